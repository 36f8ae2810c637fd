//! RetroMAE with the enhanced decoder (SPEC §6.3, decisions §10.2-10.3): the encoder's MLM loss on
//! a lightly masked input, and a one-layer decoder that rebuilds every token from the sentence
//! embedding h = H[:, 0] through two-stream attention — queries from LN(h + P\[pos\] + T\[0\]), keys and
//! values from [h ; Emb(x)\[1:\]] — under a position-specific mask generated inside the attention.

use super::config::{EncoderConfig, ModelKind};
use super::encoder::{
    bert_layer, encoder_param_specs, layer_param_specs, DropoutCfg, Encoder, LayerDropout,
    LAYER_TENSORS,
};
use super::lm_head::{lm_head_logits, lm_head_specs, LM_HEAD_TENSORS};
use super::params::{ParamSet, ParamSpec};
use crate::autograd::{Tape, Var};
use crate::data::masking::{RetroMaeBatch, IGNORE};
use crate::error::{Error, Result};
use crate::ops::{self, AttentionMask};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// XOR-ed into the encoder's dropout seed for the decoder's streams (content stream 0, query
/// stream 1, the decoder layer 2-4).
pub const DECODER_SEED_XOR: u64 = 0x5EED_DEC0_DE00_0001;

/// Prefix of the decoder layer's tensors (FlagEmbedding's name for it).
pub const DECODER_PREFIX: &str = "c_head.";

/// The LM head and decoder file of a RetroMAE run directory, beside the encoder's backbone.
pub const HEADS_FILE: &str = "retromae_heads.safetensors";

/// Encoder + LM head + decoder layer, all trainable, in one [`ParamSet`]:
/// `[encoder tensors][LM head (5)][c_head layer (16)]`.
#[derive(Clone, Debug)]
pub struct RetroMae {
    pub config: EncoderConfig,
    pub params: ParamSet,
    /// Decoder mask ratio.
    pub p_dec: f32,
    /// Tensors of the loaded checkpoint outside the model (`pooler.*`), saved back unchanged
    /// with the encoder ([`crate::io::model_dir::passthrough_tensors`]).
    pub extra_tensors: std::collections::BTreeMap<String, Tensor>,
}

/// The loss of one batch.
pub struct RetroMaeLoss {
    /// L_enc + L_dec, on the tape.
    pub total: Var,
    pub enc: f32,
    pub dec: f32,
}

impl RetroMae {
    /// All parameter specs in order.
    pub fn specs(c: &EncoderConfig) -> Vec<ParamSpec> {
        let mut s = encoder_param_specs(c);
        s.extend(lm_head_specs(c));
        s.extend(layer_param_specs(DECODER_PREFIX, c));
        s
    }

    /// From an encoder, taking LM-head and decoder tensors from `extra` when present (a resumed
    /// run or an MLM checkpoint) and initialising the rest like HF's `_init_weights`
    /// (N(0, initializer_range), zero bias, LayerNorm 1/0; the decoder is never copied from the
    /// encoder).
    pub fn new(
        encoder: Encoder,
        extra: &BTreeMap<String, Tensor>,
        p_dec: f32,
        seed: u64,
    ) -> Result<RetroMae> {
        let c = encoder.config.clone();
        let mut values = encoder.params.values().to_vec();
        let rest: Vec<ParamSpec> = lm_head_specs(&c)
            .into_iter()
            .chain(layer_param_specs(DECODER_PREFIX, &c))
            .collect();
        for (k, s) in rest.iter().enumerate() {
            let t = match extra.get(&s.name) {
                Some(t) => {
                    t.expect_dims(&s.name, &s.dims)?;
                    t.ensure_finite(&s.name)?;
                    t.to_f32()
                }
                None => init_tensor(s, c.initializer_range, seed, 1000 + k as u64)?,
            };
            values.push(t);
        }
        Ok(RetroMae {
            params: ParamSet::from_values(RetroMae::specs(&c), values)?,
            config: c,
            p_dec,
            extra_tensors: Default::default(),
        })
    }

    fn n_encoder(&self) -> usize {
        self.params.values().len() - LM_HEAD_TENSORS - LAYER_TENSORS
    }

    /// The encoder part as a standalone [`Encoder`] (for saving and for encoding).
    pub fn encoder(&self) -> Result<Encoder> {
        let n = self.n_encoder();
        Ok(Encoder {
            config: self.config.clone(),
            params: ParamSet::from_values(
                self.params.specs()[..n].to_vec(),
                self.params.values()[..n].to_vec(),
            )?,
        })
    }

    /// The LM head and decoder tensors by name (saved beside the encoder for resume).
    pub fn head_tensors(&self) -> BTreeMap<String, Tensor> {
        let n = self.n_encoder();
        self.params.specs()[n..]
            .iter()
            .zip(&self.params.values()[n..])
            .map(|(s, v)| (s.name.clone(), v.clone()))
            .collect()
    }

    /// Forward both losses on the tape. `p` are this model's parameters bound to `tape`.
    pub fn loss(
        &self,
        tape: &mut Tape,
        p: &[Var],
        batch: &RetroMaeBatch,
        drop: Option<DropoutCfg>,
    ) -> Result<RetroMaeLoss> {
        self.loss_with_hidden(tape, p, batch, drop, None)
    }

    /// [`RetroMae::loss`] with the encoder's last hidden state [B, L, hidden] of `batch.enc`
    /// given (computed elsewhere, e.g. on a kernel device, and put on `tape` as a leaf) instead of
    /// computed on the tape; everything after the encoder is the same.
    pub fn loss_with_hidden(
        &self,
        tape: &mut Tape,
        p: &[Var],
        batch: &RetroMaeBatch,
        drop: Option<DropoutCfg>,
        hidden: Option<Var>,
    ) -> Result<RetroMaeLoss> {
        let c = &self.config;
        let n = self.n_encoder();
        let (pe, ph, pd) = (
            &p[..n],
            &p[n..n + LM_HEAD_TENSORS],
            &p[n + LM_HEAD_TENSORS..],
        );
        let encoder = Encoder {
            config: c.clone(),
            params: ParamSet::from_values(
                self.params.specs()[..n].to_vec(),
                self.params.values()[..n].to_vec(),
            )?,
        };
        let (b, l, h) = (batch.enc.batch, batch.enc.len, c.hidden_size);

        // Encoder MLM loss over the masked positions only (logits for those rows alone).
        let hs = match hidden {
            Some(hv) => {
                hv.value()
                    .expect_dims("RetroMAE encoder hidden state", &[b, l, h])?;
                hv
            }
            None => encoder.forward(tape, pe, &batch.enc, drop)?,
        };
        let (enc_rows, enc_t) = labelled_rows(&batch.enc_labels);
        if enc_rows.is_empty() && batch.dec_labels.iter().all(|&t| t == IGNORE) {
            return Err(crate::error::Error::invalid(
                "RetroMAE batch has nothing to predict: no encoder-masked token and no decoder \
                 target (every text is shorter than 3 tokens)",
            ));
        }
        // Whole-word masking can leave a batch without any masked token (every text a single
        // word longer than round(L·p), as HF's collator allows): the MLM term is then absent
        // (0) for this batch rather than 0/0; the decoder still trains.
        let l_enc = if enc_rows.is_empty() {
            Var::constant(Tensor::from_vec(vec![0.0], &[1])?)
        } else {
            let x = ops::select_rows(tape, &hs, &enc_rows)?;
            let logits = lm_head_logits(tape, c, ph, &pe[0], &x)?;
            ops::cross_entropy(tape, &logits, &enc_t)?
        };

        // Sentence embedding and the two streams.
        let cls_rows: Vec<usize> = (0..b).map(|i| i * l).collect();
        let sent = ops::select_rows(tape, &hs, &cls_rows)?; // [B, h]
        let ddrop = drop.map(|d| DropoutCfg {
            seed: d.seed ^ DECODER_SEED_XOR,
            ..d
        });
        let content = encoder.embed(tape, pe, &batch.dec, ddrop, None)?;
        let content = ops::replace_rows(tape, &content, &cls_rows, &sent)?;
        let bcast: Vec<usize> = (0..b * l).map(|r| r / l).collect();
        let hq = ops::select_rows(tape, &sent, &bcast)?; // [B*L, h]
        let offset = match c.kind {
            ModelKind::XlmRoberta => c.pad_token_id + 1,
            ModelKind::Bert => 0,
        };
        let pos_ids: Vec<u32> = (0..b * l).map(|r| offset + (r % l) as u32).collect();
        let pos = ops::embedding(tape, &pe[1], &pos_ids, None, "decoder position ids")?;
        let typ = ops::embedding(tape, &pe[2], &vec![0u32; b * l], None, "token type ids")?;
        let q = ops::add(tape, &hq, &pos)?;
        let q = ops::add(tape, &q, &typ)?;
        let q = ops::layernorm(tape, &q, &pe[3], &pe[4], c.layer_norm_eps)?;
        let q = ops::reshape(tape, &q, &[b, l, h])?;
        let q = match ddrop {
            Some(d) => ops::dropout(tape, &q, d.hidden, d.seed, 1)?,
            None => q,
        };
        let mask = match &batch.dense_visibility {
            Some(v) => AttentionMask::Dense(Arc::from(v.as_slice())),
            None => AttentionMask::TwoStream {
                key_mask: Arc::from(batch.dec.mask.as_slice()),
                words: Arc::from(batch.words.as_slice()),
                p: self.p_dec,
                seed: batch.mask_seed,
            },
        };
        let ld = ddrop.map(|d| LayerDropout {
            hidden: d.hidden,
            attention: d.attention,
            seed: d.seed,
            stream: 2,
            texts: None,
        });
        let dec_out = bert_layer(tape, c, pd, &q, &content, &mask, ld)?;
        let (dec_rows, dec_t) = labelled_rows(&batch.dec_labels);
        let x = ops::select_rows(tape, &dec_out, &dec_rows)?;
        let logits = lm_head_logits(tape, c, ph, &pe[0], &x)?;
        let l_dec = ops::cross_entropy(tape, &logits, &dec_t)?;
        let (enc, dec) = (l_enc.value().f32s()?[0], l_dec.value().f32s()?[0]);
        let total = ops::add(tape, &l_enc, &l_dec)?;
        Ok(RetroMaeLoss { total, enc, dec })
    }

    /// Read a RetroMAE checkpoint's extra tensors (LM head + decoder) from
    /// `dir/retromae_heads.safetensors`: the file and every tensor of `config`'s head and decoder
    /// must be there (a resume never re-initialises part of the model).
    pub fn read_heads(dir: &Path, config: &EncoderConfig) -> Result<BTreeMap<String, Tensor>> {
        let p = dir.join(HEADS_FILE);
        if !p.is_file() {
            return Err(Error::format(
                &p,
                "missing: a checkpoint keeps the LM head and the decoder there",
            ));
        }
        let map = crate::io::read_safetensors(&p)?;
        for s in lm_head_specs(config)
            .into_iter()
            .chain(layer_param_specs(DECODER_PREFIX, config))
        {
            let Some(t) = map.get(&s.name) else {
                return Err(Error::MissingTensor {
                    path: p.clone(),
                    name: s.name,
                });
            };
            // Shape and values checked here, where the file is known (the model that takes the
            // map would report the tensor alone).
            if t.dims() != s.dims.as_slice() {
                return Err(Error::format(
                    &p,
                    format!(
                        "tensor {} has shape {:?}, expected {:?}",
                        s.name,
                        t.dims(),
                        s.dims
                    ),
                ));
            }
            t.to_f32()
                .ensure_finite(&s.name)
                .map_err(|e| Error::format(&p, e.to_string()))?;
        }
        Ok(map)
    }
}

/// Rows with a label, and those labels.
fn labelled_rows(labels: &[i64]) -> (Vec<usize>, Vec<i64>) {
    labels
        .iter()
        .enumerate()
        .filter(|(_, &t)| t != IGNORE)
        .map(|(i, &t)| (i, t))
        .unzip()
}

fn init_tensor(s: &ParamSpec, std: f32, seed: u64, stream: u64) -> Result<Tensor> {
    let n: usize = s.dims.iter().product();
    let data = if s.name.contains("LayerNorm.weight") || s.name.contains("layer_norm.weight") {
        vec![1.0; n]
    } else if s.name.ends_with("bias") {
        vec![0.0; n]
    } else {
        super::encoder::normal_vec(n, std, seed, stream)
    };
    Tensor::from_vec(data, &s.dims)
}
