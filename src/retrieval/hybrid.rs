//! The search modes over an [`Index`] (SPEC 3.4): dense, sparse and BM25 retrieve directly;
//! "colbert" re-ranks the dense top-K by MaxSim; "dense+sparse" and "all" take the union of the
//! dense and sparse top-K and re-score every candidate by `w_d·dense + w_s·sparse (+ w_c·colbert)`
//! (default weights 1, 0.3, 1: the M3 training ensemble's). The sparse score of a candidate is
//! the index's quantised score (module `sparse`).

use super::index::{bm25_tokens, Index};
use super::sparse::bm25_query;
use super::{Hit, Mode};
use crate::error::{Error, Result};
use crate::infer::EncodeOptions;
use crate::model::m3::M3Model;

/// Search settings.
#[derive(Clone, Debug)]
pub struct SearchOptions {
    /// Hits returned per query.
    pub k: usize,
    /// Candidates taken from each of dense and sparse for the fused / re-rank modes (K); 0 =
    /// the paper's protocol ([`protocol_candidates`]).
    pub candidates: usize,
    /// [w_dense, w_sparse, w_colbert].
    pub weights: [f32; 3],
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            k: 10,
            candidates: 0,
            weights: [1.0, 0.3, 1.0],
        }
    }
}

/// The candidate depth of the BGE-M3 paper's evaluation protocol (SPEC §3.4): ColBERT re-ranks
/// the dense top-200; dense+sparse (and `all`, which re-ranks those with all three) retrieve the
/// top-1000 of each.
pub fn protocol_candidates(mode: Mode) -> usize {
    match mode {
        Mode::Colbert => 200,
        _ => 1000,
    }
}

/// The largest fusion weight accepted. Base scores are inner products of unit vectors or sums of
/// term-weight products, far below 1e30, so this keeps every fused score far from f32 overflow
/// (a weight of 1e38 made `inf` scores) while allowing any sensible ratio.
pub const MAX_FUSION_WEIGHT: f32 = 1e6;

/// Check fusion weights `[w_dense, w_sparse, w_colbert]` for the modes that fuse with them
/// (`dense+sparse`, `all`; `compute_score`'s two fusions are the same pair). Every weight must be
/// finite, in `[0, MAX_FUSION_WEIGHT]`, and not all zero; with `dense+sparse` among `modes`,
/// `w_dense + w_sparse` must be positive too (otherwise every fused score is 0). Returns the
/// reason on failure; callers prefix the flag or field that held the weights.
pub fn check_weights(w: [f32; 3], modes: &[Mode]) -> std::result::Result<(), String> {
    if w.iter()
        .any(|x| !x.is_finite() || *x < 0.0 || *x > MAX_FUSION_WEIGHT)
    {
        return Err(format!(
            "each weight must be a finite number in [0, {MAX_FUSION_WEIGHT:e}] (larger weights \
             overflow the fused score)"
        ));
    }
    if w.iter().all(|&x| x == 0.0) {
        return Err("all weights are 0: every fused score would be 0".into());
    }
    if modes.contains(&Mode::DenseSparse) && w[0] + w[1] == 0.0 {
        return Err("w_dense + w_sparse is 0: every dense+sparse score would be 0".into());
    }
    Ok(())
}

/// One encoded query (the representations the mode needs).
#[derive(Clone, Debug, Default)]
pub struct QueryRep {
    pub dense: Option<Vec<f32>>,
    pub sparse: Option<Vec<(u32, f32)>>,
    pub colbert: Option<Vec<Vec<f32>>>,
    pub bm25: Option<Vec<(u32, f32)>>,
}

/// Encode queries for `mode` (one forward pass for all the neural representations).
pub fn encode_queries(model: &M3Model, texts: &[&str], mode: Mode) -> Result<Vec<QueryRep>> {
    encode_queries_for(model, texts, &[mode])
}

/// Encode queries once for several modes.
pub fn encode_queries_for(
    model: &M3Model,
    texts: &[&str],
    modes: &[Mode],
) -> Result<Vec<QueryRep>> {
    let mut need = super::IndexParts::default();
    for m in modes {
        let p = m.parts();
        need.dense |= p.dense;
        need.sparse |= p.sparse;
        need.colbert |= p.colbert;
        need.bm25 |= p.bm25;
    }
    let mut reps = vec![QueryRep::default(); texts.len()];
    if need.dense || need.sparse || need.colbert {
        let out = model.encode(
            texts,
            &EncodeOptions {
                dense: need.dense,
                sparse: need.sparse,
                colbert: need.colbert,
                ..EncodeOptions::default()
            },
        )?;
        for (i, r) in reps.iter_mut().enumerate() {
            r.dense = out.dense.as_ref().map(|d| d[i].clone());
            r.sparse = out.sparse.as_ref().map(|d| d[i].clone());
            r.colbert = out.colbert.as_ref().map(|d| d[i].clone());
        }
    }
    if need.bm25 {
        for (r, t) in reps.iter_mut().zip(texts) {
            r.bm25 = Some(bm25_query(&bm25_tokens(model, t)?));
        }
    }
    Ok(reps)
}

fn missing(what: &str) -> Error {
    Error::invalid(format!(
        "query has no {what} representation (encode it for this mode)"
    ))
}

/// The candidate depth a re-ranking mode uses: `candidates` (0: the protocol's for `mode`), at
/// least `k`.
pub fn effective_candidates(mode: Mode, candidates: usize, k: usize) -> usize {
    match candidates {
        0 => protocol_candidates(mode),
        c => c,
    }
    .max(k)
}

/// Score descending (a NaN of either sign first, as [`super::TopK`] ranks it, so that the
/// finiteness check after the cut sees it), then document number.
fn sort_hits(hits: &mut [Hit]) {
    use crate::device::cpu::topk::rank_key;
    hits.sort_by(|a, b| {
        rank_key(b.score)
            .total_cmp(&rank_key(a.score))
            .then(a.doc.cmp(&b.doc))
    });
}

impl Index {
    /// Top-k hits per query in `mode`, best first (score desc, then document number asc).
    pub fn search(
        &self,
        queries: &[QueryRep],
        mode: Mode,
        opts: &SearchOptions,
    ) -> Result<Vec<Vec<Hit>>> {
        self.require(mode.parts(), &format!("mode {mode}"))?;
        let w = opts.weights;
        if matches!(mode, Mode::DenseSparse | Mode::All) {
            check_weights(w, &[mode]).map_err(|m| Error::invalid(format!("weights {w:?}: {m}")))?;
        }
        // No more hits than documents (a huge --k must not size a buffer).
        let n_docs = self.n_docs();
        let opts = &SearchOptions {
            k: opts.k.min(n_docs),
            ..opts.clone()
        };
        let kc = effective_candidates(mode, opts.candidates, opts.k).min(n_docs);
        let dense_top = |k: usize| -> Result<Vec<Vec<Hit>>> {
            let qs = queries
                .iter()
                .map(|q| q.dense.clone().ok_or_else(|| missing("dense")))
                .collect::<Result<Vec<_>>>()?;
            match &self.device_dense {
                Some(d) if k <= crate::device::kernels::TOPK_MAX => d.index.search(&*d.dev, &qs, k),
                _ => self
                    .dense
                    .as_ref()
                    .expect("checked by require")
                    .search(&qs, k),
            }
        };
        let sparse_top = |q: &QueryRep, k: usize| -> Result<Vec<Hit>> {
            let s = q.sparse.as_ref().ok_or_else(|| missing("sparse"))?;
            Ok(self
                .sparse
                .as_ref()
                .expect("checked by require")
                .search(s, k))
        };
        let hits: Vec<Vec<Hit>> = match mode {
            Mode::Dense => dense_top(opts.k),
            Mode::Sparse => queries.iter().map(|q| sparse_top(q, opts.k)).collect(),
            Mode::Bm25 => queries
                .iter()
                .map(|q| {
                    let b = q.bm25.as_ref().ok_or_else(|| missing("bm25"))?;
                    Ok(self
                        .bm25
                        .as_ref()
                        .expect("checked by require")
                        .search(b, opts.k))
                })
                .collect(),
            Mode::Colbert => {
                let cands = dense_top(kc)?;
                let store = self.colbert.as_ref().expect("checked by require");
                queries
                    .iter()
                    .zip(cands)
                    .map(|(q, c)| {
                        let qc = q.colbert.as_ref().ok_or_else(|| missing("colbert"))?;
                        let docs: Vec<u32> = c.iter().map(|h| h.doc).collect();
                        let s = store.maxsim(qc, &docs)?;
                        let mut hits: Vec<Hit> = docs
                            .iter()
                            .zip(s)
                            .map(|(&doc, score)| Hit { doc, score })
                            .collect();
                        sort_hits(&mut hits);
                        hits.truncate(opts.k);
                        Ok(hits)
                    })
                    .collect()
            }
            Mode::DenseSparse | Mode::All => {
                let dense = self.dense.as_ref().expect("checked by require");
                let sparse = self.sparse.as_ref().expect("checked by require");
                let dtops = dense_top(kc)?;
                queries
                    .iter()
                    .zip(dtops)
                    .map(|(q, dt)| {
                        let st = sparse_top(q, kc)?;
                        let mut docs: Vec<u32> = dt.iter().chain(&st).map(|h| h.doc).collect();
                        docs.sort_unstable();
                        docs.dedup();
                        let qd = q.dense.as_ref().ok_or_else(|| missing("dense"))?;
                        let qs = q.sparse.as_ref().ok_or_else(|| missing("sparse"))?;
                        let ds = dense.score_docs(qd, &docs)?;
                        let ss = sparse.score_docs(qs, &docs);
                        let cs = if mode == Mode::All {
                            let qc = q.colbert.as_ref().ok_or_else(|| missing("colbert"))?;
                            self.colbert
                                .as_ref()
                                .expect("checked by require")
                                .maxsim(qc, &docs)?
                        } else {
                            vec![0.0; docs.len()]
                        };
                        let mut hits: Vec<Hit> = (0..docs.len())
                            .map(|i| Hit {
                                doc: docs[i],
                                score: w[0] * ds[i] + w[1] * ss[i] + w[2] * cs[i],
                            })
                            .collect();
                        if let Some(h) = hits.iter().find(|h| !h.score.is_finite()) {
                            return Err(Error::NonFinite(format!(
                                "the {mode} fused score of document {:?} ({}) with weights \
                                 {w:?}",
                                self.doc_id(h.doc),
                                h.score
                            )));
                        }
                        sort_hits(&mut hits);
                        hits.truncate(opts.k);
                        Ok(hits)
                    })
                    .collect()
            }
        }?;
        // A single mode's scores too (an index whose impact scale overflows its sums, a model
        // whose outputs do): an error, not `inf` in a ranking.
        if let Some(h) = hits.iter().flatten().find(|h| !h.score.is_finite()) {
            return Err(Error::NonFinite(format!(
                "the {mode} score of document {:?} ({})",
                self.doc_id(h.doc),
                h.score
            )));
        }
        Ok(hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_hits_ranks_nan_of_either_sign_first_then_by_document() {
        let h = |doc: u32, score: f32| Hit { doc, score };
        let mut hits = vec![
            h(0, 1.0),
            h(1, -f32::NAN),
            h(2, f32::INFINITY),
            h(3, 1.0),
            h(4, f32::NAN),
            h(5, -0.0),
            h(6, 0.0),
        ];
        sort_hits(&mut hits);
        let docs: Vec<u32> = hits.iter().map(|h| h.doc).collect();
        // Both NaNs (the negative one too) above +inf, ties by document; +0 above -0.
        assert_eq!(docs, [1, 4, 2, 0, 3, 6, 5]);
    }
}
