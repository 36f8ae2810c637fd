//! Selftest rows of the fused attention kernels (kernels/attention.cu) against
//! `cpu::attention`: odd lengths (1, 7, 33, 130), padded keys, a fully padded example (the
//! uniform-average rows, lse = +inf), cross-stream shapes (Lq != Lk), every head dim, the key
//! padding and the two-stream decoder masks, with and without probability dropout, forward and
//! backward, f32 and bf16 storage.
//!
//! Each backward row is fed the reference forward's out (rounded to the storage dtype) and lse, so
//! a forward bug fails the forward rows only.

use super::checks::{Ctx, Store};
use super::{Tol, TOL_F32};
use crate::device::cpu::attention::{
    attention_bwd, attention_fwd, AttnDims, AttnDropout, AttnMask, TwoStreamMask,
};
use crate::device::kernels::{self, AttnKernelMask};
use crate::device::launch::KDType;
use half::bf16;

/// Absolute floor of the dq / dk comparisons: dS = P (dP - D) is a difference of terms of size
/// |dO| |V| ~ sqrt(D), so where the exact gradient is 0 (one key, or a row that sees one key) the
/// reference itself is rounding noise of ~1e-7.
const DS_ABS: f64 = 1e-5;

/// One attention case: dims, mask kind, padding and dropout.
#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    q_len: usize,
    k_len: usize,
    heads: usize,
    head_dim: usize,
    two_stream: bool,
    /// Example 1 (if any) loses its last third of keys; example 2 (if any) all of them.
    pad: bool,
    dropout: bool,
}

impl Case {
    fn dims(&self) -> AttnDims {
        AttnDims {
            batch: self.batch,
            q_len: self.q_len,
            k_len: self.k_len,
            heads: self.heads,
            head_dim: self.head_dim,
        }
    }
    fn shape(&self) -> String {
        format!(
            "B{} L{}x{} H{} D{} {}{}{}",
            self.batch,
            self.q_len,
            self.k_len,
            self.heads,
            self.head_dim,
            if self.two_stream { "2stream" } else { "keypad" },
            if self.pad { " pad" } else { "" },
            if self.dropout { " drop" } else { "" }
        )
    }
}

#[allow(clippy::too_many_arguments)]
const fn case(
    batch: usize,
    q_len: usize,
    k_len: usize,
    heads: usize,
    head_dim: usize,
    two_stream: bool,
    pad: bool,
    dropout: bool,
) -> Case {
    Case {
        batch,
        q_len,
        k_len,
        heads,
        head_dim,
        two_stream,
        pad,
        dropout,
    }
}

const QUICK: &[Case] = &[
    case(1, 1, 1, 1, 64, false, false, false),
    case(3, 7, 7, 2, 32, false, true, false),
    case(2, 5, 40, 1, 64, false, true, true),
    case(2, 33, 33, 2, 64, true, true, true),
    case(1, 130, 130, 1, 128, true, false, false),
    case(2, 9, 9, 1, 128, false, true, true),
    case(2, 20, 20, 2, 32, true, true, true),
    // Two-stream on tensor cores, forward and backward, over whole 64-key tiles (no key state
    // per score), the tiles with key 0 and the diagonal, a partial last tile, and two heads
    // sharing the drawn mask (hpb2).
    case(1, 129, 129, 2, 64, true, false, true),
    // Key padding over several key tiles (the double-buffered forward's pipeline, padded keys
    // in a later tile).
    case(2, 70, 130, 2, 32, false, true, false),
    // The mask cache over more key tiles than 48 KB of shared memory held (18 tiles: its bits
    // in dynamic shared memory), padded keys in the last one.
    case(1, 65, 1100, 2, 64, true, true, false),
    // More key tiles than the cache holds (75: the first 74 cached, as on an H100 / H200, whose
    // shared memory the emulator reports; the last drawn by each head).
    case(1, 64, 4800, 2, 64, true, false, false),
];

/// Added to [`QUICK`] in the full selftest.
const FULL_EXTRA: &[Case] = &[
    case(2, 130, 130, 2, 32, true, true, false),
    case(2, 257, 257, 2, 64, false, true, false),
    case(3, 100, 100, 2, 128, true, true, true),
    case(1, 64, 193, 4, 64, false, false, true),
    // 128 key tiles, 74 of them cached on an H100 / H200 (37 KB of bits in dynamic shared
    // memory, 75 KB with the static part: above the 48 KB a launch may take without the kernel's
    // opt-in), 4 heads drawing once there and each for itself past them.
    case(1, 64, 8192, 4, 64, true, true, false),
];

/// Every attention case in f32 and bf16.
pub(super) fn all(c: &mut Ctx, quick: bool) {
    let extra: &[Case] = if quick { &[] } else { FULL_EXTRA };
    for case in QUICK.iter().chain(extra) {
        attention::<f32>(c, case);
        attention::<bf16>(c, case);
    }
}

/// Round f32 values to storage T and back, as the kernel will see them.
fn to_store<T: Store>(v: &[f32]) -> (Vec<T>, Vec<f32>) {
    let s: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    let f = s.iter().map(|&x| x.to_f32()).collect();
    (s, f)
}

fn attention<T: Store>(c: &mut Ctx, cs: &Case) {
    let d = cs.dims();
    let shape = cs.shape();
    let (b, lq, lk, w) = (d.batch, d.q_len, d.k_len, d.width());
    let sfx = T::DT.suffix();
    let fwd = format!("attention_fwd_d{}_{sfx}", d.head_dim);
    let bdq = format!("attention_bwd_dq_d{}_{sfx}", d.head_dim);
    let bdkv = format!("attention_bwd_dkdv_d{}_{sfx}", d.head_dim);
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let (q, qf) = c.randn::<T>(b * lq * w, 1.0, 0.0);
    let (k, kf) = c.randn::<T>(b * lk * w, 1.0, 0.0);
    let (v, vf) = c.randn::<T>(b * lk * w, 1.0, 0.0);
    let (dout, doutf) = c.randn::<T>(b * lq * w, 1.0, 0.0);
    let mut key_mask = vec![1u8; b * lk];
    if cs.pad {
        if b > 1 {
            let keep = lk - lk / 3;
            key_mask[lk + keep..2 * lk].fill(0);
        }
        if b > 2 {
            key_mask[2 * lk..3 * lk].fill(0);
        }
    }
    // Whole words of 1-3 tokens.
    let mut words = vec![0u32; b * lk];
    for e in 0..b {
        let mut word = 0u32;
        for j in 1..lk {
            if c.rng.below(3) != 0 {
                word += 1;
            }
            words[e * lk + j] = word;
        }
    }
    let seed = c.rng.next_u64();
    let ts = TwoStreamMask {
        key_mask: &key_mask,
        words: &words,
        p: 0.5,
        seed,
    };
    let mask = if cs.two_stream {
        AttnMask::TwoStream(ts)
    } else {
        AttnMask::KeyPadding(&key_mask)
    };
    let drop = cs.dropout.then_some(AttnDropout {
        p: 0.2,
        seed: seed ^ 0xD0,
        stream: 3,
    });
    // Reference forward, then the backward from the forward's out as the kernel will store it.
    let (mut out, mut lse) = (vec![0.0; b * lq * w], vec![0.0; b * d.heads * lq]);
    attention_fwd(&qf, &kf, &vf, mask, d, scale, drop, &mut out, &mut lse);
    let (out_s, out_r) = to_store::<T>(&out);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; qf.len()],
        vec![0.0; kf.len()],
        vec![0.0; vf.len()],
    );
    attention_bwd(
        &qf, &kf, &vf, &out_r, &lse, &doutf, mask, d, scale, drop, &mut dq, &mut dk, &mut dv,
    );
    let inf_rows = |l: &[f32]| -> Vec<f32> {
        l.iter()
            .map(|&x| f32::from(u8::from(x == f32::INFINITY)))
            .collect()
    };
    let mut fwd_kernels = vec![(fwd.clone(), kernels::AttnImpl::CudaCores)];
    if T::DT == KDType::BF16 {
        let tc = kernels::tc_fwd_kernel(cs.two_stream, d.head_dim, false);
        fwd_kernels.push((tc.clone(), kernels::AttnImpl::TensorCores));
        if cs.two_stream && d.heads > 1 {
            // Every head of a block reads the mask bits the first one drew.
            fwd_kernels.push((tc, kernels::AttnImpl::TensorCoresHeads(d.heads)));
        }
        if matches!(d.head_dim, 32 | 64) {
            // The double-buffered forward (cp.async), with its own heads-per-block rule, and
            // with all heads in one block (the cached mask bits across double buffers).
            let db = kernels::tc_fwd_kernel(cs.two_stream, d.head_dim, true);
            fwd_kernels.push((db.clone(), kernels::AttnImpl::TensorCoresPipelined));
            if cs.two_stream && d.heads > 1 {
                fwd_kernels.push((db, kernels::AttnImpl::TensorCoresPipelinedHeads(d.heads)));
            }
        }
    }
    for (fwd, imp) in fwd_kernels {
        let shape = match imp {
            kernels::AttnImpl::TensorCoresHeads(n)
            | kernels::AttnImpl::TensorCoresPipelinedHeads(n) => format!("{shape} hpb{n}"),
            _ => shape.clone(),
        };
        c.check(&fwd, &shape, |c| {
            let (bq, bk, bv) = (c.up(&q)?, c.up(&k)?, c.up(&v)?);
            let (bm, bw) = (c.up(&key_mask)?, c.up(&words)?);
            let (bo, bl) = (c.zeros::<T>(out.len())?, c.zeros::<f32>(lse.len())?);
            let km = kernel_mask(cs, &bm, &bw, &ts);
            // SAFETY: q/out [B, Lq, H*D], k/v [B, Lk, H*D], lse [B, H, Lq] f32, masks [B, Lk].
            unsafe {
                kernels::attention_fwd_with(
                    c.dev,
                    imp,
                    T::DT,
                    bq.ptr,
                    bk.ptr,
                    bv.ptr,
                    bo.ptr,
                    bl.ptr,
                    km,
                    &d,
                    scale,
                    drop,
                )?
            };
            let got = c.down::<T>(&bo, out.len())?;
            // The tensor-core kernel also rounds P to bf16 before P·V (as FlashAttention does):
            // up to 2^-9 of each probability, times |v| and the dropout scale 1/(1-p), on top
            // of the output's own rounding.
            let tol = if imp != kernels::AttnImpl::CudaCores {
                Tol {
                    atol: 5e-3,
                    ..T::TOL
                }
            } else {
                T::TOL
            };
            c.cmp(&fwd, &shape, "out", &got, &out, tol);
            let got = c.down::<f32>(&bl, lse.len())?;
            c.cmp(&fwd, &shape, "lse", &got, &lse, TOL_F32);
            c.cmp(
                &fwd,
                &shape,
                "lse=inf",
                &inf_rows(&got),
                &inf_rows(&lse),
                TOL_F32,
            );
            Ok(())
        });
    }
    let mut bwd_kernels = vec![(bdq.clone(), bdkv.clone(), kernels::AttnImpl::CudaCores)];
    if T::DT == KDType::BF16 && matches!(d.head_dim, 32 | 64) {
        bwd_kernels.push((
            format!("attention_bwd_dq_tc_d{}_bf16", d.head_dim),
            format!("attention_bwd_dkdv_tc_d{}_bf16", d.head_dim),
            kernels::AttnImpl::TensorCores,
        ));
    }
    for (bdq, bdkv, imp) in bwd_kernels {
        // Tensor cores round P and dS to bf16 before their products (as FlashAttention does).
        let tol = if imp == kernels::AttnImpl::CudaCores {
            T::TOL
        } else {
            Tol {
                atol: 1e-2,
                ..T::TOL
            }
        };
        c.check(&bdq, &shape, |c| {
            let (bq, bk, bv) = (c.up(&q)?, c.up(&k)?, c.up(&v)?);
            let (bo, bl, bd) = (c.up(&out_s)?, c.up(&lse)?, c.up(&dout)?);
            let (bm, bw) = (c.up(&key_mask)?, c.up(&words)?);
            let (gq, gk, gv) = (
                c.zeros::<T>(q.len())?,
                c.zeros::<T>(k.len())?,
                c.zeros::<T>(v.len())?,
            );
            let km = kernel_mask(cs, &bm, &bw, &ts);
            // SAFETY: as the forward, plus dout/dq [B, Lq, H*D] and dk/dv [B, Lk, H*D].
            unsafe {
                kernels::attention_bwd_with(
                    c.dev,
                    imp,
                    T::DT,
                    bq.ptr,
                    bk.ptr,
                    bv.ptr,
                    bo.ptr,
                    bl.ptr,
                    bd.ptr,
                    gq.ptr,
                    gk.ptr,
                    gv.ptr,
                    km,
                    &d,
                    scale,
                    drop,
                )?
            };
            let got = c.down::<T>(&gq, q.len())?;
            c.cmp(&bdq, &shape, "dq", &got, &dq, tol.with_floor(DS_ABS));
            let got = c.down::<T>(&gk, k.len())?;
            c.cmp(&bdkv, &shape, "dk", &got, &dk, tol.with_floor(DS_ABS));
            let got = c.down::<T>(&gv, v.len())?;
            c.cmp(&bdkv, &shape, "dv", &got, &dv, tol);
            Ok(())
        });
    }
}

fn kernel_mask(
    cs: &Case,
    key_mask: &crate::device::launch::DevBuf,
    words: &crate::device::launch::DevBuf,
    ts: &TwoStreamMask<'_>,
) -> AttnKernelMask {
    if cs.two_stream {
        AttnKernelMask::TwoStream {
            key_mask: key_mask.ptr,
            words: words.ptr,
            p: ts.p,
            seed: ts.seed,
        }
    } else {
        AttnKernelMask::KeyPadding {
            key_mask: key_mask.ptr,
        }
    }
}
