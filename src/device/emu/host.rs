//! Safe, typed wrappers that run the emulated kernels directly on host slices (the emulator's
//! "device memory" is host memory): the same signatures as the CPU reference in `device::cpu`,
//! plus the storage dtype (f32 or bf16) as a type parameter. Lengths are checked, then the
//! device-agnostic launchers of `device::kernels` are called with the slices' addresses.

use super::EmuDevice;
use crate::device::cpu::attention::{AttnDims, AttnDropout, AttnMask};
use crate::device::kernels::{self, AdamWStep, AttnKernelMask};
use crate::device::launch::{DevPtr, KDType};
use crate::error::{Error, Result};
use half::bf16;

/// A storage element type with a kernel variant.
pub trait Elem: bytemuck::Pod {
    const DT: KDType;
}
impl Elem for f32 {
    const DT: KDType = KDType::F32;
}
impl Elem for bf16 {
    const DT: KDType = KDType::BF16;
}

fn p<T>(s: &[T]) -> DevPtr {
    DevPtr(s.as_ptr() as u64)
}
fn pm<T>(s: &mut [T]) -> DevPtr {
    DevPtr(s.as_mut_ptr() as u64)
}
fn check(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::shape(what, &[want], &[got]))
    }
}

/// LayerNorm forward on rows of `dim` (see `cpu::layernorm::layernorm_fwd`).
pub fn layernorm_fwd<T: Elem>(
    dev: &EmuDevice,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: f32,
    dim: usize,
    y: &mut [T],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<()> {
    let rows = x.len() / dim.max(1);
    check("layernorm x", x.len(), rows * dim)?;
    check("layernorm gamma", gamma.len(), dim)?;
    check("layernorm beta", beta.len(), dim)?;
    check("layernorm y", y.len(), x.len())?;
    check("layernorm mean", mean.len(), rows)?;
    check("layernorm rstd", rstd.len(), rows)?;
    // SAFETY: every pointer addresses a slice whose length was checked against rows and dim.
    unsafe {
        kernels::layernorm_fwd(
            dev,
            T::DT,
            p(x),
            p(gamma),
            p(beta),
            pm(y),
            pm(mean),
            pm(rstd),
            rows,
            dim,
            eps,
        )
    }
}

/// LayerNorm backward: dx assigned; dgamma, dbeta accumulated.
pub fn layernorm_bwd<T: Elem>(
    dev: &EmuDevice,
    x: &[T],
    gamma: &[T],
    mean: &[f32],
    rstd: &[f32],
    dy: &[T],
    dim: usize,
    dx: &mut [T],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    let rows = x.len() / dim.max(1);
    check("layernorm x", x.len(), rows * dim)?;
    check("layernorm gamma", gamma.len(), dim)?;
    check("layernorm mean", mean.len(), rows)?;
    check("layernorm rstd", rstd.len(), rows)?;
    check("layernorm dy", dy.len(), x.len())?;
    check("layernorm dx", dx.len(), x.len())?;
    check("layernorm dgamma", dgamma.len(), dim)?;
    check("layernorm dbeta", dbeta.len(), dim)?;
    // SAFETY: every pointer addresses a slice whose length was checked against rows and dim.
    unsafe {
        kernels::layernorm_bwd(
            dev,
            T::DT,
            p(x),
            p(gamma),
            p(mean),
            p(rstd),
            p(dy),
            pm(dx),
            pm(dgamma),
            pm(dbeta),
            rows,
            dim,
        )
    }
}

/// GELU forward.
pub fn gelu_fwd<T: Elem>(dev: &EmuDevice, x: &[T], y: &mut [T]) -> Result<()> {
    check("gelu y", y.len(), x.len())?;
    // SAFETY: x and y hold n elements each.
    unsafe { kernels::gelu_fwd(dev, T::DT, p(x), pm(y), x.len()) }
}

/// GELU backward.
pub fn gelu_bwd<T: Elem>(dev: &EmuDevice, x: &[T], dy: &[T], dx: &mut [T]) -> Result<()> {
    check("gelu dy", dy.len(), x.len())?;
    check("gelu dx", dx.len(), x.len())?;
    // SAFETY: x, dy and dx hold n elements each.
    unsafe { kernels::gelu_bwd(dev, T::DT, p(x), p(dy), pm(dx), x.len()) }
}

/// Embedding gather (see `cpu::embedding::gather_fwd`); ids >= table rows give zero rows.
pub fn gather_fwd<T: Elem>(
    dev: &EmuDevice,
    table: &[T],
    ids: &[u32],
    dim: usize,
    out: &mut [T],
) -> Result<()> {
    let vocab = table.len() / dim.max(1);
    check("gather table", table.len(), vocab * dim)?;
    check("gather out", out.len(), ids.len() * dim)?;
    // SAFETY: table is [vocab, dim], ids [n], out [n, dim]; the kernel bounds-checks ids.
    unsafe { kernels::gather_fwd(dev, T::DT, p(table), p(ids), pm(out), ids.len(), dim, vocab) }
}

/// Embedding scatter-add into an f32 gradient table, skipping `padding_idx` rows.
pub fn gather_bwd<T: Elem>(
    dev: &EmuDevice,
    dout: &[T],
    ids: &[u32],
    dim: usize,
    padding_idx: Option<u32>,
    dtable: &mut [f32],
) -> Result<()> {
    let vocab = dtable.len() / dim.max(1);
    check("gather dtable", dtable.len(), vocab * dim)?;
    check("gather dout", dout.len(), ids.len() * dim)?;
    // SAFETY: dout is [n, dim], ids [n], dtable [vocab, dim]; the kernel bounds-checks ids.
    unsafe {
        kernels::gather_bwd(
            dev,
            T::DT,
            p(dout),
            p(ids),
            pm(dtable),
            ids.len(),
            dim,
            vocab,
            padding_idx,
        )
    }
}

/// Row L2 normalisation forward.
pub fn l2_normalize_fwd<T: Elem>(
    dev: &EmuDevice,
    x: &[T],
    dim: usize,
    eps: f32,
    y: &mut [T],
) -> Result<()> {
    let rows = x.len() / dim.max(1);
    check("l2_normalize x", x.len(), rows * dim)?;
    check("l2_normalize y", y.len(), x.len())?;
    // SAFETY: x and y are [rows, dim].
    unsafe { kernels::l2_normalize_fwd(dev, T::DT, p(x), pm(y), rows, dim, eps) }
}

/// Row L2 normalisation backward.
pub fn l2_normalize_bwd<T: Elem>(
    dev: &EmuDevice,
    x: &[T],
    dy: &[T],
    dim: usize,
    eps: f32,
    dx: &mut [T],
) -> Result<()> {
    let rows = x.len() / dim.max(1);
    check("l2_normalize x", x.len(), rows * dim)?;
    check("l2_normalize dy", dy.len(), x.len())?;
    check("l2_normalize dx", dx.len(), x.len())?;
    // SAFETY: x, dy and dx are [rows, dim].
    unsafe { kernels::l2_normalize_bwd(dev, T::DT, p(x), p(dy), pm(dx), rows, dim, eps) }
}

/// Cross-entropy forward: fills lse `[rows]` and returns (mean loss, counted rows).
pub fn cross_entropy_fwd<T: Elem>(
    dev: &EmuDevice,
    logits: &[T],
    targets: &[i64],
    classes: usize,
    lse: &mut [f32],
) -> Result<(f32, usize)> {
    let rows = targets.len();
    check("cross_entropy logits", logits.len(), rows * classes)?;
    check("cross_entropy lse", lse.len(), rows)?;
    let mut row_loss = vec![0f32; rows];
    let mut stats = [0f32; 2];
    // SAFETY: logits [rows, classes], targets/lse/row_loss [rows], stats [2].
    unsafe {
        kernels::cross_entropy_fwd(
            dev,
            T::DT,
            p(logits),
            p(targets),
            pm(lse),
            pm(&mut row_loss),
            pm(&mut stats),
            rows,
            classes,
        )?;
    }
    Ok((stats[0], stats[1] as usize))
}

/// Cross-entropy backward (dlogits assigned), given the forward's lse and count.
pub fn cross_entropy_bwd<T: Elem>(
    dev: &EmuDevice,
    logits: &[T],
    targets: &[i64],
    classes: usize,
    lse: &[f32],
    count: usize,
    g: f32,
    dlogits: &mut [T],
) -> Result<()> {
    let rows = targets.len();
    check("cross_entropy logits", logits.len(), rows * classes)?;
    check("cross_entropy lse", lse.len(), rows)?;
    check("cross_entropy dlogits", dlogits.len(), logits.len())?;
    let stats = [0f32, count as f32];
    // SAFETY: logits/dlogits [rows, classes], targets/lse [rows], stats [2].
    unsafe {
        kernels::cross_entropy_bwd(
            dev,
            T::DT,
            p(logits),
            p(targets),
            p(lse),
            p(&stats),
            g,
            pm(dlogits),
            rows,
            classes,
        )
    }
}

/// Σ g² over one gradient buffer.
pub fn grad_sumsq(dev: &EmuDevice, g: &[f32]) -> Result<f32> {
    let mut partials = vec![0f32; kernels::grad_sumsq_partials(g.len())];
    let mut out = [0f32; 1];
    // SAFETY: g [n], partials [grad_sumsq_partials(n)], out [1].
    unsafe { kernels::grad_sumsq(dev, p(g), pm(&mut partials), pm(&mut out), g.len())? };
    Ok(out[0])
}

/// One fused AdamW step; `decay_mask` (1 = decay) defaults to all; `sumsq` enables clipping to
/// `h.max_norm`.
pub fn adamw(
    dev: &EmuDevice,
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    decay_mask: Option<&[u8]>,
    sumsq: Option<f32>,
    h: &AdamWStep,
) -> Result<()> {
    let n = param.len();
    check("adamw grad", grad.len(), n)?;
    check("adamw m", m.len(), n)?;
    check("adamw v", v.len(), n)?;
    if let Some(mask) = decay_mask {
        check("adamw decay_mask", mask.len(), n)?;
    }
    let sq = [sumsq.unwrap_or(0.0)];
    let mask = decay_mask.map_or(DevPtr::NULL, p);
    let sq_ptr = if sumsq.is_some() {
        p(&sq)
    } else {
        DevPtr::NULL
    };
    // SAFETY: param/grad/m/v [n], mask [n] or null, sq [1] or null.
    unsafe {
        kernels::adamw(
            dev,
            pm(param),
            p(grad),
            pm(m),
            pm(v),
            mask,
            sq_ptr,
            None,
            n,
            h,
        )
    }
}

/// The device form of a CPU attention mask over host slices (checked against the dims).
fn attn_mask(mask: AttnMask<'_>, d: &AttnDims) -> Result<AttnKernelMask> {
    let n = d.batch * d.k_len;
    match mask {
        AttnMask::KeyPadding(m) => {
            check("attention key_mask", m.len(), n)?;
            Ok(AttnKernelMask::KeyPadding { key_mask: p(m) })
        }
        AttnMask::TwoStream(t) => {
            check("attention key_mask", t.key_mask.len(), n)?;
            check("attention words", t.words.len(), n)?;
            Ok(AttnKernelMask::TwoStream {
                key_mask: p(t.key_mask),
                words: p(t.words),
                p: t.p,
                seed: t.seed,
            })
        }
        AttnMask::Dense { .. } => Err(Error::Unsupported {
            op: "attention with a dense [B, Lq, Lk] mask (CPU reference_compat only)".into(),
            device: "emu".into(),
        }),
    }
}

fn attn_check_qkv<T>(d: &AttnDims, q: &[T], k: &[T], v: &[T]) -> Result<()> {
    check("attention q", q.len(), d.batch * d.q_len * d.width())?;
    check("attention k", k.len(), d.batch * d.k_len * d.width())?;
    check("attention v", v.len(), d.batch * d.k_len * d.width())
}

/// Fused attention forward (see `cpu::attention::attention_fwd`): out and lse assigned.
pub fn attention_fwd<T: Elem>(
    dev: &EmuDevice,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: AttnMask<'_>,
    d: AttnDims,
    scale: f32,
    drop: Option<AttnDropout>,
    out: &mut [T],
    lse: &mut [f32],
) -> Result<()> {
    attn_check_qkv(&d, q, k, v)?;
    check("attention out", out.len(), q.len())?;
    check("attention lse", lse.len(), d.batch * d.heads * d.q_len)?;
    let m = attn_mask(mask, &d)?;
    // SAFETY: q/out [B, Lq, H*D], k/v [B, Lk, H*D], lse [B, H, Lq], mask arrays [B, Lk]: checked.
    unsafe {
        kernels::attention_fwd(
            dev,
            T::DT,
            p(q),
            p(k),
            p(v),
            pm(out),
            pm(lse),
            m,
            &d,
            scale,
            drop,
        )
    }
}

/// Fused attention backward (see `cpu::attention::attention_bwd`): dq, dk, dv assigned.
pub fn attention_bwd<T: Elem>(
    dev: &EmuDevice,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[f32],
    dout: &[T],
    mask: AttnMask<'_>,
    d: AttnDims,
    scale: f32,
    drop: Option<AttnDropout>,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) -> Result<()> {
    attn_check_qkv(&d, q, k, v)?;
    check("attention out", out.len(), q.len())?;
    check("attention dout", dout.len(), q.len())?;
    check("attention dq", dq.len(), q.len())?;
    check("attention dk", dk.len(), k.len())?;
    check("attention dv", dv.len(), v.len())?;
    check("attention lse", lse.len(), d.batch * d.heads * d.q_len)?;
    let m = attn_mask(mask, &d)?;
    // SAFETY: every tensor's length was checked against the dims; mask arrays are [B, Lk].
    unsafe {
        kernels::attention_bwd(
            dev,
            T::DT,
            p(q),
            p(k),
            p(v),
            p(out),
            p(lse),
            p(dout),
            pm(dq),
            pm(dk),
            pm(dv),
            m,
            &d,
            scale,
            drop,
        )
    }
}
