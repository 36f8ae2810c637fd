//! The masked-language-model head of BERT / XLM-R: dense → GELU → LayerNorm → projection tied to
//! the word-embedding matrix, plus an output bias. RetroMAE uses the same head for the encoder MLM
//! loss and the decoder loss.

use super::config::{EncoderConfig, ModelKind};
use super::params::ParamSpec;
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::ops;

/// Number of LM-head tensors (the decoder weight is the tied word-embedding matrix).
pub const LM_HEAD_TENSORS: usize = 5;

/// LM-head parameter specs with HF names: XLM-R `lm_head.*`, BERT `cls.predictions.*`.
pub fn lm_head_specs(c: &EncoderConfig) -> Vec<ParamSpec> {
    let h = c.hidden_size;
    let names: [&str; LM_HEAD_TENSORS] = match c.kind {
        ModelKind::XlmRoberta => [
            "lm_head.dense.weight",
            "lm_head.dense.bias",
            "lm_head.layer_norm.weight",
            "lm_head.layer_norm.bias",
            "lm_head.bias",
        ],
        ModelKind::Bert => [
            "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.bias",
        ],
    };
    let dims = [vec![h, h], vec![h], vec![h], vec![h], vec![c.vocab_size]];
    names
        .iter()
        .zip(dims)
        .map(|(n, d)| ParamSpec {
            name: n.to_string(),
            dims: d,
        })
        .collect()
}

/// Logits [N, V] for hidden rows x [N, hidden]; `p` are the head's tensors in [`lm_head_specs`]
/// order and `word_emb` the (tied) word-embedding matrix [V, hidden].
pub fn lm_head_logits(
    tape: &mut Tape,
    c: &EncoderConfig,
    p: &[Var],
    word_emb: &Var,
    x: &Var,
) -> Result<Var> {
    if p.len() != LM_HEAD_TENSORS {
        return Err(Error::invalid(format!(
            "LM head has {LM_HEAD_TENSORS} tensors, got {}",
            p.len()
        )));
    }
    let t = ops::linear(tape, x, &p[0], Some(&p[1]))?;
    let t = ops::gelu(tape, &t)?;
    let t = ops::layernorm(tape, &t, &p[2], &p[3], c.layer_norm_eps)?;
    ops::linear(tape, &t, word_emb, Some(&p[4]))
}
