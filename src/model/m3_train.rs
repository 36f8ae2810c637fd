//! The M3 student in training (SPEC §4.4-4.6, decision §10.4): dense, sparse and ColBERT score
//! matrices over the in-batch candidates, InfoNCE per head, the ensemble, optional teacher
//! distillation (m3_kd_loss / kl_div) and self-knowledge distillation.

use super::encoder::{encoder_param_specs, DropoutCfg, Encoder, EncoderInput};
use super::m3::NORM_EPS;
use super::params::{ParamSet, ParamSpec};
use crate::autograd::{Tape, Var};
use crate::device::cpu::elementwise::hash_u32;
use crate::error::{Error, Result};
use crate::io::model_dir::M3Heads;
use crate::ops;
use crate::tensor::Tensor;
use std::ops::Range;
use std::sync::Arc;

/// Names of the head tensors appended after the encoder's.
pub const HEAD_NAMES: [&str; 4] = [
    "colbert_linear.weight",
    "colbert_linear.bias",
    "sparse_linear.weight",
    "sparse_linear.bias",
];

/// How teacher scores enter the per-head loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KdLoss {
    /// FlagEmbedding's Plackett-Luce-like listwise loss (the M3 scripts' choice; the default).
    #[default]
    M3KdLoss,
    /// KL to the teacher over the group + in-batch CE.
    KlDiv,
}

/// Loss settings; the default is `finetune`'s (temperature 0.02, unified, self-distillation,
/// `m3_kd_loss`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct M3LossConfig {
    pub temperature: f32,
    /// Sparse and ColBERT heads (and the ensemble) on top of dense.
    pub unified: bool,
    /// Self-knowledge distillation from the ensemble score (when `unified`).
    pub self_distill: bool,
    pub kd: KdLoss,
}

impl Default for M3LossConfig {
    fn default() -> Self {
        M3LossConfig {
            temperature: 0.02,
            unified: true,
            self_distill: true,
            kd: KdLoss::M3KdLoss,
        }
    }
}

/// The student: encoder + heads in one [`ParamSet`] (`[encoder][colbert w, b][sparse w, b]`).
#[derive(Clone, Debug)]
pub struct M3Student {
    pub encoder_config: crate::model::config::EncoderConfig,
    pub params: ParamSet,
    /// Tensors of the loaded checkpoint outside the model (`pooler.*`), saved back unchanged
    /// ([`crate::io::model_dir::passthrough_tensors`]).
    pub extra_tensors: std::collections::BTreeMap<String, Tensor>,
}

/// One batch: B queries and B·G passages (query-major groups, positive first).
#[derive(Clone, Debug)]
pub struct M3Batch {
    pub queries: EncoderInput,
    pub passages: EncoderInput,
    pub group: usize,
    /// [B, G] teacher probabilities (softmax of the teacher scores), if any.
    pub teacher: Option<Tensor>,
    /// No in-batch negatives: every score matrix is the local [B, G] block (decision §10.4).
    pub no_in_batch: bool,
    /// Cross-device negatives for the dense head (SPEC §4.5): this batch is one rank's share of
    /// a data-parallel step over this group; the dense vectors (and teacher targets) of all ranks
    /// are gathered and the dense loss is the global one over [W·B, W·B·G]. Ignored in
    /// no-in-batch mode and for a group of one.
    pub cross_device: Option<crate::dist::Group>,
}

/// Loss values of one batch, plus the total on the tape.
pub struct M3Loss {
    pub total: Var,
    pub dense: f32,
    pub sparse: f32,
    pub colbert: f32,
    pub ensemble: f32,
    pub self_distill: f32,
}

/// The three score matrices (already divided by the temperature): [B, B·G], or [B, G] in
/// no-in-batch mode.
pub struct M3Scores {
    pub dense: Var,
    /// With cross-device negatives: the global dense scores [W·B, W·B·G] (local rows and columns
    /// carry the gradient, the other ranks' are constants) and the gathered teacher targets.
    /// `dense` stays the local block, used by the ensemble and self-distillation.
    pub dense_cross: Option<(Var, Option<Tensor>)>,
    pub sparse: Option<Var>,
    pub colbert: Option<Var>,
}

impl M3Student {
    /// From an encoder and heads.
    pub fn new(encoder: Encoder, heads: &M3Heads) -> Result<M3Student> {
        let mut specs = encoder.params.specs().to_vec();
        let mut values = encoder.params.values().to_vec();
        for (name, t) in HEAD_NAMES.iter().zip([
            &heads.colbert_weight,
            &heads.colbert_bias,
            &heads.sparse_weight,
            &heads.sparse_bias,
        ]) {
            specs.push(ParamSpec {
                name: name.to_string(),
                dims: t.dims().to_vec(),
            });
            values.push(t.to_f32());
        }
        Ok(M3Student {
            encoder_config: encoder.config,
            params: ParamSet::from_values(specs, values)?,
            extra_tensors: Default::default(),
        })
    }

    /// A loaded model as a student (its encoder, its heads or fresh ones drawn from `seed`, and
    /// its pass-through tensors), without reading the directory again.
    pub fn from_model(model: &crate::model::m3::M3Model, seed: u64) -> Result<M3Student> {
        let hidden = model.encoder.config.hidden_size;
        let heads = match &model.heads {
            Some(h) => h.clone(),
            None => fresh_heads(hidden, seed)?,
        };
        let mut student = M3Student::new(model.encoder.clone(), &heads)?;
        student.extra_tensors = model.extra_tensors.clone();
        Ok(student)
    }

    /// A model directory as a student: backbone + heads, or fresh heads
    /// ([`fresh_heads`] with `seed`) when the directory has no colbert/sparse .pt files.
    pub fn load_dir(dir: &std::path::Path, seed: u64) -> Result<M3Student> {
        M3Student::load_dir_heads_from(dir, dir, seed)
    }

    /// The backbone of `dir` with the heads of `dir`, else of `heads_dir` (a dense-only run's
    /// checkpoint has none: the run's base model has them, whatever their width), else fresh.
    pub fn load_dir_heads_from(
        dir: &std::path::Path,
        heads_dir: &std::path::Path,
        seed: u64,
    ) -> Result<M3Student> {
        let cfg = crate::model::config::EncoderConfig::from_file(dir.join("config.json"))?;
        let (map, path) = crate::io::read_backbone(dir)?;
        let enc = Encoder::from_tensors(cfg, &map, &path)?;
        let hidden = enc.config.hidden_size;
        let heads = match crate::io::read_heads(dir, hidden)? {
            Some(h) => h,
            None => match crate::io::read_heads(heads_dir, hidden)? {
                Some(h) => h,
                None => fresh_heads(hidden, seed)?,
            },
        };
        let mut student = M3Student::new(enc, &heads)?;
        student.extra_tensors = crate::io::model_dir::passthrough_tensors(&map);
        Ok(student)
    }

    fn n_encoder(&self) -> usize {
        encoder_param_specs(&self.encoder_config).len()
    }

    /// The encoder part.
    pub fn encoder(&self) -> Result<Encoder> {
        let n = self.n_encoder();
        Ok(Encoder {
            config: self.encoder_config.clone(),
            params: ParamSet::from_values(
                self.params.specs()[..n].to_vec(),
                self.params.values()[..n].to_vec(),
            )?,
        })
    }

    /// The heads part.
    pub fn heads(&self) -> M3Heads {
        let v = &self.params.values()[self.n_encoder()..];
        M3Heads {
            colbert_weight: v[0].clone(),
            colbert_bias: v[1].clone(),
            sparse_weight: v[2].clone(),
            sparse_bias: v[3].clone(),
        }
    }

    /// Encode rows `rows` of `x` and apply the heads, padded back to `x.len` (SPEC §4.4).
    ///
    /// The rows are encoded as one batch padded to their longest text (padding never changes the
    /// outputs of real tokens). With dropout, every text draws its masks from the seed
    /// [`text_seed`]`(drop.seed, side, row)` and is computed as it is alone
    /// ([`Encoder::forward_texts`]), so its dropout depends only on the text and its row in the
    /// batch, never on which other texts share its sub-batch: a sub-batched encode is then the
    /// full-batch encode.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_heads(
        &self,
        tape: &mut Tape,
        p: &[Var],
        x: &EncoderInput,
        rows: Range<usize>,
        side: u64,
        unified: bool,
        drop: Option<DropoutCfg>,
    ) -> Result<HeadOutputs> {
        if rows.end > x.batch || rows.is_empty() {
            return Err(Error::invalid(format!(
                "encode_heads: rows {rows:?} of a batch of {}",
                x.batch
            )));
        }
        let n = self.n_encoder();
        let enc = self.encoder()?;
        let (pe, ph) = (&p[..n], &p[n..]);
        let xi = sub_input(x, rows.clone());
        let h = match drop {
            Some(d) => {
                let seeds: Vec<u64> = rows.map(|i| text_seed(d.seed, side, i)).collect();
                enc.forward_texts(tape, pe, &xi, d, &seeds)?
            }
            None => enc.forward(tape, pe, &xi, None)?,
        };
        let heads = apply_heads(tape, ph, &xi, &h, unified)?;
        assemble(tape, &[heads], x.len)
    }

    /// Score matrices from the head outputs of all B queries and B·G passages: [B, B·G] in
    /// in-batch mode, the local [B, G] blocks in no-in-batch mode (decision §10.4). All divided by
    /// the temperature.
    pub fn scores_from_heads(
        &self,
        tape: &mut Tape,
        q: &HeadOutputs,
        p: &HeadOutputs,
        batch: &M3Batch,
        cfg: &M3LossConfig,
        drop_ids: &[u32],
    ) -> Result<M3Scores> {
        let raw = match (&q.sparse, &p.sparse, &q.colbert, &p.colbert) {
            (Some(wq), Some(wp), Some(cq), Some(cp)) => {
                let ss = ops::lexical_scores(
                    tape,
                    wq,
                    Arc::from(batch.queries.ids.as_slice()),
                    wp,
                    Arc::from(batch.passages.ids.as_slice()),
                    Arc::from(drop_ids),
                )?;
                let sc = ops::maxsim(
                    tape,
                    cq,
                    colbert_mask(&batch.queries),
                    cp,
                    colbert_mask(&batch.passages),
                )?;
                Some((ss, sc))
            }
            _ => None,
        };
        scores_from_raw(tape, q, p, raw, batch, cfg)
    }

    /// Score matrices for a batch, encoded on `tape` in one piece.
    pub fn scores(
        &self,
        tape: &mut Tape,
        p: &[Var],
        batch: &M3Batch,
        cfg: &M3LossConfig,
        drop: Option<DropoutCfg>,
        drop_ids: &[u32],
    ) -> Result<M3Scores> {
        check_batch(batch)?;
        let (q, pp) = (&batch.queries, &batch.passages);
        let hq = self.encode_heads(tape, p, q, 0..q.batch, QUERY_SIDE, cfg.unified, drop)?;
        let hp = self.encode_heads(tape, p, pp, 0..pp.batch, PASSAGE_SIDE, cfg.unified, drop)?;
        self.scores_from_heads(tape, &hq, &hp, batch, cfg, drop_ids)
    }

    /// The full loss of a batch on one tape (SPEC §4.6 / decision §10.4).
    pub fn loss(
        &self,
        tape: &mut Tape,
        p: &[Var],
        batch: &M3Batch,
        cfg: &M3LossConfig,
        drop: Option<DropoutCfg>,
        drop_ids: &[u32],
    ) -> Result<M3Loss> {
        let s = self.scores(tape, p, batch, cfg, drop, drop_ids)?;
        loss_from_scores(tape, &s, batch, cfg)
    }

    /// Loss values and parameter gradients of a batch with the encoder and the three heads on a
    /// kernel device (`engine::DeviceEncoder` + `engine::m3_heads`, CUDA or emulated): the
    /// hidden states and the heads' outputs stay on the device; only the \[CLS\] rows and the
    /// sparse / ColBERT score matrices ([Bq, Bp]) come to a small host tape for the losses, and
    /// their gradients go back up. The device backward accumulates the encoder's weight
    /// gradients into `dgrads` (the device gradient buffers, e.g.
    /// `engine::optim::DeviceAdamW::grads`; cleared here). They stay there (summed over
    /// `sum_over` when given, NCCL on CUDA); the return value holds the loss values and the head
    /// parameters' gradients (this rank's own).
    ///
    /// `sub` > 0 encodes each side in sub-batches of `sub` texts by the exact two-pass scheme of
    /// [`M3Student::sub_batch_grads`]: pass 1 runs inference forwards (no saved activations) and
    /// keeps only each sub-batch's head outputs (on the device); the loss is computed on the
    /// whole batch; pass 2 re-runs each sub-batch's training forward and its backward from the
    /// heads' cached gradients. The device then holds the activations of one sub-batch at a time.
    /// Each sub-batch is trimmed to its longest text.
    ///
    /// Dropout: each encoder call draws its masks from `text_seed(seed, side, first row)`; with
    /// `sub` = 1 that is the CPU engine's per-text seeding ([`M3Student::encode_heads`]), so the
    /// run equals the CPU path with dropout too; larger pieces equal it only without dropout.
    #[allow(clippy::too_many_arguments)]
    pub fn device_grads_resident(
        &self,
        dev: &dyn crate::device::launch::KernelDevice,
        denc: &crate::engine::DeviceEncoder,
        dgrads: &[crate::engine::DBuf],
        batch: &M3Batch,
        cfg: &M3LossConfig,
        dropout: Option<DropoutCfg>,
        drop_ids: &[u32],
        sum_over: Option<&crate::dist::Group>,
        sub: usize,
    ) -> Result<(M3LossValues, Vec<Option<Tensor>>)> {
        use crate::engine::m3_heads::{BatchScores, HeadGradBufs, HeadWeights, SideHeads};
        check_batch(batch)?;
        let n = self.n_encoder();
        let hidden = self.encoder_config.hidden_size;
        let vocab = self.encoder_config.vocab_size;
        let hw = if cfg.unified {
            Some(HeadWeights::upload(
                dev,
                &self.params.values()[n..],
                denc.dt,
                drop_ids,
            )?)
        } else {
            None
        };
        // Pass 1: each piece's forward and heads; whole batches keep their training forward.
        let mut sides = Vec::new();
        let mut calls = Vec::new();
        for (x, side) in [
            (&batch.queries, QUERY_SIDE),
            (&batch.passages, PASSAGE_SIDE),
        ] {
            let mut heads = SideHeads::new(dev, hw.as_ref(), x, hidden)?;
            let mut side_calls = Vec::new();
            for r in chunks(x.batch, if sub == 0 { x.batch } else { sub }) {
                let d = dropout.map(|d| DropoutCfg {
                    seed: text_seed(d.seed, side, r.start),
                    ..d
                });
                let xi = if sub == 0 {
                    x.clone()
                } else {
                    sub_input(x, r.clone())
                };
                let f = denc.forward(dev, &xi, d, sub == 0)?;
                heads.forward_piece(dev, hw.as_ref(), vocab, &f.hidden, &xi, r.start)?;
                side_calls.push((xi, d, r.start, (sub == 0).then_some(f)));
            }
            sides.push(heads);
            calls.push(side_calls);
        }
        let scores = match &hw {
            Some(hw) => Some(BatchScores::new(dev, hw, &sides[0], &sides[1])?),
            None => None,
        };
        // The losses on a small host tape: [CLS] rows and raw score matrices as leaves.
        let (bq, bp) = (batch.queries.batch, batch.passages.batch);
        let mut tape = Tape::new();
        let leaf = |tape: &mut Tape, v: &[f32], dims: &[usize]| -> Result<Var> {
            Ok(tape.leaf(Tensor::from_vec(v.to_vec(), dims)?))
        };
        let cls_q = leaf(&mut tape, &sides[0].cls, &[bq, hidden])?;
        let cls_p = leaf(&mut tape, &sides[1].cls, &[bp, hidden])?;
        let raw = match &scores {
            Some(sc) => Some((
                leaf(&mut tape, &sc.sparse, &[bq, bp])?,
                leaf(&mut tape, &sc.colbert, &[bq, bp])?,
            )),
            None => None,
        };
        let dense = |tape: &mut Tape, cls: &Var| -> Result<HeadOutputs> {
            Ok(HeadOutputs {
                dense: ops::l2_normalize(tape, cls, NORM_EPS)?,
                sparse: None,
                colbert: None,
            })
        };
        let (oq, op) = (dense(&mut tape, &cls_q)?, dense(&mut tape, &cls_p)?);
        let s = scores_from_raw(&mut tape, &oq, &op, raw.clone(), batch, cfg)?;
        let loss = loss_from_scores(&mut tape, &s, batch, cfg)?;
        drop((s, oq, op));
        let values = loss.values()?;
        let mut g = tape.backward(&loss.total)?;
        let mut grad = |v: &Var| -> Result<Vec<f32>> {
            Ok(g.take(v)
                .unwrap_or_else(|| Tensor::zeros(v.dims()))
                .to_f32()
                .f32s()?
                .to_vec())
        };
        let dcls = [grad(&cls_q)?, grad(&cls_p)?];
        let side_grads = match (&hw, &scores, &raw) {
            (Some(hw), Some(sc), Some((ss, sv))) => {
                let (dss, dsv) = (grad(ss)?, grad(sv)?);
                let (gq, gp) =
                    sc.backward(dev, hw, (&sides[0], &sides[1]), Some(&dss), Some(&dsv))?;
                Some([gq, gp])
            }
            _ => None,
        };
        let acc = hw
            .as_ref()
            .map(|hw| HeadGradBufs::new(dev, hw))
            .transpose()?;
        // Pass 2: each piece's hidden-state gradient, then its encoder backward.
        crate::engine::DeviceEncoder::clear_grads(dev, dgrads)?;
        for (si, side_calls) in calls.into_iter().enumerate() {
            for (xi, d, first, fwd) in side_calls {
                let f = match fwd {
                    Some(f) => f,
                    // Recompute this piece's training forward (same input, same masks).
                    None => denc.forward(dev, &xi, d, true)?,
                };
                let dh = sides[si].backward_piece(
                    dev,
                    hw.as_ref(),
                    side_grads.as_ref().map(|g| &g[si]),
                    acc.as_ref(),
                    &f.hidden,
                    &xi,
                    first,
                    &dcls[si],
                )?;
                denc.backward(dev, f, &dh, dgrads)?;
            }
        }
        if let Some(group) = sum_over {
            group.all_reduce_device(dev, dgrads)?;
        }
        let head_grads = match acc {
            Some(acc) => {
                let h = acc.download(dev)?;
                [h.colbert_w, h.colbert_b, h.sparse_w, h.sparse_b]
                    .into_iter()
                    .zip(&self.params.specs()[n..])
                    .map(|(v, spec)| Tensor::from_vec(v, &spec.dims).map(Some))
                    .collect::<Result<Vec<_>>>()?
            }
            None => vec![None; self.params.specs().len() - n],
        };
        Ok((values, head_grads))
    }

    /// Loss values and parameter gradients of a batch by the exact two-pass sub-batch scheme
    /// (GradCache-style; SPEC §5.3 / issue 5 item 5):
    ///
    /// 1. encode queries and passages in sub-batches of `sub` texts without a tape, keeping only
    ///    the head outputs (dense vectors, per-token sparse weights, ColBERT vectors);
    /// 2. compute the full-batch loss on a small tape whose leaves are those head outputs and
    ///    backpropagate to get their gradients;
    /// 3. re-encode each sub-batch on a fresh tape (same per-text dropout seeds) and backpropagate
    ///    Σ ⟨head output, cached gradient⟩ into the parameters, accumulating.
    ///
    /// Peak activation memory is one sub-batch's tape plus the head outputs of the batch; the
    /// gradients equal [`M3Student::loss`]'s up to float summation order. Returns the gradient of
    /// every parameter (`None` where none reached it), in `params` order.
    pub fn sub_batch_grads(
        &self,
        batch: &M3Batch,
        cfg: &M3LossConfig,
        dropout: Option<DropoutCfg>,
        drop_ids: &[u32],
        sub: usize,
    ) -> Result<(M3LossValues, Vec<Option<Tensor>>)> {
        check_batch(batch)?;
        let sub = sub.max(1);
        let sides = [
            (&batch.queries, QUERY_SIDE),
            (&batch.passages, PASSAGE_SIDE),
        ];
        // Pass 1: no tape, head outputs only.
        let mut ng = Tape::no_grad();
        let p0 = self.params.bind(&mut ng);
        let mut cached = Vec::new();
        for (x, side) in sides {
            let mut parts = Vec::new();
            for r in chunks(x.batch, sub) {
                parts.push(self.encode_heads(&mut ng, &p0, x, r, side, cfg.unified, dropout)?);
            }
            cached.push(concat_heads(&parts)?);
        }
        drop_vars(p0);
        // The loss on a tape whose leaves are the head outputs.
        let mut lt = Tape::new();
        let mut leaf = |h: &HeadTensors| HeadOutputs {
            dense: lt.leaf(h.dense.clone()),
            sparse: h.sparse.clone().map(|t| lt.leaf(t)),
            colbert: h.colbert.clone().map(|t| lt.leaf(t)),
        };
        let (hq, hp) = (leaf(&cached[0]), leaf(&cached[1]));
        drop(cached);
        let s = self.scores_from_heads(&mut lt, &hq, &hp, batch, cfg, drop_ids)?;
        let loss = loss_from_scores(&mut lt, &s, batch, cfg)?;
        drop(s);
        let values = loss.values()?;
        let mut g = lt.backward(&loss.total)?;
        let mut take = |h: &HeadOutputs| HeadGrads {
            dense: g.take(&h.dense),
            sparse: h.sparse.as_ref().and_then(|v| g.take(v)),
            colbert: h.colbert.as_ref().and_then(|v| g.take(v)),
        };
        let grads = [take(&hq), take(&hp)];
        drop((hq, hp));
        // Pass 2: re-encode each sub-batch on a fresh tape and push the cached gradients in.
        let mut acc: Vec<Option<Vec<f32>>> = vec![None; self.params.values().len()];
        for ((x, side), gr) in sides.into_iter().zip(&grads) {
            for r in chunks(x.batch, sub) {
                let mut tape = Tape::new();
                let p = self.params.bind(&mut tape);
                let h =
                    self.encode_heads(&mut tape, &p, x, r.clone(), side, cfg.unified, dropout)?;
                let mut surrogate: Option<Var> = None;
                for (out, g) in [
                    (Some(&h.dense), &gr.dense),
                    (h.sparse.as_ref(), &gr.sparse),
                    (h.colbert.as_ref(), &gr.colbert),
                ] {
                    let (Some(out), Some(g)) = (out, g) else {
                        continue;
                    };
                    let d = ops::dot_sum(&mut tape, out, &row_slice(g, x.batch, r.clone())?)?;
                    surrogate = Some(match surrogate {
                        None => d,
                        Some(s) => ops::add(&mut tape, &s, &d)?,
                    });
                }
                let Some(surrogate) = surrogate else {
                    continue;
                };
                drop(h);
                let pg = tape.backward(&surrogate)?;
                for (slot, v) in acc.iter_mut().zip(&p) {
                    if let Some(t) = pg.get(v) {
                        let t = t.f32s()?;
                        match slot {
                            Some(a) => a.iter_mut().zip(t).for_each(|(a, b)| *a += b),
                            None => *slot = Some(t.to_vec()),
                        }
                    }
                }
            }
        }
        let out = acc
            .into_iter()
            .zip(self.params.specs())
            .map(|(g, s)| g.map(|g| Tensor::from_vec(g, &s.dims)).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok((values, out))
    }
}

/// Dropout-seed stream of the queries of a batch (see [`text_seed`]).
pub const QUERY_SIDE: u64 = 0x5155_4552;
/// Dropout-seed stream of the passages of a batch.
pub const PASSAGE_SIDE: u64 = 0x9A55_A6E5;

/// The dropout seed of text `row` on `side` of a batch whose forward seed is `seed`.
pub fn text_seed(seed: u64, side: u64, row: usize) -> u64 {
    let r = row as u64;
    ((hash_u32(seed, side, 2 * r) as u64) << 32) | hash_u32(seed, side, 2 * r + 1) as u64
}

/// The head outputs of some texts (on a tape, or constants).
#[derive(Clone, Debug)]
pub struct HeadOutputs {
    /// [n, H] normalised CLS vectors.
    pub dense: Var,
    /// [n, T] ReLU term weights (zero past each text's end); unified only.
    pub sparse: Option<Var>,
    /// [n, T−1, D] normalised ColBERT vectors of tokens 1.. (zero on padding); unified only.
    pub colbert: Option<Var>,
}

/// Loss values of one batch (no tape).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct M3LossValues {
    pub total: f32,
    pub dense: f32,
    pub sparse: f32,
    pub colbert: f32,
    pub ensemble: f32,
    pub self_distill: f32,
}

impl M3Loss {
    /// The values without the tape.
    pub fn values(&self) -> Result<M3LossValues> {
        Ok(M3LossValues {
            total: self.total.value().f32s()?[0],
            dense: self.dense,
            sparse: self.sparse,
            colbert: self.colbert,
            ensemble: self.ensemble,
            self_distill: self.self_distill,
        })
    }
}

struct HeadTensors {
    dense: Tensor,
    sparse: Option<Tensor>,
    colbert: Option<Tensor>,
}

struct HeadGrads {
    dense: Option<Tensor>,
    sparse: Option<Tensor>,
    colbert: Option<Tensor>,
}

fn drop_vars(_: Vec<Var>) {}

fn check_batch(batch: &M3Batch) -> Result<()> {
    let b = batch.queries.batch;
    if batch.passages.batch != b * batch.group {
        return Err(Error::shape(
            "passages (B·G)",
            &[b * batch.group],
            &[batch.passages.batch],
        ));
    }
    Ok(())
}

/// `0..n` in consecutive ranges of `k`.
fn chunks(n: usize, k: usize) -> Vec<Range<usize>> {
    (0..n).step_by(k).map(|s| s..(s + k).min(n)).collect()
}

/// Rows `rows` of `x`, padded to their own longest text.
fn sub_input(x: &EncoderInput, rows: Range<usize>) -> EncoderInput {
    let len = rows.clone().map(|i| x.text_len(i)).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut mask = Vec::with_capacity(rows.len() * len);
    for i in rows.clone() {
        ids.extend_from_slice(&x.ids[i * x.len..i * x.len + len]);
        mask.extend_from_slice(&x.mask[i * x.len..i * x.len + len]);
    }
    EncoderInput {
        ids,
        mask,
        batch: rows.len(),
        len,
    }
}

/// The score matrices from the dense vectors of `q` and `p` (their sparse / ColBERT outputs are
/// not read) and, when unified, the raw lexical and MaxSim scores [Bq, Bp]: the temperature, the
/// no-in-batch column selection and the cross-device dense scores (SPEC 4.5).
fn scores_from_raw(
    tape: &mut Tape,
    q: &HeadOutputs,
    p: &HeadOutputs,
    raw: Option<(Var, Var)>,
    batch: &M3Batch,
    cfg: &M3LossConfig,
) -> Result<M3Scores> {
    let inv_t = 1.0 / cfg.temperature;
    let local = |tape: &mut Tape, s: Var| -> Result<Var> {
        let s = ops::scale(tape, &s, inv_t)?;
        if batch.no_in_batch {
            ops::group_columns(tape, &s, batch.group)
        } else {
            Ok(s)
        }
    };
    let sd = ops::linear(tape, &q.dense, &p.dense, None)?;
    let dense = local(tape, sd)?;
    let dense_cross = match &batch.cross_device {
        Some(g) if g.world() > 1 && !batch.no_in_batch => {
            Some(cross_device_scores(tape, g, q, p, batch, inv_t)?)
        }
        _ => None,
    };
    let (sparse, colbert) = match raw {
        Some((ss, sc)) => (Some(local(tape, ss)?), Some(local(tape, sc)?)),
        None => (None, None),
    };
    Ok(M3Scores {
        dense,
        dense_cross,
        sparse,
        colbert,
    })
}

/// Mask of the ColBERT tokens (1..) of every text.
fn colbert_mask(x: &EncoderInput) -> Arc<[u8]> {
    (0..x.batch)
        .flat_map(|b| (1..x.len).map(move |l| x.mask[b * x.len + l]))
        .collect::<Vec<_>>()
        .into()
}

/// The three heads on the last hidden state `h` [n, L, H] of `x` (padded to `x.len`).
fn apply_heads(
    tape: &mut Tape,
    ph: &[Var],
    x: &EncoderInput,
    h: &Var,
    unified: bool,
) -> Result<HeadOutputs> {
    let cls: Vec<usize> = (0..x.batch).map(|i| i * x.len).collect();
    let d = ops::select_rows(tape, h, &cls)?;
    let dense = ops::l2_normalize(tape, &d, NORM_EPS)?;
    if !unified {
        return Ok(HeadOutputs {
            dense,
            sparse: None,
            colbert: None,
        });
    }
    // Sparse: ReLU term weights per token (max per id is taken by the lexical score).
    let w = ops::linear(tape, h, &ph[2], Some(&ph[3]))?;
    let w = ops::relu(tape, &w)?;
    let sparse = ops::reshape(tape, &w, &[x.batch, x.len])?;
    // ColBERT: vectors of tokens 1.. (pads zeroed), normalised.
    let rows: Vec<usize> = (0..x.batch)
        .flat_map(|b| (1..x.len).map(move |l| b * x.len + l))
        .collect();
    let f: Arc<[f32]> = rows
        .iter()
        .map(|&r| x.mask[r] as f32)
        .collect::<Vec<_>>()
        .into();
    let v = ops::select_rows(tape, h, &rows)?;
    let v = ops::linear(tape, &v, &ph[0], Some(&ph[1]))?;
    let v = ops::mul_rows(tape, &v, f)?;
    let v = ops::l2_normalize(tape, &v, NORM_EPS)?;
    let dim = v.dims()[1];
    let colbert = ops::reshape(tape, &v, &[x.batch, x.len.saturating_sub(1), dim])?;
    Ok(HeadOutputs {
        dense,
        sparse: Some(sparse),
        colbert: Some(colbert),
    })
}

/// Pieces [n_i, l_i, c] → [Σ n_i, t, c], zero past each piece's l_i (one tape node).
fn pad_concat(tape: &mut Tape, pieces: &[Var], t: usize) -> Result<Var> {
    let shapes = pieces
        .iter()
        .map(|v| v.value().shape().dims3("pad_concat piece"))
        .collect::<Result<Vec<_>>>()?;
    let c = shapes.first().map_or(0, |s| s.2);
    if let Some(bad) = shapes.iter().find(|s| s.2 != c || s.1 > t) {
        return Err(Error::shape(
            "pad_concat piece",
            &[bad.0, t, c],
            &[bad.0, bad.1, bad.2],
        ));
    }
    if pieces.len() == 1 && shapes[0].1 == t {
        return Ok(pieces[0].clone());
    }
    let total: usize = shapes.iter().map(|s| s.0).sum();
    let mut y = vec![0.0f32; total * t * c];
    let mut row = 0;
    for (v, &(n, l, _)) in pieces.iter().zip(&shapes) {
        let xs = v.value().f32s()?;
        for r in 0..n {
            let at = (row + r) * t * c;
            y[at..at + l * c].copy_from_slice(&xs[r * l * c..(r + 1) * l * c]);
        }
        row += n;
    }
    let out = Tensor::from_vec(y, &[total, t, c])?;
    let inputs: Vec<&Var> = pieces.iter().collect();
    Ok(tape.record("pad_concat", &inputs, out, move |dy| {
        let dy = dy.f32s()?;
        let mut row = 0;
        shapes
            .iter()
            .map(|&(n, l, c)| {
                let mut dx = vec![0.0f32; n * l * c];
                for r in 0..n {
                    let at = (row + r) * t * c;
                    dx[r * l * c..(r + 1) * l * c].copy_from_slice(&dy[at..at + l * c]);
                }
                row += n;
                Tensor::from_vec(dx, &[n, l, c]).map(Some)
            })
            .collect()
    }))
}

/// Head outputs of several pieces, padded to length `t` and stacked.
fn assemble(tape: &mut Tape, pieces: &[HeadOutputs], t: usize) -> Result<HeadOutputs> {
    let view = |tape: &mut Tape, v: &Var, d: [usize; 3]| ops::reshape(tape, v, &d);
    let mut dense = Vec::new();
    let mut sparse = Vec::new();
    let mut colbert = Vec::new();
    for h in pieces {
        let (n, hd) = h.dense.value().shape().dims2("dense head")?;
        dense.push(view(tape, &h.dense, [n, 1, hd])?);
        if let (Some(s), Some(c)) = (&h.sparse, &h.colbert) {
            let (n, l) = s.value().shape().dims2("sparse head")?;
            sparse.push(view(tape, s, [n, l, 1])?);
            colbert.push(c.clone());
        }
    }
    let d = pad_concat(tape, &dense, 1)?;
    let (n, _, hd) = d.value().shape().dims3("dense head")?;
    let dense = ops::reshape(tape, &d, &[n, hd])?;
    if sparse.is_empty() {
        return Ok(HeadOutputs {
            dense,
            sparse: None,
            colbert: None,
        });
    }
    let s = pad_concat(tape, &sparse, t)?;
    let sparse = ops::reshape(tape, &s, &[n, t])?;
    let colbert = pad_concat(tape, &colbert, t.saturating_sub(1))?;
    Ok(HeadOutputs {
        dense,
        sparse: Some(sparse),
        colbert: Some(colbert),
    })
}

/// Stack the (constant) head outputs of consecutive sub-batches along rows.
fn concat_heads(parts: &[HeadOutputs]) -> Result<HeadTensors> {
    let cat = |get: &dyn Fn(&HeadOutputs) -> Option<&Var>| -> Result<Option<Tensor>> {
        let vs: Vec<&Var> = parts.iter().filter_map(get).collect();
        if vs.is_empty() {
            return Ok(None);
        }
        let mut dims = vs[0].dims().to_vec();
        dims[0] = vs.iter().map(|v| v.dims()[0]).sum();
        let mut data = Vec::with_capacity(dims.iter().product());
        for v in &vs {
            data.extend_from_slice(v.value().f32s()?);
        }
        Tensor::from_vec(data, &dims).map(Some)
    };
    Ok(HeadTensors {
        dense: cat(&|h| Some(&h.dense))?.expect("dense head"),
        sparse: cat(&|h| h.sparse.as_ref())?,
        colbert: cat(&|h| h.colbert.as_ref())?,
    })
}

/// Rows `rows` of a tensor whose leading dim is `n`.
fn row_slice(t: &Tensor, n: usize, rows: Range<usize>) -> Result<Tensor> {
    let per = t.numel() / n.max(1);
    let mut dims = t.dims().to_vec();
    dims[0] = rows.len();
    Tensor::from_vec(t.f32s()?[rows.start * per..rows.end * per].to_vec(), &dims)
}

/// The global dense scores of a cross-device step (SPEC §4.5): every rank's query and passage
/// vectors gathered in rank order; this rank's rows are replaced by its own vectors on the tape
/// (so only they carry gradient, as in FlagEmbedding's `_dist_gather_tensor`), then
/// S_x = Q_all · P_allᵀ / τ. Teacher targets are gathered alongside.
fn cross_device_scores(
    tape: &mut Tape,
    g: &crate::dist::Group,
    q: &HeadOutputs,
    p: &HeadOutputs,
    batch: &M3Batch,
    inv_t: f32,
) -> Result<(Var, Option<Tensor>)> {
    let r = g.rank();
    let global = |tape: &mut Tape, local: &Var| -> Result<Var> {
        let n = local.dims()[0];
        let all = Var::constant(g.all_gather_rows(local.value())?);
        let rows: Vec<usize> = (r * n..(r + 1) * n).collect();
        ops::replace_rows(tape, &all, &rows, local)
    };
    let qa = global(tape, &q.dense)?;
    let pa = global(tape, &p.dense)?;
    let sx = ops::linear(tape, &qa, &pa, None)?;
    let sx = ops::scale(tape, &sx, inv_t)?;
    let teacher = match &batch.teacher {
        Some(t) => Some(g.all_gather_rows(t)?),
        None => None,
    };
    Ok((sx, teacher))
}

/// The loss of a batch from its score matrices (SPEC §4.5-4.6 / decision §10.4). In-batch mode:
/// [B, B·G] matrices, target b·G. No-in-batch mode: the local [B, G] blocks, target 0, teacher
/// KD and self-distillation over the G columns.
pub fn loss_from_scores(
    tape: &mut Tape,
    s: &M3Scores,
    batch: &M3Batch,
    cfg: &M3LossConfig,
) -> Result<M3Loss> {
    let b = batch.queries.batch;
    let g = batch.group;
    let targets: Vec<i64> = if batch.no_in_batch {
        vec![0; b]
    } else {
        (0..b).map(|i| (i * g) as i64).collect()
    };
    let head_loss_with =
        |tape: &mut Tape, s: &Var, teacher: &Option<Tensor>, targets: &[i64]| -> Result<Var> {
            let b = targets.len();
            match (teacher, cfg.kd) {
                (None, _) => ops::cross_entropy(tape, s, targets),
                (Some(t), KdLoss::M3KdLoss) if batch.no_in_batch => {
                    // Row by row: each row is its own [1, G] "batch" of candidates.
                    let tv = t.f32s()?;
                    let mut sum: Option<Var> = None;
                    for r in 0..b {
                        let row = ops::select_rows(tape, s, &[r])?;
                        let tr = Tensor::from_vec(tv[r * g..(r + 1) * g].to_vec(), &[1, g])?;
                        let l = ops::m3_kd_loss(tape, &row, &tr, g)?;
                        sum = Some(match sum {
                            None => l,
                            Some(a) => ops::add(tape, &a, &l)?,
                        });
                    }
                    ops::scale(tape, &sum.expect("B >= 1"), 1.0 / b as f32)
                }
                (Some(t), KdLoss::M3KdLoss) => ops::m3_kd_loss(tape, s, t, g),
                (Some(t), KdLoss::KlDiv) => {
                    let local = if batch.no_in_batch {
                        s.clone()
                    } else {
                        ops::group_columns(tape, s, g)?
                    };
                    let kl = ops::soft_cross_entropy(tape, &local, t)?;
                    let ce = ops::cross_entropy(tape, s, targets)?;
                    ops::add(tape, &kl, &ce)
                }
            }
        };
    let head_loss = |tape: &mut Tape, s: &Var| head_loss_with(tape, s, &batch.teacher, &targets);
    let ld = match &s.dense_cross {
        // Global rows: target (global query index)·G.
        Some((sx, teacher)) => {
            let rows = sx.dims()[0];
            let t: Vec<i64> = (0..rows).map(|i| (i * g) as i64).collect();
            match (&batch.teacher, cfg.kd) {
                // kl_div: the KD part on the local block's groups, the CE on the global rows.
                (Some(tl), KdLoss::KlDiv) => {
                    let local = ops::group_columns(tape, &s.dense, g)?;
                    let kl = ops::soft_cross_entropy(tape, &local, tl)?;
                    let ce = ops::cross_entropy(tape, sx, &t)?;
                    ops::add(tape, &kl, &ce)?
                }
                // m3_kd_loss (and plain CE): gathered teacher targets over the global rows.
                _ => head_loss_with(tape, sx, teacher, &t)?,
            }
        }
        None => head_loss(tape, &s.dense)?,
    };
    let val = |v: &Var| v.value().f32s().map(|x| x[0]);
    let (Some(ss), Some(sc)) = (&s.sparse, &s.colbert) else {
        let dense = val(&ld)?;
        return Ok(M3Loss {
            total: ld,
            dense,
            sparse: 0.0,
            colbert: 0.0,
            ensemble: 0.0,
            self_distill: 0.0,
        });
    };
    let ls = head_loss(tape, ss)?;
    let lc = head_loss(tape, sc)?;
    let s03 = ops::scale(tape, ss, 0.3)?;
    let se = ops::add(tape, &s.dense, &s03)?;
    let se = ops::add(tape, &se, sc)?;
    let le = head_loss(tape, &se)?;
    let ls01 = ops::scale(tape, &ls, 0.1)?;
    let sum = ops::add(tape, &ld, &le)?;
    let sum = ops::add(tape, &sum, &ls01)?;
    let sum = ops::add(tape, &sum, &lc)?;
    let mut total = ops::scale(tape, &sum, 0.25)?;
    let mut lsd = 0.0;
    if cfg.self_distill {
        // Teacher = softmax of the (detached) ensemble scores over the row's candidates.
        let teacher = softmax_rows(se.value())?;
        let a = ops::soft_cross_entropy(tape, &s.dense, &teacher)?;
        let bsd = ops::soft_cross_entropy(tape, ss, &teacher)?;
        let bsd = ops::scale(tape, &bsd, 0.1)?;
        let c = ops::soft_cross_entropy(tape, sc, &teacher)?;
        let x = ops::add(tape, &a, &bsd)?;
        let x = ops::add(tape, &x, &c)?;
        let x = ops::scale(tape, &x, 1.0 / 3.0)?;
        lsd = val(&x)?;
        let t2 = ops::add(tape, &total, &x)?;
        total = ops::scale(tape, &t2, 0.5)?;
    }
    Ok(M3Loss {
        dense: val(&ld)?,
        sparse: val(&ls)?,
        colbert: val(&lc)?,
        ensemble: val(&le)?,
        self_distill: lsd,
        total,
    })
}

/// Row-wise softmax of a [rows, cols] matrix (f64 accumulation).
pub fn softmax_rows(s: &Tensor) -> Result<Tensor> {
    let (rows, cols) = s.shape().dims2("softmax rows")?;
    let sv = s.f32s()?;
    let mut t = vec![0.0f32; rows * cols];
    for r in 0..rows {
        let row = &sv[r * cols..(r + 1) * cols];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        for c in 0..cols {
            t[r * cols + c] = ((row[c] as f64 - max).exp() / z) as f32;
        }
    }
    Tensor::from_vec(t, &[rows, cols])
}

/// Fresh heads as PyTorch's nn.Linear initialises them (kaiming-uniform with a = √5, i.e.
/// U(±1/√fan_in) for weight and bias) — FlagEmbedding's behaviour when the .pt files are absent.
pub fn fresh_heads(hidden: usize, seed: u64) -> Result<M3Heads> {
    use crate::data::rng::Rng;
    let bound = 1.0 / (hidden as f64).sqrt();
    let mut rng = Rng::new(seed, 0x4EAD);
    let mut u = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    Ok(M3Heads {
        colbert_weight: Tensor::from_vec(u(hidden * hidden), &[hidden, hidden])?,
        colbert_bias: Tensor::from_vec(u(hidden), &[hidden])?,
        sparse_weight: Tensor::from_vec(u(hidden), &[1, hidden])?,
        sparse_bias: Tensor::from_vec(u(1), &[1])?,
    })
}
