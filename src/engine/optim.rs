//! AdamW on the device for a trainer whose encoder lives there: f32 master weights and moments
//! stay on the device in the encoder's flat layout ([`super::FlatLayout`]), one fused kernel
//! (kernels/adamw.cu) updates them from the flat gradient buffer and writes the compute copy the
//! forward reads (bf16 on CUDA) in the same pass. Per step the host reads back one float per run
//! of trainable tensors (Σ g², for the global clip norm) instead of the whole gradient, and uploads
//! nothing. The host keeps the optimizer of the other parameters (heads) and the step count;
//! [`DeviceAdamW::sync_to_host`] brings weights and moments back for checkpoints.

use super::{DBuf, FlatLayout};
use crate::device::kernels::{self as k, AdamWStep};
use crate::device::launch::{KDType, KernelDevice};
use crate::error::{Error, Result};
use crate::model::params::ParamSet;
use crate::tensor::Tensor;
use crate::train::optim::AdamW;
use std::ops::Range;

/// Device AdamW state of a group of consecutive parameters of a [`ParamSet`] (an encoder's: the
/// first `layout.lens.len()`; or RetroMAE's LM head and decoder after them) whose weights live in
/// one flat device buffer, with the flat f32 gradient buffer the backward accumulates into.
pub struct DeviceAdamW {
    layout: FlatLayout,
    /// Index of the group's first tensor in the [`ParamSet`] (and the host optimizer).
    first: usize,
    names: Vec<String>,
    grads: std::sync::Arc<DBuf>,
    grad_views: Vec<DBuf>,
    master: DBuf,
    m: DBuf,
    v: DBuf,
    /// [total] u8: 1 where weight decay applies.
    decay: crate::device::launch::DevBuf,
    /// Runs of consecutive trainable tensors, as element ranges of the flat buffers.
    runs: Vec<(Range<usize>, Range<usize>)>,
    partials: DBuf,
    sumsq: DBuf,
}

impl std::fmt::Debug for DeviceAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceAdamW({} tensors, {} elements)",
            self.layout.lens.len(),
            self.layout.total
        )
    }
}

impl DeviceAdamW {
    /// Upload the master weights (`params`' first tensors, in the layout of `denc`'s flat
    /// weights), the moments of `opt` (zero for a fresh run, a checkpoint's on resume) and the
    /// decay mask (`opt`'s rule), and allocate the gradient buffer. `frozen[i]` tensors are never
    /// updated (no decay either), as the host optimizer skips a tensor without gradient.
    pub fn new(
        dev: &dyn KernelDevice,
        denc: &super::DeviceEncoder,
        params: &ParamSet,
        opt: &AdamW,
        frozen: &[bool],
    ) -> Result<DeviceAdamW> {
        let (_, layout) = denc
            .flat_weights()
            .ok_or_else(|| Error::invalid("device optimizer: the encoder has no weights"))?;
        DeviceAdamW::new_group(dev, layout, 0, params, opt, frozen)
    }

    /// [`DeviceAdamW::new`] for the tensors `first ..` of `params` whose weights lie in a flat
    /// buffer of `layout` (`frozen` indexed like `layout`).
    pub fn new_group(
        dev: &dyn KernelDevice,
        layout: &FlatLayout,
        first: usize,
        params: &ParamSet,
        opt: &AdamW,
        frozen: &[bool],
    ) -> Result<DeviceAdamW> {
        let (grads, grad_views) = DBuf::flat(dev, layout, KDType::F32)?;
        let n = layout.lens.len();
        if params.values().len() < first + n || frozen.len() < n {
            return Err(Error::invalid(format!(
                "device optimizer: {} parameters / {} frozen flags for a layout of {n} from \
                 tensor {first}",
                params.values().len(),
                frozen.len()
            )));
        }
        let mut master = vec![0.0f32; layout.total];
        let mut m = vec![0.0f32; layout.total];
        let mut v = vec![0.0f32; layout.total];
        let mut decay = vec![0u8; layout.total];
        for i in 0..n {
            let (o, len) = (layout.offsets[i], layout.lens[i]);
            let t = params.values()[first + i].to_f32();
            let vals = t.f32s()?;
            if vals.len() != len {
                return Err(Error::shape(
                    format!("device optimizer: {}", params.specs()[first + i].name),
                    &[len],
                    &[vals.len()],
                ));
            }
            master[o..o + len].copy_from_slice(vals);
            let (mi, vi) = opt.moments(first + i);
            m[o..o + len].copy_from_slice(mi);
            v[o..o + len].copy_from_slice(vi);
            if opt.decays(first + i) {
                decay[o..o + len].fill(1);
            }
        }
        let mut runs = Vec::new();
        let mut i = 0;
        while i < n {
            if frozen[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < n && !frozen[i] {
                i += 1;
            }
            let a = layout.offsets[start];
            let b = layout.offsets[i - 1] + layout.lens[i - 1];
            runs.push((start..i, a..b));
        }
        let max_run = runs.iter().map(|r| r.1.len()).max().unwrap_or(0);
        Ok(DeviceAdamW {
            layout: layout.clone(),
            first,
            names: params.specs()[first..first + n]
                .iter()
                .map(|s| s.name.clone())
                .collect(),
            grads,
            grad_views,
            master: DBuf::from_f32(dev, &master, KDType::F32)?,
            m: DBuf::from_f32(dev, &m, KDType::F32)?,
            v: DBuf::from_f32(dev, &v, KDType::F32)?,
            decay: super::upload_pod(dev, &decay)?,
            runs,
            partials: DBuf::zeros(dev, k::grad_sumsq_partials(max_run.max(1)), KDType::F32)?,
            sumsq: DBuf::zeros(dev, 1, KDType::F32)?,
        })
    }

    /// The per-tensor gradient buffers (views of one flat f32 buffer) the device backward
    /// accumulates into.
    pub fn grads(&self) -> &[DBuf] {
        &self.grad_views
    }

    /// Zero the gradients (the start of a step).
    pub fn clear_grads(&self, dev: &dyn KernelDevice) -> Result<()> {
        self.grads.zero(dev)
    }

    /// Σ g² over the trainable tensors of the gradient buffer, times `scale`². A non-finite sum
    /// is an error naming the first tensor at fault and the step.
    pub fn grad_sumsq(&self, dev: &dyn KernelDevice, scale: f32, step: u64) -> Result<f64> {
        let grads = &*self.grads;
        let mut total = 0.0f64;
        for (tensors, r) in &self.runs {
            // SAFETY: grads holds layout.total f32 (checked); the run lies inside it; partials
            // has room for the longest run; sumsq holds one f32.
            unsafe {
                k::grad_sumsq(
                    dev,
                    grads.at(r.start),
                    self.partials.ptr(),
                    self.sumsq.ptr(),
                    r.len(),
                )?
            };
            let s = self.sumsq.to_f32(dev)?[0] as f64;
            if !s.is_finite() {
                let all = grads.to_f32(dev)?;
                for i in tensors.clone() {
                    let (o, len) = (self.layout.offsets[i], self.layout.lens[i]);
                    if all[o..o + len].iter().any(|x| !x.is_finite()) {
                        return Err(Error::NonFinite(format!(
                            "gradient of {} at step {step}",
                            self.names[i]
                        )));
                    }
                }
                return Err(Error::NonFinite(format!(
                    "gradient norm of {}.. at step {step}",
                    self.names[tensors.start]
                )));
            }
            total += s;
        }
        Ok(total * (scale as f64) * (scale as f64))
    }

    /// One optimizer step of a trainer whose other parameters (heads, decoder, ...) keep the
    /// host optimizer `host`: `grads` are the host gradients (None for the tensors this
    /// optimizer owns), the device gradients are scaled by `grad_scale` (1/W after a sum over W
    /// ranks). The global clip norm covers both sides (one float read back per run of device
    /// tensors); the host step runs first, then the fused kernel updates the master weights and
    /// writes `denc`'s compute weights. Returns the global gradient norm.
    #[allow(clippy::too_many_arguments)]
    pub fn step_with_host(
        &self,
        dev: &dyn KernelDevice,
        denc: &super::DeviceEncoder,
        params: &mut ParamSet,
        host: &mut AdamW,
        grads: &[Option<Tensor>],
        lr: f32,
        grad_scale: f32,
    ) -> Result<f32> {
        let (weights, _) = denc
            .flat_weights()
            .ok_or_else(|| Error::invalid("device optimizer: the encoder has no weights"))?;
        step_groups(dev, &[(self, weights)], params, host, grads, lr, grad_scale)
    }

    /// One AdamW step (`step` counted from 1, bias corrections from it) of every trainable
    /// tensor with gradient `scale · grads`; `copy` (the encoder's flat weights, this layout)
    /// receives the new weights in its own type.
    fn step(
        &self,
        dev: &dyn KernelDevice,
        copy: &DBuf,
        hyper: &crate::device::cpu::adamw::AdamWHyper,
        lr: f32,
        step: u64,
        scale: f32,
    ) -> Result<()> {
        let grads = &*self.grads;
        if copy.len() != self.layout.total {
            return Err(Error::shape(
                "device optimizer weight copy",
                &[self.layout.total],
                &[copy.len()],
            ));
        }
        let h = AdamWStep {
            lr,
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            eps: hyper.eps,
            weight_decay: hyper.weight_decay,
            step,
            max_norm: 0.0,
            grad_scale: scale,
        };
        let u8_at = |i: usize| crate::device::launch::DevPtr(self.decay.ptr.0 + i as u64);
        for (_, r) in &self.runs {
            // SAFETY: master, m, v, grads hold layout.total f32, decay layout.total u8, copy
            // layout.total elements of its type; the run lies inside all of them.
            unsafe {
                k::adamw(
                    dev,
                    self.master.at(r.start),
                    grads.at(r.start),
                    self.m.at(r.start),
                    self.v.at(r.start),
                    u8_at(r.start),
                    crate::device::launch::DevPtr::NULL,
                    Some((copy.at(r.start), copy.dtype())),
                    r.len(),
                    &h,
                )?
            };
        }
        Ok(())
    }

    /// Bring the master weights into `params` and the moments into `opt` for the tensors this
    /// optimizer updates (before a checkpoint, a parameter check or the end of the run); frozen
    /// tensors are left as the host has them.
    pub fn sync_to_host(
        &self,
        dev: &dyn KernelDevice,
        params: &mut ParamSet,
        opt: &mut AdamW,
    ) -> Result<()> {
        let (master, m, v) = (
            self.master.to_f32(dev)?,
            self.m.to_f32(dev)?,
            self.v.to_f32(dev)?,
        );
        let mut values = params.values().to_vec();
        for (tensors, _) in &self.runs {
            for i in tensors.clone() {
                let (o, n) = (self.layout.offsets[i], self.layout.lens[i]);
                let at = self.first + i;
                values[at] = Tensor::from_vec(master[o..o + n].to_vec(), &params.specs()[at].dims)?;
                opt.set_moments(at, m[o..o + n].to_vec(), v[o..o + n].to_vec())?;
            }
        }
        params.set_values(values)
    }

    /// Whether tensor `i` (of the [`ParamSet`]) is updated here (in the group, not frozen).
    pub fn owns(&self, i: usize) -> bool {
        i.checked_sub(self.first)
            .is_some_and(|j| self.runs.iter().any(|(t, _)| t.contains(&j)))
    }
}

/// One optimizer step over several device groups (each with the flat buffer of its compute
/// weights, which receives the new values) and the host optimizer `host` for the tensors no group
/// owns (`grads`: their host gradients, None for the groups' tensors; a tensor with neither
/// gradient is not updated). The device gradients are scaled by `grad_scale`; the global clip
/// norm covers every group and the host tensors. Returns the global gradient norm.
pub fn step_groups(
    dev: &dyn KernelDevice,
    groups: &[(&DeviceAdamW, &DBuf)],
    params: &mut ParamSet,
    host: &mut AdamW,
    grads: &[Option<Tensor>],
    lr: f32,
    grad_scale: f32,
) -> Result<f32> {
    if grads.len() != params.values().len() {
        return Err(Error::invalid(format!(
            "optimizer: {} gradients for {} parameters",
            grads.len(),
            params.values().len()
        )));
    }
    for (g, _) in groups {
        if let Some(i) =
            (0..g.layout.lens.len()).find(|&i| g.owns(g.first + i) && grads[g.first + i].is_some())
        {
            return Err(Error::invalid(format!(
                "a host gradient for {}, which the device optimizer updates",
                g.names[i]
            )));
        }
    }
    let mut dev_sq = 0.0;
    for (g, _) in groups {
        dev_sq += g.grad_sumsq(dev, grad_scale, host.step + 1)?;
    }
    let (norm, clip) = host.update_with(params, grads, lr, dev_sq)?;
    for (g, weights) in groups {
        g.step(dev, weights, &host.hyper, lr, host.step, grad_scale * clip)?;
    }
    Ok(norm)
}
