//! Exact dense search on a kernel device: the document vectors live on the device (f32), each
//! block of queries is one GEMM against the whole corpus ([queries, n_docs] scores on the
//! device) and kernels/topk.cu picks the top k of every row, so only k hits per query come back.
//! Ranking rule as `retrieval::dense` (score desc, document asc); "exact" with respect to the
//! device's f32 scores (cuBLAS may round a dot product differently from the CPU GEMM, which can
//! swap documents whose scores differ in the last bit).

use super::DBuf;
use crate::device::cpu::gemm::Trans;
use crate::device::kernels::{self as k, TOPK_MAX};
use crate::device::launch::{download, DeviceGemm, KDType, KernelDevice};
use crate::error::{Error, Result};
use crate::retrieval::dense::DenseIndex;
use crate::retrieval::Hit;

/// Scores per GEMM: queries per block are chosen so that [queries, n_docs] f32 stays under this.
const SCORE_BYTES: usize = 1 << 28;

/// A dense index uploaded to a device.
pub struct DeviceDenseIndex {
    vecs: DBuf,
    n: usize,
    dim: usize,
}

impl DeviceDenseIndex {
    /// Upload the vectors of `idx`.
    pub fn upload(dev: &dyn KernelDevice, idx: &DenseIndex) -> Result<DeviceDenseIndex> {
        Ok(DeviceDenseIndex {
            vecs: DBuf::from_f32(dev, idx.vectors(), KDType::F32)?,
            n: idx.n_docs(),
            dim: idx.dim(),
        })
    }

    /// Number of documents.
    pub fn n_docs(&self) -> usize {
        self.n
    }

    /// Top-k per query (k is capped at the number of documents and must be <= 2048).
    pub fn search(
        &self,
        dev: &dyn KernelDevice,
        queries: &[Vec<f32>],
        k: usize,
    ) -> Result<Vec<Vec<Hit>>> {
        for (i, q) in queries.iter().enumerate() {
            if q.len() != self.dim {
                return Err(Error::shape(
                    format!("dense query {i}"),
                    &[self.dim],
                    &[q.len()],
                ));
            }
        }
        let k = k.min(self.n);
        if k > TOPK_MAX {
            return Err(Error::invalid(format!(
                "device dense search: k = {k} > {TOPK_MAX}"
            )));
        }
        if k == 0 || queries.is_empty() {
            return Ok(vec![Vec::new(); queries.len()]);
        }
        let block = (SCORE_BYTES / (4 * self.n)).clamp(1, 1024);
        let mut out = Vec::with_capacity(queries.len());
        for qb in queries.chunks(block) {
            let m = qb.len();
            let flat: Vec<f32> = qb.iter().flatten().copied().collect();
            let q = DBuf::from_f32(dev, &flat, KDType::F32)?;
            let scores = DBuf::uninit(dev, m * self.n, KDType::F32)?;
            let g = DeviceGemm {
                ta: Trans::N,
                tb: Trans::T,
                m,
                k: self.dim,
                n: self.n,
                alpha: 1.0,
                beta: 0.0,
                ab: KDType::F32,
                c: KDType::F32,
            };
            let (ts, ti) = (
                DBuf::uninit(dev, m * k, KDType::F32)?,
                dev.alloc(m * k * 4)?,
            );
            // SAFETY: q m·dim, the vectors n·dim, scores m·n f32; top-k outputs m·k f32 / i32.
            unsafe {
                dev.gemm(&g, q.ptr(), self.vecs.ptr(), scores.ptr())?;
                k::topk_rows(dev, scores.ptr(), ts.ptr(), ti.ptr, m, self.n, k)?;
            }
            let s = ts.to_f32(dev)?;
            let idx = download::<i32>(dev, &ti, m * k)?;
            for r in 0..m {
                out.push(
                    (0..k)
                        .map(|j| Hit {
                            doc: idx[r * k + j] as u32,
                            score: s[r * k + j],
                        })
                        .collect(),
                );
            }
        }
        Ok(out)
    }
}
