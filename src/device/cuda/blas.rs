//! cuBLAS GEMMs on the device's stream, in the crate's row-major convention.
//!
//! Our matrices are row-major and contiguous, cuBLAS's column-major. A row-major `X[r, c]` is,
//! byte for byte, the column-major `Xᵀ[c, r]` with leading dimension `c`. So for the row-major
//! product `C[m,n] = op(A)[m,k] · op(B)[k,n]` we ask cuBLAS for the column-major product
//! `Cᵀ[n,m] = op(B)ᵀ[n,k] · op(A)ᵀ[k,m]`: the operands are swapped (B first), the transposes keep
//! their flags, and the leading dimensions are the row lengths as stored:
//!
//! | row-major operand        | cuBLAS operand | op | leading dimension |
//! |--------------------------|----------------|----|-------------------|
//! | B [k,n] (`Trans::N`)     | first          | N  | n                 |
//! | B [n,k] (`Trans::T`)     | first          | T  | k                 |
//! | A [m,k] (`Trans::N`)     | second         | N  | k                 |
//! | A [k,m] (`Trans::T`)     | second         | T  | m                 |
//! | C [m,n]                  | result         |    | n (cuBLAS m = n, n = m) |
//!
//! `gemm_bf16` stores A, B and C as bf16 and accumulates in f32 (cublasGemmEx with
//! CUBLAS_COMPUTE_32F, tensor cores); `gemm_f32` is cublasSgemm (f32 throughout; no TF32 unless
//! the environment enables it, e.g. NVIDIA_TF32_OVERRIDE).

use super::driver_error;
use crate::device::cpu::gemm::Trans;
use crate::device::launch::{DevPtr, DeviceGemm, KDType};
use crate::error::{Error, Result};
use cudarc::cublas::{result as cublas, sys as blas_sys, CudaBlas};
use cudarc::driver::CudaStream;
use std::ffi::{c_int, c_void};
use std::sync::Arc;

/// A cuBLAS handle bound to one `CudaDevice`'s stream.
pub struct Blas {
    inner: CudaBlas,
    stream: Arc<CudaStream>,
}

/// cuBLAS dimensions and operand order for a row-major product (see the module table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColMajorGemm {
    pub transa: Trans,
    pub transb: Trans,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Leading dimension of cuBLAS's first operand (our B).
    pub lda: usize,
    /// Leading dimension of cuBLAS's second operand (our A).
    pub ldb: usize,
    pub ldc: usize,
}

/// The column-major call that computes row-major `C[m,n] = op(A) · op(B)`.
pub fn col_major(ta: Trans, tb: Trans, m: usize, k: usize, n: usize) -> ColMajorGemm {
    ColMajorGemm {
        transa: tb,
        transb: ta,
        m: n,
        n: m,
        k,
        lda: if tb == Trans::N { n } else { k },
        ldb: if ta == Trans::N { k } else { m },
        ldc: n,
    }
}

fn op(t: Trans) -> blas_sys::cublasOperation_t {
    match t {
        Trans::N => blas_sys::cublasOperation_t::CUBLAS_OP_N,
        Trans::T => blas_sys::cublasOperation_t::CUBLAS_OP_T,
    }
}

fn dim(v: usize, what: &str) -> Result<c_int> {
    c_int::try_from(v.max(1))
        .map_err(|_| Error::invalid(format!("gemm {what} = {v} exceeds cuBLAS's int")))
}

fn blas_error(what: &str, e: cublas::CublasError) -> Error {
    Error::Cuda {
        op: what.to_string(),
        msg: format!("{e:?}"),
    }
}

impl Blas {
    /// A handle on `stream`; an error text (not a panic) when libcublas cannot be loaded.
    pub(super) fn new(stream: &Arc<CudaStream>) -> std::result::Result<Blas, String> {
        // SAFETY: only tries to dlopen libcublas under cudarc's candidate names and closes it.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(format!(
                "libcublas could not be loaded (looked for {}); put the CUDA toolkit's lib64 or \
                 PyTorch's nvidia/cublas/lib on LD_LIBRARY_PATH",
                cudarc::get_lib_name_candidates("cublas")
                    .iter()
                    .filter(|c| c.starts_with("libcublas.so"))
                    .take(2)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("cuCtxSetCurrent", e).to_string())?;
        CudaBlas::new(Arc::clone(stream))
            .map(|inner| Blas {
                inner,
                stream: Arc::clone(stream),
            })
            .map_err(|e| format!("cublasCreate failed: {e:?}"))
    }

    fn bind(&self) -> Result<()> {
        // cuBLAS runs on the calling thread's current context.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("cuCtxSetCurrent", e))
    }

    /// Row-major `C[m,n] = alpha · op(A) · op(B) + beta · C`, f32 storage and arithmetic
    /// (cublasSgemm). `op(A)` is A [m,k] or Aᵀ with A stored [k,m]; likewise B; the same
    /// convention as `cpu::gemm::sgemm`.
    ///
    /// # Safety
    /// a, b and c must address live device memory of this device holding m·k, k·n and m·n f32,
    /// and c must not overlap a or b.
    pub unsafe fn gemm_f32(
        &self,
        ta: Trans,
        tb: Trans,
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: DevPtr,
        b: DevPtr,
        beta: f32,
        c: DevPtr,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let g = col_major(ta, tb, m, k, n);
        self.bind()?;
        // SAFETY: the caller guarantees the operand sizes; `g` maps our row-major product onto
        // cuBLAS's column-major one (module table); alpha and beta are host scalars (the
        // handle's default pointer mode); the handle queues the work on the device's stream.
        unsafe {
            cublas::sgemm(
                *self.inner.handle(),
                op(g.transa),
                op(g.transb),
                dim(g.m, "n")?,
                dim(g.n, "m")?,
                dim(g.k, "k")?,
                &alpha,
                b.0 as *const f32,
                dim(g.lda, "ld")?,
                a.0 as *const f32,
                dim(g.ldb, "ld")?,
                &beta,
                c.0 as *mut f32,
                dim(g.ldc, "ld")?,
            )
        }
        .map_err(|e| blas_error(&format!("cublasSgemm {m}x{k}x{n}"), e))
    }

    /// Row-major `C[m,n] = alpha · op(A) · op(B) + beta · C` with A, B, C stored as bf16 and f32
    /// accumulation (cublasGemmEx, CUBLAS_COMPUTE_32F). Conventions as [`Blas::gemm_f32`].
    ///
    /// # Safety
    /// a, b and c must address live device memory of this device holding m·k, k·n and m·n bf16,
    /// and c must not overlap a or b.
    pub unsafe fn gemm_bf16(
        &self,
        ta: Trans,
        tb: Trans,
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: DevPtr,
        b: DevPtr,
        beta: f32,
        c: DevPtr,
    ) -> Result<()> {
        let bf16 = blas_sys::cudaDataType_t::CUDA_R_16BF;
        // SAFETY: forwarded contract.
        unsafe { self.gemm_ex_bf16(ta, tb, m, k, n, alpha, a, b, beta, c, bf16) }
    }

    /// cublasGemmEx with bf16 A and B, C of type `c_type`, f32 compute (row-major convention of
    /// [`Blas::gemm_f32`]).
    ///
    /// # Safety
    /// As [`Blas::gemm_f32`], with A, B bf16 and C of `c_type`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_ex_bf16(
        &self,
        ta: Trans,
        tb: Trans,
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: DevPtr,
        b: DevPtr,
        beta: f32,
        c: DevPtr,
        c_type: blas_sys::cudaDataType_t,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let g = col_major(ta, tb, m, k, n);
        let bf16 = blas_sys::cudaDataType_t::CUDA_R_16BF;
        self.bind()?;
        // SAFETY: as in gemm_f32; with CUBLAS_COMPUTE_32F, alpha and beta are f32 host scalars.
        unsafe {
            cublas::gemm_ex(
                *self.inner.handle(),
                op(g.transa),
                op(g.transb),
                dim(g.m, "n")?,
                dim(g.n, "m")?,
                dim(g.k, "k")?,
                (&alpha as *const f32).cast::<c_void>(),
                b.0 as *const c_void,
                bf16,
                dim(g.lda, "ld")?,
                a.0 as *const c_void,
                bf16,
                dim(g.ldb, "ld")?,
                (&beta as *const f32).cast::<c_void>(),
                c.0 as *mut c_void,
                c_type,
                dim(g.ldc, "ld")?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            blas_error(
                &format!("cublasGemmEx bf16 {m}x{k}x{n} ({c_type:?} out)"),
                e,
            )
        })
    }
}

impl Blas {
    /// Any [`DeviceGemm`]: f32 x f32 -> f32 (cublasSgemm), bf16 x bf16 -> bf16 or -> f32
    /// (cublasGemmEx, f32 compute; the f32 output accumulates parameter gradients).
    ///
    /// # Safety
    /// As [`Blas::gemm_f32`], with the storage types of `g`.
    pub unsafe fn gemm(&self, g: &DeviceGemm, a: DevPtr, b: DevPtr, c: DevPtr) -> Result<()> {
        let (ta, tb, m, k, n) = (g.ta, g.tb, g.m, g.k, g.n);
        match (g.ab, g.c) {
            // SAFETY: forwarded contract.
            (KDType::F32, KDType::F32) => unsafe {
                self.gemm_f32(ta, tb, m, k, n, g.alpha, a, b, g.beta, c)
            },
            // SAFETY: forwarded contract.
            (KDType::BF16, KDType::BF16) => unsafe {
                self.gemm_bf16(ta, tb, m, k, n, g.alpha, a, b, g.beta, c)
            },
            // SAFETY: forwarded contract, C stored f32 (a supported output of bf16 inputs under
            // CUBLAS_COMPUTE_32F).
            (KDType::BF16, KDType::F32) => unsafe {
                self.gemm_ex_bf16(
                    ta,
                    tb,
                    m,
                    k,
                    n,
                    g.alpha,
                    a,
                    b,
                    g.beta,
                    c,
                    blas_sys::cudaDataType_t::CUDA_R_32F,
                )
            },
            (ab, cd) => Err(Error::Unsupported {
                op: format!(
                    "GEMM with {} inputs and {} output",
                    ab.suffix(),
                    cd.suffix()
                ),
                device: "cuda".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cpu::gemm::sgemm_reference;

    /// Emulate cuBLAS's column-major GEMM on host memory, then check that `col_major` makes it
    /// compute our row-major product for every transpose combination.
    fn colmajor_gemm(g: &ColMajorGemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        let at = |i: usize, p: usize| match g.transa {
            Trans::N => a[i + p * g.lda],
            Trans::T => a[p + i * g.lda],
        };
        let bt = |p: usize, j: usize| match g.transb {
            Trans::N => b[p + j * g.ldb],
            Trans::T => b[j + p * g.ldb],
        };
        for j in 0..g.n {
            for i in 0..g.m {
                c[i + j * g.ldc] = (0..g.k).map(|p| at(i, p) * bt(p, j)).sum();
            }
        }
    }

    #[test]
    fn row_major_maps_onto_column_major() {
        let (m, k, n) = (5, 3, 4);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
        for ta in [Trans::N, Trans::T] {
            for tb in [Trans::N, Trans::T] {
                let mut want = vec![0f32; m * n];
                sgemm_reference(ta, tb, m, k, n, 1.0, &a, &b, 0.0, &mut want);
                let g = col_major(ta, tb, m, k, n);
                let mut got = vec![0f32; m * n];
                // cuBLAS's first operand is our B, its second our A.
                colmajor_gemm(&g, &b, &a, &mut got);
                for (x, y) in got.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-5, "{ta:?} {tb:?}: {got:?} vs {want:?}");
                }
            }
        }
    }
}
