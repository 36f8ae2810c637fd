//! Stored ColBERT vectors (f16) and MaxSim re-ranking: score(q, d) = (1/n_q) Σ_i max_j ⟨q_i, d_j⟩
//! over the real vectors (SPEC 3.3, the per-pair `colbert_score`). f16 halves the store (the
//! vectors are unit-norm, so f16's 11-bit mantissa costs ~1e-3 in a score); the products run in
//! f32 through the GEMM.

use super::index_format::{Buf, Container, SectionData};
use crate::device::cpu::gemm::{sgemm, Trans};
use crate::error::{Error, Result};
use half::f16;

/// Per-document multi-vectors: `offsets[d]..offsets[d+1]` rows of `vecs` (`[rows, dim]`, f16).
#[derive(Clone, Debug)]
pub struct ColbertStore {
    dim: usize,
    offsets: Buf<u64>,
    vecs: Buf<f16>,
}

impl ColbertStore {
    /// Build from each document's vectors (stored as f16: a value outside f16's range, or not
    /// finite, is an error, not an infinite score later).
    pub fn build(docs: &[Vec<Vec<f32>>]) -> Result<ColbertStore> {
        let dim = docs.iter().flatten().next().map_or(0, Vec::len);
        let mut offsets = Vec::with_capacity(docs.len() + 1);
        offsets.push(0u64);
        let mut vecs = Vec::new();
        for (i, d) in docs.iter().enumerate() {
            for v in d {
                if v.len() != dim {
                    return Err(Error::shape(
                        format!("ColBERT vector of document {i}"),
                        &[dim],
                        &[v.len()],
                    ));
                }
                if let Some(x) = v.iter().find(|x| !f16::from_f32(**x).is_finite()) {
                    return Err(Error::NonFinite(format!(
                        "ColBERT vector of document {i}: {x} is outside f16's range (vectors \
                         are stored as f16; the model's are normalised)"
                    )));
                }
                vecs.extend(v.iter().map(|&x| f16::from_f32(x)));
            }
            offsets.push(offsets[i] + d.len() as u64);
        }
        Ok(ColbertStore {
            dim,
            offsets: offsets.into(),
            vecs: vecs.into(),
        })
    }

    /// From already flattened parts (`offsets[0] == 0`, `vecs.len() == offsets.last() * dim`).
    pub fn from_parts(dim: usize, offsets: Vec<u64>, vecs: Vec<f16>) -> Result<ColbertStore> {
        if offsets.first() != Some(&0)
            || offsets.windows(2).any(|w| w[0] > w[1])
            || offsets.last().copied().unwrap_or(0) as usize * dim != vecs.len()
        {
            return Err(Error::invalid("ColBERT store: inconsistent offsets"));
        }
        Ok(ColbertStore {
            dim,
            offsets: offsets.into(),
            vecs: vecs.into(),
        })
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of documents.
    pub fn n_docs(&self) -> usize {
        self.offsets.len() - 1
    }

    /// MaxSim score of each candidate document for one query (`q`: the query's vectors).
    pub fn maxsim(&self, q: &[Vec<f32>], docs: &[u32]) -> Result<Vec<f32>> {
        if let Some(&d) = docs.iter().find(|&&d| d as usize >= self.n_docs()) {
            return Err(Error::invalid(format!(
                "document number {d} is outside the store's {} documents",
                self.n_docs()
            )));
        }
        if q.is_empty() {
            return Ok(vec![0.0; docs.len()]);
        }
        if let Some(v) = q.iter().find(|v| v.len() != self.dim) {
            return Err(Error::shape(
                "ColBERT query vector",
                &[self.dim],
                &[v.len()],
            ));
        }
        let nq = q.len();
        let qflat: Vec<f32> = q.iter().flatten().copied().collect();
        let mut dbuf = Vec::new();
        let mut sims = Vec::new();
        Ok(docs
            .iter()
            .map(|&d| {
                let (a, b) = (
                    self.offsets[d as usize] as usize,
                    self.offsets[d as usize + 1] as usize,
                );
                let nd = b - a;
                if nd == 0 {
                    return 0.0;
                }
                dbuf.clear();
                dbuf.extend(
                    self.vecs[a * self.dim..b * self.dim]
                        .iter()
                        .map(|x| x.to_f32()),
                );
                sims.resize(nq * nd, 0.0);
                sgemm(
                    Trans::N,
                    Trans::T,
                    nq,
                    self.dim,
                    nd,
                    1.0,
                    &qflat,
                    &dbuf,
                    0.0,
                    &mut sims,
                );
                let total: f64 = sims
                    .chunks(nd)
                    .map(|row| row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64)
                    .sum();
                (total / nq as f64) as f32
            })
            .collect())
    }

    /// Sections to persist.
    pub fn sections(&self) -> Vec<SectionData<'_>> {
        vec![
            SectionData::array("colbert.offsets", &self.offsets),
            SectionData::array("colbert.vectors", &self.vecs),
        ]
    }

    /// Load and validate against the metadata.
    pub fn from_container(c: &Container, n_docs: usize, dim: usize) -> Result<ColbertStore> {
        let offsets: Buf<u64> = c.array("colbert.offsets")?;
        let vecs: Buf<f16> = c.array("colbert.vectors")?;
        if offsets.len() != n_docs + 1 || offsets[0] != 0 {
            return Err(c.err(
                "colbert.offsets",
                format!("{} entries, expected {}", offsets.len(), n_docs + 1),
            ));
        }
        if offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(c.err("colbert.offsets", "not monotone"));
        }
        let rows = offsets[n_docs];
        if (rows as u128) * (dim as u128) != vecs.len() as u128 {
            return Err(c.err(
                "colbert.vectors",
                format!("{} values, expected {rows} rows × {dim}", vecs.len()),
            ));
        }
        if vecs.iter().any(|x| !x.is_finite()) {
            return Err(c.err("colbert.vectors", "non-finite value"));
        }
        Ok(ColbertStore { dim, offsets, vecs })
    }
}
