//! Fused multi-head attention (scores, mask, softmax, weighted sum) as one node.

use super::tensor;
use crate::autograd::{Tape, Var};
pub use crate::device::cpu::attention::AttnDropout;
use crate::device::cpu::attention::{self as k, AttnDims, AttnMask, TwoStreamMask};
use crate::error::{Error, Result};
use std::ops::Range;
use std::sync::Arc;

/// The visibility rule of an attention call, owned so the backward can regenerate it.
#[derive(Clone, Debug)]
pub enum AttentionMask {
    /// HF attention_mask [B, Lk]: 1 = real key, 0 = padding.
    KeyPadding(Arc<[u8]>),
    /// The RetroMAE decoder mask generated from (seed, example, row, word): key padding [B, Lk],
    /// word index per key [B, Lk], hide probability, seed (see `two_stream_visible`).
    TwoStream {
        key_mask: Arc<[u8]>,
        words: Arc<[u32]>,
        p: f32,
        seed: u64,
    },
    /// An explicit visibility matrix [B, Lq, Lk] (CPU only; reference_compat).
    Dense(Arc<[u8]>),
}

impl AttentionMask {
    fn as_kernel(&self, q_len: usize) -> AttnMask<'_> {
        match self {
            AttentionMask::KeyPadding(m) => AttnMask::KeyPadding(m),
            AttentionMask::TwoStream {
                key_mask,
                words,
                p,
                seed,
            } => AttnMask::TwoStream(TwoStreamMask {
                key_mask,
                words,
                p: *p,
                seed: *seed,
            }),
            AttentionMask::Dense(v) => AttnMask::Dense { vis: v, q_len },
        }
    }

    fn check(&self, batch: usize, q_len: usize, k_len: usize) -> Result<()> {
        let bad = |what: &str, want: &[usize], got: usize| Err(Error::shape(what, want, &[got]));
        match self {
            AttentionMask::KeyPadding(m) if m.len() != batch * k_len => {
                bad("attention key mask", &[batch, k_len], m.len())
            }
            AttentionMask::TwoStream {
                key_mask, words, p, ..
            } => {
                if key_mask.len() != batch * k_len {
                    return bad("two-stream key mask", &[batch, k_len], key_mask.len());
                }
                if words.len() != batch * k_len {
                    return bad("two-stream word ids", &[batch, k_len], words.len());
                }
                if !(0.0..1.0).contains(p) {
                    return Err(Error::invalid(format!(
                        "two-stream mask probability {p} not in [0, 1)"
                    )));
                }
                Ok(())
            }
            AttentionMask::Dense(v) if v.len() != batch * q_len * k_len => bad(
                "attention visibility matrix",
                &[batch, q_len, k_len],
                v.len(),
            ),
            _ => Ok(()),
        }
    }
}

/// q [B, Lq, H*D], k, v [B, Lk, H*D] -> [B, Lq, H*D], softmax(q kᵀ · scale + mask) v per head.
pub fn attention(
    tape: &mut Tape,
    q: &Var,
    k: &Var,
    v: &Var,
    mask: &AttentionMask,
    heads: usize,
    scale: f32,
    dropout: Option<AttnDropout>,
) -> Result<Var> {
    let (batch, q_len, width) = q.value().shape().dims3("attention q")?;
    let (kb, k_len, kw) = k.value().shape().dims3("attention k")?;
    if (kb, kw) != (batch, width) {
        return Err(Error::shape(
            "attention k",
            &[batch, k_len, width],
            k.dims(),
        ));
    }
    v.value().expect_dims("attention v", k.dims())?;
    if k_len == 0 && batch * q_len > 0 {
        return Err(Error::invalid("attention: no key to attend to"));
    }
    if heads == 0 || width % heads != 0 {
        return Err(Error::invalid(format!(
            "attention: width {width} not divisible by {heads} heads"
        )));
    }
    mask.check(batch, q_len, k_len)?;
    let d = AttnDims {
        batch,
        q_len,
        k_len,
        heads,
        head_dim: width / heads,
    };
    let mut out = vec![0.0; batch * q_len * width];
    let mut lse = vec![0.0; batch * heads * q_len];
    k::attention_fwd(
        q.value().f32s()?,
        k.value().f32s()?,
        v.value().f32s()?,
        mask.as_kernel(q_len),
        d,
        scale,
        dropout,
        &mut out,
        &mut lse,
    );
    let mask = mask.clone();
    record(
        tape,
        [q, k, v],
        out,
        move |[qs, ks, vs, os, dos], [dq, dk, dv]| {
            k::attention_bwd(
                qs,
                ks,
                vs,
                os,
                &lse,
                dos,
                mask.as_kernel(q_len),
                d,
                scale,
                dropout,
                dq,
                dk,
                dv,
            )
        },
    )
}

/// Record an attention node whose value is `out`: its backward gets q, k, v, out, dout and fills
/// dq, dk, dv (zeroed).
fn record(
    tape: &mut Tape,
    [q, k, v]: [&Var; 3],
    out: Vec<f32>,
    bwd: impl Fn([&[f32]; 5], [&mut [f32]; 3]) + 'static,
) -> Result<Var> {
    let out_t = tensor(out, q.dims())?;
    let (qt, kt, vt, ot) = (
        q.value().clone(),
        k.value().clone(),
        v.value().clone(),
        out_t.clone(),
    );
    Ok(tape.record("attention", &[q, k, v], out_t, move |dout| {
        let mut dq = vec![0.0; qt.numel()];
        let mut dk = vec![0.0; kt.numel()];
        let mut dv = vec![0.0; vt.numel()];
        bwd(
            [qt.f32s()?, kt.f32s()?, vt.f32s()?, ot.f32s()?, dout.f32s()?],
            [&mut dq, &mut dk, &mut dv],
        );
        Ok(vec![
            Some(tensor(dq, qt.dims())?),
            Some(tensor(dk, kt.dims())?),
            Some(tensor(dv, vt.dims())?),
        ])
    }))
}

/// A batch of independent texts (M3 fine-tuning's per-text dropout seeds): text b is its first
/// `lens[b]` rows and draws its dropout from `seeds[b]`. The ops that take it
/// ([`attention_texts`], [`dropout_texts`](super::dropout_texts)) compute each text exactly as
/// they compute it alone, unpadded, so a text's result never depends on which texts share its
/// batch; with the row-wise ops around them, a whole encoder forward does not either.
#[derive(Clone, Debug)]
pub struct Texts {
    pub lens: Arc<[usize]>,
    pub seeds: Arc<[u64]>,
}

/// Self-attention over a batch of independent texts (`x` [B, L, H*D] projected to q, k, v):
/// text b attends as the unpadded sequence of its first `texts.lens[b]` rows (key padding inside
/// them from `key_mask` [B, L]), with attention dropout `(p, stream)` drawn from
/// `texts.seeds[b]`: the call it gets alone (batch of one). Rows past a text's length output 0.
/// The texts run in parallel.
#[allow(clippy::too_many_arguments)]
pub fn attention_texts(
    tape: &mut Tape,
    q: &Var,
    k: &Var,
    v: &Var,
    key_mask: &Arc<[u8]>,
    texts: &Texts,
    heads: usize,
    scale: f32,
    dropout: Option<(f32, u64)>,
) -> Result<Var> {
    use rayon::prelude::*;
    let (batch, len, width) = q.value().shape().dims3("attention q")?;
    k.value().expect_dims("attention k", q.dims())?;
    v.value().expect_dims("attention v", q.dims())?;
    if heads == 0 || width % heads != 0 {
        return Err(Error::invalid(format!(
            "attention: width {width} not divisible by {heads} heads"
        )));
    }
    if key_mask.len() != batch * len {
        return Err(Error::shape(
            "attention key mask",
            &[batch, len],
            &[key_mask.len()],
        ));
    }
    if texts.lens.len() != batch || texts.seeds.len() != batch {
        return Err(Error::invalid(format!(
            "per-text attention: {} lengths and {} seeds for {batch} texts",
            texts.lens.len(),
            texts.seeds.len()
        )));
    }
    if let Some(&n) = texts.lens.iter().find(|&&n| n == 0 || n > len) {
        return Err(Error::invalid(format!(
            "per-text attention: a text of {n} rows in a batch of length {len}"
        )));
    }
    let head_dim = width / heads;
    let one = move |b: usize| text_call(texts, b, len, heads, head_dim, dropout);
    let mut out = vec![0.0; batch * len * width];
    let mut lse = vec![0.0; batch * heads * len];
    {
        let (qs, ks, vs) = (q.value().f32s()?, k.value().f32s()?, v.value().f32s()?);
        out.par_chunks_mut(len * width)
            .zip(lse.par_chunks_mut(heads * len))
            .enumerate()
            .for_each(|(b, (o, l))| {
                let (rows, d, drop, keys) = one(b);
                let n = d.q_len;
                k::attention_fwd(
                    &qs[rows.clone()],
                    &ks[rows.clone()],
                    &vs[rows],
                    AttnMask::KeyPadding(&key_mask[keys]),
                    d,
                    scale,
                    drop,
                    &mut o[..n * width],
                    &mut l[..heads * n],
                );
            });
    }
    let (key_mask, texts) = (key_mask.clone(), texts.clone());
    record(
        tape,
        [q, k, v],
        out,
        move |[qs, ks, vs, os, dos], [dq, dk, dv]| {
            let one = |b: usize| text_call(&texts, b, len, heads, head_dim, dropout);
            dq.par_chunks_mut(len * width)
                .zip(dk.par_chunks_mut(len * width))
                .zip(dv.par_chunks_mut(len * width))
                .enumerate()
                .for_each(|(b, ((dq, dk), dv))| {
                    let (rows, d, drop, keys) = one(b);
                    let m = d.q_len * width;
                    k::attention_bwd(
                        &qs[rows.clone()],
                        &ks[rows.clone()],
                        &vs[rows.clone()],
                        &os[rows.clone()],
                        &lse[b * heads * len..b * heads * len + heads * d.q_len],
                        &dos[rows],
                        AttnMask::KeyPadding(&key_mask[keys]),
                        d,
                        scale,
                        drop,
                        &mut dq[..m],
                        &mut dk[..m],
                        &mut dv[..m],
                    );
                });
        },
    )
}

/// Text `b`'s attention call in a batch of length `len` ([`attention_texts`]): its rows' element
/// range in [B, L, H*D], its sizes as a batch of one, its dropout, its key-mask range.
fn text_call(
    texts: &Texts,
    b: usize,
    len: usize,
    heads: usize,
    head_dim: usize,
    dropout: Option<(f32, u64)>,
) -> (Range<usize>, AttnDims, Option<AttnDropout>, Range<usize>) {
    let n = texts.lens[b];
    let width = heads * head_dim;
    let d = AttnDims {
        batch: 1,
        q_len: n,
        k_len: n,
        heads,
        head_dim,
    };
    let drop = dropout.map(|(p, stream)| AttnDropout {
        p,
        seed: texts.seeds[b],
        stream,
    });
    (
        b * len * width..(b * len + n) * width,
        d,
        drop,
        b * len..b * len + n,
    )
}
