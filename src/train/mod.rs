//! Training infrastructure shared by RetroMAE pre-training and M3 fine-tuning: AdamW with global
//! gradient clipping, the linear warm-up/decay schedule, metrics (JSONL + SVG curves) and atomic
//! checkpoints with everything needed for a bit-identical resume.

pub mod checkpoint;
pub mod m3;
pub mod metrics;
pub mod optim;
pub mod retromae;
pub mod schedule;

pub use checkpoint::{atomic_dir, replace_files, TrainState};
pub use metrics::MetricsLog;
pub use optim::AdamW;
pub use schedule::linear_warmup_decay;

use crate::autograd::{Grads, Var};
use crate::error::{Error, Result};
use crate::model::params::{ParamSet, ParamSpec};
use crate::tensor::Tensor;

/// A `--max-grad-norm` value as the optimizer's option: 0 disables clipping (a negative or
/// non-finite value is refused by [`check_schedule`]).
pub fn clip_option(max_grad_norm: f32) -> Option<f32> {
    (max_grad_norm != 0.0).then_some(max_grad_norm)
}

/// The optimizer and schedule settings both trainers take, checked before the first step (a NaN
/// or negative learning rate would train garbage and write it into checkpoints).
pub fn check_schedule(
    lr: f32,
    warmup_ratio: f64,
    weight_decay: f32,
    max_grad_norm: Option<f32>,
    steps: Option<u64>,
    epochs: Option<u64>,
) -> Result<()> {
    let bad = |flag: &str, v: String, want: &str| {
        Err(Error::invalid(format!("--{flag} {v}: must be {want}")))
    };
    if !(lr.is_finite() && lr >= 0.0) {
        return bad("lr", lr.to_string(), "a finite number >= 0");
    }
    if !(0.0..=1.0).contains(&warmup_ratio) {
        return bad("warmup-ratio", warmup_ratio.to_string(), "in [0, 1]");
    }
    if !(weight_decay.is_finite() && weight_decay >= 0.0) {
        return bad(
            "weight-decay",
            weight_decay.to_string(),
            "a finite number >= 0",
        );
    }
    if let Some(c) = max_grad_norm {
        if !(c.is_finite() && c > 0.0) {
            return bad(
                "max-grad-norm",
                c.to_string(),
                "a finite number > 0 (0 disables clipping)",
            );
        }
    }
    if steps == Some(0) {
        return bad("steps", "0".into(), ">= 1");
    }
    if epochs == Some(0) {
        return bad("epochs", "0".into(), ">= 1");
    }
    Ok(())
}

/// Refuse to write a checkpoint whose weights are not all finite (the last good checkpoint
/// stays the newest one).
pub fn ensure_params_finite(params: &ParamSet, step: u64) -> Result<()> {
    for (s, v) in params.specs().iter().zip(params.values()) {
        v.ensure_finite(&format!(
            "weights after step {step} (tensor {}; no checkpoint written, the last one is kept)",
            s.name
        ))?;
    }
    Ok(())
}

/// A resumed run's step against the run's length: a checkpoint past the end is an error (a
/// smaller `--steps` than the run it comes from).
pub fn check_resume_step(state: &TrainState, total: u64) -> Result<()> {
    if state.step > total {
        return Err(Error::invalid(format!(
            "the checkpoint is at step {} but this run has {total} steps (--steps / --epochs \
             must reach at least the checkpoint's step)",
            state.step
        )));
    }
    Ok(())
}

/// Create the run's output directory (an existing file there is a clear error, not "File
/// exists").
pub fn create_output_dir(out: &std::path::Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::invalid(format!(
            "--output {}: exists and is not a directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))
}

/// `--resume DIR`: a checkpoint directory (its trainer state is there).
pub fn check_resume_dir(resume: &std::path::Path) -> Result<()> {
    if !resume.join("trainer_state.json").is_file() {
        return Err(Error::invalid(format!(
            "--resume {}: not a checkpoint directory (no trainer_state.json; give a \
             checkpoint-<step> directory or the --output of a finished run)",
            resume.display()
        )));
    }
    Ok(())
}

/// `--resume DIR` with `--model M` (or `--config M/config.json`): the checkpoint's model must
/// have the architecture of `config` (M's config.json), or the resume would silently train
/// another model than the one named.
pub fn check_resume_model(resume: &std::path::Path, config: &std::path::Path) -> Result<()> {
    use crate::model::config::EncoderConfig;
    let rc = EncoderConfig::from_file(resume.join("config.json"))?;
    let mc = EncoderConfig::from_file(config)?;
    if rc != mc {
        return Err(Error::invalid(format!(
            "--resume {} holds a {:?} model ({} layers, hidden {}, vocabulary {}) but {} \
             is a {:?} model ({} layers, hidden {}, vocabulary {}): resume with the model the \
             run started from",
            resume.display(),
            rc.kind,
            rc.num_hidden_layers,
            rc.hidden_size,
            rc.vocab_size,
            config.display(),
            mc.kind,
            mc.num_hidden_layers,
            mc.hidden_size,
            mc.vocab_size
        )));
    }
    Ok(())
}

/// The settings recorded in a checkpoint (`TrainState::args`) against this run's: a resume with
/// different data or hyper-parameters would not continue the same run. `null` (older
/// checkpoints) is not checked. Keys whose values differ are listed.
pub fn check_resume_args(recorded: &serde_json::Value, now: &serde_json::Value) -> Result<()> {
    let (Some(old), Some(new)) = (recorded.as_object(), now.as_object()) else {
        return Ok(());
    };
    let diffs: Vec<String> = new
        .iter()
        .filter_map(|(k, v)| match old.get(k) {
            Some(o) if o != v => Some(format!("{k}: checkpoint {o}, now {v}")),
            _ => None,
        })
        .collect();
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "--resume: the run's settings changed ({}); resume with the checkpoint's settings \
             or start a new run",
            diffs.join("; ")
        )))
    }
}

/// Every rank of a data-parallel run must train with rank 0's settings (`settings`: a JSON object
/// of hyper-parameters, data fingerprint, model config, schedule): rank 0's are broadcast, each
/// rank lists the keys where its own differ, and the verdicts are summed over the group, so that
/// every rank stops together (rank 0 must not write a model that another rank refused). A rank
/// that differs names the keys; the others name the ranks.
pub fn check_same_settings(group: &crate::dist::Group, settings: &serde_json::Value) -> Result<()> {
    if group.world() == 1 {
        return Ok(());
    }
    let mut bytes = serde_json::to_vec(settings)
        .map_err(|e| Error::Dist(format!("rank {}: settings: {e}", group.rank())))?;
    group.broadcast(&mut bytes)?;
    let theirs: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Dist(format!("settings broadcast by rank 0 are not JSON: {e}")))?;
    let empty = serde_json::Map::new();
    let (old, new) = (
        theirs.as_object().unwrap_or(&empty),
        settings.as_object().unwrap_or(&empty),
    );
    let me = group.rank();
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let null = serde_json::Value::Null;
    let diffs: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let (o, v) = (old.get(k).unwrap_or(&null), new.get(k).unwrap_or(&null));
            (o != v).then(|| format!("{k}: rank 0 {o}, rank {me} {v}"))
        })
        .collect();
    let mut flags = vec![0.0f32; group.world()];
    flags[me] = if diffs.is_empty() { 0.0 } else { 1.0 };
    group.all_reduce_sum(&mut flags)?;
    let differ: Vec<usize> = (0..flags.len()).filter(|&r| flags[r] != 0.0).collect();
    if !diffs.is_empty() {
        return Err(Error::Dist(format!(
            "rank {me} was started with other settings than rank 0 ({}): every rank needs the \
             same flags, data and model",
            diffs.join("; ")
        )));
    }
    if !differ.is_empty() {
        return Err(Error::Dist(format!(
            "rank {me}: ranks {differ:?} were started with other settings than rank 0 (their \
             errors name them); every rank needs the same flags, data and model"
        )));
    }
    Ok(())
}

/// The state and optimizer of a run: the resumed ones, or fresh ones (step 0, AdamW with torch's
/// defaults); `total` steps either way.
pub fn start_or_resume(
    resume: Option<(TrainState, AdamW)>,
    specs: &[ParamSpec],
    hyper: crate::device::cpu::adamw::AdamWHyper,
    max_grad_norm: Option<f32>,
    seed: u64,
    total: u64,
) -> (TrainState, AdamW) {
    let (mut state, opt) = resume.unwrap_or_else(|| {
        (
            TrainState {
                step: 0,
                total_steps: total,
                batches_seen: 0,
                seed,
                args: serde_json::Value::Null,
                metrics_checksum: None,
                log: None,
                files: Default::default(),
            },
            AdamW::new(specs, hyper, max_grad_norm),
        )
    });
    state.total_steps = total;
    (state, opt)
}

/// Per-parameter gradient sums over micro-batches (None: no gradient reached it yet).
#[derive(Debug)]
pub struct GradAccumulator(Vec<Option<Vec<f32>>>);

impl GradAccumulator {
    /// Empty sums for `n` parameters.
    pub fn new(n: usize) -> Self {
        GradAccumulator(vec![None; n])
    }

    /// Add the gradients that reached `vars` (parameter i bound as `vars[i]`).
    pub fn add(&mut self, grads: &Grads, vars: &[Var]) -> Result<()> {
        for (slot, v) in self.0.iter_mut().zip(vars) {
            if let Some(t) = grads.get(v) {
                let t = t.f32s()?;
                match slot {
                    Some(acc) => acc.iter_mut().zip(t).for_each(|(a, b)| *a += b),
                    None => *slot = Some(t.to_vec()),
                }
            }
        }
        Ok(())
    }

    /// Add a gradient for parameter `i` computed elsewhere (e.g. downloaded from a device).
    pub fn add_values(&mut self, i: usize, g: &[f32]) {
        match &mut self.0[i] {
            Some(acc) => acc.iter_mut().zip(g).for_each(|(a, b)| *a += b),
            slot => *slot = Some(g.to_vec()),
        }
    }

    /// The sums as tensors; `frozen(i)` drops parameter i's gradient (it is not updated).
    pub fn into_tensors(
        self,
        specs: &[ParamSpec],
        frozen: impl Fn(usize) -> bool,
    ) -> Result<Vec<Option<Tensor>>> {
        self.0
            .into_iter()
            .zip(specs)
            .enumerate()
            .map(|(i, (g, s))| {
                if frozen(i) {
                    Ok(None)
                } else {
                    g.map(|g| Tensor::from_vec(g, &s.dims)).transpose()
                }
            })
            .collect()
    }
}
