//! The scalar oracle of attention: every score, probability and gradient computed by plain loops
//! in f64, one (row, key) at a time. `attention.rs` (GEMM-based, the CPU engine's path) is tested
//! against it; it is also kept readable as the statement of what the kernels compute.
//!
//! Layout: q [B, Lq, H*D], k and v [B, Lk, H*D] (the rows that the Q/K/V linear layers produce, no
//! transpose), output [B, Lq, H*D]. The forward saves only the log-sum-exp per (b, h, row); the
//! backward recomputes the probabilities, exactly as the fused GPU kernel does, so no [L, L] matrix
//! is ever kept. Visibility of (row i, key j) comes from [`AttnMask`], a pure function, so the
//! RetroMAE position-specific mask can be generated, never stored.

use super::attention::{AttnDims, AttnDropout, AttnMask};

/// Forward. `lse` gets [B, H, Lq]. A row that sees no key at all gets the uniform average over all
/// keys, which is what PyTorch gives when every score carries finfo(dtype).min (such rows are pad
/// rows; their values are never used downstream). The (example, head) pairs are spread over the
/// machine's cores; each pair is computed exactly as the serial loop would.
pub fn attention_fwd_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: AttnMask<'_>,
    d: AttnDims,
    scale: f32,
    drop: Option<AttnDropout>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let pairs = d.batch * d.heads;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(pairs)
        .max(1);
    let run = |range: std::ops::Range<usize>| -> Vec<(usize, Vec<f32>, Vec<f32>)> {
        range
            .map(|bh| {
                let (o, l) = attend_head(q, k, v, mask, d, scale, drop, bh / d.heads, bh % d.heads);
                (bh, o, l)
            })
            .collect()
    };
    let per = pairs.div_ceil(threads);
    let results: Vec<(usize, Vec<f32>, Vec<f32>)> =
        if threads == 1 || d.q_len * d.k_len * pairs < 1 << 14 {
            run(0..pairs)
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let r = t * per..((t + 1) * per).min(pairs);
                        s.spawn(move || run(r))
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("attention worker"))
                    .collect()
            })
        };
    let w = d.width();
    for (bh, o, l) in results {
        let (b, h) = (bh / d.heads, bh % d.heads);
        for i in 0..d.q_len {
            out[(b * d.q_len + i) * w + h * d.head_dim..][..d.head_dim]
                .copy_from_slice(&o[i * d.head_dim..(i + 1) * d.head_dim]);
        }
        lse[bh * d.q_len..(bh + 1) * d.q_len].copy_from_slice(&l);
    }
}

/// One (example, head) of the forward: output rows [Lq, D] and lse [Lq].
fn attend_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: AttnMask<'_>,
    d: AttnDims,
    scale: f32,
    drop: Option<AttnDropout>,
    b: usize,
    h: usize,
) -> (Vec<f32>, Vec<f32>) {
    let w = d.width();
    let mut out = vec![0.0f32; d.q_len * d.head_dim];
    let mut lse = vec![0.0f32; d.q_len];
    let mut p = vec![0.0f64; d.k_len];
    let mut acc = vec![0.0f64; d.head_dim];
    for i in 0..d.q_len {
        let qi = &q[(b * d.q_len + i) * w + h * d.head_dim..][..d.head_dim];
        let mut max = f64::NEG_INFINITY;
        for (j, pj) in p.iter_mut().enumerate() {
            if mask.visible(b, i, j, d.k_len) {
                let kj = &k[(b * d.k_len + j) * w + h * d.head_dim..][..d.head_dim];
                let s: f64 = qi.iter().zip(kj).map(|(&a, &c)| a as f64 * c as f64).sum();
                *pj = s * scale as f64;
                max = max.max(*pj);
            } else {
                *pj = f64::NEG_INFINITY;
            }
        }
        let row_lse;
        if max == f64::NEG_INFINITY {
            p.iter_mut().for_each(|x| *x = 1.0 / d.k_len as f64);
            row_lse = f64::INFINITY; // marks a fully masked row for the backward
        } else {
            let mut sum = 0.0;
            for pj in p.iter_mut() {
                *pj = (*pj - max).exp();
                sum += *pj;
            }
            p.iter_mut().for_each(|x| *x /= sum);
            row_lse = max + sum.ln();
        }
        lse[i] = row_lse as f32;
        if drop.is_some() {
            for (j, pj) in p.iter_mut().enumerate() {
                *pj *= AttnDropout::factor_of(drop, &d, b, h, i, j);
            }
        }
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                let vj = &v[(b * d.k_len + j) * w + h * d.head_dim..][..d.head_dim];
                for (a, &x) in acc.iter_mut().zip(vj) {
                    *a += pj * x as f64;
                }
            }
        }
        for (o, &a) in out[i * d.head_dim..(i + 1) * d.head_dim]
            .iter_mut()
            .zip(&acc)
        {
            *o = a as f32;
        }
    }
    (out, lse)
}

/// Backward: dq, dk, dv are assigned (fully overwritten).
pub fn attention_bwd_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    mask: AttnMask<'_>,
    d: AttnDims,
    scale: f32,
    drop: Option<AttnDropout>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let w = d.width();
    dq.iter_mut().for_each(|x| *x = 0.0);
    let mut dk64 = vec![0.0f64; dk.len()];
    let mut dv64 = vec![0.0f64; dv.len()];
    let mut p = vec![0.0f64; d.k_len];
    for b in 0..d.batch {
        for h in 0..d.heads {
            for i in 0..d.q_len {
                let row = (b * d.q_len + i) * w + h * d.head_dim;
                let qi = &q[row..][..d.head_dim];
                let doi = &dout[row..][..d.head_dim];
                let oi = &out[row..][..d.head_dim];
                let l = lse[(b * d.heads + h) * d.q_len + i] as f64;
                let masked_row = l == f64::INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = if masked_row {
                        1.0 / d.k_len as f64
                    } else if mask.visible(b, i, j, d.k_len) {
                        let kj = &k[(b * d.k_len + j) * w + h * d.head_dim..][..d.head_dim];
                        let s: f64 = qi.iter().zip(kj).map(|(&a, &c)| a as f64 * c as f64).sum();
                        (s * scale as f64 - l).exp()
                    } else {
                        0.0
                    };
                }
                // With dropout factors m_ij, O_i = Σ_j m_ij p_ij V_j, so dV_j += m_ij p_ij dO_i and
                // dS_ij = p_ij (m_ij dO_i·V_j − D_i) with D_i = dO_i · O_i as without dropout.
                // D_i = dO_i · O_i  (= Σ_j p_ij dP_ij)
                let di: f64 = doi.iter().zip(oi).map(|(&a, &c)| a as f64 * c as f64).sum();
                for (j, &pj) in p.iter().enumerate() {
                    if pj == 0.0 {
                        continue;
                    }
                    let kv = (b * d.k_len + j) * w + h * d.head_dim;
                    let m = AttnDropout::factor_of(drop, &d, b, h, i, j);
                    // dV_j += m_ij p_ij dO_i
                    for c in 0..d.head_dim {
                        dv64[kv + c] += m * pj * doi[c] as f64;
                    }
                    if masked_row {
                        continue; // the scores of a fully masked row are constants
                    }
                    let dp: f64 = doi
                        .iter()
                        .zip(&v[kv..kv + d.head_dim])
                        .map(|(&a, &c)| a as f64 * c as f64)
                        .sum();
                    let ds = pj * (m * dp - di) * scale as f64;
                    for c in 0..d.head_dim {
                        dq[row + c] += (ds * k[kv + c] as f64) as f32;
                        dk64[kv + c] += ds * qi[c] as f64;
                    }
                }
            }
        }
    }
    for (o, a) in dk.iter_mut().zip(dk64) {
        *o = a as f32;
    }
    for (o, a) in dv.iter_mut().zip(dv64) {
        *o = a as f32;
    }
}
