//! AdamW over a [`ParamSet`] with per-tensor moments, no weight decay on biases and LayerNorm
//! parameters (the HF Trainer rule), and global gradient-norm clipping.

use crate::device::cpu::adamw::{adamw_step, clip_factor, grad_norm_sq, AdamWHyper};
use crate::error::{Error, Result};
use crate::model::params::{ParamSet, ParamSpec};
use crate::tensor::Tensor;
use std::collections::BTreeMap;

/// The optimizer state.
#[derive(Clone, Debug)]
pub struct AdamW {
    /// Base hyper-parameters (the schedule scales `lr`).
    pub hyper: AdamWHyper,
    /// Clip the global gradient norm to this value (None: no clipping).
    pub max_grad_norm: Option<f32>,
    /// Updates made so far.
    pub step: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    decay: Vec<bool>,
}

/// torch.optim.AdamW's defaults (β1 0.9, β2 0.999, eps 1e-8) with this lr and weight decay.
pub fn adamw_hyper(lr: f32, weight_decay: f32) -> AdamWHyper {
    AdamWHyper {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
    }
}

/// HF Trainer: no decay for "bias" and LayerNorm weights.
pub fn no_decay(name: &str) -> bool {
    name.ends_with("bias") || name.contains("LayerNorm") || name.contains("layer_norm")
}

impl AdamW {
    /// Fresh state for parameters with these specs.
    pub fn new(specs: &[ParamSpec], hyper: AdamWHyper, max_grad_norm: Option<f32>) -> AdamW {
        let sizes: Vec<usize> = specs.iter().map(|s| s.dims.iter().product()).collect();
        AdamW {
            hyper,
            max_grad_norm,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            decay: specs.iter().map(|s| !no_decay(&s.name)).collect(),
        }
    }

    /// One update with learning rate `lr`. `grads[i]` belongs to parameter i (None: no gradient this
    /// step, e.g. a frozen tensor — it is left untouched). Returns the global gradient norm before
    /// clipping. A non-finite gradient is an error naming the tensor; nothing is updated then.
    pub fn update(
        &mut self,
        params: &mut ParamSet,
        grads: &[Option<Tensor>],
        lr: f32,
    ) -> Result<f32> {
        Ok(self.update_with(params, grads, lr, 0.0)?.0)
    }

    /// [`AdamW::update`] when some gradients are applied elsewhere (a device optimizer,
    /// `engine::optim::DeviceAdamW`, for the parameters whose `grads` entry is None here):
    /// `extra_sq` is their Σ g², counted in the global norm. Returns the norm and the clip factor,
    /// which the other optimizer applies too.
    pub fn update_with(
        &mut self,
        params: &mut ParamSet,
        grads: &[Option<Tensor>],
        lr: f32,
        extra_sq: f64,
    ) -> Result<(f32, f32)> {
        if grads.len() != params.values().len() || self.m.len() != grads.len() {
            return Err(Error::invalid(format!(
                "optimizer: {} gradients for {} parameters ({} in state)",
                grads.len(),
                params.values().len(),
                self.m.len()
            )));
        }
        let mut sq = extra_sq;
        for (i, g) in grads.iter().enumerate() {
            if let Some(g) = g {
                let name = &params.specs()[i].name;
                g.expect_dims(&format!("gradient of {name}"), &params.specs()[i].dims)?;
                let s = grad_norm_sq(g.f32s()?);
                if !s.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "gradient of {name} at step {}",
                        self.step + 1
                    )));
                }
                sq += s;
            }
        }
        let norm = sq.sqrt();
        let scale = self.max_grad_norm.map_or(1.0, |m| clip_factor(norm, m));
        self.step += 1;
        let mut values = params.values().to_vec();
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let h = AdamWHyper {
                lr,
                weight_decay: if self.decay[i] {
                    self.hyper.weight_decay
                } else {
                    0.0
                },
                ..self.hyper
            };
            let mut p = values[i].clone().into_f32_vec()?;
            adamw_step(
                &mut p,
                g.f32s()?,
                &mut self.m[i],
                &mut self.v[i],
                &h,
                self.step,
                scale,
            );
            values[i] = Tensor::from_vec(p, &params.specs()[i].dims)?;
        }
        params.set_values(values)?;
        Ok((norm as f32, scale))
    }

    /// The moments (m, v) of parameter `i`.
    pub fn moments(&self, i: usize) -> (&[f32], &[f32]) {
        (&self.m[i], &self.v[i])
    }

    /// Replace the moments of parameter `i` (from a device optimizer, before a checkpoint).
    pub fn set_moments(&mut self, i: usize, m: Vec<f32>, v: Vec<f32>) -> Result<()> {
        if m.len() != self.m[i].len() || v.len() != self.v[i].len() {
            return Err(Error::invalid(format!(
                "optimizer moments of parameter {i}: {} / {} values for {}",
                m.len(),
                v.len(),
                self.m[i].len()
            )));
        }
        self.m[i] = m;
        self.v[i] = v;
        Ok(())
    }

    /// Whether parameter `i` takes weight decay.
    pub fn decays(&self, i: usize) -> bool {
        self.decay[i]
    }

    /// The moments as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`), for checkpoints.
    pub fn state_tensors(&self, specs: &[ParamSpec]) -> Result<BTreeMap<String, Tensor>> {
        let mut map = BTreeMap::new();
        for (i, s) in specs.iter().enumerate() {
            map.insert(
                format!("exp_avg.{}", s.name),
                Tensor::from_vec(self.m[i].clone(), &s.dims)?,
            );
            map.insert(
                format!("exp_avg_sq.{}", s.name),
                Tensor::from_vec(self.v[i].clone(), &s.dims)?,
            );
        }
        Ok(map)
    }

    /// Restore the moments from a checkpoint directory's optimizer.safetensors.
    pub fn load_dir(
        &mut self,
        dir: &std::path::Path,
        specs: &[ParamSpec],
        step: u64,
    ) -> Result<()> {
        let p = dir.join("optimizer.safetensors");
        let map = crate::io::read_safetensors(&p)?;
        self.load_state(specs, &map, step).map_err(|e| match e {
            Error::NonFinite(m) => Error::NonFinite(format!("{}: {m}", p.display())),
            Error::Invalid(m) => Error::format(&p, m),
            e @ Error::Shape { .. } => Error::format(&p, e.to_string()),
            e => e,
        })
    }

    /// Restore the moments saved by [`AdamW::state_tensors`] (and the step count).
    pub fn load_state(
        &mut self,
        specs: &[ParamSpec],
        map: &BTreeMap<String, Tensor>,
        step: u64,
    ) -> Result<()> {
        for (i, s) in specs.iter().enumerate() {
            for (key, dst) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let name = format!("{key}.{}", s.name);
                let t = map
                    .get(&name)
                    .ok_or_else(|| Error::invalid(format!("optimizer state lacks {name}")))?;
                t.expect_dims(&name, &s.dims)?;
                t.ensure_finite(&format!("optimizer state {name}"))?;
                *dst = t.to_f32().into_f32_vec()?;
                // A second moment is a mean of squares: a negative one makes the update's square
                // root NaN a step later.
                if key == "exp_avg_sq" {
                    if let Some(j) = dst.iter().position(|&x| x < 0.0) {
                        return Err(Error::invalid(format!(
                            "optimizer state {name}: element {j} is negative ({})",
                            dst[j]
                        )));
                    }
                }
            }
        }
        self.step = step;
        Ok(())
    }
}
