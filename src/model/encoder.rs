//! The BERT / XLM-RoBERTa encoder (post-LN transformer), forward on the tape (so backward is
//! free), parameters named exactly as in Hugging Face checkpoints.

use super::config::{EncoderConfig, ModelKind};
use super::params::{ParamSet, ParamSpec};
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::ops::{self, AttentionMask, AttnDropout, Texts};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// A right-padded batch of token ids.
#[derive(Clone, Debug)]
pub struct EncoderInput {
    /// [batch * len] token ids.
    pub ids: Vec<u32>,
    /// [batch * len] attention mask, 1 = real token.
    pub mask: Vec<u8>,
    pub batch: usize,
    pub len: usize,
}

impl EncoderInput {
    /// Right-pad `seqs` to the longest with `pad_id` (mask 0 on padding).
    pub fn pad(seqs: &[Vec<u32>], pad_id: u32) -> EncoderInput {
        let len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * len);
        let mut mask = Vec::with_capacity(seqs.len() * len);
        for s in seqs {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(pad_id, len - s.len()));
            mask.extend(std::iter::repeat_n(1u8, s.len()));
            mask.extend(std::iter::repeat_n(0u8, len - s.len()));
        }
        EncoderInput {
            ids,
            mask,
            batch: seqs.len(),
            len,
        }
    }

    /// Rows of text `b` through its last real token (at least one): its length unpadded.
    pub fn text_len(&self, b: usize) -> usize {
        self.mask[b * self.len..(b + 1) * self.len]
            .iter()
            .rposition(|&m| m != 0)
            .map_or(1, |p| p + 1)
    }
}

/// Dropout settings for a training forward (None = eval mode).
#[derive(Clone, Copy, Debug)]
pub struct DropoutCfg {
    pub hidden: f32,
    pub attention: f32,
    /// Seed of this forward; every dropout site derives its own stream from it.
    pub seed: u64,
}

/// The encoder: config + parameters.
#[derive(Clone, Debug)]
pub struct Encoder {
    pub config: EncoderConfig,
    pub params: ParamSet,
}

/// Number of tensors of one transformer layer, in the order of [`layer_param_specs`].
pub const LAYER_TENSORS: usize = 16;
/// Number of embedding tensors before the first layer.
pub const EMBEDDING_TENSORS: usize = 5;

/// Specs of one BERT layer under `prefix` (e.g. "encoder.layer.3." or "c_head."), in the order
/// [`bert_layer`] reads them: Q, K, V, attention output dense + LayerNorm, intermediate, output
/// dense + LayerNorm (weight then bias each).
pub fn layer_param_specs(prefix: &str, c: &EncoderConfig) -> Vec<ParamSpec> {
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let mut v = Vec::with_capacity(LAYER_TENSORS);
    let mut push = |name: &str, dims: Vec<usize>| {
        v.push(ParamSpec {
            name: format!("{prefix}{name}"),
            dims,
        })
    };
    for m in ["query", "key", "value"] {
        push(&format!("attention.self.{m}.weight"), vec![h, h]);
        push(&format!("attention.self.{m}.bias"), vec![h]);
    }
    push("attention.output.dense.weight", vec![h, h]);
    push("attention.output.dense.bias", vec![h]);
    push("attention.output.LayerNorm.weight", vec![h]);
    push("attention.output.LayerNorm.bias", vec![h]);
    push("intermediate.dense.weight", vec![f, h]);
    push("intermediate.dense.bias", vec![f]);
    push("output.dense.weight", vec![h, f]);
    push("output.dense.bias", vec![h]);
    push("output.LayerNorm.weight", vec![h]);
    push("output.LayerNorm.bias", vec![h]);
    v
}

/// Parameter specs of an encoder, in HF state-dict order: the 5 embedding tensors, then
/// [`LAYER_TENSORS`] per layer.
pub fn encoder_param_specs(c: &EncoderConfig) -> Vec<ParamSpec> {
    let h = c.hidden_size;
    let mut v = vec![
        ParamSpec {
            name: "embeddings.word_embeddings.weight".into(),
            dims: vec![c.vocab_size, h],
        },
        ParamSpec {
            name: "embeddings.position_embeddings.weight".into(),
            dims: vec![c.max_position_embeddings, h],
        },
        ParamSpec {
            name: "embeddings.token_type_embeddings.weight".into(),
            dims: vec![c.type_vocab_size, h],
        },
        ParamSpec {
            name: "embeddings.LayerNorm.weight".into(),
            dims: vec![h],
        },
        ParamSpec {
            name: "embeddings.LayerNorm.bias".into(),
            dims: vec![h],
        },
    ];
    for i in 0..c.num_hidden_layers {
        v.extend(layer_param_specs(&format!("encoder.layer.{i}."), c));
    }
    v
}

/// Where a layer's dropout draws its randomness: hidden dropout after the attention output and
/// after the FFN, attention-probability dropout, each on its own stream.
#[derive(Clone, Debug)]
pub struct LayerDropout {
    pub hidden: f32,
    pub attention: f32,
    pub seed: u64,
    /// First of the three streams this layer uses.
    pub stream: u64,
    /// A batch of independent texts, each drawing from its own seed in place of `seed` and
    /// computed as it is alone ([`Texts`]; self-attention under a key-padding mask only).
    pub texts: Option<Texts>,
}

/// One post-LN BERT layer with separate query and key/value inputs (the encoder passes the same
/// tensor twice; the RetroMAE decoder passes its query stream and content stream):
/// a = LN(q_in + Dropout(Attn(q_in Wq, kv_in Wk, kv_in Wv) Wo)); y = LN(a + Dropout(FFN(a))).
/// `p` holds the layer's [`LAYER_TENSORS`] tensors in [`layer_param_specs`] order.
pub fn bert_layer(
    tape: &mut Tape,
    c: &EncoderConfig,
    p: &[Var],
    q_in: &Var,
    kv_in: &Var,
    mask: &AttentionMask,
    drop: Option<LayerDropout>,
) -> Result<Var> {
    if p.len() != LAYER_TENSORS {
        return Err(Error::invalid(format!(
            "a layer has {LAYER_TENSORS} tensors, got {}",
            p.len()
        )));
    }
    let q = ops::linear(tape, q_in, &p[0], Some(&p[1]))?;
    let k = ops::linear(tape, kv_in, &p[2], Some(&p[3]))?;
    let v = ops::linear(tape, kv_in, &p[4], Some(&p[5]))?;
    let scale = 1.0 / (c.head_dim() as f32).sqrt();
    let heads = c.num_attention_heads;
    let texts = drop.as_ref().and_then(|d| d.texts.as_ref());
    let a = match (texts, mask) {
        (Some(t), AttentionMask::KeyPadding(m)) if q_in.value().is_same(kv_in.value()) => {
            let ad = drop
                .as_ref()
                .filter(|d| d.attention > 0.0)
                .map(|d| (d.attention, d.stream));
            ops::attention_texts(tape, &q, &k, &v, m, t, heads, scale, ad)?
        }
        (Some(_), _) => {
            return Err(Error::invalid(
                "per-text dropout takes self-attention under a key-padding mask",
            ))
        }
        (None, _) => {
            let attn_drop = drop.as_ref().and_then(|d| {
                (d.attention > 0.0).then_some(AttnDropout {
                    p: d.attention,
                    seed: d.seed,
                    stream: d.stream,
                })
            });
            ops::attention(tape, &q, &k, &v, mask, heads, scale, attn_drop)?
        }
    };
    let a = ops::linear(tape, &a, &p[6], Some(&p[7]))?;
    let a = match &drop {
        Some(d) => layer_dropout(tape, &a, d, 1)?,
        None => a,
    };
    let r = ops::add(tape, q_in, &a)?;
    let x1 = ops::layernorm(tape, &r, &p[8], &p[9], c.layer_norm_eps)?;
    let hmid = ops::linear(tape, &x1, &p[10], Some(&p[11]))?;
    let hmid = ops::gelu(tape, &hmid)?;
    let o = ops::linear(tape, &hmid, &p[12], Some(&p[13]))?;
    let o = match &drop {
        Some(d) => layer_dropout(tape, &o, d, 2)?,
        None => o,
    };
    let r2 = ops::add(tape, &x1, &o)?;
    ops::layernorm(tape, &r2, &p[14], &p[15], c.layer_norm_eps)
}

/// Hidden dropout on the layer's stream `stream + k`, per text when the layer has [`Texts`].
fn layer_dropout(tape: &mut Tape, x: &Var, d: &LayerDropout, k: u64) -> Result<Var> {
    match &d.texts {
        Some(t) => ops::dropout_texts(tape, x, d.hidden, t, d.stream + k),
        None => ops::dropout(tape, x, d.hidden, d.seed, d.stream + k),
    }
}

impl Encoder {
    /// Take the encoder's tensors from a checkpoint map (extra tensors such as `pooler.*` or
    /// `embeddings.position_ids` are ignored); shapes are checked against the config.
    pub fn from_tensors(
        config: EncoderConfig,
        map: &BTreeMap<String, Tensor>,
        path: &Path,
    ) -> Result<Encoder> {
        // A checkpoint with more layers than the config: loading would drop them silently.
        let n = config.num_hidden_layers;
        if let Some(layer) = map
            .keys()
            .filter_map(|k| {
                k.strip_prefix("encoder.layer.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .find(|&i| i >= n)
        {
            return Err(Error::Config {
                field: "num_hidden_layers".into(),
                msg: format!(
                    "{n}, but {} holds encoder.layer.{layer}: config and weights disagree",
                    path.display()
                ),
            });
        }
        // Fewer layers in the weights than the config says: said before the parameter list is
        // built (its size follows the config).
        let held = map
            .keys()
            .filter_map(|k| k.strip_prefix("encoder.layer.")?.split('.').next())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if held < n {
            // Layers under a key prefix the loader does not know (`module.` of a DataParallel
            // save, say) are not missing layers: name the prefix rather than blame the config.
            if let Some(k) = (held == 0)
                .then(|| map.keys().find(|k| k.contains(".encoder.layer.")))
                .flatten()
            {
                let prefix = &k[..k.find("encoder.layer.").unwrap_or(0)];
                return Err(Error::format(
                    path,
                    format!(
                        "the encoder's keys carry the prefix {prefix:?} (e.g. {k}); known \
                         prefixes are roberta., bert. and model. (rename the keys)"
                    ),
                ));
            }
            return Err(Error::Config {
                field: "num_hidden_layers".into(),
                msg: format!(
                    "{n}, but {} holds {held} encoder layers: config and weights disagree",
                    path.display()
                ),
            });
        }
        let params = ParamSet::from_map(encoder_param_specs(&config), map, path)?;
        Ok(Encoder { config, params })
    }

    /// Fresh weights: N(0, initializer_range) for matrices and embeddings (pad row zeroed for
    /// XLM-R, as HF does), zero biases, LayerNorm 1/0.
    pub fn init_random(config: EncoderConfig, seed: u64) -> Result<Encoder> {
        let specs = encoder_param_specs(&config);
        let std = config.initializer_range;
        let mut values = Vec::with_capacity(specs.len());
        for (k, s) in specs.iter().enumerate() {
            let n: usize = s.dims.iter().product();
            let data = if s.name.ends_with("LayerNorm.weight") {
                vec![1.0; n]
            } else if s.name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                let mut d = normal_vec(n, std, seed, k as u64);
                if s.name.starts_with("embeddings.word")
                    || s.name.starts_with("embeddings.position")
                {
                    let pad = config.pad_token_id as usize;
                    if config.kind == ModelKind::XlmRoberta && pad < s.dims[0] {
                        d[pad * s.dims[1]..(pad + 1) * s.dims[1]].fill(0.0);
                    }
                }
                d
            };
            values.push(Tensor::from_vec(data, &s.dims)?);
        }
        Ok(Encoder {
            config,
            params: ParamSet::from_values(specs, values)?,
        })
    }

    /// Position ids per the model kind ([`position_ids`]).
    pub fn position_ids(&self, input: &EncoderInput) -> Vec<u32> {
        position_ids(&self.config, input)
    }

    /// Check ids and length against the config ([`check_input`]).
    pub fn check_input(&self, input: &EncoderInput) -> Result<()> {
        check_input(&self.config, input)
    }

    /// The embeddings block: LN(word\[ids\] + pos\[pos_ids\] + type\[0\]) with dropout (per
    /// text when `texts` is given).
    pub fn embed(
        &self,
        tape: &mut Tape,
        p: &[Var],
        input: &EncoderInput,
        drop: Option<DropoutCfg>,
        texts: Option<&Texts>,
    ) -> Result<Var> {
        let n = input.ids.len();
        let h = self.config.hidden_size;
        // HF builds the word table with padding_idx = pad_token_id (both kinds) and RoBERTa's
        // position table with padding_idx too: those rows never receive a gradient.
        let pad = Some(self.config.pad_token_id);
        let pos_pad =
            (self.config.kind == ModelKind::XlmRoberta).then_some(self.config.pad_token_id);
        let word = ops::embedding(tape, &p[0], &input.ids, pad, "token ids")?;
        let pos_ids = self.position_ids(input);
        let pos = ops::embedding(tape, &p[1], &pos_ids, pos_pad, "position ids")?;
        let typ = ops::embedding(tape, &p[2], &vec![0u32; n], None, "token type ids")?;
        let x = ops::add(tape, &word, &pos)?;
        let x = ops::add(tape, &x, &typ)?;
        let x = ops::layernorm(tape, &x, &p[3], &p[4], self.config.layer_norm_eps)?;
        let x = ops::reshape(tape, &x, &[input.batch, input.len, h])?;
        match (drop, texts) {
            (Some(d), Some(t)) => ops::dropout_texts(tape, &x, d.hidden, t, 0),
            (Some(d), None) => ops::dropout(tape, &x, d.hidden, d.seed, 0),
            (None, _) => Ok(x),
        }
    }

    /// Layer `i` (same tensor as query and key/value input), with per-text dropout seeds when
    /// `texts` is given.
    #[allow(clippy::too_many_arguments)]
    pub fn layer(
        &self,
        tape: &mut Tape,
        p: &[Var],
        i: usize,
        x: &Var,
        mask: &AttentionMask,
        drop: Option<DropoutCfg>,
        texts: Option<&Texts>,
    ) -> Result<Var> {
        let at = EMBEDDING_TENSORS + i * LAYER_TENSORS;
        let lp = p
            .get(at..at + LAYER_TENSORS)
            .ok_or_else(|| Error::invalid(format!("encoder layer {i} parameters missing")))?;
        let d = drop.map(|d| LayerDropout {
            hidden: d.hidden,
            attention: d.attention,
            seed: d.seed,
            stream: 1 + 4 * i as u64,
            texts: texts.cloned(),
        });
        bert_layer(tape, &self.config, lp, x, x, mask, d)
    }

    /// Full forward: last_hidden_state [B, L, hidden]. `p` are this encoder's parameters bound to
    /// `tape` (see [`ParamSet::bind`]).
    pub fn forward(
        &self,
        tape: &mut Tape,
        p: &[Var],
        input: &EncoderInput,
        drop: Option<DropoutCfg>,
    ) -> Result<Var> {
        self.forward_with(tape, p, input, drop, None)
    }

    /// [`Encoder::forward`] of a batch of independent texts in training mode: text b draws its
    /// dropout masks from `seeds[b]` (in place of `drop.seed`) and gets the hidden states it gets
    /// when it is encoded alone, unpadded (through its last real token), with `drop.seed =
    /// seeds[b]`, whatever texts share its batch (up to the rounding of the batched products;
    /// rows past its length are padding). M3 fine-tuning encodes this way, so that
    /// sub-batching never changes a text's dropout.
    pub fn forward_texts(
        &self,
        tape: &mut Tape,
        p: &[Var],
        input: &EncoderInput,
        drop: DropoutCfg,
        seeds: &[u64],
    ) -> Result<Var> {
        if seeds.len() != input.batch {
            return Err(Error::invalid(format!(
                "per-text forward: {} seeds for {} texts",
                seeds.len(),
                input.batch
            )));
        }
        let texts = Texts {
            lens: (0..input.batch).map(|b| input.text_len(b)).collect(),
            seeds: seeds.into(),
        };
        self.forward_with(tape, p, input, Some(drop), Some(&texts))
    }

    fn forward_with(
        &self,
        tape: &mut Tape,
        p: &[Var],
        input: &EncoderInput,
        drop: Option<DropoutCfg>,
        texts: Option<&Texts>,
    ) -> Result<Var> {
        self.check_input(input)?;
        if p.len() != self.params.values().len() {
            return Err(Error::invalid(format!(
                "encoder forward got {} parameters, expected {}",
                p.len(),
                self.params.values().len()
            )));
        }
        let mask = AttentionMask::KeyPadding(Arc::from(input.mask.clone()));
        let mut x = self.embed(tape, p, input, drop, texts)?;
        for i in 0..self.config.num_hidden_layers {
            x = self.layer(tape, p, i, &x, &mask, drop, texts)?;
        }
        Ok(x)
    }
}

/// Position ids per the model kind: RoBERTa counts non-pad tokens from padding_idx + 1 and
/// gives pad tokens padding_idx (SPEC §1.2); BERT uses 0..len.
pub fn position_ids(config: &EncoderConfig, input: &EncoderInput) -> Vec<u32> {
    let pad = config.pad_token_id;
    let mut pos = Vec::with_capacity(input.ids.len());
    for row in input.ids.chunks(input.len.max(1)) {
        match config.kind {
            ModelKind::XlmRoberta => {
                let mut count = 0;
                for &id in row {
                    if id != pad {
                        count += 1;
                        pos.push(pad + count);
                    } else {
                        pos.push(pad);
                    }
                }
            }
            ModelKind::Bert => pos.extend(0..row.len() as u32),
        }
    }
    pos
}

/// Check ids and length against the config.
pub fn check_input(config: &EncoderConfig, input: &EncoderInput) -> Result<()> {
    if input.ids.len() != input.batch * input.len || input.mask.len() != input.ids.len() {
        return Err(Error::shape(
            "encoder input ids/mask",
            &[input.batch, input.len],
            &[input.ids.len(), input.mask.len()],
        ));
    }
    if input.len > config.max_tokens() {
        return Err(Error::invalid(format!(
            "sequence of {} tokens exceeds the model's maximum of {}",
            input.len,
            config.max_tokens()
        )));
    }
    if let Some(&bad) = input.ids.iter().find(|&&i| i as usize >= config.vocab_size) {
        return Err(Error::invalid(format!(
            "token id {bad} >= vocab size {}",
            config.vocab_size
        )));
    }
    Ok(())
}

/// Deterministic N(0, std) values (Box-Muller over a splitmix hash of (seed, stream, index)).
pub fn normal_vec(n: usize, std: f32, seed: u64, stream: u64) -> Vec<f32> {
    use crate::device::cpu::elementwise::hash_u32;
    (0..n)
        .map(|i| {
            let u1 = ((hash_u32(seed, stream, 2 * i as u64) as f64) + 1.0) / 4_294_967_297.0;
            let u2 = hash_u32(seed, stream, 2 * i as u64 + 1) as f64 / 4_294_967_296.0;
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std as f64) as f32
        })
        .collect()
}
