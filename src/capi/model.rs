//! The model handle and the two compute calls: `r3_model_load` / `r3_model_free`, `r3_encode`,
//! `r3_score`, and their option structs.

use super::output::R3Output;
use super::status::{
    fork_check, fork_mark, guard, guard_void, str_arg, str_array_arg, write_out, FfiError, R3Status,
};
use crate::device::Device;
use crate::infer::{EncodeOptions, ScoreOptions};
use crate::model::config::Pooling;
use crate::model::m3::M3Model;
use std::ffi::c_char;
use std::ptr;

/// `R3_POOLING_DEFAULT`: the model directory's pooling (sentence-transformers files, else CLS).
pub const R3_POOLING_DEFAULT: i32 = 0;
/// `R3_POOLING_CLS`: the first token's hidden state.
pub const R3_POOLING_CLS: i32 = 1;
/// `R3_POOLING_MEAN`: the attention-masked mean over tokens.
pub const R3_POOLING_MEAN: i32 = 2;
/// `R3_NORMALIZE_DEFAULT`: the model directory's choice (else normalise).
pub const R3_NORMALIZE_DEFAULT: i32 = 0;
/// `R3_NORMALIZE_YES`: L2-normalise dense vectors.
pub const R3_NORMALIZE_YES: i32 = 1;
/// `R3_NORMALIZE_NO`: return raw pooled vectors.
pub const R3_NORMALIZE_NO: i32 = 2;

/// `R3_SCORE_DENSE`: index of the dense score in a pair's five `r3_score` outputs.
pub const R3_SCORE_DENSE: i32 = 0;
/// `R3_SCORE_SPARSE`: the lexical (sparse) score.
pub const R3_SCORE_SPARSE: i32 = 1;
/// `R3_SCORE_COLBERT`: the ColBERT late-interaction score.
pub const R3_SCORE_COLBERT: i32 = 2;
/// `R3_SCORE_SPARSE_DENSE`: (w_sparse·sparse + w_dense·dense) / (w_dense + w_sparse).
pub const R3_SCORE_SPARSE_DENSE: i32 = 3;
/// `R3_SCORE_COLBERT_SPARSE_DENSE`: the weighted mean of all three.
pub const R3_SCORE_COLBERT_SPARSE_DENSE: i32 = 4;
/// `R3_SCORE_COUNT`: scores per pair.
pub const R3_SCORE_COUNT: i32 = 5;

/// The default texts per forward pass (`batch_size` 0).
const DEFAULT_BATCH_SIZE: usize = 32;

/// A loaded model (`r3_model` in C, opaque).
///
/// Immutable once loaded, so one handle may serve `r3_encode` / `r3_score` from many threads at
/// once (asserted below: `M3Model` is `Send + Sync`).
#[derive(Debug)]
pub struct R3Model {
    pub(crate) model: M3Model,
}

// The header promises that a model handle may be shared across threads; this fails to compile if
// a change to the model ever makes that false.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<R3Model>();
    assert_send_sync::<R3Output>();
};

/// Options of `r3_encode` (`r3_encode_options` in C). Start from `r3_encode_options_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R3EncodeOptions {
    /// Nonzero: compute dense vectors.
    pub dense: i32,
    /// Nonzero: compute sparse lexical weights (needs the M3 heads).
    pub sparse: i32,
    /// Nonzero: compute ColBERT vectors (needs the M3 heads).
    pub colbert: i32,
    /// One of `R3_POOLING_*`.
    pub pooling: i32,
    /// One of `R3_NORMALIZE_*`.
    pub normalize: i32,
    /// Max tokens per text, specials included; 0: the model's default.
    pub max_length: usize,
    /// Texts per forward pass; 0: 32.
    pub batch_size: usize,
}

impl Default for R3EncodeOptions {
    fn default() -> Self {
        R3EncodeOptions {
            dense: 1,
            sparse: 0,
            colbert: 0,
            pooling: R3_POOLING_DEFAULT,
            normalize: R3_NORMALIZE_DEFAULT,
            max_length: 0,
            batch_size: 0,
        }
    }
}

impl R3EncodeOptions {
    /// The Rust options these stand for, or a clear error for an out-of-range field.
    pub(crate) fn to_rust(self) -> Result<EncodeOptions, FfiError> {
        if self.dense == 0 && self.sparse == 0 && self.colbert == 0 {
            return Err(FfiError::invalid(
                "r3_encode_options: nothing requested (set dense, sparse or colbert)",
            ));
        }
        let pooling = match self.pooling {
            R3_POOLING_DEFAULT => None,
            R3_POOLING_CLS => Some(Pooling::Cls),
            R3_POOLING_MEAN => Some(Pooling::Mean),
            v => {
                return Err(FfiError::invalid(format!(
                    "r3_encode_options.pooling {v}: expected R3_POOLING_DEFAULT (0), \
                     R3_POOLING_CLS (1) or R3_POOLING_MEAN (2)"
                )))
            }
        };
        let normalize = match self.normalize {
            R3_NORMALIZE_DEFAULT => None,
            R3_NORMALIZE_YES => Some(true),
            R3_NORMALIZE_NO => Some(false),
            v => {
                return Err(FfiError::invalid(format!(
                    "r3_encode_options.normalize {v}: expected R3_NORMALIZE_DEFAULT (0), \
                     R3_NORMALIZE_YES (1) or R3_NORMALIZE_NO (2)"
                )))
            }
        };
        Ok(EncodeOptions {
            dense: self.dense != 0,
            sparse: self.sparse != 0,
            colbert: self.colbert != 0,
            max_length: (self.max_length != 0).then_some(self.max_length),
            batch_size: nonzero_or(self.batch_size, DEFAULT_BATCH_SIZE),
            pooling,
            normalize,
            ..EncodeOptions::default()
        })
    }
}

/// Options of `r3_score` (`r3_score_options` in C). Start from `r3_score_options_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct R3ScoreOptions {
    /// Fusion weights `[w_dense, w_sparse, w_colbert]`: each in [0, 1e6], `w_dense + w_sparse >
    /// 0` (the sparse+dense score divides by it); the rules of `retrom3 score` / search.
    pub weights: [f32; 3],
    /// Max tokens per query, specials included; 0: 512 (FlagEmbedding's `compute_score`), or
    /// the model's max length if lower.
    pub max_query_length: usize,
    /// Max tokens per passage, specials included; 0: as `max_query_length`.
    pub max_passage_length: usize,
    /// Texts per forward pass; 0: 32.
    pub batch_size: usize,
}

impl Default for R3ScoreOptions {
    fn default() -> Self {
        R3ScoreOptions {
            weights: ScoreOptions::default().weights,
            max_query_length: 0,
            max_passage_length: 0,
            batch_size: 0,
        }
    }
}

impl R3ScoreOptions {
    /// The Rust options for `model` (0 lengths resolve to FlagEmbedding's `compute_score`
    /// default, 512, capped at the model's max length, as the library and `retrom3 score`).
    pub(crate) fn to_rust(self) -> ScoreOptions {
        ScoreOptions {
            max_query_length: (self.max_query_length != 0).then_some(self.max_query_length),
            max_passage_length: (self.max_passage_length != 0).then_some(self.max_passage_length),
            weights: self.weights,
            batch_size: nonzero_or(self.batch_size, DEFAULT_BATCH_SIZE),
        }
    }
}

fn nonzero_or(v: usize, default: usize) -> usize {
    if v == 0 {
        default
    } else {
        v
    }
}

/// Borrow a model handle argument.
///
/// # Safety
/// `p` is NULL or a live handle from `r3_model_load`.
pub(crate) unsafe fn model_arg<'a>(p: *const R3Model) -> Result<&'a M3Model, FfiError> {
    // SAFETY: NULL or a live handle (from Box::into_raw in r3_model_load) per the contract.
    unsafe { p.as_ref() }
        .map(|m| &m.model)
        .ok_or_else(|| FfiError::null("model"))
}

/// Fill `opts` with the defaults: dense only, the model's pooling, normalisation and max length,
/// 32 texts per batch.
///
/// # Safety
/// `opts` is NULL or valid for a write of `r3_encode_options`.
#[no_mangle]
pub unsafe extern "C" fn r3_encode_options_init(opts: *mut R3EncodeOptions) -> R3Status {
    // SAFETY: forwarded contract.
    guard(|| unsafe { write_out(opts, R3EncodeOptions::default(), "opts") })
}

/// Fill `opts` with the defaults: weights [1, 1, 1], lengths 0 (512, or the model's max length
/// if lower), 32 texts per batch.
///
/// # Safety
/// `opts` is NULL or valid for a write of `r3_score_options`.
#[no_mangle]
pub unsafe extern "C" fn r3_score_options_init(opts: *mut R3ScoreOptions) -> R3Status {
    // SAFETY: forwarded contract.
    guard(|| unsafe { write_out(opts, R3ScoreOptions::default(), "opts") })
}

/// Load a model directory (Hugging Face / FlagEmbedding layout) on `device` ("cpu", "cuda",
/// "cuda:N", or "emu" in builds with the emulator; NULL means "cpu"). On success `*out` owns a new handle (free it with
/// `r3_model_free`); on failure `*out` is NULL.
///
/// # Safety
/// `dir` and `device` are NULL or NUL-terminated strings; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn r3_model_load(
    dir: *const c_char,
    device: *const c_char,
    out: *mut *mut R3Model,
) -> R3Status {
    guard(|| {
        // SAFETY: forwarded contract; NULL is rejected inside.
        unsafe { write_out(out, ptr::null_mut(), "out") }?;
        // SAFETY: forwarded contract.
        let dir = unsafe { str_arg(dir, "dir") }?;
        let device: Device = if device.is_null() {
            Device::Cpu
        } else {
            // SAFETY: forwarded contract.
            unsafe { str_arg(device, "device") }?.parse()?
        };
        let model = M3Model::load(dir, device)?;
        let handle = Box::into_raw(Box::new(R3Model { model }));
        // SAFETY: `out` was checked non-null and writable above.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Free a model handle. NULL is a no-op. The handle must not be in use by another thread and
/// must not be used again.
///
/// # Safety
/// `model` is NULL or a live handle from `r3_model_load`, not freed before.
#[no_mangle]
pub unsafe extern "C" fn r3_model_free(model: *mut R3Model) {
    guard_void(|| {
        if !model.is_null() {
            // SAFETY: a live handle from Box::into_raw in r3_model_load, freed once per contract.
            drop(unsafe { Box::from_raw(model) });
        }
    })
}

/// Encode `n` texts. On success `*out` owns a new output (free it with `r3_output_free`); on
/// failure `*out` is NULL. `options` NULL means the defaults of `r3_encode_options_init`.
///
/// # Safety
/// `model` is NULL or a live handle; `texts` is NULL (only valid when `n` is 0) or points to `n`
/// pointers, each NULL or a NUL-terminated string; `options` is NULL or points to an
/// `r3_encode_options`; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn r3_encode(
    model: *const R3Model,
    texts: *const *const c_char,
    n: usize,
    options: *const R3EncodeOptions,
    out: *mut *mut R3Output,
) -> R3Status {
    guard(|| {
        // SAFETY: forwarded contract; NULL is rejected inside.
        unsafe { write_out(out, ptr::null_mut(), "out") }?;
        // SAFETY: forwarded contract.
        let model = unsafe { model_arg(model) }?;
        // SAFETY: forwarded contract.
        let texts = unsafe { str_array_arg(texts, n, "texts") }?;
        // SAFETY: NULL or a readable r3_encode_options per the contract (plain data, Copy).
        let opts = unsafe { options.as_ref() }
            .copied()
            .unwrap_or_default()
            .to_rust()?;
        fork_check()?;
        let enc = model.encode(&texts, &opts);
        fork_mark(&enc);
        let enc = enc?;
        let output = R3Output::from_encode(model, texts.len(), enc)?;
        // SAFETY: `out` was checked non-null and writable above.
        unsafe { out.write(Box::into_raw(Box::new(output))) };
        Ok(())
    })
}

/// Score `n` (query, passage) pairs: `queries[i]` with `passages[i]`. On success `out5[5*i..5*i+5]`
/// holds pair i's dense, sparse, colbert, sparse+dense and colbert+sparse+dense scores (the
/// `R3_SCORE_*` indices); on failure `out5` is left unchanged. `options` NULL means the defaults
/// of `r3_score_options_init`. Needs the M3 heads.
///
/// # Safety
/// `model` is NULL or a live handle; `queries` and `passages` are NULL (only valid when `n` is 0)
/// or point to `n` pointers, each NULL or a NUL-terminated string; `options` is NULL or points to
/// an `r3_score_options`; `out5` is NULL (only valid when `n` is 0) or valid for writes of
/// `5 * n` floats.
#[no_mangle]
pub unsafe extern "C" fn r3_score(
    model: *const R3Model,
    queries: *const *const c_char,
    passages: *const *const c_char,
    n: usize,
    options: *const R3ScoreOptions,
    out5: *mut f32,
) -> R3Status {
    guard(|| {
        // SAFETY: forwarded contract.
        let model = unsafe { model_arg(model) }?;
        // SAFETY: forwarded contract.
        let queries = unsafe { str_array_arg(queries, n, "queries") }?;
        // SAFETY: forwarded contract.
        let passages = unsafe { str_array_arg(passages, n, "passages") }?;
        if n > 0 && out5.is_null() {
            return Err(FfiError::null("out5"));
        }
        let len = n
            .checked_mul(5)
            .filter(|&l| l <= isize::MAX as usize / std::mem::size_of::<f32>())
            .ok_or_else(|| FfiError::invalid(format!("n {n} is too large")))?;
        // SAFETY: NULL or a readable r3_score_options per the contract (plain data, Copy).
        let raw = unsafe { options.as_ref() }.copied().unwrap_or_default();
        if raw.weights == [0.0; 3] {
            return Err(FfiError::invalid(
                "r3_score_options.weights are all 0 (a zero-filled struct?): fill the options \
                 with r3_score_options_init first, then change fields",
            ));
        }
        let opts = raw.to_rust();
        let pairs: Vec<(&str, &str)> = queries.into_iter().zip(passages).collect();
        fork_check()?;
        let scores = model.compute_score(&pairs, &opts);
        fork_mark(&scores);
        let scores = scores?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: non-null (checked), valid for `5 * n` float writes per the contract, size
        // checked above; written only now, after every fallible step.
        let dst = unsafe { std::slice::from_raw_parts_mut(out5, len) };
        for (row, s) in dst.chunks_exact_mut(5).zip(&scores) {
            row.copy_from_slice(&[
                s.dense,
                s.sparse,
                s.colbert,
                s.sparse_dense,
                s.colbert_sparse_dense,
            ]);
        }
        Ok(())
    })
}
