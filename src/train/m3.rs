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
use crate::data::m3_data::{
    batches_per_epoch, epoch_plan, example_max_len, plan_units, sample_group_shuffled, BucketSpec,
    PlanUnit, PlannedBatch, TrainDataset, TrainExample,
};
use crate::data::rng::Rng;
use crate::data::tokenizer::TextTokenizer;
use crate::device::cpu::elementwise::hash_u32;
use crate::device::Device;
use crate::dist::{DistEnv, Group};
use crate::engine::optim::DeviceAdamW;
use crate::error::{Error, Result};
use crate::model::encoder::{DropoutCfg, EncoderInput};
use crate::model::m3_train::{M3Batch, M3LossConfig, M3LossValues, M3Student};
use crate::tensor::Tensor;
use std::path::Path;
use std::time::Instant;

/// Settings of a fine-tuning run. The default is `retrom3 finetune`'s with no flags (one
/// epoch; override what differs: `FinetuneConfig { steps: Some(100), ..Default::default() }`).
#[derive(Clone, Debug, PartialEq)]
pub struct FinetuneConfig {
    pub steps: Option<u64>,
    pub epochs: Option<u64>,
    /// Queries per batch (used by [`M3TrainData::single`]; the plan carries the per-bucket sizes).
    pub batch_size: usize,
    /// Encode in sub-batches of this many texts with the exact two-pass scheme
    /// ([`M3Student::sub_batch_grads`]); 0 = one tape for the whole batch.
    pub sub_batch: usize,
    pub group_size: usize,
    pub query_max_len: usize,
    pub passage_max_len: usize,
    pub loss: M3LossConfig,
    /// Self-distillation runs at the steps whose 0-based index exceeds this (FlagEmbedding's
    /// strict `step > self_distill_start_step`; -1 = from the first step).
    pub self_distill_start_step: i64,
    /// Use the rows' teacher scores (`pos_scores` / `neg_scores`) when every group of a batch
    /// has them (FlagEmbedding's `knowledge_distillation`); off: plain InfoNCE.
    pub knowledge_distillation: bool,
    /// SPEC §4.2 augmentation: a positive of over 100 characters is cut into three pieces
    /// shown in random order with this probability (0 = never; the paper 0.002).
    pub shuffle_ratio: f64,
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
    /// Gather the dense vectors of every rank for the dense loss (FlagEmbedding's
    /// `negatives_cross_device`; no effect on one process).
    pub negatives_cross_device: bool,
}

impl FinetuneConfig {
    /// The settings a run cannot start with, named by field: a temperature that is not > 0, a
    /// shuffle ratio outside [0, 1], max lengths under 2 or over the model's `max_tokens` (the
    /// trainer checks the schedule, batch and group sizes itself).
    pub fn check(&self, max_tokens: usize) -> Result<()> {
        let t = self.loss.temperature;
        let bad = |msg: String| Err(Error::invalid(msg));
        if !(t > 0.0 && t.is_finite()) {
            return bad(format!("temperature {t}: must be > 0"));
        }
        if self.group_size > crate::data::m3_data::MAX_GROUP_SIZE {
            return bad(format!(
                "group_size {}: above {} passages per query",
                self.group_size,
                crate::data::m3_data::MAX_GROUP_SIZE
            ));
        }
        if !(0.0..=1.0).contains(&self.shuffle_ratio) {
            return bad(format!(
                "shuffle_ratio {}: must be in [0, 1]",
                self.shuffle_ratio
            ));
        }
        for (k, v) in [
            ("query_max_len", self.query_max_len),
            ("passage_max_len", self.passage_max_len),
        ] {
            if !(2..=max_tokens).contains(&v) {
                return bad(format!(
                    "{k} {v}: must be in 2..={max_tokens} (specials included; the model's maximum)"
                ));
            }
        }
        Ok(())
    }
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            steps: None,
            epochs: None,
            batch_size: 4,
            sub_batch: 0,
            group_size: 8,
            query_max_len: 512,
            passage_max_len: 512,
            loss: M3LossConfig::default(),
            self_distill_start_step: -1,
            knowledge_distillation: true,
            shuffle_ratio: 0.0,
            lr: 1e-5,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            seed: 42,
            save_every: None,
            fix_encoder: false,
            fix_position_embedding: false,
            dropout: true,
            negatives_cross_device: true,
        }
    }
}

/// The training data: datasets (one per file) split into length-bucket units (SPEC §5.1-5.2).
#[derive(Clone, Debug)]
pub struct M3TrainData {
    pub datasets: Vec<TrainDataset>,
    pub units: Vec<PlanUnit>,
}

impl M3TrainData {
    /// Bucket every dataset by the longest tokenized text of each example (specials included,
    /// untruncated); with no boundaries nothing is tokenized and each dataset is one unit.
    pub fn new(
        datasets: Vec<TrainDataset>,
        spec: &BucketSpec,
        tok: &TextTokenizer,
    ) -> Result<M3TrainData> {
        let mut lengths = Vec::new();
        if !spec.boundaries.is_empty() {
            for d in &datasets {
                let mut len_of =
                    |t: &str| -> Result<usize> { Ok(tok.encode(t, usize::MAX / 2)?.len()) };
                lengths.push(
                    d.examples
                        .iter()
                        .map(|e| example_max_len(e, &mut len_of))
                        .collect::<Result<Vec<_>>>()?,
                );
            }
        }
        let units = plan_units(&datasets, &lengths, spec);
        Ok(M3TrainData { datasets, units })
    }

    /// One in-batch dataset, one bucket of `batch_size`.
    pub fn single(examples: Vec<TrainExample>, batch_size: usize) -> M3TrainData {
        let datasets = vec![TrainDataset::from_file("train".into(), examples, false)];
        let units = plan_units(&datasets, &[], &BucketSpec::single(batch_size));
        M3TrainData { datasets, units }
    }
}

/// One row of the report per step: (step, total, dense, sparse, colbert, ensemble, self-distill).
pub type StepLosses = (u64, f32, f32, f32, f32, f32, f32);

/// The run's files in `dir`: backbone, config, tokenizer, optimizer and trainer state, and the
/// heads when `heads` (unified fine-tuning; dense-only runs save no heads, as FlagEmbedding, and
/// remove stale ones so that no loader pairs them with the new backbone).
fn write_run_files(
    dir: &Path,
    model: &M3Student,
    opt: &AdamW,
    state: &TrainState,
    tokenizer_dir: &Path,
    heads: bool,
) -> Result<()> {
    super::ensure_params_finite(&model.params, state.step)?;
    let enc = model.encoder()?;
    let mut tensors = enc.params.to_map();
    tensors.extend(model.extra_tensors.clone());
    crate::io::write_backbone(dir, &tensors)?;
    if heads {
        crate::io::write_heads(dir, &model.heads())?;
    } else {
        for f in [
            crate::io::model_dir::COLBERT_FILE,
            crate::io::model_dir::SPARSE_FILE,
        ] {
            match std::fs::remove_file(dir.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(dir.join(f), e))
                }
                _ => {}
            }
        }
    }
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

/// The settings a resume must share with the run it continues (recorded in the checkpoint's
/// trainer state): hyper-parameters, loss switches, world size and a fingerprint of the data
/// (per dataset: name, example count, a hash of every text and score). `--steps` / `--epochs` /
/// `--save-every` / `--sub-batch` may change.
fn run_args(cfg: &FinetuneConfig, data: &M3TrainData, world: usize) -> serde_json::Value {
    let datasets: Vec<serde_json::Value> = data
        .datasets
        .iter()
        .map(|d| {
            let mut h = crate::data::corpus::Fnv64::new();
            for e in &d.examples {
                h.str(&e.query);
                for list in [&e.pos, &e.neg] {
                    h.bytes(&(list.len() as u64).to_le_bytes());
                    list.iter().for_each(|t| h.str(t));
                }
                for s in [&e.pos_scores, &e.neg_scores] {
                    let s = s.as_deref().unwrap_or(&[]);
                    h.bytes(&(s.len() as u64).to_le_bytes());
                    s.iter().for_each(|x| h.bytes(&x.to_le_bytes()));
                }
                h.str(e.prompt.as_deref().unwrap_or(""));
            }
            serde_json::json!({
                "name": d.source.file_name().map(|n| n.to_string_lossy().to_string()),
                "examples": d.examples.len(),
                "no_in_batch": d.no_in_batch,
                "hash": format!("{:016x}", h.finish()),
            })
        })
        .collect();
    let batch_sizes: Vec<usize> = data.units.iter().map(|u| u.batch_size).collect();
    // The rows' per-file settings (`type`, `batch_size`, `train_group_size`) and the batching
    // units (dataset, length bucket, batch size, the examples in each): the epoch plan and the
    // groups follow from them, so a changed file setting or --length-buckets must not resume.
    // (Keys of their own: a checkpoint written before them resumes as it did.)
    let mut rows = crate::data::corpus::Fnv64::new();
    for d in &data.datasets {
        rows.bytes(&(d.examples.len() as u64).to_le_bytes());
        for e in &d.examples {
            rows.str(e.kind.as_deref().unwrap_or("\u{0}"));
            for n in [e.batch_size, e.train_group_size] {
                rows.bytes(&n.map_or(u64::MAX, |n| n as u64).to_le_bytes());
            }
        }
    }
    let mut plan = crate::data::corpus::Fnv64::new();
    for u in &data.units {
        for n in [
            u.dataset,
            u.bucket,
            u.batch_size,
            usize::from(u.no_in_batch),
        ] {
            plan.bytes(&(n as u64).to_le_bytes());
        }
        plan.bytes(&(u.examples.len() as u64).to_le_bytes());
        u.examples
            .iter()
            .for_each(|&i| plan.bytes(&(i as u64).to_le_bytes()));
    }
    serde_json::json!({
        "batch_sizes": batch_sizes,
        "group_size": cfg.group_size,
        "query_max_len": cfg.query_max_len,
        "passage_max_len": cfg.passage_max_len,
        // Floats as their shortest decimal form: a JSON round trip of the number could move
        // it by one ulp and refuse a legitimate resume.
        "temperature": cfg.loss.temperature.to_string(),
        "unified": cfg.loss.unified,
        "self_distill": cfg.loss.self_distill,
        "self_distill_start_step": cfg.self_distill_start_step,
        "kd_loss": format!("{:?}", cfg.loss.kd),
        "knowledge_distillation": cfg.knowledge_distillation,
        "shuffle_ratio": cfg.shuffle_ratio.to_string(),
        "lr": cfg.lr.to_string(),
        "warmup_ratio": cfg.warmup_ratio.to_string(),
        "weight_decay": cfg.weight_decay.to_string(),
        "max_grad_norm": cfg.max_grad_norm.map(|c| c.to_string()),
        "fix_encoder": cfg.fix_encoder,
        "fix_position_embedding": cfg.fix_position_embedding,
        "dropout": cfg.dropout,
        "negatives_cross_device": cfg.negatives_cross_device,
        "world": world,
        "data": datasets,
        "per-file type/batch_size/train_group_size": format!("{:016x}", rows.finish()),
        "batching (--length-buckets, batch sizes)": format!("{:016x}", plan.finish()),
    })
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
        .map(|&e| {
            if cfg.knowledge_distillation {
                sample_group_shuffled(e, cfg.group_size, cfg.shuffle_ratio, rng)
            } else {
                // FlagEmbedding drops the score columns: no teacher, no re-sorted negatives.
                let plain = TrainExample {
                    pos_scores: None,
                    neg_scores: None,
                    ..e.clone()
                };
                sample_group_shuffled(&plain, cfg.group_size, cfg.shuffle_ratio, rng)
            }
        })
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
        no_in_batch: false,
        cross_device: None,
    })
}

/// Run (or continue) fine-tuning on the CPU engine; the final model directory is written into
/// `out`.
#[allow(clippy::type_complexity)]
pub fn finetune(
    model: &mut M3Student,
    data: &M3TrainData,
    tok: &TextTokenizer,
    cfg: &FinetuneConfig,
    tokenizer_dir: &Path,
    out: &Path,
    resume: Option<(TrainState, AdamW)>,
    progress: &mut dyn FnMut(u64, u64, f32),
) -> Result<Vec<StepLosses>> {
    finetune_on(
        Device::Cpu,
        model,
        data,
        tok,
        cfg,
        tokenizer_dir,
        out,
        resume,
        progress,
    )
}

/// [`finetune`] with the encoder on `device`: on CUDA (bf16 storage, f32 accumulation: mixed
/// precision with f32 master weights) or the emulator (f32), the encoder forward and backward
/// and its AdamW run there ([`M3Student::device_grads_resident`], [`DeviceAdamW`]), and so do the
/// three heads' forward and backward (`engine::m3_heads`); the losses run on the host from the
/// \[CLS\] rows and the two score matrices, and the heads' few tensors keep the host AdamW (their
/// gradients read back); `sub_batch` > 0 runs the two-pass sub-batch scheme there too.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn finetune_on(
    device: Device,
    model: &mut M3Student,
    data: &M3TrainData,
    tok: &TextTokenizer,
    cfg: &FinetuneConfig,
    tokenizer_dir: &Path,
    out: &Path,
    resume: Option<(TrainState, AdamW)>,
    progress: &mut dyn FnMut(u64, u64, f32),
) -> Result<Vec<StepLosses>> {
    finetune_dist(
        device,
        DistSetup::Group(Group::single()),
        model,
        data,
        tok,
        cfg,
        tokenizer_dir,
        out,
        resume,
        progress,
    )
}

/// How a fine-tuning process joins its data-parallel group.
#[derive(Debug)]
pub enum DistSetup {
    /// A group made by the caller (one process, or a TCP group; tests run ranks as threads).
    Group(Group),
    /// The launch environment ([`DistEnv::from_env`]): a TCP group on the CPU or under
    /// emulation, NCCL on CUDA (rendezvous over TCP).
    Env(DistEnv),
}

/// [`finetune_on`] as one rank of a data-parallel group (SPEC §5.2, §4.5, decision §10.9): every
/// rank draws the same epoch plan (global batches of per-device size × W, one seed) and trains on
/// its slice of each global batch; with `negatives_cross_device` the dense loss is the global one
/// over the gathered vectors; gradients are averaged over the ranks (summed by NCCL on the device
/// for the encoder on CUDA), so every rank applies the same update. Rank 0 alone writes metrics,
/// checkpoints and the final model; the ranks check that they hold identical parameters at the
/// start, at every checkpoint and at the end. Losses reported are the mean over the ranks.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn finetune_dist(
    device: Device,
    dist: DistSetup,
    model: &mut M3Student,
    data: &M3TrainData,
    tok: &TextTokenizer,
    cfg: &FinetuneConfig,
    tokenizer_dir: &Path,
    out: &Path,
    resume: Option<(TrainState, AdamW)>,
    progress: &mut dyn FnMut(u64, u64, f32),
) -> Result<Vec<StepLosses>> {
    device.ensure_available()?;
    tok.check_wraps_texts()?;
    let engine = crate::engine::trainer_encoder(device, &model.encoder()?)?;
    let group = match dist {
        DistSetup::Group(g) => g,
        DistSetup::Env(e) => connect_group(&e, engine.as_ref().map(|(d, _)| d.clone()))?,
    };
    let (rank, world) = (group.rank(), group.world());
    super::check_schedule(
        cfg.lr,
        cfg.warmup_ratio,
        cfg.weight_decay,
        cfg.max_grad_norm,
        cfg.steps,
        cfg.epochs,
    )?;
    if cfg.group_size == 0 || data.units.iter().any(|u| u.batch_size == 0) {
        return Err(Error::invalid("batch size and group size must be >= 1"));
    }
    cfg.check(model.encoder_config.max_tokens())?;
    if tok.vocab_size() > model.encoder_config.vocab_size {
        return Err(Error::Config {
            field: "vocab_size".into(),
            msg: format!(
                "the tokenizer has {} tokens but the model's embedding table only {}: another \
                 model's tokenizer?",
                tok.vocab_size(),
                model.encoder_config.vocab_size
            ),
        });
    }
    // The padding id is the one the model's position ids count from (XLM-R) and the sparse head
    // drops: a BERT tokenizer on an XLM-R model (smaller vocabulary, [PAD] 0 against <pad> 1)
    // passes the size check above but would train on ids the model misreads.
    if let Some(p) = tok
        .pad_id()
        .filter(|&p| p != model.encoder_config.pad_token_id)
    {
        return Err(Error::Config {
            field: "pad_token_id".into(),
            msg: format!(
                "the tokenizer {} pads with id {p}, the model's config.json with {}: another \
                 model's tokenizer",
                tokenizer_dir.display(),
                model.encoder_config.pad_token_id
            ),
        });
    }
    // Rows built in code get the checks the file reader makes (a row without a positive, or
    // with a score list of the wrong length, would index out of bounds in the sampler).
    for d in &data.datasets {
        for e in &d.examples {
            e.check().map_err(|msg| Error::Input {
                path: d.source.clone(),
                line: e.line,
                msg,
            })?;
        }
    }
    if let Some(d) = data
        .datasets
        .iter()
        .find(|d| d.no_in_batch && d.group_size(&[], cfg.group_size) == 1)
    {
        return Err(Error::invalid(format!(
            "{}: no-in-batch mode with a group size of 1 leaves one passage per query (the loss \
             would be identically 0); use --group-size 2 or more",
            d.source.display()
        )));
    }
    // One query per global batch and one passage per query: no negative at all, in the group
    // or the batch, and every loss identically 0.
    if let Some(u) = data.units.iter().find(|u| {
        u.batch_size * world == 1 && data.datasets[u.dataset].group_size(&[], cfg.group_size) == 1
    }) {
        return Err(Error::invalid(format!(
            "{}: a batch of 1 query with a group size of 1 has no negative (the loss would be \
             identically 0); use a larger batch or group",
            data.datasets[u.dataset].source.display()
        )));
    }
    // Rows without negatives only where no group needs one (group size 1; `symmetric_class`
    // files whose rows all lack them).
    for d in &data.datasets {
        let g = d.group_size(&[], cfg.group_size);
        let needs = match d.files.first().and_then(|f| f.1.kind.as_deref()) {
            Some("symmetric_class") => g > 1 && d.examples.iter().any(|e| !e.neg.is_empty()),
            _ => g > 1,
        };
        if let Some(e) = d.examples.iter().find(|e| needs && e.neg.is_empty()) {
            return Err(Error::Input {
                path: d.source.clone(),
                line: e.line,
                msg: format!(
                    "field \"neg\": empty list, but a group of {g} passages needs at least one \
                     negative (FlagEmbedding divides by len(neg)); an empty \"neg\" is for \
                     --group-size 1"
                ),
            });
        }
    }
    let per_epoch = batches_per_epoch(&data.units, world) as u64;
    if per_epoch == 0 {
        let n: usize = data.datasets.iter().map(|d| d.examples.len()).sum();
        return Err(Error::invalid(format!(
            "{n} training examples give no full batch of {world} x the per-device batch size \
             (each dataset and length bucket is batched on its own)"
        )));
    }
    let total = match cfg.steps {
        Some(s) => s,
        None => {
            let e = cfg.epochs.unwrap_or(1);
            e.checked_mul(per_epoch).ok_or_else(|| {
                Error::invalid(format!(
                    "{e} epochs of {per_epoch} batches overflow the step count"
                ))
            })?
        }
    }
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
    super::check_resume_step(&state, total)?;
    // One batch per step: a trainer state that says otherwise was edited or mixed with another
    // run's, and its data cursor cannot be trusted.
    if state.batches_seen != state.step {
        return Err(Error::invalid(format!(
            "resumed trainer state: {} batches seen in {} steps (one batch a step)",
            state.batches_seen, state.step
        )));
    }
    let args = run_args(cfg, data, world);
    super::check_resume_args(&state.args, &args)?;
    // What every rank must share besides what a resume must: the schedule, the seed (each
    // rank's slice of every batch follows from it), the step it starts at, the model's config.
    let mut settings = args.clone();
    settings["total_steps"] = total.into();
    settings["seed"] = state.seed.into();
    settings["start_step"] = state.step.into();
    settings["save_every"] = cfg.save_every.into();
    settings["model config"] = model.encoder_config.to_hf_json();
    super::check_same_settings(&group, &settings)?;
    state.args = args;
    group.check_in_sync(model.params.values(), "at the start")?;
    let main = group.is_main();
    let mut metrics = if main {
        super::create_output_dir(out)?;
        super::checkpoint::retire_later_state(out, state.step)?;
        super::checkpoint::clear_dead_saves(out)?;
        Some(MetricsLog::open_resumed(
            &out.join("metrics.jsonl"),
            state.step,
            state.metrics_checksum.as_deref(),
            state.log.as_deref(),
        )?)
    } else {
        None
    };
    let pad = model.encoder_config.pad_token_id;
    let drop_ids = tok.special_ids();
    let n_enc = model.params.values().len() - 4;
    let frozen = |i: usize| {
        (cfg.fix_encoder && i < n_enc)
            || (cfg.fix_position_embedding
                && model.params.specs()[i].name == "embeddings.position_embeddings.weight")
    };
    let frozen: Vec<bool> = (0..model.params.values().len()).map(frozen).collect();
    // With the encoder on a device, its optimizer runs there too: gradient buffers (views of one
    // flat f32 buffer, allocated once and cleared every step), f32 master weights and moments;
    // the kernel writes the forward's compute copy. The heads keep the host optimizer.
    let dopt = match &engine {
        Some((dev, denc)) => Some(DeviceAdamW::new(
            &**dev,
            denc,
            &model.params,
            &opt,
            &frozen,
        )?),
        None => None,
    };
    let mut plan: (u64, Vec<PlannedBatch>) = (u64::MAX, Vec::new());
    let mut report = Vec::new();
    let c = model.encoder_config.clone();
    while state.step < total {
        let t0 = Instant::now();
        let k = state.batches_seen;
        let epoch = k / per_epoch;
        if plan.0 != epoch {
            plan = (epoch, epoch_plan(&data.units, cfg.seed, epoch, world));
        }
        let pb = &plan.1[(k % per_epoch) as usize];
        let ds = &data.datasets[pb.dataset];
        let exs: Vec<&TrainExample> = pb
            .rank_slice(rank)
            .iter()
            .map(|&i| &ds.examples[i])
            .collect();
        // Per rank and batch streams (rank 0 of a group of one keeps the single-process ones).
        let stream = k * world as u64 + rank as u64;
        let mut rng = Rng::new(cfg.seed, (1 << 41) + stream);
        // Per-file group size (`type`, `train_group_size`; SPEC §4.1).
        let bcfg = FinetuneConfig {
            group_size: ds.group_size(&pb.examples, cfg.group_size),
            ..cfg.clone()
        };
        let mut batch = make_m3_batch(&exs, tok, &bcfg, pad, &mut rng)?;
        batch.no_in_batch = pb.no_in_batch;
        if cfg.negatives_cross_device && world > 1 {
            batch.cross_device = Some(group.clone());
        }
        let drop = cfg.dropout.then(|| DropoutCfg {
            hidden: c.hidden_dropout_prob,
            attention: c.attention_probs_dropout_prob,
            seed: ((hash_u32(cfg.seed, 17, stream) as u64) << 32)
                | hash_u32(cfg.seed, 18, stream) as u64,
        });
        let lcfg = M3LossConfig {
            // FlagEmbedding: active when its forward counter (0-based) exceeds the start step.
            self_distill: cfg.loss.self_distill
                && i64::try_from(state.step).is_ok_and(|s| s > cfg.self_distill_start_step),
            ..cfg.loss
        };
        let sum_over = (world > 1).then_some(&group);
        // A non-finite value met in the forward or backward pass names the step it happened at.
        let computed = (|| -> Result<(M3LossValues, Vec<Option<Tensor>>)> {
            Ok(if let (Some((dev, denc)), Some(dopt)) = (&engine, &dopt) {
                // Encoder gradients stay on the device (summed over the group there).
                let (loss, heads) = model.device_grads_resident(
                    &**dev,
                    denc,
                    dopt.grads(),
                    &batch,
                    &lcfg,
                    drop,
                    &drop_ids,
                    sum_over,
                    cfg.sub_batch,
                )?;
                let mut grads: Vec<Option<Tensor>> =
                    (0..n_enc).map(|_| None).chain(heads).collect();
                group.average_grads(&mut grads)?;
                (loss, grads)
            } else if cfg.sub_batch > 0 {
                model.sub_batch_grads(&batch, &lcfg, drop, &drop_ids, cfg.sub_batch)?
            } else {
                let mut tape = Tape::new();
                let p = model.params.bind(&mut tape);
                let loss = model.loss(&mut tape, &p, &batch, &lcfg, drop, &drop_ids)?;
                let values = loss.values()?;
                let g = tape.backward(&loss.total)?;
                let mut acc = GradAccumulator::new(p.len());
                acc.add(&g, &p)?;
                (values, acc.into_tensors(model.params.specs(), |_| false)?)
            })
        })();
        let (loss, mut grads) = computed.map_err(|e| match e {
            Error::NonFinite(m) => Error::NonFinite(format!("{m} (M3 step {})", state.step + 1)),
            e => e,
        })?;
        if engine.is_none() {
            group.average_grads(&mut grads)?;
        }
        let tokens = batch
            .queries
            .mask
            .iter()
            .chain(&batch.passages.mask)
            .filter(|&&m| m != 0)
            .count();
        // Mean losses and total tokens over the ranks (a NaN anywhere stops every rank here).
        let mut shared = [
            loss.total,
            loss.dense,
            loss.sparse,
            loss.colbert,
            loss.ensemble,
            loss.self_distill,
            tokens as f32,
        ];
        group.all_reduce_sum(&mut shared)?;
        let inv_w = 1.0 / world as f32;
        let loss = M3LossValues {
            total: shared[0] * inv_w,
            dense: shared[1] * inv_w,
            sparse: shared[2] * inv_w,
            colbert: shared[3] * inv_w,
            ensemble: shared[4] * inv_w,
            self_distill: shared[5] * inv_w,
        };
        let tokens = shared[6] as usize;
        let grads: Vec<Option<Tensor>> = grads
            .into_iter()
            .enumerate()
            .map(|(i, g)| if frozen[i] { None } else { g })
            .collect();
        let lv = loss.total;
        if !lv.is_finite() {
            return Err(Error::NonFinite(format!(
                "M3 loss at step {} (dense {}, sparse {}, colbert {}, ensemble {}, self-distill {})",
                state.step + 1,
                loss.dense,
                loss.sparse,
                loss.colbert,
                loss.ensemble,
                loss.self_distill
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
        let lr = cfg.lr * linear_warmup_decay(state.step, total, warmup);
        let norm = match (&engine, &dopt) {
            // Device gradients are the sum over the ranks: scaled by 1/W.
            (Some((dev, denc)), Some(dopt)) => dopt.step_with_host(
                &**dev,
                denc,
                &mut model.params,
                &mut opt,
                &grads,
                lr,
                1.0 / world as f32,
            )?,
            _ => opt.update(&mut model.params, &grads, lr)?,
        };
        state.step += 1;
        state.batches_seen += 1;
        let secs = t0.elapsed().as_secs_f64();
        report.push(row);
        if let Some(metrics) = metrics.as_mut() {
            metrics.log(serde_json::json!({
                "step": state.step, "lr": lr, "loss": lv, "dense": loss.dense,
                "sparse": loss.sparse, "colbert": loss.colbert, "ensemble": loss.ensemble,
                "self_distill": loss.self_distill, "grad_norm": norm, "tokens": tokens,
                "tokens_per_s": tokens as f64 / secs.max(1e-9),
            }))?;
            progress(state.step, total, lv);
        }
        if cfg
            .save_every
            .is_some_and(|n| n > 0 && state.step % n == 0 && state.step < total)
        {
            if let (Some((dev, _)), Some(dopt)) = (&engine, &dopt) {
                dopt.sync_to_host(&**dev, &mut model.params, &mut opt)?;
            }
            group.check_in_sync(
                model.params.values(),
                &format!("at checkpoint {}", state.step),
            )?;
            if let Some(metrics) = metrics.as_ref() {
                state.metrics_checksum = Some(metrics.checksum());
                let dir = out.join(format!("checkpoint-{}", state.step));
                atomic_dir(&dir, |tmp| {
                    write_run_files(tmp, model, &opt, &state, tokenizer_dir, cfg.loss.unified)?;
                    super::checkpoint::write_log_copy(tmp, metrics.text())
                })?;
                // The plot follows the log (an interrupted run's is not the previous run's).
                write_m3_svg(metrics, out)?;
            }
        }
    }
    if let (Some((dev, _)), Some(dopt)) = (&engine, &dopt) {
        dopt.sync_to_host(&**dev, &mut model.params, &mut opt)?;
    }
    group.check_in_sync(model.params.values(), "at the end")?;
    if let Some(metrics) = metrics {
        state.metrics_checksum = Some(metrics.checksum());
        // No heads of an earlier run beside the new backbone: a dense-only run's M3 heads, any
        // run's RetroMAE decoder (`pretrain --model` would continue from it).
        let stale: &[&str] = if cfg.loss.unified {
            &[crate::model::retromae::HEADS_FILE]
        } else {
            &[
                crate::io::model_dir::COLBERT_FILE,
                crate::io::model_dir::SPARSE_FILE,
                crate::model::retromae::HEADS_FILE,
            ]
        };
        super::replace_files(out, stale, |tmp| {
            write_run_files(tmp, model, &opt, &state, tokenizer_dir, cfg.loss.unified)
        })?;
        write_m3_svg(&metrics, out)?;
    }
    Ok(report)
}

fn write_m3_svg(metrics: &MetricsLog, out: &Path) -> Result<()> {
    metrics.write_svg(
        &out.join("metrics.svg"),
        "M3 fine-tuning",
        &["loss", "dense", "sparse", "colbert"],
    )
}

/// Join the group `env` describes: NCCL when this rank's encoder is on a CUDA device (the
/// rendezvous is a TCP group at `MASTER_ADDR:MASTER_PORT`), else the TCP group itself.
pub fn connect_group(
    env: &DistEnv,
    dev: Option<std::sync::Arc<crate::engine::Gpu>>,
) -> Result<Group> {
    let tcp = env.connect()?;
    match dev {
        Some(d) if d.cuda_stream().is_some() => nccl_group(tcp, d),
        _ => Ok(Group::new(tcp)),
    }
}

#[cfg(feature = "cuda")]
fn nccl_group(
    tcp: crate::dist::tcp::TcpGroup,
    dev: std::sync::Arc<crate::engine::Gpu>,
) -> Result<Group> {
    Ok(Group::new(crate::dist::nccl::NcclGroup::new(tcp, dev)?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_group(
    _tcp: crate::dist::tcp::TcpGroup,
    _dev: std::sync::Arc<crate::engine::Gpu>,
) -> Result<Group> {
    Err(Error::FeatureMissing("cuda"))
}

/// Settings of hard-negative mining (SPEC §4.8, FlagEmbedding's hn_mine.py).
#[derive(Clone, Debug)]
pub struct MineConfig {
    /// Ranks [start, end) of the dense retrieval list to sample from (hn_mine's "10-210").
    pub range: (usize, usize),
    /// Negatives to keep per query (hn_mine's 15).
    pub negatives: usize,
    pub seed: u64,
    /// Max tokens per text, specials included (queries and passages).
    pub max_length: usize,
    /// Texts per encoder forward.
    pub batch_size: usize,
    /// The file the rows come from (row k = line k): errors then name it and the line.
    pub source: Option<std::path::PathBuf>,
}

/// What mining did, for the report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MineStats {
    pub queries: usize,
    pub corpus: usize,
    /// Negatives taken from the retrieval range.
    pub mined: usize,
    /// Negatives topped up with random corpus texts (the range had too few).
    pub random: usize,
    /// Blank texts left out of the candidate pool.
    pub blank_pool: usize,
    /// Rows given fewer negatives than asked (the pool holds too few texts that are neither the
    /// row's query nor its positives), and of those the rows given none.
    pub short_rows: usize,
    pub rows_without_negatives: usize,
}

/// The candidate pool of hn_mine.py when no pool file is given: every pos and neg text of the
/// rows, de-duplicated in first-seen order.
pub fn pool_from_rows(rows: &[serde_json::Value]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut pool = Vec::new();
    for r in rows {
        for field in ["pos", "neg"] {
            for t in r[field].as_array().into_iter().flatten() {
                if let Some(t) = t.as_str() {
                    if seen.insert(t.to_string()) {
                        pool.push(t.to_string());
                    }
                }
            }
        }
    }
    pool
}

/// Hard-negative mining (SPEC §4.8): embed `pool` and the queries with the dense head, exact
/// inner-product top-`range.1`, keep the hits at ranks [range.0, range.1) that are neither a
/// positive nor the query text, sample `negatives` of them at random, and top up with random pool
/// texts (not positives, not the query, not already taken) when fewer were found. Each row's "neg"
/// is REPLACED; its "neg_scores" (no longer aligned) is removed; every other field is kept.
/// Rows need "query" (string) and "pos" (list of strings); errors name the 1-based row.
pub fn mine_hard_negatives(
    model: &crate::M3Model,
    rows: &mut [serde_json::Value],
    pool: &[String],
    cfg: &MineConfig,
) -> Result<MineStats> {
    use crate::retrieval::dense::DenseIndex;
    let (start, end) = cfg.range;
    if start >= end {
        return Err(Error::invalid(format!(
            "range {start}-{end}: the start must be below the end"
        )));
    }
    // The rows first: a malformed one is named before any pool rule.
    let row_err = |i: usize, msg: String| match &cfg.source {
        Some(path) => Error::Input {
            path: path.clone(),
            line: i + 1,
            msg,
        },
        None => Error::invalid(format!("row {}: {msg}", i + 1)),
    };
    let mut queries = Vec::with_capacity(rows.len());
    let mut positives = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let q = match r["query"].as_str() {
            Some(q) if q.trim().is_empty() => {
                return Err(row_err(i, "field \"query\": empty text".into()))
            }
            Some(q) => q,
            None => {
                return Err(row_err(
                    i,
                    "field \"query\": missing or not a string".into(),
                ))
            }
        };
        let pos: Vec<String> = r["pos"]
            .as_array()
            .and_then(|a| a.iter().map(|t| t.as_str().map(String::from)).collect())
            .ok_or_else(|| row_err(i, "field \"pos\": missing or not a list of strings".into()))?;
        if pos.is_empty() || pos.iter().any(|p| p.trim().is_empty()) {
            return Err(row_err(
                i,
                "field \"pos\": an empty list or an empty text".into(),
            ));
        }
        // "neg" is replaced, but its texts join the default pool: a list of strings or absent.
        if !r["neg"].is_null()
            && !r["neg"]
                .as_array()
                .is_some_and(|a| a.iter().all(serde_json::Value::is_string))
        {
            return Err(row_err(i, "field \"neg\": not a list of strings".into()));
        }
        queries.push(q.to_string());
        positives.push(pos);
    }
    // De-duplicated, first occurrence kept (the reference's set of candidates): a text repeated
    // in the pool must not become two of a row's negatives.
    let mut seen = std::collections::HashSet::new();
    let pool: Vec<&str> = pool
        .iter()
        .map(String::as_str)
        .filter(|t| seen.insert(*t))
        .collect();
    // Blank texts cannot be negatives (counted in the report).
    let n_all = pool.len();
    let pool: Vec<&str> = pool.into_iter().filter(|t| !t.trim().is_empty()).collect();
    let blank_pool = n_all - pool.len();
    if pool.is_empty() {
        return Err(Error::invalid("the candidate pool is empty"));
    }
    if cfg.negatives == 0 || cfg.batch_size == 0 {
        return Err(Error::invalid(format!(
            "--negatives {} / --batch-size {}: both must be >= 1",
            cfg.negatives, cfg.batch_size
        )));
    }
    let opts = crate::EncodeOptions {
        max_length: Some(cfg.max_length),
        batch_size: cfg.batch_size,
        ..Default::default()
    };
    let docs = model
        .encode(&pool, &opts)?
        .dense
        .ok_or_else(|| Error::invalid("the model gave no dense output"))?;
    let index = DenseIndex::build(&docs)?;
    let qtexts: Vec<&str> = queries.iter().map(String::as_str).collect();
    let qvecs = model
        .encode(&qtexts, &opts)?
        .dense
        .ok_or_else(|| Error::invalid("the model gave no dense output"))?;
    let hits = index.search(&qvecs, end.min(pool.len()))?;
    let mut stats = MineStats {
        queries: rows.len(),
        corpus: pool.len(),
        blank_pool,
        ..Default::default()
    };
    for (i, r) in rows.iter_mut().enumerate() {
        let mut rng = Rng::new(cfg.seed, 0x4E00_0000 + i as u64);
        let banned = |t: &str| t == queries[i] || positives[i].iter().any(|p| p == t);
        let mut cand: Vec<usize> = hits[i]
            .iter()
            .skip(start)
            .map(|h| h.doc as usize)
            .filter(|&d| !banned(pool[d]))
            .collect();
        rng.shuffle(&mut cand);
        cand.truncate(cfg.negatives);
        stats.mined += cand.len();
        let mut taken: std::collections::HashSet<usize> = cand.iter().copied().collect();
        let mut eligible: Vec<usize> = (0..pool.len())
            .filter(|d| !taken.contains(d) && !banned(pool[*d]))
            .collect();
        rng.shuffle(&mut eligible);
        for d in eligible {
            if cand.len() >= cfg.negatives {
                break;
            }
            if taken.insert(d) {
                cand.push(d);
                stats.random += 1;
            }
        }
        if cand.len() < cfg.negatives {
            stats.short_rows += 1;
            stats.rows_without_negatives += usize::from(cand.is_empty());
        }
        let obj = r
            .as_object_mut()
            .ok_or_else(|| row_err(i, "not a JSON object".into()))?;
        obj.insert(
            "neg".into(),
            serde_json::Value::from(cand.iter().map(|&d| pool[d]).collect::<Vec<_>>()),
        );
        obj.remove("neg_scores");
    }
    Ok(stats)
}
