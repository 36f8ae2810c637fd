//! `retrom3 finetune`: M3 unified fine-tuning with self-knowledge distillation (SPEC §4).

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use retrom3::data::m3_data::{read_train_paths_with, BucketSpec, MergeRule};
use retrom3::data::TextTokenizer;
use retrom3::dist::{DistEnv, Group};
use retrom3::model::m3_train::{KdLoss, M3LossConfig, M3Student};
use retrom3::train::m3::{finetune_dist, DistSetup, FinetuneConfig, M3TrainData};
use retrom3::train::optim::adamw_hyper;
use retrom3::train::{clip_option as clip, AdamW, TrainState};
use retrom3::{Device, Error, Result};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// Model directory (heads loaded when both .pt files exist, else freshly initialised).
    #[arg(long)]
    pub model: PathBuf,
    /// Training JSONL files, or directories of .json/.jsonl files. Each file is its own dataset
    /// (a batch never mixes files); a file whose stem ends with `no_in_batch_neg`, or the files of
    /// a directory whose name ends with it, train without in-batch negatives (local [B, G] scores).
    #[arg(long, num_args = 1.., required = true)]
    pub train: Vec<PathBuf>,
    /// Output directory: the fine-tuned model (loads in FlagEmbedding), metrics, checkpoints.
    #[arg(long)]
    pub output: PathBuf,
    /// cpu, cuda[:N], or emu (the CUDA kernels run on CPU threads: an `emu` build, for checks).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Passages per query: 1 positive + G-1 negatives.
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    /// Queries per batch (per length bucket unless --bucket-batch-sizes is given).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Length-bucket boundaries in tokens, e.g. 500,1000,2000,3000,4000,5000,6000,7000 (SPEC
    /// §5.1): an example goes to the bucket of its longest text (query, positives, negatives;
    /// tokenized with specials, untruncated) and batches never mix buckets. Default: no buckets.
    #[arg(long, value_delimiter = ',')]
    pub length_buckets: Vec<usize>,
    /// Queries per batch for each bucket (one value per bucket, i.e. boundaries + 1), e.g. the
    /// research code's 80 GB / G = 8 sizes 48,32,20,18,14,14,12,10,8. Default: --batch-size for all.
    #[arg(long, value_delimiter = ',')]
    pub bucket_batch_sizes: Vec<usize>,
    /// Files of one --train directory with fewer examples than this are merged into one dataset
    /// (batch size = the smallest of theirs; FlagEmbedding's small_threshold). 0 = never merge.
    #[arg(long, default_value_t = 0)]
    pub small_threshold: usize,
    /// A merged dataset with fewer examples than this is dropped (FlagEmbedding's drop_threshold).
    #[arg(long, default_value_t = 0)]
    pub drop_threshold: usize,
    #[arg(long, default_value_t = 512)]
    pub query_max_len: usize,
    #[arg(long, default_value_t = 512)]
    pub passage_max_len: usize,
    #[arg(long, default_value_t = 0.02)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f32,
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    #[arg(long)]
    pub epochs: Option<u64>,
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// Unified fine-tuning (dense + sparse + ColBERT); `--unified false` trains dense only.
    #[arg(long, num_args = 0..=1, default_value = "true", default_missing_value = "true", action = clap::ArgAction::Set)]
    pub unified: bool,
    /// With several processes (WORLD_SIZE > 1): gather every rank's dense vectors so the dense
    /// loss sees the whole global batch as negatives (FlagEmbedding's negatives_cross_device).
    #[arg(long, num_args = 0..=1, default_value = "true", default_missing_value = "true", action = clap::ArgAction::Set)]
    pub negatives_cross_device: bool,
    /// Self-knowledge distillation from the ensemble score.
    #[arg(long, num_args = 0..=1, default_value = "true", default_missing_value = "true", action = clap::ArgAction::Set)]
    pub self_distill: bool,
    /// Self-distillation from the steps whose 0-based index exceeds N (FlagEmbedding's strict
    /// `step > self_distill_start_step`): -1 (the default, as FlagEmbedding's) = from the first
    /// step, 0 (its example scripts) = from the second.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub self_distill_start_step: i64,
    /// Use the rows' teacher scores (`pos_scores` / `neg_scores`) with `--kd-loss` when every
    /// row of a batch has them; `false` ignores them (plain InfoNCE).
    #[arg(long, num_args = 0..=1, default_value = "true", default_missing_value = "true", action = clap::ArgAction::Set)]
    pub knowledge_distillation: bool,
    /// Probability of showing a positive of over 100 characters as three pieces in random
    /// order (FlagEmbedding's `shuffle_ratio`; the paper 0.002).
    #[arg(long, default_value_t = 0.0)]
    pub shuffle_ratio: f64,
    /// Loss with teacher scores (pos_scores/neg_scores): m3_kd_loss or kl_div.
    #[arg(long, default_value = "m3_kd_loss")]
    pub kd_loss: String,
    /// Encode each batch in sub-batches of N texts with the exact two-pass (GradCache-style)
    /// scheme: activations of one sub-batch at a time, same gradients. 0 = off.
    #[arg(long, default_value_t = 0)]
    pub sub_batch: usize,
    /// Seed of every random draw (default 42; a resumed run keeps its own).
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub save_every: Option<u64>,
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Train only the heads.
    #[arg(long)]
    pub fix_encoder: bool,
    #[arg(long)]
    pub fix_position_embedding: bool,
    /// Max gradient norm (0 disables clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
}

/// `--seed` when not given.
const DEFAULT_SEED: u64 = 42;

/// The run's settings from the flags (`kd` parsed from `--kd-loss`; `seed` the resumed run's).
fn finetune_config(a: &FinetuneArgs, kd: KdLoss, seed: u64) -> FinetuneConfig {
    FinetuneConfig {
        steps: a.steps,
        epochs: a.epochs,
        batch_size: a.batch_size,
        sub_batch: a.sub_batch,
        group_size: a.group_size,
        query_max_len: a.query_max_len,
        passage_max_len: a.passage_max_len,
        loss: M3LossConfig {
            temperature: a.temperature,
            unified: a.unified,
            self_distill: a.self_distill && a.unified,
            kd,
        },
        self_distill_start_step: a.self_distill_start_step,
        knowledge_distillation: a.knowledge_distillation,
        shuffle_ratio: a.shuffle_ratio,
        lr: a.lr,
        warmup_ratio: a.warmup_ratio,
        weight_decay: a.weight_decay,
        max_grad_norm: clip(a.max_grad_norm),
        seed,
        save_every: a.save_every,
        fix_encoder: a.fix_encoder,
        fix_position_embedding: a.fix_position_embedding,
        dropout: true,
        negatives_cross_device: a.negatives_cross_device,
    }
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    a.device.ensure_available()?;
    // Launched as one rank of several (torchrun-style variables): rank r trains on GPU
    // LOCAL_RANK with `--device cuda`, and only rank 0 shows progress and writes files.
    let env = DistEnv::from_env()?;
    if a.temperature.is_nan() || a.temperature <= 0.0 {
        return Err(Error::invalid(format!(
            "--temperature {}: must be > 0",
            a.temperature
        )));
    }
    if !(0.0..=1.0).contains(&a.shuffle_ratio) {
        return Err(Error::invalid(format!(
            "--shuffle-ratio {}: must be in [0, 1]",
            a.shuffle_ratio
        )));
    }
    if a.self_distill_start_step < -1 {
        return Err(Error::invalid(format!(
            "--self-distill-start-step {}: must be >= -1",
            a.self_distill_start_step
        )));
    }
    let kd = match a.kd_loss.as_str() {
        "m3_kd_loss" => KdLoss::M3KdLoss,
        "kl_div" => KdLoss::KlDiv,
        o => {
            return Err(Error::invalid(format!(
                "--kd-loss {o:?}: expected m3_kd_loss or kl_div"
            )))
        }
    };
    if a.batch_size == 0 {
        return Err(Error::invalid("--batch-size 0: must be >= 1"));
    }
    if let (Ok(o), Ok(m)) = (a.output.canonicalize(), a.model.canonicalize()) {
        if o == m {
            return Err(Error::invalid(format!(
                "--output {}: the same directory as --model (the run would overwrite its base \
                 model); write to another directory",
                a.output.display()
            )));
        }
    }
    // A --train directory as --output: the run's own JSON files (config, trainer state,
    // metrics, tokenizer) would be read back as training data by the next run or resume.
    if let Ok(o) = a.output.canonicalize() {
        if let Some(t) = a
            .train
            .iter()
            .find(|t| t.canonicalize().is_ok_and(|t| t == o))
        {
            return Err(Error::invalid(format!(
                "--output {}: the same directory as --train {} (its .json/.jsonl files are \
                 training data); write to another directory",
                a.output.display(),
                t.display()
            )));
        }
    }
    if let Some(r) = &a.resume {
        retrom3::train::check_resume_dir(r)?;
        retrom3::train::check_resume_model(r, &a.model.join("config.json"))?;
    }
    let tok = TextTokenizer::from_dir(a.resume.as_ref().unwrap_or(&a.model))?;
    let spec = BucketSpec::new(
        a.length_buckets.clone(),
        (!a.bucket_batch_sizes.is_empty()).then(|| a.bucket_batch_sizes.clone()),
        a.batch_size,
    )?;
    let files = read_train_paths_with(
        &a.train,
        MergeRule {
            small_threshold: a.small_threshold,
            drop_threshold: a.drop_threshold,
        },
    )?;
    for f in &files.dropped {
        eprintln!(
            "warning: {} dropped (merged small files below --drop-threshold {})",
            f.display(),
            a.drop_threshold
        );
    }
    // Teacher scores apply to a batch only when every row of it has them (SPEC §4.5).
    let with_scores: usize = files
        .datasets
        .iter()
        .flat_map(|d| &d.examples)
        .filter(|e| e.pos_scores.is_some() && e.neg_scores.is_some())
        .count();
    let rows: usize = files.datasets.iter().map(|d| d.examples.len()).sum();
    if a.knowledge_distillation && with_scores > 0 && with_scores < rows {
        eprintln!(
            "warning: {with_scores} of {rows} training rows have teacher scores (pos_scores and \
             neg_scores); a batch with any row without them trains without distillation"
        );
    }
    let data = M3TrainData::new(files.datasets, &spec, &tok)?;
    // Each dataset and length bucket is batched on its own and incomplete batches are dropped
    // (SPEC §5.2): say which parts of the data never reach a batch.
    let world = env.as_ref().map_or(1, |e| e.world);
    if env.as_ref().is_none_or(|e| e.rank == 0) {
        let mut unused = 0usize;
        for u in &data.units {
            let global = u.batch_size * world;
            let left = u.examples.len() % global;
            unused += left;
            if u.examples.len() < global {
                eprintln!(
                    "warning: {}: {} examples{} are fewer than one batch of {global}; they are \
                     not trained on",
                    data.datasets[u.dataset].source.display(),
                    u.examples.len(),
                    if data.units.iter().filter(|v| v.dataset == u.dataset).count() > 1 {
                        format!(" in length bucket {}", u.bucket)
                    } else {
                        String::new()
                    }
                );
            }
        }
        let total: usize = data.units.iter().map(|u| u.examples.len()).sum();
        if unused > 0 {
            eprintln!(
                "note: each epoch leaves out {unused} of {total} examples (the incomplete last \
                 batch of each dataset and length bucket, a different subset each epoch, as \
                 FlagEmbedding)"
            );
        }
    }
    let seed = a.seed.unwrap_or(DEFAULT_SEED);
    let (mut model, resume) = match &a.resume {
        Some(dir) => {
            let state = TrainState::load(dir)?;
            super::warn_damaged_log_copy(dir, &state);
            if let Some(s) = a.seed.filter(|&s| s != state.seed) {
                return Err(Error::invalid(format!(
                    "--seed {s} differs from the resumed run's {} (a resumed run keeps its \
                     seed: drop --seed)",
                    state.seed
                )));
            }
            // A unified run trains the heads, and its checkpoints keep them: without them the
            // base model's untrained heads would pair with the checkpoint's moments. (A
            // dense-only run's checkpoint has none: the base model's are its heads.)
            let heads = ["colbert_linear.pt", "sparse_linear.pt"];
            if a.unified && !heads.iter().all(|f| dir.join(f).is_file()) {
                return Err(Error::format(
                    dir,
                    "colbert_linear.pt / sparse_linear.pt missing: a unified run's checkpoint \
                     keeps its trained heads",
                ));
            }
            let model = M3Student::load_dir_heads_from(dir, &a.model, state.seed)?;
            let mut opt = AdamW::new(
                model.params.specs(),
                adamw_hyper(a.lr, a.weight_decay),
                clip(a.max_grad_norm),
            );
            opt.load_dir(dir, model.params.specs(), state.step)?;
            (model, Some((state, opt)))
        }
        None => (M3Student::load_dir(&a.model, seed)?, None),
    };
    if tok.vocab_size() > model.encoder_config.vocab_size {
        return Err(Error::Config {
            field: "vocab_size".into(),
            msg: format!(
                "tokenizer has {} tokens but the model's embedding table only {}",
                tok.vocab_size(),
                model.encoder_config.vocab_size
            ),
        });
    }
    let max = model.encoder_config.max_tokens();
    for (flag, v) in [
        ("--query-max-len", a.query_max_len),
        ("--passage-max-len", a.passage_max_len),
    ] {
        if !(2..=max).contains(&v) {
            return Err(Error::invalid(format!("{flag} {v}: must be in 2..={max}")));
        }
    }
    let cfg = finetune_config(&a, kd, resume.as_ref().map_or(seed, |(s, _)| s.seed));
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("finetune [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let tok_dir = a.resume.clone().unwrap_or(a.model.clone());
    let device = match (&env, a.device) {
        (Some(e), Device::Cuda(_)) => Device::Cuda(e.local_rank),
        _ => a.device,
    };
    let main = env.as_ref().is_none_or(|e| e.rank == 0);
    if !main {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let dist = match env {
        Some(e) => DistSetup::Env(e),
        None => DistSetup::Group(Group::single()),
    };
    let report = finetune_dist(
        device,
        dist,
        &mut model,
        &data,
        &tok,
        &cfg,
        &tok_dir,
        &a.output,
        resume,
        &mut |s, t, l| {
            pb.set_length(t);
            pb.set_position(s);
            pb.set_message(format!("loss {l:.4}"));
        },
    )?;
    pb.finish_and_clear();
    match (main, report.last()) {
        (true, Some(r)) => eprintln!(
            "step {}: loss {:.4}; model written to {}",
            r.0,
            r.1,
            a.output.display()
        ),
        (true, None) => eprintln!(
            "nothing to train: the checkpoint is at the run's last step; model written to {}",
            a.output.display()
        ),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        a: FinetuneArgs,
    }

    /// The library's `FinetuneConfig::default()` is what the command runs with no flags, so a
    /// program that links the library trains as the CLI does (a drift fails here).
    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let w =
            Wrap::try_parse_from(["x", "--model", "m", "--train", "t", "--output", "o"]).unwrap();
        assert_eq!(w.a.kd_loss, "m3_kd_loss");
        assert_eq!(
            finetune_config(&w.a, KdLoss::M3KdLoss, w.a.seed.unwrap_or(DEFAULT_SEED)),
            FinetuneConfig::default()
        );
        let w = Wrap::try_parse_from([
            "x",
            "--model",
            "m",
            "--train",
            "t",
            "--output",
            "o",
            "--unified",
            "false",
            "--max-grad-norm",
            "0",
            "--steps",
            "7",
        ])
        .unwrap();
        let c = finetune_config(&w.a, KdLoss::KlDiv, 5);
        assert!(!c.loss.unified && !c.loss.self_distill);
        assert_eq!((c.max_grad_norm, c.steps, c.seed), (None, Some(7), 5));
    }
}
