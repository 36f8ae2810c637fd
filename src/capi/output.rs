//! The output handle of `r3_encode` and its read-only accessors. The handle owns flat, C-ready
//! copies (dense rows contiguous, per-text id and weight arrays, per-text ColBERT blocks), so an
//! accessor only hands out pointers into it.

use super::status::{guard, guard_void, write_out, FfiError, FfiResult, R3Status};
use crate::error::Error;
use crate::infer::EncodeOutput;
use crate::model::m3::M3Model;
use std::ptr;

/// The encoded texts (`r3_output` in C, opaque). Immutable once built: any number of threads may
/// read it at once; only `r3_output_free` needs exclusive access.
#[derive(Debug)]
pub struct R3Output {
    count: usize,
    /// Row-major `count x dim`.
    dense: Option<Matrix>,
    /// Per text: ids sorted ascending, weights > 0.
    sparse: Option<Vec<Sparse>>,
    /// Per text: row-major `tokens x dim`.
    colbert: Option<Vec<Matrix>>,
}

#[derive(Debug)]
struct Matrix {
    data: Vec<f32>,
    rows: usize,
    dim: usize,
}

#[derive(Debug)]
struct Sparse {
    ids: Vec<u32>,
    weights: Vec<f32>,
}

impl Matrix {
    /// Flatten equal-length rows; `dim` is used when there are no rows.
    fn from_rows(rows: &[Vec<f32>], dim: usize, what: &str) -> crate::Result<Matrix> {
        let dim = rows.first().map_or(dim, Vec::len);
        if let Some(r) = rows.iter().find(|r| r.len() != dim) {
            return Err(Error::shape(what, &[dim], &[r.len()]));
        }
        Ok(Matrix {
            data: rows.concat(),
            rows: rows.len(),
            dim,
        })
    }
}

impl R3Output {
    /// Convert an [`EncodeOutput`] of `count` texts into the C layout.
    pub(crate) fn from_encode(
        model: &M3Model,
        count: usize,
        out: EncodeOutput,
    ) -> FfiResult<R3Output> {
        let hidden = model.encoder.config.hidden_size;
        let colbert_dim = model
            .heads
            .as_ref()
            .and_then(|h| h.colbert_weight.dims().first().copied())
            .unwrap_or(hidden);
        let dense = out
            .dense
            .map(|d| Matrix::from_rows(&d, hidden, "dense output"))
            .transpose()?;
        let sparse = out.sparse.map(|s| {
            s.into_iter()
                .map(|lw| Sparse {
                    ids: lw.iter().map(|e| e.0).collect(),
                    weights: lw.iter().map(|e| e.1).collect(),
                })
                .collect()
        });
        let colbert = out
            .colbert
            .map(|c| {
                c.iter()
                    .map(|v| Matrix::from_rows(v, colbert_dim, "colbert output"))
                    .collect::<crate::Result<Vec<_>>>()
            })
            .transpose()?;
        Ok(R3Output {
            count,
            dense,
            sparse,
            colbert,
        })
    }
}

/// Borrow an output handle argument.
///
/// # Safety
/// `p` is NULL or a live handle from `r3_encode`.
unsafe fn output_arg<'a>(p: *const R3Output) -> FfiResult<&'a R3Output> {
    // SAFETY: NULL or a live handle (from Box::into_raw in r3_encode) per the contract.
    unsafe { p.as_ref() }.ok_or_else(|| FfiError::null("output"))
}

fn not_requested(what: &str) -> FfiError {
    FfiError::new(
        R3Status::NotRequested,
        format!("{what} was not requested in r3_encode_options"),
    )
}

fn check_index(o: &R3Output, i: usize) -> FfiResult<()> {
    if i >= o.count {
        return Err(FfiError::new(
            R3Status::OutOfRange,
            format!(
                "text index {i} out of range (the output has {} texts)",
                o.count
            ),
        ));
    }
    Ok(())
}

/// NULL for an empty array (C callers test pointers, not lengths), else the data.
fn data_ptr<T>(v: &[T]) -> *const T {
    if v.is_empty() {
        ptr::null()
    } else {
        v.as_ptr()
    }
}

/// Number of texts in `output` (the `n` given to `r3_encode`).
///
/// # Safety
/// `output` is NULL or a live handle; `n` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn r3_output_count(output: *const R3Output, n: *mut usize) -> R3Status {
    guard(|| {
        // SAFETY: forwarded contract.
        let o = unsafe { output_arg(output) }?;
        // SAFETY: forwarded contract.
        unsafe { write_out(n, o.count, "n") }
    })
}

/// The dense vectors: `*data` points to `n x dim` floats, row-major, row i for text i (NULL when
/// `n` is 0). The memory belongs to `output` and lives until `r3_output_free`.
///
/// # Safety
/// `output` is NULL or a live handle; `data`, `n`, `dim` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn r3_output_dense(
    output: *const R3Output,
    data: *mut *const f32,
    n: *mut usize,
    dim: *mut usize,
) -> R3Status {
    guard(|| {
        // SAFETY: forwarded contract.
        let o = unsafe { output_arg(output) }?;
        if data.is_null() || n.is_null() || dim.is_null() {
            return Err(FfiError::null("an out-pointer (data, n or dim)"));
        }
        let d = o.dense.as_ref().ok_or_else(|| not_requested("dense"))?;
        // SAFETY: all three checked non-null, writable per the contract.
        unsafe {
            data.write(data_ptr(&d.data));
            n.write(d.rows);
            dim.write(d.dim);
        }
        Ok(())
    })
}

/// Text `i`'s lexical weights: `*len` pairs, `(*ids)[k]` with `(*weights)[k]`, ids ascending,
/// weights > 0, special tokens dropped (both NULL when `len` is 0). The memory belongs to `output`
/// and lives until `r3_output_free`.
///
/// # Safety
/// `output` is NULL or a live handle; `ids`, `weights`, `len` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn r3_output_sparse(
    output: *const R3Output,
    i: usize,
    ids: *mut *const u32,
    weights: *mut *const f32,
    len: *mut usize,
) -> R3Status {
    guard(|| {
        // SAFETY: forwarded contract.
        let o = unsafe { output_arg(output) }?;
        if ids.is_null() || weights.is_null() || len.is_null() {
            return Err(FfiError::null("an out-pointer (ids, weights or len)"));
        }
        let s = o.sparse.as_ref().ok_or_else(|| not_requested("sparse"))?;
        check_index(o, i)?;
        let s = &s[i];
        // SAFETY: all three checked non-null, writable per the contract.
        unsafe {
            ids.write(data_ptr(&s.ids));
            weights.write(data_ptr(&s.weights));
            len.write(s.ids.len());
        }
        Ok(())
    })
}

/// Text `i`'s ColBERT vectors: `*data` points to `count x dim` floats, row-major, one normalised
/// row per token after CLS (`</s>` included). The memory belongs to `output` and lives until
/// `r3_output_free`.
///
/// # Safety
/// `output` is NULL or a live handle; `data`, `count`, `dim` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn r3_output_colbert(
    output: *const R3Output,
    i: usize,
    data: *mut *const f32,
    count: *mut usize,
    dim: *mut usize,
) -> R3Status {
    guard(|| {
        // SAFETY: forwarded contract.
        let o = unsafe { output_arg(output) }?;
        if data.is_null() || count.is_null() || dim.is_null() {
            return Err(FfiError::null("an out-pointer (data, count or dim)"));
        }
        let c = o.colbert.as_ref().ok_or_else(|| not_requested("colbert"))?;
        check_index(o, i)?;
        let m = &c[i];
        // SAFETY: all three checked non-null, writable per the contract.
        unsafe {
            data.write(data_ptr(&m.data));
            count.write(m.rows);
            dim.write(m.dim);
        }
        Ok(())
    })
}

/// Free an output and every array its accessors returned. NULL is a no-op. No other thread may
/// be reading it, and neither it nor those arrays may be used again.
///
/// # Safety
/// `output` is NULL or a live handle from `r3_encode`, not freed before.
#[no_mangle]
pub unsafe extern "C" fn r3_output_free(output: *mut R3Output) {
    guard_void(|| {
        if !output.is_null() {
            // SAFETY: a live handle from Box::into_raw in r3_encode, freed once per contract.
            drop(unsafe { Box::from_raw(output) });
        }
    })
}
