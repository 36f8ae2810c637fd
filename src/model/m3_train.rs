//! The M3 student in training (SPEC §4.4-4.6, decision §10.4): dense, sparse and ColBERT score
//! matrices over the in-batch candidates, InfoNCE per head, the ensemble, optional teacher
//! distillation (m3_kd_loss / kl_div) and self-knowledge distillation.

use super::encoder::{encoder_param_specs, DropoutCfg, Encoder, EncoderInput};
use super::m3::NORM_EPS;
use super::params::{ParamSet, ParamSpec};
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::io::model_dir::M3Heads;
use crate::ops;
use crate::tensor::Tensor;
use std::sync::Arc;

/// Names of the head tensors appended after the encoder's.
pub const HEAD_NAMES: [&str; 4] = [
    "colbert_linear.weight",
    "colbert_linear.bias",
    "sparse_linear.weight",
    "sparse_linear.bias",
];

/// How teacher scores enter the per-head loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KdLoss {
    /// FlagEmbedding's Plackett-Luce-like listwise loss (the M3 scripts' choice).
    M3KdLoss,
    /// KL to the teacher over the group + in-batch CE.
    KlDiv,
}

/// Loss settings.
#[derive(Clone, Copy, Debug)]
pub struct M3LossConfig {
    pub temperature: f32,
    /// Sparse and ColBERT heads (and the ensemble) on top of dense.
    pub unified: bool,
    /// Self-knowledge distillation from the ensemble score (when `unified`).
    pub self_distill: bool,
    pub kd: KdLoss,
}

/// The student: encoder + heads in one [`ParamSet`] (`[encoder][colbert w, b][sparse w, b]`).
#[derive(Clone, Debug)]
pub struct M3Student {
    pub encoder_config: crate::model::config::EncoderConfig,
    pub params: ParamSet,
}

/// One batch: B queries and B·G passages (query-major groups, positive first).
#[derive(Clone, Debug)]
pub struct M3Batch {
    pub queries: EncoderInput,
    pub passages: EncoderInput,
    pub group: usize,
    /// [B, G] teacher probabilities (softmax of the teacher scores), if any.
    pub teacher: Option<Tensor>,
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

/// The three score matrices (already divided by the temperature).
pub struct M3Scores {
    pub dense: Var,
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
        })
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

    /// Score matrices [B, B·G] for a batch.
    pub fn scores(
        &self,
        tape: &mut Tape,
        p: &[Var],
        batch: &M3Batch,
        cfg: &M3LossConfig,
        drop: Option<DropoutCfg>,
        drop_ids: &[u32],
    ) -> Result<M3Scores> {
        let n = self.n_encoder();
        let enc = self.encoder()?;
        let (pe, ph) = (&p[..n], &p[n..]);
        let hq = enc.forward(tape, pe, &batch.queries, drop)?;
        let pdrop = drop.map(|d| DropoutCfg {
            seed: d.seed ^ 0x9A55_A6E5,
            ..d
        });
        let hp = enc.forward(tape, pe, &batch.passages, pdrop)?;
        let inv_t = 1.0 / cfg.temperature;
        // Dense: normalised CLS vectors, S = q pᵀ / τ.
        let cls = |x: &EncoderInput| -> Vec<usize> { (0..x.batch).map(|i| i * x.len).collect() };
        let qd = ops::select_rows(tape, &hq, &cls(&batch.queries))?;
        let qd = ops::l2_normalize(tape, &qd, NORM_EPS)?;
        let pd = ops::select_rows(tape, &hp, &cls(&batch.passages))?;
        let pd = ops::l2_normalize(tape, &pd, NORM_EPS)?;
        let sd = ops::linear(tape, &qd, &pd, None)?;
        let dense = ops::scale(tape, &sd, inv_t)?;
        if !cfg.unified {
            return Ok(M3Scores {
                dense,
                sparse: None,
                colbert: None,
            });
        }
        // Sparse: ReLU term weights, max per token id, lexical match.
        let weights = |tape: &mut Tape, h: &Var, x: &EncoderInput| -> Result<Var> {
            let w = ops::linear(tape, h, &ph[2], Some(&ph[3]))?;
            let w = ops::relu(tape, &w)?;
            ops::reshape(tape, &w, &[x.batch, x.len])
        };
        let wq = weights(tape, &hq, &batch.queries)?;
        let wp = weights(tape, &hp, &batch.passages)?;
        let drop_ids: Arc<[u32]> = Arc::from(drop_ids);
        let ss = ops::lexical_scores(
            tape,
            &wq,
            Arc::from(batch.queries.ids.as_slice()),
            &wp,
            Arc::from(batch.passages.ids.as_slice()),
            drop_ids,
        )?;
        let sparse = ops::scale(tape, &ss, inv_t)?;
        // ColBERT: vectors of tokens 1.. (pads zeroed), normalised, MaxSim over real tokens.
        let vecs = |tape: &mut Tape, h: &Var, x: &EncoderInput| -> Result<(Var, Arc<[u8]>)> {
            let rows: Vec<usize> = (0..x.batch)
                .flat_map(|b| (1..x.len).map(move |l| b * x.len + l))
                .collect();
            let m: Vec<u8> = rows.iter().map(|&r| x.mask[r]).collect();
            let v = ops::select_rows(tape, h, &rows)?;
            let v = ops::linear(tape, &v, &ph[0], Some(&ph[1]))?;
            let f: Arc<[f32]> = m.iter().map(|&x| x as f32).collect::<Vec<_>>().into();
            let v = ops::mul_rows(tape, &v, f)?;
            let v = ops::l2_normalize(tape, &v, NORM_EPS)?;
            let d = v.dims()[1];
            Ok((
                ops::reshape(tape, &v, &[x.batch, x.len.saturating_sub(1), d])?,
                Arc::from(m),
            ))
        };
        let (cq, qm) = vecs(tape, &hq, &batch.queries)?;
        let (cp, pm) = vecs(tape, &hp, &batch.passages)?;
        let sc = ops::maxsim(tape, &cq, qm, &cp, pm)?;
        let colbert = ops::scale(tape, &sc, inv_t)?;
        Ok(M3Scores {
            dense,
            sparse: Some(sparse),
            colbert: Some(colbert),
        })
    }

    /// The full loss of a batch (SPEC §4.6 / decision §10.4).
    pub fn loss(
        &self,
        tape: &mut Tape,
        p: &[Var],
        batch: &M3Batch,
        cfg: &M3LossConfig,
        drop: Option<DropoutCfg>,
        drop_ids: &[u32],
    ) -> Result<M3Loss> {
        let b = batch.queries.batch;
        if batch.passages.batch != b * batch.group {
            return Err(Error::shape(
                "passages (B·G)",
                &[b * batch.group],
                &[batch.passages.batch],
            ));
        }
        let s = self.scores(tape, p, batch, cfg, drop, drop_ids)?;
        let targets: Vec<i64> = (0..b).map(|i| (i * batch.group) as i64).collect();
        let head_loss = |tape: &mut Tape, s: &Var| -> Result<Var> {
            match (&batch.teacher, cfg.kd) {
                (None, _) => ops::cross_entropy(tape, s, &targets),
                (Some(t), KdLoss::M3KdLoss) => ops::m3_kd_loss(tape, s, t, batch.group),
                (Some(t), KdLoss::KlDiv) => {
                    let local = ops::group_columns(tape, s, batch.group)?;
                    let kl = ops::soft_cross_entropy(tape, &local, t)?;
                    let ce = ops::cross_entropy(tape, s, &targets)?;
                    ops::add(tape, &kl, &ce)
                }
            }
        };
        let ld = head_loss(tape, &s.dense)?;
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
            // Teacher = softmax of the (detached) ensemble scores over all in-batch candidates.
            let (rows, cols) = se.value().shape().dims2("ensemble scores")?;
            let sev = se.value().f32s()?;
            let mut t = vec![0.0f32; rows * cols];
            for r in 0..rows {
                let row = &sev[r * cols..(r + 1) * cols];
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
                let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
                for c in 0..cols {
                    t[r * cols + c] = ((row[c] as f64 - max).exp() / z) as f32;
                }
            }
            let teacher = Tensor::from_vec(t, &[rows, cols])?;
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
