//! Retrieval: persisted indexes (dense, learned sparse, BM25, ColBERT multi-vector), the search
//! modes of BGE-M3 (dense, sparse, multi-vector re-rank, dense+sparse hybrid, all three), BEIR
//! data loading and trec_eval-compatible metrics. See docs/retrieval.md.
//!
//! ```no_run
//! use retrom3::retrieval::{beir, Index, IndexParts, Mode, SearchOptions};
//! use retrom3::{Device, M3Model};
//! let model = M3Model::load("models/bge-m3", Device::Cpu)?;
//! let corpus = beir::read_corpus("data/corpus.jsonl".as_ref())?;
//! let index = Index::build(&model, &corpus, IndexParts::all(), &mut |_| {})?;
//! let queries = retrom3::retrieval::encode_queries(&model, &["what is bge m3?"], Mode::All)?;
//! let hits = index.search(&queries, Mode::All, &SearchOptions::default())?;
//! println!("{} -> {}", index.doc_id(hits[0][0].doc), hits[0][0].score);
//! # Ok::<(), retrom3::Error>(())
//! ```

pub mod beir;
pub mod colbert;
pub mod dense;
pub mod fingerprint;
pub mod hybrid;
pub mod index;
pub mod index_format;
pub mod metrics;
pub mod sparse;

pub use fingerprint::ModelFingerprint;
pub use hybrid::{encode_queries, QueryRep, SearchOptions};
pub use index::{Index, IndexParts};

use crate::error::{Error, Result};
use std::collections::BinaryHeap;

/// One search result: a document number (its position in the corpus) and a score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub doc: u32,
    pub score: f32,
}

/// A search / evaluation mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Exact inner product over the dense vectors.
    Dense,
    /// Learned lexical weights, inverted index with exact block-max top-k (term-at-a-time when pruning cannot pay).
    Sparse,
    /// ColBERT MaxSim re-rank of the dense top-K candidates.
    Colbert,
    /// Union of dense and sparse top-K, re-scored by w_d·dense + w_s·sparse.
    DenseSparse,
    /// Union of dense and sparse top-K, re-scored by w_d·dense + w_s·sparse + w_c·colbert.
    All,
    /// BM25 over the model tokenizer's ids (the baseline).
    Bm25,
}

impl Mode {
    /// Every mode, in the order of the evaluation table.
    pub const ALL: [Mode; 6] = [
        Mode::Bm25,
        Mode::Dense,
        Mode::Sparse,
        Mode::Colbert,
        Mode::DenseSparse,
        Mode::All,
    ];

    /// The name used on the command line, in tables and in run tags.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Dense => "dense",
            Mode::Sparse => "sparse",
            Mode::Colbert => "colbert",
            Mode::DenseSparse => "dense+sparse",
            Mode::All => "all",
            Mode::Bm25 => "bm25",
        }
    }

    /// The index parts this mode reads.
    pub fn parts(self) -> IndexParts {
        let mut p = IndexParts::default();
        match self {
            Mode::Dense => p.dense = true,
            Mode::Sparse => p.sparse = true,
            Mode::Colbert => {
                p.dense = true;
                p.colbert = true
            }
            Mode::DenseSparse => {
                p.dense = true;
                p.sparse = true
            }
            Mode::All => p = IndexParts::all(),
            Mode::Bm25 => p.bm25 = true,
        }
        p
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        Ok(match s.trim() {
            "dense" => Mode::Dense,
            "sparse" | "lexical" => Mode::Sparse,
            "colbert" | "multivector" | "multi-vector" => Mode::Colbert,
            "hybrid" | "dense+sparse" | "sparse+dense" => Mode::DenseSparse,
            "all" | "colbert+sparse+dense" => Mode::All,
            "bm25" => Mode::Bm25,
            other => {
                return Err(Error::invalid(format!(
                "unknown mode {other:?} (dense, sparse, colbert, hybrid = dense+sparse, all, bm25)"
            )))
            }
        })
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Is `a` ranked before `b`: higher score, then lower document number (scores in IEEE total
/// order, the heap's: a positive NaN above `inf`).
fn better(a: (f32, u32), b: (f32, u32)) -> bool {
    a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)) == std::cmp::Ordering::Greater
}

/// Entry of the bounded heap, ordered so that the heap's top is the worst kept hit.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Worst(f32, u32);
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Worst {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // "Greater" = worse: lower score, then higher document number.
        o.0.total_cmp(&self.0).then(self.1.cmp(&o.1))
    }
}

/// A bounded top-k collector (score desc, then document number asc). A NaN score ranks first, so
/// that it reaches the caller's finiteness check instead of vanishing from the ranking.
#[derive(Debug)]
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub fn new(k: usize) -> TopK {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(heap_capacity(k)),
        }
    }

    /// Offer a hit.
    #[inline]
    pub fn push(&mut self, doc: u32, score: f32) {
        if self.k == 0 {
            return;
        }
        // One NaN (whatever its sign bit) above every number.
        let score = crate::device::cpu::topk::rank_key(score);
        if self.heap.len() < self.k {
            self.heap.push(Worst(score, doc));
        } else if let Some(w) = self.heap.peek() {
            if better((score, doc), (w.0, w.1)) {
                self.heap.pop();
                self.heap.push(Worst(score, doc));
            }
        }
    }

    /// The kept hits, best first.
    pub fn into_sorted(self) -> Vec<Hit> {
        let mut v = self.heap.into_vec();
        v.sort();
        v.into_iter()
            .map(|w| Hit {
                doc: w.1,
                score: w.0,
            })
            .collect()
    }
}

/// The initial capacity of a top-`k` heap: k + 1, at most 2^16 + 1 (the heap grows past it only
/// as hits arrive, so a k far above the documents allocates nothing up front).
pub(crate) fn heap_capacity(k: usize) -> usize {
    k.min(1 << 16) + 1
}

/// The top-k of a full score vector (index = document number).
pub fn top_k_of(scores: &[f32], k: usize) -> Vec<Hit> {
    let mut t = TopK::new(k);
    for (d, &s) in scores.iter().enumerate() {
        t.push(d as u32, s);
    }
    t.into_sorted()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_score_then_document_and_keeps_nan_first() {
        let ranked = |scores: &[f32], k| -> Vec<(u32, f32)> {
            top_k_of(scores, k)
                .into_iter()
                .map(|h| (h.doc, h.score))
                .collect()
        };
        assert_eq!(
            ranked(&[1.0, 3.0, 2.0, 3.0, f32::NEG_INFINITY], 3),
            vec![(1, 3.0), (3, 3.0), (2, 2.0)]
        );
        assert!(ranked(&[1.0, 2.0], 0).is_empty());
        // A NaN of either sign is kept, first, where a caller's finiteness check sees it; the
        // bounded heap does not evict it for a later, larger number.
        let neg_nan = -f32::NAN;
        for nan in [f32::NAN, neg_nan] {
            let r = ranked(&[1.0, nan, 2.0, f32::INFINITY, 5.0], 2);
            assert_eq!(r.len(), 2);
            assert_eq!(r[0].0, 1);
            assert!(r[0].1.is_nan());
            assert_eq!(r[1], (3, f32::INFINITY));
        }
    }
}
