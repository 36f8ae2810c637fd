//! The M3 unified fine-tuning loop (SPEC §4): epoch plan from the seed, per-query sampling,
//! tokenization at query/passage max lengths, the unified loss with self-distillation from
//! `self_distill_start_step`, AdamW + warm-up/decay + clipping, metrics, atomic checkpoints, and a
//! bit-identical resume (all randomness derives from the seed and the batch index).

use super::checkpoint::{atomic_dir, TrainState};
use super::metrics::MetricsLog;
use super::optim::{adamw_hyper, AdamW};
use super::schedule::{linear_warmup_decay, warmup_steps};
use super::start_or_resume;
use super::GradAccumulator;
use crate::autograd::Tape;
use crate::data::m3_data::{sample_group, TrainExample};
use crate::data::rng::Rng;
use crate::data::tokenizer::TextTokenizer;
use crate::device::cpu::elementwise::hash_u32;
use crate::error::{Error, Result};
use crate::model::encoder::{DropoutCfg, EncoderInput};
use crate::model::m3_train::{M3Batch, M3LossConfig, M3Student};
use crate::tensor::Tensor;
use std::path::Path;
use std::time::Instant;

/// Settings of a fine-tuning run.
#[derive(Clone, Debug)]
pub struct FinetuneConfig {
    pub steps: Option<u64>,
    pub epochs: Option<u64>,
    /// Queries per batch.
    pub batch_size: usize,
    pub group_size: usize,
    pub query_max_len: usize,
    pub passage_max_len: usize,
    pub loss: M3LossConfig,
    pub self_distill_start_step: u64,
    pub lr: f32,
    pub warmup_ratio: f64,
    pub weight_decay: f32,
    pub max_grad_norm: Option<f32>,
    pub seed: u64,
    pub save_every: Option<u64>,
    /// Train only the heads.
    pub fix_encoder: bool,
    /// Keep the position embeddings frozen.
    pub fix_position_embedding: bool,
    pub dropout: bool,
}

/// One row of the report per step: (step, total, dense, sparse, colbert, ensemble, self-distill).
pub type StepLosses = (u64, f32, f32, f32, f32, f32, f32);

fn write_run_files(
    dir: &Path,
    model: &M3Student,
    opt: &AdamW,
    state: &TrainState,
    tokenizer_dir: &Path,
) -> Result<()> {
    let enc = model.encoder()?;
    crate::io::write_backbone(dir, &enc.params.to_map())?;
    crate::io::write_heads(dir, &model.heads())?;
    let cfg = serde_json::to_string_pretty(&model.encoder_config.to_hf_json())
        .map_err(|e| Error::invalid(e.to_string()))?;
    crate::io::write_atomic(&dir.join("config.json"), |w| {
        std::io::Write::write_all(w, cfg.as_bytes())
    })?;
    crate::io::write_safetensors(
        &dir.join("optimizer.safetensors"),
        &opt.state_tensors(model.params.specs())?,
        None,
    )?;
    crate::io::copy_tokenizer_files(tokenizer_dir, dir)?;
    state.save(dir)
}

/// Build batch `k` of the plan: sample groups, tokenize, pad, teacher probabilities.
pub fn make_m3_batch(
    examples: &[&TrainExample],
    tok: &TextTokenizer,
    cfg: &FinetuneConfig,
    pad: u32,
    rng: &mut Rng,
) -> Result<M3Batch> {
    let groups: Vec<_> = examples
        .iter()
        .map(|e| sample_group(e, cfg.group_size, rng))
        .collect();
    let queries: Vec<&str> = groups.iter().map(|g| g.query.as_str()).collect();
    let passages: Vec<&str> = groups
        .iter()
        .flat_map(|g| g.passages.iter().map(String::as_str))
        .collect();
    let q = tok.encode_batch(&queries, cfg.query_max_len)?;
    let p = tok.encode_batch(&passages, cfg.passage_max_len)?;
    let teacher = if groups.iter().all(|g| g.teacher.is_some()) {
        let mut t = Vec::with_capacity(groups.len() * cfg.group_size);
        for g in &groups {
            let s = g.teacher.as_ref().expect("checked");
            let max = s.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
            let z: f64 = s.iter().map(|&x| (x as f64 - max).exp()).sum();
            t.extend(s.iter().map(|&x| ((x as f64 - max).exp() / z) as f32));
        }
        Some(Tensor::from_vec(t, &[groups.len(), cfg.group_size])?)
    } else {
        None
    };
    Ok(M3Batch {
        queries: EncoderInput::pad(&q, pad),
        passages: EncoderInput::pad(&p, pad),
        group: cfg.group_size,
        teacher,
    })
}

/// Run (or continue) fine-tuning; the final model directory is written into `out`.
#[allow(clippy::type_complexity)]
pub fn finetune(
    model: &mut M3Student,
    examples: &[TrainExample],
    tok: &TextTokenizer,
    cfg: &FinetuneConfig,
    tokenizer_dir: &Path,
    out: &Path,
    resume: Option<(TrainState, AdamW)>,
    progress: &mut dyn FnMut(u64, u64, f32),
) -> Result<Vec<StepLosses>> {
    if cfg.batch_size == 0 || cfg.group_size < 2 {
        return Err(Error::invalid(
            "batch size must be >= 1 and group size >= 2",
        ));
    }
    let per_epoch = (examples.len() / cfg.batch_size) as u64;
    if per_epoch == 0 {
        return Err(Error::invalid(format!(
            "{} training examples are fewer than one batch of {}",
            examples.len(),
            cfg.batch_size
        )));
    }
    let total = cfg
        .steps
        .unwrap_or(cfg.epochs.unwrap_or(1) * per_epoch)
        .max(1);
    let warmup = warmup_steps(total, cfg.warmup_ratio);
    let (mut state, mut opt) = start_or_resume(
        resume,
        model.params.specs(),
        adamw_hyper(cfg.lr, cfg.weight_decay),
        cfg.max_grad_norm,
        cfg.seed,
        total,
    );
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut metrics = MetricsLog::open(&out.join("metrics.jsonl"))?;
    let pad = model.encoder_config.pad_token_id;
    let drop_ids = tok.special_ids();
    let n_enc = model.params.values().len() - 4;
    let frozen = |i: usize| {
        (cfg.fix_encoder && i < n_enc)
            || (cfg.fix_position_embedding
                && model.params.specs()[i].name == "embeddings.position_embeddings.weight")
    };
    let frozen: Vec<bool> = (0..model.params.values().len()).map(frozen).collect();
    let mut order: (u64, Vec<usize>) = (u64::MAX, Vec::new());
    let mut report = Vec::new();
    let c = model.encoder_config.clone();
    while state.step < total {
        let t0 = Instant::now();
        let k = state.batches_seen;
        let epoch = k / per_epoch;
        if order.0 != epoch {
            let mut o: Vec<usize> = (0..examples.len()).collect();
            Rng::new(cfg.seed, 0x200 + epoch).shuffle(&mut o);
            order = (epoch, o);
        }
        let start = ((k % per_epoch) as usize) * cfg.batch_size;
        let exs: Vec<&TrainExample> = order.1[start..start + cfg.batch_size]
            .iter()
            .map(|&i| &examples[i])
            .collect();
        let mut rng = Rng::new(cfg.seed, (1 << 41) + k);
        let batch = make_m3_batch(&exs, tok, cfg, pad, &mut rng)?;
        let drop = cfg.dropout.then(|| DropoutCfg {
            hidden: c.hidden_dropout_prob,
            attention: c.attention_probs_dropout_prob,
            seed: ((hash_u32(cfg.seed, 17, k) as u64) << 32) | hash_u32(cfg.seed, 18, k) as u64,
        });
        let lcfg = M3LossConfig {
            // FlagEmbedding: active when its forward counter (0-based) exceeds the start step.
            self_distill: cfg.loss.self_distill && state.step > cfg.self_distill_start_step,
            ..cfg.loss
        };
        let mut tape = Tape::new();
        let p = model.params.bind(&mut tape);
        let loss = model.loss(&mut tape, &p, &batch, &lcfg, drop, &drop_ids)?;
        let lv = loss.total.value().f32s()?[0];
        if !lv.is_finite() {
            return Err(Error::NonFinite(format!(
                "M3 loss at step {}",
                state.step + 1
            )));
        }
        let row = (
            state.step + 1,
            lv,
            loss.dense,
            loss.sparse,
            loss.colbert,
            loss.ensemble,
            loss.self_distill,
        );
        let g = tape.backward(&loss.total)?;
        let mut acc = GradAccumulator::new(p.len());
        acc.add(&g, &p)?;
        let grads = acc.into_tensors(model.params.specs(), |i| frozen[i])?;
        let lr = cfg.lr * linear_warmup_decay(state.step, total, warmup);
        let norm = opt.update(&mut model.params, &grads, lr)?;
        state.step += 1;
        state.batches_seen += 1;
        let tokens = batch
            .queries
            .mask
            .iter()
            .chain(&batch.passages.mask)
            .filter(|&&m| m != 0)
            .count();
        let secs = t0.elapsed().as_secs_f64();
        metrics.log(serde_json::json!({
            "step": state.step, "lr": lr, "loss": lv, "dense": loss.dense, "sparse": loss.sparse,
            "colbert": loss.colbert, "ensemble": loss.ensemble, "self_distill": loss.self_distill,
            "grad_norm": norm, "tokens": tokens, "tokens_per_s": tokens as f64 / secs.max(1e-9),
        }))?;
        report.push(row);
        progress(state.step, total, lv);
        if cfg
            .save_every
            .is_some_and(|n| n > 0 && state.step % n == 0 && state.step < total)
        {
            let dir = out.join(format!("checkpoint-{}", state.step));
            atomic_dir(&dir, |tmp| {
                write_run_files(tmp, model, &opt, &state, tokenizer_dir)
            })?;
        }
    }
    write_run_files(out, model, &opt, &state, tokenizer_dir)?;
    metrics.write_svg(
        &out.join("metrics.svg"),
        "M3 fine-tuning",
        &["loss", "dense", "sparse", "colbert"],
    )?;
    Ok(report)
}
