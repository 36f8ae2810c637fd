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
