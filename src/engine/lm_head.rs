//! The masked-language-model head and its cross-entropy on a kernel device (RetroMAE's encoder
//! MLM loss and decoder loss, `model::lm_head::lm_head_logits` + `ops::cross_entropy`): dense ->
//! GELU -> LayerNorm -> projection onto the tied word embeddings + bias -> mean cross-entropy
//! over the rows whose target is not -100, forward and backward in one call. The logits exist
//! one chunk of rows at a time (`chunk_rows`), so a 250k-word vocabulary does not need
//! [N, V] in memory.

use super::encoder::{linear, linear_bwd};
use super::{upload_pod, DBuf};
use crate::device::kernels as k;
use crate::device::launch::{KDType, KernelDevice};
use crate::error::{Error, Result};

/// The head's tensors on the device: dense [H, H] + \[H\], LayerNorm \[H\] x 2, output bias \[V\],
/// and the projection, the word-embedding matrix [V, H]. As weights: the compute type; as
/// gradients: f32, accumulated.
pub struct LmHeadBufs<'a> {
    pub dense_w: &'a DBuf,
    pub dense_b: &'a DBuf,
    pub ln_g: &'a DBuf,
    pub ln_b: &'a DBuf,
    pub bias: &'a DBuf,
    pub word_emb: &'a DBuf,
}

/// The weights ([`LmHeadBufs`] in the compute type).
pub type LmHeadWeights<'a> = LmHeadBufs<'a>;
/// Their gradients ([`LmHeadBufs`] in f32, accumulated).
pub type LmHeadGrads<'a> = LmHeadBufs<'a>;

/// Mean cross-entropy of the head over `x` [N, H] (compute type) against `targets` \[N\] (-100 =
/// ignored), the mean taken over the counted rows as `ops::cross_entropy`. Accumulates `g` times
/// its gradient into `grads` and returns (loss, dx [N, H] in the compute type). A batch with no
/// counted row has loss 0 and no gradient.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_loss(
    dev: &dyn KernelDevice,
    w: &LmHeadWeights,
    grads: &LmHeadGrads,
    x: &DBuf,
    targets: &[i64],
    g: f32,
    eps: f32,
    chunk_rows: usize,
) -> Result<(f32, DBuf)> {
    let dt = x.dtype();
    let (n, h) = (targets.len(), w.dense_b.len());
    let v = w.bias.len();
    if x.len() != n * h || w.word_emb.len() != v * h || w.dense_w.len() != h * h {
        return Err(Error::invalid(format!(
            "device LM head: x of {} elements for {n} targets x {h}, word embeddings of {} \
             (expected {v} x {h})",
            x.len(),
            w.word_emb.len()
        )));
    }
    if let Some(t) = targets
        .iter()
        .find(|&&t| t != -100 && !(0..v as i64).contains(&t))
    {
        return Err(Error::invalid(format!(
            "device LM head: target {t} outside the vocabulary of {v}"
        )));
    }
    let dx = DBuf::zeros(dev, n * h, dt)?;
    let total = targets.iter().filter(|&&t| t != -100).count();
    if total == 0 {
        return Ok((0.0, dx));
    }
    let chunk = chunk_rows.clamp(1, n);
    // Each chunk's (mean loss, count) stays on the device until the end: one read-back per call,
    // not one synchronisation per chunk.
    let all_stats = DBuf::uninit(dev, 2 * n.div_ceil(chunk), KDType::F32)?;
    let mut counted = Vec::new();
    for (ci, r0) in (0..n).step_by(chunk).enumerate() {
        let m = chunk.min(n - r0);
        let tg = &targets[r0..r0 + m];
        let count = tg.iter().filter(|&&t| t != -100).count();
        if count == 0 {
            continue;
        }
        // A view of rows r0 .. r0 + m of x and dx.
        let xs = DBuf::uninit(dev, m * h, dt)?;
        // SAFETY: x holds n × h, xs m × h of the same type.
        unsafe { dev.copy_d2d(x.at(r0 * h), xs.ptr(), m * h * dt.size())? };
        // Forward: u = x Wdᵀ, a = GELU(u + bd), t = LN(a), logits = t Eᵀ + b.
        let u = linear(dev, &xs, w.dense_w, m, h, h)?;
        let a = DBuf::uninit(dev, m * h, dt)?;
        let t = DBuf::uninit(dev, m * h, dt)?;
        let (mean, rstd) = (
            DBuf::uninit(dev, m, KDType::F32)?,
            DBuf::uninit(dev, m, KDType::F32)?,
        );
        // SAFETY: u, a, t m × h; biases and LN parameters h; mean, rstd m f32.
        unsafe {
            k::bias_gelu_fwd(dev, dt, u.ptr(), w.dense_b.ptr(), a.ptr(), m, h)?;
            k::layernorm_fwd(
                dev,
                dt,
                a.ptr(),
                w.ln_g.ptr(),
                w.ln_b.ptr(),
                t.ptr(),
                mean.ptr(),
                rstd.ptr(),
                m,
                h,
                eps,
            )?;
        }
        let logits = linear(dev, &t, w.word_emb, m, h, v)?;
        let tgt = upload_pod(dev, tg)?;
        let (lse, row_loss) = (
            DBuf::uninit(dev, m, KDType::F32)?,
            DBuf::uninit(dev, m, KDType::F32)?,
        );
        let stats = all_stats.at(2 * ci);
        // SAFETY: logits m × v; bias v; targets m i64; lse, row_loss m f32, stats 2 f32 (chunk ci of all_stats); the
        // backward overwrites the logits with their gradient.
        unsafe {
            k::add_bias(dev, dt, logits.ptr(), w.bias.ptr(), m, v)?;
            k::cross_entropy_fwd(
                dev,
                dt,
                logits.ptr(),
                tgt.ptr,
                lse.ptr(),
                row_loss.ptr(),
                stats,
                m,
                v,
            )?;
            // This chunk's mean is over its `count` rows; the batch's over `total`.
            let gc = g * count as f32 / total as f32;
            k::cross_entropy_bwd(
                dev,
                dt,
                logits.ptr(),
                tgt.ptr,
                lse.ptr(),
                stats,
                gc,
                logits.ptr(),
                m,
                v,
            )?;
        }
        counted.push((ci, r0, m, count));
        // Backward: output bias, word embeddings, LN, GELU, dense.
        // SAFETY: dlogits m × v; the bias gradient v f32.
        unsafe { k::colsum(dev, dt, logits.ptr(), grads.bias.ptr(), m, v)? };
        let dtn = DBuf::uninit(dev, m * h, dt)?;
        linear_bwd(
            dev,
            &t,
            w.word_emb,
            &logits,
            Some((&dtn, 0.0)),
            grads.word_emb,
            m,
            h,
            v,
        )?;
        drop(logits);
        let da = DBuf::uninit(dev, m * h, dt)?;
        let du = DBuf::uninit(dev, m * h, dt)?;
        // SAFETY: a, dtn, da, u, du m × h; LN parameters and biases h; their gradients f32.
        unsafe {
            k::layernorm_bwd(
                dev,
                dt,
                a.ptr(),
                w.ln_g.ptr(),
                mean.ptr(),
                rstd.ptr(),
                dtn.ptr(),
                da.ptr(),
                grads.ln_g.ptr(),
                grads.ln_b.ptr(),
                m,
                h,
            )?;
            k::bias_gelu_bwd(
                dev,
                dt,
                u.ptr(),
                w.dense_b.ptr(),
                da.ptr(),
                du.ptr(),
                grads.dense_b.ptr(),
                m,
                h,
            )?;
        }
        let dxs = DBuf::uninit(dev, m * h, dt)?;
        linear_bwd(
            dev,
            &xs,
            w.dense_w,
            &du,
            Some((&dxs, 0.0)),
            grads.dense_w,
            m,
            h,
            h,
        )?;
        // SAFETY: dxs m × h into rows r0.. of dx (n × h).
        unsafe { dev.copy_d2d(dxs.ptr(), dx.at(r0 * h), m * h * dt.size())? };
    }
    let st = all_stats.to_f32(dev)?;
    let mut loss = 0.0f64;
    for (ci, r0, m, count) in counted {
        let l = st[2 * ci];
        if !l.is_finite() {
            return Err(Error::NonFinite(format!(
                "device LM head: cross-entropy of rows {r0}..{} is {l}",
                r0 + m
            )));
        }
        loss += l as f64 * count as f64 / total as f64;
    }
    Ok((loss as f32, dx))
}
