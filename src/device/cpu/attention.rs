//! Multi-head scaled dot-product attention on the CPU, the reference of kernels/attention.cu.
//!
//! Layout: q [B, Lq, H*D], k and v [B, Lk, H*D] (the rows the Q/K/V linear layers produce, no
//! transpose), output [B, Lq, H*D]. Per (example, head): S = scale · Q Kᵀ and O = P V are GEMMs on
//! strided views; the masked softmax runs over one [Lq, Lk] block at a time. The forward keeps only
//! the log-sum-exp per (b, h, row); the backward recomputes P from it, exactly as the fused GPU
//! kernel does, so no [L, L] matrix outlives one head. Visibility of (row i, key j) comes from
//! [`AttnMask`], a pure function, so masks can be generated, never stored. `attention_ref.rs` is the
//! scalar oracle this file is tested against.

use super::elementwise::{
    drop_key, drop_row_key, exp_f32, mum32, vis_row_key, vis_u32, vis_unit, vis_word_key,
};
use super::gemm::sgemm_strided;

/// Which keys a query row may see.
#[derive(Clone, Copy, Debug)]
pub enum AttnMask<'a> {
    /// Key padding: key j of example b is visible iff `mask[b * lk + j] != 0` (HF attention_mask).
    KeyPadding(&'a [u8]),
    /// The RetroMAE decoder's position-specific mask (SPEC §10.3), a pure function of
    /// (seed, example, row, word of the key): see [`two_stream_visible`].
    TwoStream(TwoStreamMask<'a>),
    /// An explicit [B, Lq, Lk] visibility matrix (1 = visible). Only the CPU path takes it, for
    /// `reference_compat` parity with the reference RetroMAE collator.
    Dense { vis: &'a [u8], q_len: usize },
}

/// Parameters of the RetroMAE decoder mask.
#[derive(Clone, Copy, Debug)]
pub struct TwoStreamMask<'a> {
    /// [B, Lk] key padding (1 = real token).
    pub key_mask: &'a [u8],
    /// [B, Lk] whole-word index of each key (tokens of one word share it).
    pub words: &'a [u32],
    /// Probability that a word is hidden from a row.
    pub p: f32,
    pub seed: u64,
}

/// visible(b, i, j) of the decoder mask: never the row itself, never padding; the sentence
/// embedding slot 0 always (for rows i != 0); otherwise the word of key j is hidden from row i when
/// `vis_unit(vis_row_key(seed, b, i), word(j)) < p` (counter-based: a row key, a word key, and one
/// 32-bit product of the two per draw, [`vis_u32`]; SPEC 10.3). Each row thus draws its own
/// whole-word mask.
#[inline]
pub fn two_stream_visible(m: &TwoStreamMask<'_>, b: usize, i: usize, j: usize, lk: usize) -> bool {
    if j == i || m.key_mask[b * lk + j] == 0 {
        return false;
    }
    if j == 0 {
        return true;
    }
    vis_unit(vis_row_key(m.seed, b as u32, i as u32), m.words[b * lk + j]) >= m.p
}

impl AttnMask<'_> {
    /// What [`AttnMask::hide_row_with`] takes for every row of example `b`: the two-stream
    /// mask's word key of each key ([`vis_word_key`], one mix per key instead of one per score);
    /// empty for the other masks.
    pub fn row_keys(&self, b: usize, lk: usize) -> Vec<u32> {
        match self {
            AttnMask::TwoStream(t) => t.words[b * lk..(b + 1) * lk]
                .iter()
                .map(|&w| vis_word_key(w))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Set the entries of score row `i` of example `b` (\[Lk\]) that it may not see to `fill`
    /// (key padding as one select per entry, so the loop vectorises).
    #[inline(always)]
    pub fn hide_row(&self, b: usize, i: usize, row: &mut [f32], fill: f32) {
        let keys = self.row_keys(b, row.len());
        self.hide_row_with(b, i, row, fill, &keys);
    }

    /// [`AttnMask::hide_row`] with `keys` = [`AttnMask::row_keys`]`(b, Lk)` computed once for
    /// the example's rows: the two-stream draw is then one product per score, the row key once
    /// per row (the same function as [`two_stream_visible`]).
    #[inline(always)]
    pub fn hide_row_with(&self, b: usize, i: usize, row: &mut [f32], fill: f32, keys: &[u32]) {
        let lk = row.len();
        match self {
            AttnMask::KeyPadding(m) => {
                for (x, &m) in row.iter_mut().zip(&m[b * lk..(b + 1) * lk]) {
                    *x = if m != 0 { *x } else { fill };
                }
            }
            AttnMask::TwoStream(t) => {
                let rk = vis_row_key(t.seed, b as u32, i as u32);
                let km = &t.key_mask[b * lk..(b + 1) * lk];
                for (j, ((x, &m), &wk)) in row.iter_mut().zip(km).zip(keys).enumerate() {
                    let u = (vis_u32(rk, wk) >> 8) as f32 * (1.0 / 16_777_216.0);
                    let vis = j != i && m != 0 && (j == 0 || u >= t.p);
                    *x = if vis { *x } else { fill };
                }
            }
            _ => {
                for (j, x) in row.iter_mut().enumerate() {
                    if !self.visible(b, i, j, lk) {
                        *x = fill;
                    }
                }
            }
        }
    }

    /// Whether row `i` of example `b` may attend to key `j`.
    #[inline]
    pub fn visible(&self, b: usize, i: usize, j: usize, lk: usize) -> bool {
        match self {
            AttnMask::KeyPadding(m) => m[b * lk + j] != 0,
            AttnMask::TwoStream(t) => two_stream_visible(t, b, i, j, lk),
            AttnMask::Dense { vis, q_len } => vis[(b * q_len + i) * lk + j] != 0,
        }
    }
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub batch: usize,
    pub q_len: usize,
    pub k_len: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttnDims {
    /// Row width H * D.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Dropout on the attention probabilities: p_ij is kept when
/// `drop_unit(drop_row_key(seed, stream, (b * H + h) * Lq + i), j) >= p` and scaled by 1/(1-p)
/// (32-bit draws: one row key per score row and one key per key j, then one folded 32 x 32-bit
/// product per score: a few integer ops on a GPU, where the 64-bit `hash_unit` of every
/// (row, key) index cost several emulated 64-bit multiplies).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnDropout {
    pub p: f32,
    pub seed: u64,
    pub stream: u64,
}

impl AttnDropout {
    /// The factor applied to p_ij: 0 (dropped) or 1/(1-p); 1 without dropout.
    #[inline]
    pub fn factor_of(
        drop: Option<AttnDropout>,
        d: &AttnDims,
        b: usize,
        h: usize,
        i: usize,
        j: usize,
    ) -> f64 {
        match drop {
            None => 1.0,
            Some(a) => a.row(d, b, h, i).factor(j) as f64,
        }
    }

    /// The draws of score row (b, h, i): its key, computed once ([`drop_row_key`]).
    #[inline]
    pub fn row(self, d: &AttnDims, b: usize, h: usize, i: usize) -> DropRow {
        let r = ((b * d.heads + h) * d.q_len + i) as u64;
        DropRow {
            key: drop_row_key(self.seed, self.stream, r),
            p: self.p,
            scale: 1.0 / (1.0 - self.p),
        }
    }
}

/// One score row's dropout draws ([`AttnDropout::row`]).
#[derive(Clone, Copy, Debug)]
pub struct DropRow {
    key: u32,
    p: f32,
    scale: f32,
}

impl DropRow {
    /// The factor of p_ij: 0 (dropped) or 1/(1-p), kept when drop_unit(row key, j) >= p.
    #[inline]
    pub fn factor(&self, j: usize) -> f32 {
        self.factor_keyed(drop_key(j as u32))
    }

    /// [`DropRow::factor`] from key j's [`drop_key`] (computed once for all rows).
    #[inline(always)]
    pub fn factor_keyed(&self, jkey: u32) -> f32 {
        let u = ((mum32(self.key, jkey) ^ jkey) >> 8) as f32 * (1.0 / 16_777_216.0);
        if u >= self.p {
            self.scale
        } else {
            0.0
        }
    }
}

/// Offset of head `h` of row `r` (a token row of example-major layout) in a [.., H*D] buffer.
#[inline]
fn head_at(d: &AttnDims, row: usize, h: usize) -> usize {
    row * d.width() + h * d.head_dim
}

crate::multiversion! {
    /// P = masked softmax(S) in place for one (b, h) block [Lq, Lk]; returns lse per row (+inf
    /// marks a row with no visible key, which gets the uniform distribution: PyTorch's result
    /// when every score carries finfo.min).
    fn softmax_block / softmax_block_at(
        s: &mut [f32],
        mask: AttnMask<'_>,
        d: &AttnDims,
        b: usize,
        lse: &mut [f32],
    ) {
        let keys = mask.row_keys(b, d.k_len);
        for (i, row) in s.chunks_exact_mut(d.k_len).enumerate() {
            mask.hide_row_with(b, i, row, f32::NEG_INFINITY, &keys);
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            if max == f32::NEG_INFINITY {
                row.fill(1.0 / d.k_len as f32);
                lse[i] = f32::INFINITY;
                continue;
            }
            // Hidden keys: exp(-inf) = 0.
            row.iter_mut().for_each(|x| *x = exp_f32(*x - max));
            let sum: f64 = row.iter().map(|&x| x as f64).sum();
            let inv = (1.0 / sum) as f32;
            row.iter_mut().for_each(|x| *x *= inv);
            lse[i] = max + sum.ln() as f32;
        }
    }
}

/// S = scale · Q_h K_hᵀ for one (b, h): [Lq, Lk].
fn scores(q: &[f32], k: &[f32], d: &AttnDims, b: usize, h: usize, scale: f32, s: &mut [f32]) {
    let w = d.width();
    sgemm_strided(
        d.q_len,
        d.head_dim,
        d.k_len,
        scale,
        &q[head_at(d, b * d.q_len, h)..],
        [w, 1],
        &k[head_at(d, b * d.k_len, h)..],
        [1, w],
        0.0,
        s,
        [d.k_len, 1],
    );
}

/// [`drop_key`] of keys 0..lk: the per-key half of every dropout draw, computed once per block.
fn drop_keys(lk: usize) -> Vec<u32> {
    (0..lk as u32).map(drop_key).collect()
}

crate::multiversion! {
    /// Attention dropout on one (b, h) block of probabilities [Lq, Lk].
    fn apply_dropout / apply_dropout_at(
        p: &mut [f32],
        drop: Option<AttnDropout>,
        d: &AttnDims,
        b: usize,
        h: usize,
    ) {
        let Some(drop) = drop else { return };
        let jkeys = drop_keys(d.k_len);
        for (i, row) in p.chunks_exact_mut(d.k_len).enumerate() {
            let dr = drop.row(d, b, h, i);
            for (x, &jk) in row.iter_mut().zip(&jkeys) {
                *x *= dr.factor_keyed(jk);
            }
        }
    }
}

crate::multiversion! {
    /// P of one (b, h) block [Lq, Lk] from its scores and the forward's lse per row (a fully
    /// masked row, lse = +inf, is uniform).
    fn recompute_probs / recompute_probs_at(
        p: &mut [f32],
        row_lse: &[f32],
        mask: AttnMask<'_>,
        b: usize,
        lk: usize,
    ) {
        let keys = mask.row_keys(b, lk);
        for (i, row) in p.chunks_exact_mut(lk).enumerate() {
            let l = row_lse[i];
            if l == f32::INFINITY {
                row.fill(1.0 / lk as f32);
            } else {
                row.iter_mut().for_each(|x| *x = exp_f32(*x - l));
                mask.hide_row_with(b, i, row, 0.0, &keys);
            }
        }
    }
}

crate::multiversion! {
    /// The score gradients of one (b, h) block: with dropout factors m, O = (P ⊙ m) V, so
    /// dS = P ⊙ (m ⊙ dP − D) · scale with D_i = dO_i · O_i (`dp` in, dS out), and `p` becomes
    /// P ⊙ m for dV. `dout` / `out` start at this block's first row and head; rows are `width`
    /// apart.
    fn score_grads / score_grads_at(
        p: &mut [f32],
        dp: &mut [f32],
        row_lse: &[f32],
        dout: &[f32],
        out: &[f32],
        d: &AttnDims,
        b: usize,
        h: usize,
        scale: f32,
        drop: Option<AttnDropout>,
    ) {
        let (lk, hd, w) = (d.k_len, d.head_dim, d.width());
        let jkeys = if drop.is_some() { drop_keys(lk) } else { Vec::new() };
        for (i, (prow, dprow)) in p.chunks_exact_mut(lk).zip(dp.chunks_exact_mut(lk)).enumerate() {
            let di: f64 = dout[i * w..i * w + hd]
                .iter()
                .zip(&out[i * w..i * w + hd])
                .map(|(&a, &c)| a as f64 * c as f64)
                .sum();
            let di = di as f32;
            if row_lse[i] == f32::INFINITY {
                // The scores of a fully masked row are constants.
                dprow.fill(0.0);
                if let Some(a) = drop {
                    let dr = a.row(d, b, h, i);
                    for (x, &jk) in prow.iter_mut().zip(&jkeys) {
                        *x *= dr.factor_keyed(jk);
                    }
                }
                continue;
            }
            match drop {
                None => {
                    for (x, g) in prow.iter().zip(dprow.iter_mut()) {
                        *g = x * (*g - di) * scale;
                    }
                }
                Some(a) => {
                    let dr = a.row(d, b, h, i);
                    for ((x, g), &jk) in prow.iter_mut().zip(dprow.iter_mut()).zip(&jkeys) {
                        let m = dr.factor_keyed(jk);
                        *g = *x * (m * *g - di) * scale;
                        *x *= m;
                    }
                }
            }
        }
    }
}

/// Forward: out [B, Lq, H*D] and lse [B, H, Lq].
pub fn attention_fwd(
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
    use rayon::prelude::*;
    let w = d.width();
    assert_eq!(
        out.len(),
        d.batch * d.q_len * w,
        "attention_fwd: out length"
    );
    assert_eq!(
        lse.len(),
        d.batch * d.heads * d.q_len,
        "attention_fwd: lse length"
    );
    if out.is_empty() {
        return;
    }
    // One task per sequence: its output rows and lse entries are contiguous and disjoint.
    out.par_chunks_mut(d.q_len * w)
        .zip(lse.par_chunks_mut(d.heads * d.q_len))
        .enumerate()
        .for_each(|(b, (out_b, lse_b))| {
            let mut s = vec![0.0f32; d.q_len * d.k_len];
            for h in 0..d.heads {
                scores(q, k, &d, b, h, scale, &mut s);
                softmax_block(
                    &mut s,
                    mask,
                    &d,
                    b,
                    &mut lse_b[h * d.q_len..(h + 1) * d.q_len],
                );
                apply_dropout(&mut s, drop, &d, b, h);
                sgemm_strided(
                    d.q_len,
                    d.k_len,
                    d.head_dim,
                    1.0,
                    &s,
                    [d.k_len, 1],
                    &v[head_at(&d, b * d.k_len, h)..],
                    [w, 1],
                    0.0,
                    &mut out_b[head_at(&d, 0, h)..],
                    [w, 1],
                );
            }
        });
}

/// Backward: dq, dk, dv are assigned (fully overwritten).
pub fn attention_bwd(
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
    use rayon::prelude::*;
    let w = d.width();
    let (lq, lk, hd) = (d.q_len, d.k_len, d.head_dim);
    assert_eq!(dq.len(), d.batch * lq * w, "attention_bwd: dq length");
    assert_eq!(dk.len(), d.batch * lk * w, "attention_bwd: dk length");
    assert_eq!(dv.len(), d.batch * lk * w, "attention_bwd: dv length");
    if dq.is_empty() || dk.is_empty() {
        return;
    }
    // One task per sequence: its dq, dk, dv rows are contiguous and disjoint.
    dq.par_chunks_mut(lq * w)
        .zip(dk.par_chunks_mut(lk * w))
        .zip(dv.par_chunks_mut(lk * w))
        .enumerate()
        .for_each(|(b, ((dq_b, dk_b), dv_b))| {
            let mut p = vec![0.0f32; lq * lk];
            let mut dp = vec![0.0f32; lq * lk];
            for h in 0..d.heads {
                let bh = b * d.heads + h;
                let row_lse = &lse[bh * lq..(bh + 1) * lq];
                // Recompute P from the saved lse.
                scores(q, k, &d, b, h, scale, &mut p);
                recompute_probs(&mut p, row_lse, mask, b, lk);
                // dP = dO V_hᵀ  (before dropout: dP_ij here is dO_i · V_j).
                let (qo, ko) = (head_at(&d, b * lq, h), head_at(&d, b * lk, h));
                sgemm_strided(
                    lq,
                    hd,
                    lk,
                    1.0,
                    &dout[qo..],
                    [w, 1],
                    &v[ko..],
                    [1, w],
                    0.0,
                    &mut dp,
                    [lk, 1],
                );
                // With dropout factors m: O = (P ⊙ m) V, so dV = (P ⊙ m)ᵀ dO and
                // dS = P ⊙ (m ⊙ dP − D) · scale with D_i = dO_i · O_i.
                let (dout_h, out_h) = (&dout[qo..], &out[qo..]);
                score_grads(
                    &mut p, &mut dp, row_lse, dout_h, out_h, &d, b, h, scale, drop,
                );
                // dV_h = (P ⊙ m)ᵀ dO_h ; dQ_h = dS K_h ; dK_h = dSᵀ Q_h (each (b, h) view is disjoint).
                sgemm_strided(
                    lk,
                    lq,
                    hd,
                    1.0,
                    &p,
                    [1, lk],
                    &dout[qo..],
                    [w, 1],
                    0.0,
                    &mut dv_b[head_at(&d, 0, h)..],
                    [w, 1],
                );
                sgemm_strided(
                    lq,
                    lk,
                    hd,
                    1.0,
                    &dp,
                    [lk, 1],
                    &k[ko..],
                    [w, 1],
                    0.0,
                    &mut dq_b[head_at(&d, 0, h)..],
                    [w, 1],
                );
                sgemm_strided(
                    lk,
                    lq,
                    hd,
                    1.0,
                    &dp,
                    [1, lk],
                    &q[qo..],
                    [w, 1],
                    0.0,
                    &mut dk_b[head_at(&d, 0, h)..],
                    [w, 1],
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::attention_ref::{attention_bwd_ref, attention_fwd_ref};
    use super::*;
    use crate::device::cpu::elementwise::hash_unit;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| hash_unit(seed, 0, i as u64) * 2.0 - 1.0)
            .collect()
    }

    #[test]
    fn every_vector_level_gives_the_same_bits() {
        let (lq, lk) = (5, 37);
        let d = AttnDims {
            batch: 2,
            q_len: lq,
            k_len: lk,
            heads: 2,
            head_dim: 3,
        };
        let mut key_mask = vec![1u8; 2 * lk];
        key_mask[lk + 30..].fill(0);
        let mask = AttnMask::KeyPadding(&key_mask);
        let drop = Some(AttnDropout {
            p: 0.3,
            seed: 5,
            stream: 2,
        });
        let scores: Vec<f32> = data(lq * lk, 1).iter().map(|x| 6.0 * x).collect();
        let w = d.width();
        let (dout, out) = (data(lq * w, 2), data(lq * w, 3));
        crate::device::cpu::simd::assert_same_bits("attention rows", |level| {
            let mut p = scores.clone();
            let mut lse = vec![0.0; lq];
            softmax_block_at(level, &mut p, mask, &d, 1, &mut lse);
            let mut fwd = p.clone();
            apply_dropout_at(level, &mut fwd, drop, &d, 1, 1);
            let mut rp = scores.clone();
            recompute_probs_at(level, &mut rp, &lse, mask, 1, lk);
            let mut dp = data(lq * lk, 4);
            score_grads_at(
                level, &mut rp, &mut dp, &lse, &dout, &out, &d, 1, 1, 0.5, drop,
            );
            [p, lse, fwd, rp, dp].concat()
        });
    }

    #[test]
    fn two_stream_mask_rules() {
        let key_mask = [1, 1, 1, 1, 1, 1, 0, 0];
        let words = [0, 1, 1, 2, 3, 4, 5, 5];
        let m = TwoStreamMask {
            key_mask: &key_mask,
            words: &words,
            p: 0.5,
            seed: 9,
        };
        for i in 0..8 {
            assert!(
                !two_stream_visible(&m, 0, i, i, 8),
                "a row never sees itself"
            );
            assert!(
                !two_stream_visible(&m, 0, i, 6, 8) && !two_stream_visible(&m, 0, i, 7, 8),
                "padding"
            );
            if i != 0 {
                assert!(
                    two_stream_visible(&m, 0, i, 0, 8),
                    "slot 0 visible to row {i}"
                );
            }
            // Tokens of one word share their fate (unless one of them is the row itself).
            if i != 1 && i != 2 {
                assert_eq!(
                    two_stream_visible(&m, 0, i, 1, 8),
                    two_stream_visible(&m, 0, i, 2, 8)
                );
            }
        }
        // The hidden fraction matches p over many rows.
        let n = 4000;
        let km = vec![1u8; n];
        let w: Vec<u32> = (0..n as u32).collect();
        let big = TwoStreamMask {
            key_mask: &km,
            words: &w,
            p: 0.3,
            seed: 1,
        };
        let hidden = (1..n)
            .filter(|&j| {
                !two_stream_visible(&big, 0, n - 1 - (j % 7), j, n) && j != n - 1 - (j % 7)
            })
            .count();
        let frac = hidden as f64 / (n - 1) as f64;
        assert!((frac - 0.3).abs() < 0.03, "hidden fraction {frac}");
    }

    /// The visibility draw (one 32-bit product of a row key and a word key): the right rate, and
    /// no visible correlation between neighbouring rows, words, examples or seeds (each pair
    /// agrees half the time at p = 0.5), nor in a 2 x 2 square of rows and words (a draw linear in
    /// the keys, e.g. their xor's top bit, would make the four draws' parity always even).
    #[test]
    fn two_stream_draws_are_uniform_and_independent() {
        use crate::device::cpu::elementwise::{vis_row_key, vis_unit};
        let hide =
            |seed: u64, b: u32, i: u32, w: u32, p: f32| vis_unit(vis_row_key(seed, b, i), w) < p;
        let (mut n, mut rate, mut rows, mut words, mut exs, mut seeds, mut squares) =
            (0, 0, 0, 0, 0, 0, 0);
        for b in 0..4u32 {
            for i in 0..64u32 {
                for w in 0..256u32 {
                    n += 1;
                    rate += usize::from(hide(5, b, i, w, 0.25));
                    let h = hide(5, b, i, w, 0.5);
                    rows += usize::from(h == hide(5, b, i + 1, w, 0.5));
                    words += usize::from(h == hide(5, b, i, w + 1, 0.5));
                    exs += usize::from(h == hide(5, b + 1, i, w, 0.5));
                    seeds += usize::from(h == hide(6, b, i, w, 0.5));
                    let (r, c, d) = (
                        hide(5, b, i + 3, w, 0.5),
                        hide(5, b, i, w + 5, 0.5),
                        hide(5, b, i + 3, w + 5, 0.5),
                    );
                    squares += usize::from(h ^ r ^ c ^ d);
                }
            }
        }
        let f = |c: usize| c as f64 / n as f64;
        assert!((f(rate) - 0.25).abs() < 0.01, "hide rate {}", f(rate));
        for (what, c) in [
            ("rows", rows),
            ("words", words),
            ("examples", exs),
            ("seeds", seeds),
            ("2 x 2 squares", squares),
        ] {
            assert!((f(c) - 0.5).abs() < 0.015, "{what}: agreement {}", f(c));
        }
    }

    /// The attention-dropout draw: the right rate, and no visible correlation between
    /// neighbouring rows, keys, heads, seeds or streams (each pair agrees half the time at
    /// p = 0.5) nor within 2 x 2 squares of rows and keys; distinct rows never share a row key.
    #[test]
    fn dropout_draws_are_uniform_and_independent() {
        let d = AttnDims {
            batch: 2,
            q_len: 64,
            k_len: 256,
            heads: 4,
            head_dim: 8,
        };
        let drop = |seed: u64, stream: u64, p: f32| AttnDropout { p, seed, stream };
        let kept = |a: AttnDropout, b: usize, h: usize, i: usize, j: usize| {
            a.row(&d, b, h, i).factor(j) > 0.0
        };
        let (mut n, mut rate, mut rows, mut keys, mut heads, mut seeds, mut streams) =
            (0, 0, 0, 0, 0, 0, 0);
        let (mut squares, mut sq_n) = (0, 0);
        let mut row_keys = std::collections::HashSet::new();
        let half = drop(5, 1, 0.5);
        for b in 0..d.batch {
            for h in 0..d.heads - 1 {
                for i in 0..d.q_len - 1 {
                    row_keys.insert(half.row(&d, b, h, i).key);
                    for j in 0..d.k_len - 1 {
                        n += 1;
                        rate += usize::from(!kept(drop(5, 1, 0.1), b, h, i, j));
                        let k = kept(half, b, h, i, j);
                        rows += usize::from(k == kept(half, b, h, i + 1, j));
                        keys += usize::from(k == kept(half, b, h, i, j + 1));
                        heads += usize::from(k == kept(half, b, h + 1, i, j));
                        seeds += usize::from(k == kept(drop(6, 1, 0.5), b, h, i, j));
                        streams += usize::from(k == kept(drop(5, 2, 0.5), b, h, i, j));
                        if i + 2 < d.q_len && j + 3 < d.k_len {
                            sq_n += 1;
                            squares += usize::from(
                                k ^ kept(half, b, h, i + 2, j)
                                    ^ kept(half, b, h, i, j + 3)
                                    ^ kept(half, b, h, i + 2, j + 3),
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(row_keys.len(), d.batch * (d.heads - 1) * (d.q_len - 1));
        let f = |c: usize| c as f64 / n as f64;
        assert!((f(rate) - 0.1).abs() < 0.005, "drop rate {}", f(rate));
        for (what, c) in [
            ("rows", rows),
            ("keys", keys),
            ("heads", heads),
            ("seeds", seeds),
            ("streams", streams),
        ] {
            assert!((f(c) - 0.5).abs() < 0.01, "{what}: agreement {}", f(c));
        }
        // A 2 x 2 square of rows and keys: the parity of its four draws is odd half the time (a
        // draw linear in the keys would make it always even).
        let odd = squares as f64 / sq_n as f64;
        assert!((odd - 0.5).abs() < 0.01, "2 x 2 squares: odd parity {odd}");
        // Kept scores are scaled by 1/(1-p).
        let r = drop(5, 1, 0.2).row(&d, 0, 0, 0);
        assert!((0..64).all(|j| [0.0, 1.25].contains(&r.factor(j))));
    }

    #[test]
    fn gemm_attention_matches_the_scalar_oracle() {
        for (drop, lq, lk) in [
            (None, 5, 5),
            (
                Some(AttnDropout {
                    p: 0.2,
                    seed: 3,
                    stream: 1,
                }),
                4,
                6,
            ),
        ] {
            let d = AttnDims {
                batch: 2,
                q_len: lq,
                k_len: lk,
                heads: 3,
                head_dim: 4,
            };
            let w = d.width();
            let (q, k, v) = (
                data(2 * lq * w, 1),
                data(2 * lk * w, 2),
                data(2 * lk * w, 3),
            );
            // Example 1 has its last keys padded; example 0 row visibility is full.
            let mut m = vec![1u8; 2 * lk];
            m[2 * lk - 1] = 0;
            m[2 * lk - 2] = 0;
            // The decoder mask over the same padding: words of two tokens (its per-example word
            // keys and per-row keys are computed once per block, the oracle draws per score).
            let words: Vec<u32> = (0..2 * lk as u32).map(|t| t / 2).collect();
            let two_stream = TwoStreamMask {
                key_mask: &m,
                words: &words,
                p: 0.4,
                seed: 9,
            };
            for mask in [AttnMask::KeyPadding(&m), AttnMask::TwoStream(two_stream)] {
                let (mut o1, mut o2) = (vec![0.0; 2 * lq * w], vec![0.0; 2 * lq * w]);
                let (mut l1, mut l2) = (vec![0.0; 2 * 3 * lq], vec![0.0; 2 * 3 * lq]);
                attention_fwd(&q, &k, &v, mask, d, 0.5, drop, &mut o1, &mut l1);
                attention_fwd_ref(&q, &k, &v, mask, d, 0.5, drop, &mut o2, &mut l2);
                for (a, b) in o1.iter().zip(&o2).chain(l1.iter().zip(&l2)) {
                    assert!((a - b).abs() < 1e-5, "forward {a} vs {b}");
                }
                let dout = data(2 * lq * w, 4);
                let mut g1 = [vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]];
                let mut g2 = g1.clone();
                let [a1, b1, c1] = &mut g1;
                attention_bwd(&q, &k, &v, &o1, &l1, &dout, mask, d, 0.5, drop, a1, b1, c1);
                let [a2, b2, c2] = &mut g2;
                attention_bwd_ref(&q, &k, &v, &o2, &l2, &dout, mask, d, 0.5, drop, a2, b2, c2);
                for (x, y) in g1.iter().flatten().zip(g2.iter().flatten()) {
                    assert!((x - y).abs() < 1e-5, "backward {x} vs {y}");
                }
            }
        }
    }
}
