//! The BGE-M3 model: one encoder, three retrieval heads (dense CLS/mean, sparse lexical weights,
//! ColBERT multi-vectors), a tokenizer, and the encoding defaults read from the model directory.

use super::config::{read_sentence_transformers_info, EncoderConfig, Pooling};
use super::encoder::{Encoder, EncoderInput};
use crate::autograd::{Tape, Var};
use crate::data::tokenizer::TextTokenizer;
use crate::device::cpu::sparse::{max_by_token_id, LexEntry};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::model_dir::{self, M3Heads};
use crate::ops;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The normalisation eps of the dense and ColBERT heads (PyTorch F.normalize default).
pub const NORM_EPS: f32 = 1e-12;

/// A loaded BGE-M3-style model.
#[derive(Debug)]
pub struct M3Model {
    /// The backbone.
    pub encoder: Encoder,
    /// The sparse and ColBERT heads (None for a plain dense model such as a sentence-transformers
    /// BERT).
    pub heads: Option<M3Heads>,
    /// The tokenizer of the model directory.
    pub tokenizer: TextTokenizer,
    /// Default dense pooling (sentence-transformers Pooling module, else CLS).
    pub pooling: Pooling,
    /// Default dense normalisation (sentence-transformers Normalize module, else true).
    pub normalize: bool,
    /// Default max length in tokens, specials included (sentence_bert_config.json, else 512;
    /// never above the model's position table).
    pub max_length: usize,
    /// Where the model runs.
    pub device: Device,
    /// The directory it was loaded from.
    pub dir: PathBuf,
    /// Token ids the sparse head drops (cls, eos, pad, unk).
    pub special_ids: Vec<u32>,
    /// Checkpoint tensors the encoder does not use but a faithful copy keeps (`pooler.*`), written
    /// back by [`M3Model::save`] so transformers finds the pooler it expects.
    pub extra_tensors: BTreeMap<String, Tensor>,
    /// The model on a kernel device (CUDA or emulated) when `device` is not the CPU: encode runs
    /// there. One lock: a device runs one batch at a time.
    pub engine: Option<std::sync::Arc<std::sync::Mutex<crate::engine::M3Engine>>>,
}

impl M3Model {
    /// Load a model directory in the Hugging Face / FlagEmbedding layout: config.json,
    /// model.safetensors or pytorch_model.bin, tokenizer.json, and optionally colbert_linear.pt +
    /// sparse_linear.pt and the sentence-transformers files.
    ///
    /// ```no_run
    /// use retrom3::{M3Model, EncodeOptions, Device};
    /// let model = M3Model::load("models/bge-m3", Device::Cpu)?;
    /// let out = model.encode(&["What is BGE M3?"], &EncodeOptions::all())?;
    /// let dense = &out.dense.unwrap()[0];
    /// let sparse = &out.sparse.unwrap()[0];
    /// println!("{} dims, {} terms", dense.len(), sparse.len());
    /// # Ok::<(), retrom3::Error>(())
    /// ```
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<M3Model> {
        let dir = dir.as_ref();
        device.ensure_available()?;
        if !dir.is_dir() {
            let (kind, what) = if dir.exists() {
                (
                    std::io::ErrorKind::InvalidInput,
                    "not a directory (a model is the directory holding config.json)",
                )
            } else {
                (std::io::ErrorKind::NotFound, "model directory not found")
            };
            return Err(Error::io(dir, std::io::Error::new(kind, what)));
        }
        let config = EncoderConfig::from_file(dir.join("config.json"))?;
        let (map, path) = model_dir::read_backbone(dir)?;
        let encoder = Encoder::from_tensors(config, &map, &path)?;
        let extra_tensors = model_dir::passthrough_tensors(&map);
        let heads = model_dir::read_heads(dir, encoder.config.hidden_size)?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        if tokenizer.vocab_size() > encoder.config.vocab_size {
            return Err(Error::Config {
                field: "vocab_size".into(),
                msg: format!(
                    "tokenizer has {} tokens but the model's embedding table only {}",
                    tokenizer.vocab_size(),
                    encoder.config.vocab_size
                ),
            });
        }
        // The specials the post-processor adds are read from the table too (a template id past
        // it failed every encode as "token id N >= vocab size", naming neither file).
        if let Some(&id) = (tokenizer.post_processor_ids()?.iter())
            .find(|&&id| id as usize >= encoder.config.vocab_size)
        {
            return Err(Error::format(
                tokenizer.path(),
                format!(
                    "the post-processor adds token id {id}, outside the model's embedding table \
                     of {} rows (config.json vocab_size)",
                    encoder.config.vocab_size
                ),
            ));
        }
        tokenizer.check_wraps_texts()?;
        let st = read_sentence_transformers_info(dir)?;
        let max_length = st
            .max_seq_length
            .unwrap_or(512)
            .min(encoder.config.max_tokens());
        let special_ids = tokenizer.special_ids();
        let engine = (device != Device::Cpu)
            .then(|| {
                let dt = crate::engine::compute_dtype(device);
                crate::engine::M3Engine::new(device, &encoder, heads.as_ref(), dt)
            })
            .transpose()?
            .map(|e| std::sync::Arc::new(std::sync::Mutex::new(e)));
        Ok(M3Model {
            engine,
            encoder,
            heads,
            tokenizer,
            pooling: st.pooling.unwrap_or(Pooling::Cls),
            normalize: st.normalize.unwrap_or(true),
            max_length,
            device,
            dir: dir.to_path_buf(),
            special_ids,
            extra_tensors,
        })
    }

    /// The heads, or a clear error naming the directory when they are absent.
    pub fn require_heads(&self, what: &str) -> Result<&M3Heads> {
        self.heads.as_ref().ok_or_else(|| {
            Error::invalid(format!(
                "{what} needs the M3 heads, but {} has no colbert_linear.pt / sparse_linear.pt",
                self.dir.display()
            ))
        })
    }

    /// Write the model directory (model.safetensors, config.json, heads, tokenizer files) so that
    /// transformers and FlagEmbedding load it unchanged. A model without heads removes the head
    /// files `out` may hold (another model's heads must not load with this encoder).
    pub fn save(&self, out: impl AsRef<Path>) -> Result<()> {
        let out = out.as_ref();
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let mut tensors = self.encoder.params.to_map();
        tensors.extend(
            self.extra_tensors
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        model_dir::write_backbone(out, &tensors)?;
        let cfg = serde_json::to_string_pretty(&self.encoder.config.to_hf_json())
            .map_err(|e| Error::invalid(format!("config serialisation: {e}")))?;
        crate::io::write_atomic(&out.join("config.json"), |w| {
            std::io::Write::write_all(w, cfg.as_bytes())
        })?;
        match &self.heads {
            Some(h) => model_dir::write_heads(out, h)?,
            None => {
                for f in [model_dir::COLBERT_FILE, model_dir::SPARSE_FILE] {
                    match std::fs::remove_file(out.join(f)) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(Error::io(out.join(f), e))
                        }
                        _ => {}
                    }
                }
            }
        }
        if self.dir != out {
            model_dir::copy_tokenizer_files(&self.dir, out)?;
        }
        Ok(())
    }
}

/// Head outputs for one padded batch, per text, in batch order.
#[derive(Debug, Default)]
pub struct HeadOutputs {
    pub dense: Vec<Vec<f32>>,
    pub sparse: Vec<Vec<LexEntry>>,
    pub colbert: Vec<Vec<Vec<f32>>>,
}

/// Which heads to compute and how.
#[derive(Clone, Copy, Debug)]
pub struct HeadRequest {
    pub dense: bool,
    pub sparse: bool,
    pub colbert: bool,
    pub pooling: Pooling,
    pub normalize: bool,
}

impl M3Model {
    /// The kernel device the model runs on, when it is not the CPU (shared, e.g. with an index
    /// for device dense search).
    pub fn device_handle(&self) -> Option<std::sync::Arc<crate::engine::Gpu>> {
        self.engine
            .as_ref()
            .map(|e| e.lock().unwrap_or_else(|p| p.into_inner()).device_arc())
    }

    /// Encoder forward + the requested heads on one padded batch (no gradient).
    pub fn forward_heads(&self, input: &EncoderInput, req: HeadRequest) -> Result<HeadOutputs> {
        if let Some(engine) = &self.engine {
            let e = engine.lock().unwrap_or_else(|p| p.into_inner());
            return e.heads(input, req, &self.special_ids);
        }
        let mut tape = Tape::no_grad();
        let p = self.encoder.params.bind(&mut tape);
        let hs = self.encoder.forward(&mut tape, &p, input, None)?;
        self.heads_on_hidden(&mut tape, &hs, input, req)
    }

    /// The heads on a last hidden state [B, L, hidden].
    pub fn heads_on_hidden(
        &self,
        tape: &mut Tape,
        hs: &Var,
        input: &EncoderInput,
        req: HeadRequest,
    ) -> Result<HeadOutputs> {
        let heads = match (req.sparse || req.colbert, &self.heads) {
            (true, None) => Some(self.require_heads(if req.sparse {
                "sparse output"
            } else {
                "colbert output"
            })?),
            (_, h) => h.as_ref(),
        };
        heads_on_hidden(tape, hs, input, req, heads, &self.special_ids)
    }
}

/// The heads on a last hidden state [B, L, hidden] (the CPU reference of
/// `engine::m3::encode_heads`): `heads` must be present for sparse / colbert outputs.
pub fn heads_on_hidden(
    tape: &mut Tape,
    hs: &Var,
    input: &EncoderInput,
    req: HeadRequest,
    heads: Option<&M3Heads>,
    special_ids: &[u32],
) -> Result<HeadOutputs> {
    {
        let (b, l) = (input.batch, input.len);
        let hidden = *hs.dims().last().unwrap_or(&0);
        let lens: Vec<usize> = input
            .mask
            .chunks(l.max(1))
            .map(|m| m.iter().filter(|&&x| x != 0).count())
            .collect();
        // Overflowing or NaN weights give a non-finite hidden state; the sparse head's ReLU and
        // positive-weight filter would hide it (an empty vector), so it is an error here.
        if let Some(i) = hs.value().f32s()?.iter().position(|v| !v.is_finite()) {
            let per_text = (l * hidden).max(1);
            return Err(Error::NonFinite(format!(
                "the encoder's last hidden state (position {} of batch row {}): the model's \
                 weights overflow or hold NaN",
                i % per_text / hidden.max(1),
                i / per_text + 1
            )));
        }
        let mut out = HeadOutputs::default();
        if req.dense {
            let pooled = match req.pooling {
                Pooling::Cls => {
                    let rows: Vec<usize> = (0..b).map(|i| i * l).collect();
                    ops::select_rows(tape, hs, &rows)?
                }
                Pooling::Mean => ops::masked_mean(tape, hs, &input.mask)?,
            };
            let pooled = if req.normalize {
                ops::l2_normalize(tape, &pooled, NORM_EPS)?
            } else {
                pooled
            };
            out.dense = pooled
                .value()
                .f32s()?
                .chunks(hidden)
                .map(<[f32]>::to_vec)
                .collect();
        }
        if req.sparse || req.colbert {
            let heads = heads
                .ok_or_else(|| Error::invalid("sparse / colbert outputs need the model's heads"))?;
            if req.sparse {
                let sw = Var::constant(heads.sparse_weight.clone());
                let sb = Var::constant(heads.sparse_bias.clone());
                let w = ops::linear(tape, hs, &sw, Some(&sb))?;
                let w = ops::relu(tape, &w)?;
                let ws = w.value().f32s()?;
                for bi in 0..b {
                    let ids = &input.ids[bi * l..(bi + 1) * l];
                    out.sparse
                        .push(max_by_token_id(&ws[bi * l..(bi + 1) * l], ids, special_ids));
                }
            }
            if req.colbert {
                // ColBERT vectors: every real token after CLS (</s> included), projected, normalised.
                let rows: Vec<usize> = (0..b)
                    .flat_map(|bi| (1..lens[bi]).map(move |li| bi * l + li))
                    .collect();
                let x = ops::select_rows(tape, hs, &rows)?;
                let cw = Var::constant(heads.colbert_weight.clone());
                let cb = Var::constant(heads.colbert_bias.clone());
                let c = ops::linear(tape, &x, &cw, Some(&cb))?;
                let c = ops::l2_normalize(tape, &c, NORM_EPS)?;
                let dim = heads.colbert_weight.dims()[0];
                let cs = c.value().f32s()?;
                let mut off = 0;
                for &len in &lens {
                    let n = len.saturating_sub(1);
                    out.colbert.push(
                        cs[off * dim..(off + n) * dim]
                            .chunks(dim)
                            .map(<[f32]>::to_vec)
                            .collect(),
                    );
                    off += n;
                }
            }
        }
        Ok(out)
    }
}
