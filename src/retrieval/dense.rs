//! Exact inner-product search over stored dense vectors: blocked GEMM (queries × a block of
//! documents) and a per-query top-k heap. The block keeps the score tile in cache
//! (`QUERY_BLOCK × DOC_BLOCK` f32 = 1 MiB) while the GEMM streams the document vectors once per
//! query block.

use super::index_format::{Buf, Container, SectionData};
use super::{top_k_of, Hit};
use crate::device::cpu::gemm::{sgemm, Trans};
use crate::error::{Error, Result};

const DOC_BLOCK: usize = 4096;
const QUERY_BLOCK: usize = 64;

/// Row-major `[n_docs, dim]` f32 document vectors.
#[derive(Clone, Debug)]
pub struct DenseIndex {
    dim: usize,
    vecs: Buf<f32>,
}

impl DenseIndex {
    /// Build from one vector per document (all of the same dimension).
    pub fn build(vecs: &[Vec<f32>]) -> Result<DenseIndex> {
        let dim = vecs.first().map_or(0, Vec::len);
        let mut flat = Vec::with_capacity(vecs.len() * dim);
        for (i, v) in vecs.iter().enumerate() {
            if v.len() != dim {
                return Err(Error::shape(
                    format!("dense vector of document {i}"),
                    &[dim],
                    &[v.len()],
                ));
            }
            flat.extend_from_slice(v);
        }
        Ok(DenseIndex {
            dim,
            vecs: flat.into(),
        })
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of documents.
    pub fn n_docs(&self) -> usize {
        self.vecs.len().checked_div(self.dim).unwrap_or(0)
    }

    /// All stored vectors, row-major [n_docs, dim].
    pub fn vectors(&self) -> &[f32] {
        &self.vecs
    }

    /// The stored vector of a document.
    pub fn vector(&self, doc: u32) -> &[f32] {
        &self.vecs[doc as usize * self.dim..(doc as usize + 1) * self.dim]
    }

    /// Inner products of `q` with the given documents (a query of another dimension, or a
    /// document number past the index, is an error).
    pub fn score_docs(&self, q: &[f32], docs: &[u32]) -> Result<Vec<f32>> {
        if q.len() != self.dim {
            return Err(Error::shape("dense query vector", &[self.dim], &[q.len()]));
        }
        if let Some(&d) = docs.iter().find(|&&d| d as usize >= self.n_docs()) {
            return Err(Error::invalid(format!(
                "document number {d} is outside the index's {} documents",
                self.n_docs()
            )));
        }
        Ok(docs
            .iter()
            .map(|&d| crate::infer::dense_score(q, self.vector(d)))
            .collect())
    }

    /// Exact top-k per query (score desc, then document number asc).
    pub fn search(&self, queries: &[Vec<f32>], k: usize) -> Result<Vec<Vec<Hit>>> {
        for (i, q) in queries.iter().enumerate() {
            if q.len() != self.dim {
                return Err(Error::shape(
                    format!("dense query {i}"),
                    &[self.dim],
                    &[q.len()],
                ));
            }
        }
        let n = self.n_docs();
        let mut out = Vec::with_capacity(queries.len());
        let mut tile = vec![0f32; QUERY_BLOCK * DOC_BLOCK];
        for qb in queries.chunks(QUERY_BLOCK) {
            let m = qb.len();
            let qflat: Vec<f32> = qb.iter().flatten().copied().collect();
            let mut heaps: Vec<super::TopK> = (0..m).map(|_| super::TopK::new(k)).collect();
            for start in (0..n).step_by(DOC_BLOCK) {
                let nb = DOC_BLOCK.min(n - start);
                let docs = &self.vecs[start * self.dim..(start + nb) * self.dim];
                let c = &mut tile[..m * nb];
                sgemm(
                    Trans::N,
                    Trans::T,
                    m,
                    self.dim,
                    nb,
                    1.0,
                    &qflat,
                    docs,
                    0.0,
                    c,
                );
                for (qi, heap) in heaps.iter_mut().enumerate() {
                    for (j, &s) in c[qi * nb..(qi + 1) * nb].iter().enumerate() {
                        heap.push((start + j) as u32, s);
                    }
                }
            }
            out.extend(heaps.into_iter().map(super::TopK::into_sorted));
        }
        Ok(out)
    }

    /// Brute force (f64 dot per document), the oracle in tests.
    pub fn search_brute(&self, q: &[f32], k: usize) -> Vec<Hit> {
        let scores: Vec<f32> = (0..self.n_docs() as u32)
            .map(|d| crate::infer::dense_score(q, self.vector(d)))
            .collect();
        top_k_of(&scores, k)
    }

    /// Sections to persist.
    pub fn sections(&self) -> Vec<SectionData<'_>> {
        vec![SectionData::array("dense.vectors", &self.vecs)]
    }

    /// Load and validate against the metadata.
    pub fn from_container(c: &Container, n_docs: usize, dim: usize) -> Result<DenseIndex> {
        let vecs: Buf<f32> = c.array("dense.vectors")?;
        if Some(vecs.len()) != n_docs.checked_mul(dim) {
            return Err(c.err(
                "dense.vectors",
                format!("{} floats, expected {n_docs} × {dim}", vecs.len()),
            ));
        }
        if vecs.iter().any(|x| !x.is_finite()) {
            return Err(c.err("dense.vectors", "non-finite value"));
        }
        Ok(DenseIndex { dim, vecs })
    }
}
