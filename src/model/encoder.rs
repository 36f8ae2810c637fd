//! The BERT / XLM-RoBERTa encoder (post-LN transformer), forward on the tape (so backward is
//! free), parameters named exactly as in Hugging Face checkpoints.

use super::config::{EncoderConfig, ModelKind};
use super::params::{ParamSet, ParamSpec};
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::ops::{self, AttentionMask, AttnDropout};
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
}

/// Dropout settings for a training forward (None = eval mode).
#[derive(Clone, Copy, Debug)]
pub struct DropoutCfg {
    pub hidden: f32,
    pub attention: f32,
    /// Seed of this forward; every dropout site derives its own stream from it.
    pub seed: u64,
}

struct LayerIdx {
    q_w: usize,
    k_w: usize,
    v_w: usize,
    o_w: usize,
    ln1: usize,
    i_w: usize,
    out_w: usize,
    ln2: usize,
}

/// The encoder: config + parameters.
#[derive(Clone, Debug)]
pub struct Encoder {
    pub config: EncoderConfig,
    pub params: ParamSet,
}

/// Parameter specs of an encoder, in HF state-dict order.
pub fn encoder_param_specs(c: &EncoderConfig) -> Vec<ParamSpec> {
    let h = c.hidden_size;
    let mut v = Vec::new();
    let mut push = |name: String, dims: Vec<usize>| v.push(ParamSpec { name, dims });
    push(
        "embeddings.word_embeddings.weight".into(),
        vec![c.vocab_size, h],
    );
    push(
        "embeddings.position_embeddings.weight".into(),
        vec![c.max_position_embeddings, h],
    );
    push(
        "embeddings.token_type_embeddings.weight".into(),
        vec![c.type_vocab_size, h],
    );
    push("embeddings.LayerNorm.weight".into(), vec![h]);
    push("embeddings.LayerNorm.bias".into(), vec![h]);
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}.");
        for m in ["query", "key", "value"] {
            push(format!("{p}attention.self.{m}.weight"), vec![h, h]);
            push(format!("{p}attention.self.{m}.bias"), vec![h]);
        }
        push(format!("{p}attention.output.dense.weight"), vec![h, h]);
        push(format!("{p}attention.output.dense.bias"), vec![h]);
        push(format!("{p}attention.output.LayerNorm.weight"), vec![h]);
        push(format!("{p}attention.output.LayerNorm.bias"), vec![h]);
        push(
            format!("{p}intermediate.dense.weight"),
            vec![c.intermediate_size, h],
        );
        push(
            format!("{p}intermediate.dense.bias"),
            vec![c.intermediate_size],
        );
        push(
            format!("{p}output.dense.weight"),
            vec![h, c.intermediate_size],
        );
        push(format!("{p}output.dense.bias"), vec![h]);
        push(format!("{p}output.LayerNorm.weight"), vec![h]);
        push(format!("{p}output.LayerNorm.bias"), vec![h]);
    }
    v
}

impl Encoder {
    /// Take the encoder's tensors from a checkpoint map (extra tensors such as `pooler.*` or
    /// `embeddings.position_ids` are ignored); shapes are checked against the config.
    pub fn from_tensors(
        config: EncoderConfig,
        map: &BTreeMap<String, Tensor>,
        path: &Path,
    ) -> Result<Encoder> {
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

    /// Position ids per the model kind: RoBERTa counts non-pad tokens from padding_idx + 1 and
    /// gives pad tokens padding_idx (SPEC §1.2); BERT uses 0..len.
    pub fn position_ids(&self, input: &EncoderInput) -> Vec<u32> {
        let pad = self.config.pad_token_id;
        let mut pos = Vec::with_capacity(input.ids.len());
        for row in input.ids.chunks(input.len.max(1)) {
            match self.config.kind {
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

    fn layer_idx(&self, i: usize) -> Result<LayerIdx> {
        let p = format!("encoder.layer.{i}.");
        let f = |n: &str| {
            self.params
                .index(&format!("{p}{n}"))
                .ok_or_else(|| Error::invalid(format!("encoder parameter {p}{n} missing")))
        };
        Ok(LayerIdx {
            q_w: f("attention.self.query.weight")?,
            k_w: f("attention.self.key.weight")?,
            v_w: f("attention.self.value.weight")?,
            o_w: f("attention.output.dense.weight")?,
            ln1: f("attention.output.LayerNorm.weight")?,
            i_w: f("intermediate.dense.weight")?,
            out_w: f("output.dense.weight")?,
            ln2: f("output.LayerNorm.weight")?,
        })
    }

    /// Check ids and length against the config.
    pub fn check_input(&self, input: &EncoderInput) -> Result<()> {
        if input.ids.len() != input.batch * input.len || input.mask.len() != input.ids.len() {
            return Err(Error::shape(
                "encoder input ids/mask",
                &[input.batch, input.len],
                &[input.ids.len(), input.mask.len()],
            ));
        }
        if input.len > self.config.max_tokens() {
            return Err(Error::invalid(format!(
                "sequence of {} tokens exceeds the model's maximum of {}",
                input.len,
                self.config.max_tokens()
            )));
        }
        if let Some(&bad) = input
            .ids
            .iter()
            .find(|&&i| i as usize >= self.config.vocab_size)
        {
            return Err(Error::invalid(format!(
                "token id {bad} >= vocab size {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// The embeddings block: LN(word[ids] + pos[pos_ids] + type[0]) with dropout.
    pub fn embed(
        &self,
        tape: &mut Tape,
        p: &[Var],
        input: &EncoderInput,
        drop: Option<DropoutCfg>,
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
        match drop {
            Some(d) => ops::dropout(tape, &x, d.hidden, d.seed, 0),
            None => Ok(x),
        }
    }

    /// One post-LN transformer layer.
    pub fn layer(
        &self,
        tape: &mut Tape,
        p: &[Var],
        i: usize,
        x: &Var,
        mask: &AttentionMask,
        drop: Option<DropoutCfg>,
    ) -> Result<Var> {
        let c = &self.config;
        let ix = self.layer_idx(i)?;
        let q = ops::linear(tape, x, &p[ix.q_w], Some(&p[ix.q_w + 1]))?;
        let k = ops::linear(tape, x, &p[ix.k_w], Some(&p[ix.k_w + 1]))?;
        let v = ops::linear(tape, x, &p[ix.v_w], Some(&p[ix.v_w + 1]))?;
        let stream = 1 + 4 * i as u64;
        let attn_drop = drop.and_then(|d| {
            (d.attention > 0.0).then_some(AttnDropout {
                p: d.attention,
                seed: d.seed,
                stream,
            })
        });
        let scale = 1.0 / (c.head_dim() as f32).sqrt();
        let a = ops::attention(
            tape,
            &q,
            &k,
            &v,
            mask,
            c.num_attention_heads,
            scale,
            attn_drop,
        )?;
        let a = ops::linear(tape, &a, &p[ix.o_w], Some(&p[ix.o_w + 1]))?;
        let a = match drop {
            Some(d) => ops::dropout(tape, &a, d.hidden, d.seed, stream + 1)?,
            None => a,
        };
        let r = ops::add(tape, x, &a)?;
        let x1 = ops::layernorm(tape, &r, &p[ix.ln1], &p[ix.ln1 + 1], c.layer_norm_eps)?;
        let hmid = ops::linear(tape, &x1, &p[ix.i_w], Some(&p[ix.i_w + 1]))?;
        let hmid = ops::gelu(tape, &hmid)?;
        let o = ops::linear(tape, &hmid, &p[ix.out_w], Some(&p[ix.out_w + 1]))?;
        let o = match drop {
            Some(d) => ops::dropout(tape, &o, d.hidden, d.seed, stream + 2)?,
            None => o,
        };
        let r2 = ops::add(tape, &x1, &o)?;
        ops::layernorm(tape, &r2, &p[ix.ln2], &p[ix.ln2 + 1], c.layer_norm_eps)
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
        self.check_input(input)?;
        if p.len() != self.params.values().len() {
            return Err(Error::invalid(format!(
                "encoder forward got {} parameters, expected {}",
                p.len(),
                self.params.values().len()
            )));
        }
        let mask = AttentionMask::KeyPadding(Arc::from(input.mask.clone()));
        let mut x = self.embed(tape, p, input, drop)?;
        for i in 0..self.config.num_hidden_layers {
            x = self.layer(tape, p, i, &x, &mask, drop)?;
        }
        Ok(x)
    }
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
