//! Pair scores (FlagEmbedding's `compute_score`, SPEC §3.3): dense, lexical, ColBERT and the two
//! weighted fusions.

use super::encode::{ColbertVecs, EncodeOptions, LexicalWeights};
use crate::error::{Error, Result};
use crate::model::m3::M3Model;

/// Options of [`M3Model::compute_score`].
#[derive(Clone, Debug)]
pub struct ScoreOptions {
    /// Max tokens per query, specials included (None: FlagEmbedding's `compute_score` default,
    /// 512, or the model's position table if that holds fewer; not sentence_bert_config.json's
    /// max_seq_length). A value over the model's maximum is an error.
    pub max_query_length: Option<usize>,
    /// Max tokens per passage, as `max_query_length`.
    pub max_passage_length: Option<usize>,
    /// [w_dense, w_sparse, w_colbert] of the fused scores.
    pub weights: [f32; 3],
    pub batch_size: usize,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            max_query_length: None,
            max_passage_length: None,
            weights: [1.0, 1.0, 1.0],
            batch_size: 32,
        }
    }
}

/// The five scores of one (query, passage) pair.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairScores {
    pub dense: f32,
    pub sparse: f32,
    pub colbert: f32,
    /// (w_sparse·sparse + w_dense·dense) / (w_dense + w_sparse)
    pub sparse_dense: f32,
    /// (w_colbert·colbert + w_sparse·sparse + w_dense·dense) / (w_dense + w_sparse + w_colbert)
    pub colbert_sparse_dense: f32,
}

/// Dot product (cosine for normalised vectors), f64 accumulation. Both vectors have the same
/// length (one model's outputs); with different lengths the longer one's tail is ignored, so
/// programs that mix models check lengths first (the index search does).
pub fn dense_score(q: &[f32], p: &[f32]) -> f32 {
    q.iter()
        .zip(p)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum::<f64>() as f32
}

/// Σ over shared token ids of w_q · w_p. Both lists are sorted by id with one weight per id, as
/// every encode output is; unsorted input misses shared ids.
pub fn lexical_score(q: &LexicalWeights, p: &LexicalWeights) -> f32 {
    let (mut i, mut j, mut acc) = (0, 0, 0.0f64);
    while i < q.len() && j < p.len() {
        match q[i].0.cmp(&p[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                acc += q[i].1 as f64 * p[j].1 as f64;
                i += 1;
                j += 1;
            }
        }
    }
    acc as f32
}

/// ColBERT late interaction: (1/n_q) Σ_i max_j ⟨q_i, p_j⟩ over the real vectors (no padding
/// enters the max; FlagEmbedding's batched compute_score lets padded zero rows in, SPEC §3.3).
/// All vectors have one dimension (one model's outputs), as for [`dense_score`].
pub fn colbert_score(q: &ColbertVecs, p: &ColbertVecs) -> f32 {
    if q.is_empty() || p.is_empty() {
        return 0.0;
    }
    let total: f64 = q
        .iter()
        .map(|qi| {
            p.iter()
                .map(|pj| dense_score(qi, pj) as f64)
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .sum();
    (total / q.len() as f64) as f32
}

impl PairScores {
    /// The first score that is not finite, by name, if any.
    pub fn non_finite(&self) -> Option<(&'static str, f32)> {
        [
            ("dense", self.dense),
            ("sparse", self.sparse),
            ("colbert", self.colbert),
            ("sparse+dense", self.sparse_dense),
            ("colbert+sparse+dense", self.colbert_sparse_dense),
        ]
        .into_iter()
        .find(|(_, v)| !v.is_finite())
    }

    /// Combine the three base scores with weights [dense, sparse, colbert], in double precision
    /// as FlagEmbedding's Python floats do (weights near f32's limits neither overflow the sum
    /// nor lose their ratio).
    pub fn fuse(dense: f32, sparse: f32, colbert: f32, w: [f32; 3]) -> PairScores {
        let [wd, ws, wc] = w.map(f64::from);
        let (d, s, c) = (f64::from(dense), f64::from(sparse), f64::from(colbert));
        PairScores {
            dense,
            sparse,
            colbert,
            sparse_dense: ((ws * s + wd * d) / (wd + ws)) as f32,
            colbert_sparse_dense: ((wc * c + ws * s + wd * d) / (wd + ws + wc)) as f32,
        }
    }
}

impl M3Model {
    /// The five scores of each (query, passage) pair, in order.
    pub fn compute_score(
        &self,
        pairs: &[(&str, &str)],
        opts: &ScoreOptions,
    ) -> Result<Vec<PairScores>> {
        self.compute_score_with_progress(pairs, opts, &mut |_| {})
    }

    /// [`M3Model::compute_score`] with a progress callback (texts encoded so far). Finite
    /// outputs can still give an infinite score (a lexical sum of 1e37-sized weights overflows
    /// f32, as can an unnormalised dense dot product): a non-finite score is an
    /// [`Error::NonFinite`] naming the pair.
    pub fn compute_score_with_progress(
        &self,
        pairs: &[(&str, &str)],
        opts: &ScoreOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<PairScores>> {
        let scores = self.compute_score_unchecked(pairs, opts, progress)?;
        for (i, s) in scores.iter().enumerate() {
            if let Some((name, v)) = s.non_finite() {
                return Err(Error::NonFinite(format!(
                    "the {name} score of input pair {} ({v}): the model's outputs are too large \
                     for f32 scores",
                    i + 1
                )));
            }
        }
        Ok(scores)
    }

    /// [`M3Model::compute_score_with_progress`] without the finiteness check, for a caller that
    /// names a bad pair its own way ([`PairScores::non_finite`]; `retrom3 score` names the line).
    pub fn compute_score_unchecked(
        &self,
        pairs: &[(&str, &str)],
        opts: &ScoreOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<PairScores>> {
        let w = opts.weights;
        // The rules of search / eval and `retrom3 score`: the two fusions are dense+sparse and all.
        use crate::retrieval::{hybrid::check_weights, Mode};
        check_weights(w, &[Mode::DenseSparse, Mode::All])
            .map_err(|m| Error::invalid(format!("weights {w:?}: {m}")))?;
        self.require_heads("compute_score")?;
        // Checked here so that the error names the field the caller set.
        // 512 (FlagEmbedding's compute_score default for queries) within the position table,
        // whatever sentence_bert_config.json's max_seq_length says (an encode default).
        let default_len = 512.min(self.encoder.config.max_tokens());
        let mut lens = [0; 2];
        for (len, (field, m)) in lens.iter_mut().zip([
            ("max_query_length", opts.max_query_length),
            ("max_passage_length", opts.max_passage_length),
        ]) {
            *len = self
                .resolve_max_length(Some(m.unwrap_or(default_len)))
                .map_err(|e| match e {
                    Error::Invalid(msg) => Error::invalid(format!("{field}: {msg}")),
                    e => e,
                })?;
        }
        let base = EncodeOptions {
            batch_size: opts.batch_size,
            ..EncodeOptions::all()
        };
        let queries: Vec<&str> = pairs.iter().map(|p| p.0).collect();
        let passages: Vec<&str> = pairs.iter().map(|p| p.1).collect();
        let qo = EncodeOptions {
            max_length: Some(lens[0]),
            ..base.clone()
        };
        let po = EncodeOptions {
            max_length: Some(lens[1]),
            ..base
        };
        let q = self.encode_with_progress(&queries, &qo, progress)?;
        let p = self.encode_with_progress(&passages, &po, progress)?;
        let (qd, qs, qc) = (
            q.dense.unwrap_or_default(),
            q.sparse.unwrap_or_default(),
            q.colbert.unwrap_or_default(),
        );
        let (pd, ps, pc) = (
            p.dense.unwrap_or_default(),
            p.sparse.unwrap_or_default(),
            p.colbert.unwrap_or_default(),
        );
        Ok((0..pairs.len())
            .map(|i| {
                PairScores::fuse(
                    dense_score(&qd[i], &pd[i]),
                    lexical_score(&qs[i], &ps[i]),
                    colbert_score(&qc[i], &pc[i]),
                    w,
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::PairScores;

    /// The weighted scores are weighted means: any positive scale of the weights gives the same
    /// value, at f32's largest and smallest (subnormal) weights too.
    #[test]
    fn fused_scores_do_not_depend_on_the_weights_scale() {
        let want = PairScores::fuse(0.9946, 0.2, 0.8, [0.4, 0.2, 0.4]);
        // 3e38 each: their f32 sum overflows; 1.4e-45 is the least subnormal.
        let tiny = f32::from_bits(1);
        for w in [
            [3e38, 1.5e38, 3e38],
            [2.0 * tiny, tiny, 2.0 * tiny],
            [4.0, 2.0, 4.0],
        ] {
            let got = PairScores::fuse(0.9946, 0.2, 0.8, w);
            assert!(got.sparse_dense.is_finite() && got.colbert_sparse_dense.is_finite());
            assert!(
                (got.sparse_dense - want.sparse_dense).abs() < 1e-6,
                "{w:?}: {got:?}"
            );
            assert!(
                (got.colbert_sparse_dense - want.colbert_sparse_dense).abs() < 1e-6,
                "{w:?}: {got:?}"
            );
        }
    }
}
