//! Training infrastructure shared by RetroMAE pre-training and M3 fine-tuning: AdamW with global
//! gradient clipping, the linear warm-up/decay schedule, metrics (JSONL + SVG curves) and atomic
//! checkpoints with everything needed for a bit-identical resume.

pub mod checkpoint;
pub mod m3;
pub mod metrics;
pub mod optim;
pub mod retromae;
pub mod schedule;

pub use checkpoint::{atomic_dir, TrainState};
pub use metrics::MetricsLog;
pub use optim::AdamW;
pub use schedule::linear_warmup_decay;

use crate::autograd::{Grads, Var};
use crate::error::Result;
use crate::model::params::ParamSpec;
use crate::tensor::Tensor;

/// A `--max-grad-norm` value as the optimizer's option: 0 (or less) disables clipping.
pub fn clip_option(max_grad_norm: f32) -> Option<f32> {
    (max_grad_norm > 0.0).then_some(max_grad_norm)
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
            },
            AdamW::new(specs, hyper, max_grad_norm),
        )
    });
    state.total_steps = total;
    (state, opt)
}

/// Per-parameter gradient sums over micro-batches (None: no gradient reached it yet).
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
