//! ColBERT late interaction (MaxSim), the reference of kernels/maxsim.cu.
//!
//! score[b, n] = ( Σ_i qmask\[b,i\] · max_{j : pmask\[n,j\]} ⟨Q\[b,i\], P\[n,j\]⟩ ) / Σ_i qmask\[b,i\].
//! Padding never enters the max (retrom3 decision, SPEC §10.6). A query with no real vector, or a
//! passage with none, scores 0. The forward records the argmax per (b, n, i) for the backward.

/// Sizes: Q is [B, Lq, D], P is [N, Lp, D].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxSimDims {
    pub queries: usize,
    pub q_len: usize,
    pub passages: usize,
    pub p_len: usize,
    pub dim: usize,
}

/// Marks "no visible passage vector" in the argmax array.
pub const NO_ARGMAX: u32 = u32::MAX;

/// Forward: scores [B, N], argmax [B, N, Lq].
pub fn maxsim_fwd(
    q: &[f32],
    qmask: &[u8],
    p: &[f32],
    pmask: &[u8],
    d: MaxSimDims,
    scores: &mut [f32],
    argmax: &mut [u32],
) {
    use rayon::prelude::*;
    if d.queries == 0 || d.passages == 0 {
        return;
    }
    if d.q_len == 0 {
        // Queries without a token score 0 (as an all-padding query does).
        scores[..d.queries * d.passages].fill(0.0);
        return;
    }
    // One task per query: its scores row and argmax block are contiguous and disjoint.
    let per_q = d.passages * d.q_len.max(1);
    scores[..d.queries * d.passages]
        .par_chunks_mut(d.passages)
        .zip(argmax[..d.queries * per_q].par_chunks_mut(per_q))
        .enumerate()
        .for_each(|(b, (scores_b, argmax_b))| {
            let count = qmask[b * d.q_len..(b + 1) * d.q_len]
                .iter()
                .filter(|&&m| m != 0)
                .count();
            for n in 0..d.passages {
                let mut total = 0.0f64;
                for i in 0..d.q_len {
                    let am = &mut argmax_b[n * d.q_len + i];
                    *am = NO_ARGMAX;
                    if qmask[b * d.q_len + i] == 0 {
                        continue;
                    }
                    let qi = &q[(b * d.q_len + i) * d.dim..][..d.dim];
                    let mut best = f64::NEG_INFINITY;
                    for j in 0..d.p_len {
                        if pmask[n * d.p_len + j] == 0 {
                            continue;
                        }
                        let pj = &p[(n * d.p_len + j) * d.dim..][..d.dim];
                        let s: f64 = qi.iter().zip(pj).map(|(&a, &c)| a as f64 * c as f64).sum();
                        if s > best {
                            best = s;
                            *am = j as u32;
                        }
                    }
                    if *am != NO_ARGMAX {
                        total += best;
                    }
                }
                scores_b[n] = if count == 0 {
                    0.0
                } else {
                    (total / count as f64) as f32
                };
            }
        });
}

/// Backward: dq and dp are accumulated (`+=`), so callers zero them first or sum sub-batches.
pub fn maxsim_bwd(
    q: &[f32],
    qmask: &[u8],
    p: &[f32],
    argmax: &[u32],
    dscores: &[f32],
    d: MaxSimDims,
    dq: &mut [f32],
    dp: &mut [f32],
) {
    for b in 0..d.queries {
        let count = qmask[b * d.q_len..(b + 1) * d.q_len]
            .iter()
            .filter(|&&m| m != 0)
            .count();
        if count == 0 {
            continue;
        }
        for n in 0..d.passages {
            let g = dscores[b * d.passages + n] / count as f32;
            for i in 0..d.q_len {
                let j = argmax[(b * d.passages + n) * d.q_len + i];
                if j == NO_ARGMAX {
                    continue;
                }
                let (qo, po) = (
                    (b * d.q_len + i) * d.dim,
                    (n * d.p_len + j as usize) * d.dim,
                );
                for c in 0..d.dim {
                    dq[qo + c] += g * p[po + c];
                    dp[po + c] += g * q[qo + c];
                }
            }
        }
    }
}
