//! Selftest rows of the M3 retrieval kernels (kernels/maxsim.cu, kernels/sparse.cu,
//! kernels/infonce.cu, launched through `device::kernels_m3`) against their CPU twins:
//! `cpu::maxsim`, `cpu::sparse`, `cpu::loss` and `ops::m3_kd_loss`. Odd lengths, padded tails and
//! holes, fully padded queries / passages / texts, D 32 / 64 / 128 / 1024, f32 and bf16 storage,
//! forward and backward. Each backward is fed the reference forward's saved state (argmax, lexical
//! lists), so a forward bug fails the forward rows only.

use super::checks::Store;
use super::{compare, SelftestRow, Tol, TOL_F32};
use crate::autograd::Tape;
use crate::device::cpu;
use crate::device::cpu::maxsim::{MaxSimDims, NO_ARGMAX};
use crate::device::cpu::sparse::LexEntry;
use crate::device::kernels_m3 as km;
use crate::device::launch::{download, upload, DevBuf, DevPtr, KernelDevice};
use crate::engine::m3_heads::LexBufs;
use crate::error::Result;
use crate::ops;
use crate::tensor::Tensor;
use half::bf16;

/// Exact outputs (ids, positions, counts) compared as f32: any difference fails.
const EXACT: Tol = Tol {
    atol: 0.0,
    rtol: 0.0,
    floor: 0.0,
};

/// The special ids the sparse head drops (cls, pad, eos, unk).
const DROP: [u32; 4] = [0, 1, 2, 3];

struct M3Ctx<'a> {
    dev: &'a dyn KernelDevice,
    state: u64,
    rows: Vec<SelftestRow>,
}

impl M3Ctx<'_> {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let u1 = (self.uniform() as f64).max(1e-12);
        let u2 = self.uniform() as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// n values `shift + scale * N(0,1)` in storage T, and the same (rounded) values as f32.
    fn randn<T: Store>(&mut self, n: usize, scale: f32, shift: f32) -> (Vec<T>, Vec<f32>) {
        let s: Vec<T> = (0..n)
            .map(|_| T::from_f32(shift + scale * self.normal()))
            .collect();
        let f = s.iter().map(|&v| v.to_f32()).collect();
        (s, f)
    }
    fn up<T: bytemuck::Pod>(&self, v: &[T]) -> Result<DevBuf> {
        upload(self.dev, v)
    }
    fn zeros<T: bytemuck::Pod + Default>(&self, n: usize) -> Result<DevBuf> {
        upload(self.dev, &vec![T::default(); n.max(1)])
    }
    fn down<T: Store>(&self, b: &DevBuf, n: usize) -> Result<Vec<f32>> {
        Ok(download::<T>(self.dev, b, n)?
            .into_iter()
            .map(Store::to_f32)
            .collect())
    }
    fn down_i32(&self, b: &DevBuf, n: usize) -> Result<Vec<i32>> {
        download::<i32>(self.dev, b, n)
    }
    fn cmp(&mut self, k: &str, shape: &str, out: &str, got: &[f32], want: &[f32], tol: Tol) {
        self.rows.push(compare(k, shape, out, got, want, tol));
    }
    /// Run one check; a launch error becomes a failing row instead of ending the selftest.
    fn check(&mut self, kernel: &str, shape: &str, f: impl FnOnce(&mut Self) -> Result<()>) {
        if let Err(e) = f(self) {
            let mut row = compare(kernel, shape, "-", &[], &[], TOL_F32);
            row.error = Some(e.to_string());
            self.rows.push(row);
        }
    }
    /// A padding mask of `texts` x `len`: each text real up to a random length (>= 1), one hole
    /// in the middle of long texts, and text `empty` (if any) fully padded.
    fn mask(&mut self, texts: usize, len: usize, empty: Option<usize>) -> Vec<u8> {
        let mut m = vec![0u8; texts * len];
        for t in 0..texts {
            if Some(t) == empty || len == 0 {
                continue;
            }
            let real = if t == 0 { len } else { 1 + self.below(len) };
            m[t * len..t * len + real].iter_mut().for_each(|v| *v = 1);
            if real > 4 {
                m[t * len + real / 2] = 0;
            }
        }
        m
    }
}

/// Every M3 check on the quick or the full shape list.
pub(super) fn all(dev: &dyn KernelDevice, quick: bool, seed: u64) -> Result<Vec<SelftestRow>> {
    let mut c = M3Ctx {
        dev,
        state: seed ^ 0x4D33_5345_4C46_5445,
        rows: Vec::new(),
    };
    // (queries, q_len, passages, p_len, dim, pad)
    let ms: &[(usize, usize, usize, usize, usize, bool)] = if quick {
        &[
            (2, 5, 3, 7, 32, false),
            (3, 9, 4, 33, 64, true),
            (1, 1, 2, 1, 128, true),
            (2, 37, 3, 131, 1024, true),
        ]
    } else {
        &[
            (2, 5, 3, 7, 32, false),
            (3, 9, 4, 33, 64, true),
            (1, 1, 2, 1, 128, true),
            (4, 37, 5, 131, 128, true),
            (2, 70, 3, 300, 1024, true),
        ]
    };
    for &(bq, lq, bp, lp, d, pad) in ms {
        let dims = MaxSimDims {
            queries: bq,
            q_len: lq,
            passages: bp,
            p_len: lp,
            dim: d,
        };
        maxsim::<f32>(&mut c, dims, pad);
        maxsim::<bf16>(&mut c, dims, pad);
    }
    // (q_len, dim, document lengths)
    let docs: &[(usize, usize, &[usize])] = if quick {
        &[
            (5, 64, &[3, 0, 130, 1, 17]),
            (33, 32, &[7, 0, 40]),
            (32, 1024, &[40, 129]),
            (8, 96, &[16, 15, 0, 33, 1, 2, 3, 4, 5]),
            // 20 documents: more than the warps of the pipelined scan's grid on the emulator
            // (2 blocks x 8), so warps walk several; 40 query tokens: two launches.
            (
                40,
                128,
                &[
                    16, 0, 17, 1, 33, 15, 2, 0, 64, 5, 31, 16, 48, 3, 0, 9, 70, 1, 2, 20,
                ],
            ),
        ]
    } else {
        &[
            (5, 64, &[3, 0, 130, 1, 17]),
            (33, 32, &[7, 0, 40]),
            (32, 1024, &[40, 129, 1, 300]),
            (70, 128, &[257, 2, 64]),
            (8, 96, &[16, 15, 0, 33, 1, 2, 3, 4, 5, 6, 7]),
            (1, 1024, &[128, 128, 127]),
            (12, 48, &[9, 20]),
        ]
    };
    for &(lq, d, lens) in docs {
        maxsim_docs::<f32>(&mut c, km::MaxSimImpl::Simt, lq, d, lens);
        maxsim_docs::<bf16>(&mut c, km::MaxSimImpl::Simt, lq, d, lens);
        if d % 32 == 0 {
            maxsim_docs::<bf16>(&mut c, km::MaxSimImpl::TensorCores, lq, d, lens);
        }
        if d % 128 == 0 {
            maxsim_docs::<bf16>(&mut c, km::MaxSimImpl::TensorCoresPipelined, lq, d, lens);
        }
    }
    // (query texts, q_len, passage texts, p_len, hidden, vocab)
    let sp: &[(usize, usize, usize, usize, usize, usize)] = if quick {
        &[
            (2, 5, 3, 7, 32, 12),
            (3, 17, 4, 33, 64, 20),
            (2, 40, 3, 129, 1024, 60),
        ]
    } else {
        &[
            (2, 5, 3, 7, 32, 12),
            (3, 17, 4, 33, 64, 20),
            (4, 64, 8, 300, 1024, 200),
            (2, 1, 2, 513, 128, 250_002),
        ]
    };
    for &(bq, lq, bp, lp, hidden, vocab) in sp {
        sparse::<f32>(&mut c, (bq, lq), (bp, lp), hidden, vocab);
        sparse::<bf16>(&mut c, (bq, lq), (bp, lp), hidden, vocab);
    }
    // (rows, group, cols = rows * group unless local)
    let ls: &[(usize, usize)] = if quick {
        &[(4, 3), (3, 8), (5, 200)]
    } else {
        &[(4, 3), (3, 8), (5, 200), (16, 8), (2, 128)]
    };
    for &(b, g) in ls {
        infonce::<f32>(&mut c, b, g, false);
        infonce::<bf16>(&mut c, b, g, false);
        soft_ce::<f32>(&mut c, b, g);
        soft_ce::<bf16>(&mut c, b, g);
        let kg = g.min(km::KD_MAX_GROUP);
        m3_kd::<f32>(&mut c, b, kg, false);
        m3_kd::<bf16>(&mut c, b, kg, false);
    }
    infonce::<f32>(&mut c, 3, 4, true);
    infonce::<bf16>(&mut c, 3, 4, true);
    m3_kd::<f32>(&mut c, 3, 5, true);
    m3_kd::<bf16>(&mut c, 3, 5, true);
    Ok(c.rows)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn maxsim<T: Store>(c: &mut M3Ctx, d: MaxSimDims, pad: bool) {
    let (bq, lq, bp, lp, dim) = (d.queries, d.q_len, d.passages, d.p_len, d.dim);
    let shape = format!(
        "{bq}x{lq} vs {bp}x{lp} D{dim}{}",
        if pad { " pad" } else { "" }
    );
    let sfx = T::DT.suffix();
    let (fwd, bwd) = (format!("maxsim_fwd_{sfx}"), format!("maxsim_bwd_{sfx}"));
    let s = 1.0 / (dim as f32).sqrt();
    let (q, qf) = c.randn::<T>(bq * lq * dim, s, 0.0);
    let (p, pf) = c.randn::<T>(bp * lp * dim, s, 0.0);
    let (qmask, pmask) = if pad {
        (
            c.mask(bq, lq, (bq > 1).then_some(1)),
            c.mask(bp, lp, (bp > 1).then_some(bp - 1)),
        )
    } else {
        (vec![1u8; bq * lq], vec![1u8; bp * lp])
    };
    let mut scores = vec![0.0; bq * bp];
    let mut argmax = vec![0u32; bq * bp * lq];
    cpu::maxsim::maxsim_fwd(&qf, &qmask, &pf, &pmask, d, &mut scores, &mut argmax);
    let (_, ds) = c.randn::<f32>(bq * bp, 1.0, 0.0);
    let (_, dq0) = c.randn::<f32>(bq * lq * dim, 0.1, 0.0);
    let (_, dp0) = c.randn::<f32>(bp * lp * dim, 0.1, 0.0);
    let (mut dq, mut dp) = (dq0.clone(), dp0.clone());
    cpu::maxsim::maxsim_bwd(&qf, &qmask, &pf, &argmax, &ds, d, &mut dq, &mut dp);
    // The similarity of query token (b, t) with passage token (n, j).
    let sim = |b: usize, t: usize, n: usize, j: usize| -> f64 {
        dot(
            &qf[(b * lq + t) * dim..][..dim],
            &pf[(n * lp + j) * dim..][..dim],
        )
    };
    c.check(&fwd, &shape, |c| {
        let (bqv, bqm, bpv, bpm) = (c.up(&q)?, c.up(&qmask)?, c.up(&p)?, c.up(&pmask)?);
        let (bs, ba) = (c.zeros::<f32>(bq * bp)?, c.zeros::<i32>(bq * bp * lq)?);
        // SAFETY: q [bq, lq, dim], qmask [bq, lq], p [bp, lp, dim], pmask [bp, lp],
        // scores [bq, bp], argmax [bq, bp, lq], as maxsim_fwd documents.
        unsafe {
            km::maxsim_fwd(
                c.dev,
                T::DT,
                bqv.ptr,
                bqm.ptr,
                bpv.ptr,
                bpm.ptr,
                bs.ptr,
                ba.ptr,
                d,
            )?
        };
        let got = c.down::<f32>(&bs, bq * bp)?;
        c.cmp(&fwd, &shape, "scores", &got, &scores, TOL_F32);
        // The argmax may differ from the reference's on (near-)ties only: compare the similarity
        // each one picks; a missing or extra argmax counts as an error of 1e3.
        let am = c.down_i32(&ba, bq * bp * lq)?;
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for b in 0..bq {
            for n in 0..bp {
                for t in 0..lq {
                    let k = (b * bp + n) * lq + t;
                    let r = argmax[k];
                    let w = if r == NO_ARGMAX {
                        0.0
                    } else {
                        sim(b, t, n, r as usize)
                    };
                    let g = match am[k] {
                        -1 if r == NO_ARGMAX => 0.0,
                        -1 => w + 1e3,
                        j if j < 0 || j as usize >= lp => f64::NAN,
                        _ if r == NO_ARGMAX => 1e3,
                        j if pmask[n * lp + j as usize] == 0 => w + 1e3,
                        j => sim(b, t, n, j as usize),
                    };
                    got.push(g as f32);
                    want.push(w as f32);
                }
            }
        }
        c.cmp(&fwd, &shape, "argmax sim", &got, &want, TOL_F32);
        Ok(())
    });
    c.check(&bwd, &shape, |c| {
        let (bqv, bqm, bpv) = (c.up(&q)?, c.up(&qmask)?, c.up(&p)?);
        let am: Vec<i32> = argmax.iter().map(|&a| a as i32).collect();
        let (ba, bds, bdq, bdp) = (c.up(&am)?, c.up(&ds)?, c.up(&dq0)?, c.up(&dp0)?);
        // SAFETY: as maxsim_bwd documents: dq [bq, lq, dim] f32, dp [bp, lp, dim] f32.
        unsafe {
            km::maxsim_bwd(
                c.dev,
                T::DT,
                bqv.ptr,
                bqm.ptr,
                bpv.ptr,
                ba.ptr,
                bds.ptr,
                bdq.ptr,
                bdp.ptr,
                d,
            )?
        };
        let got = c.down::<f32>(&bdq, bq * lq * dim)?;
        c.cmp(&bwd, &shape, "dq+=", &got, &dq, TOL_F32);
        let got = c.down::<f32>(&bdp, bp * lp * dim)?;
        c.cmp(&bwd, &shape, "dp+=", &got, &dp, TOL_F32);
        Ok(())
    });
}

fn maxsim_docs<T: Store>(
    c: &mut M3Ctx,
    imp: km::MaxSimImpl,
    lq: usize,
    dim: usize,
    lens: &[usize],
) {
    let n = lens.len();
    let shape = format!("q{lq} D{dim} docs {lens:?}");
    let tc = match imp {
        km::MaxSimImpl::TensorCores => "_tc",
        km::MaxSimImpl::TensorCoresPipelined => "_tcp",
        km::MaxSimImpl::Simt | km::MaxSimImpl::Auto => "",
    };
    let k = format!("maxsim_docs{tc}_{}", T::DT.suffix());
    let s = 1.0 / (dim as f32).sqrt();
    let total: usize = lens.iter().sum();
    let (q, qf) = c.randn::<T>(lq * dim, s, 0.0);
    let (store, sf) = c.randn::<T>(total * dim, s, 0.0);
    let mut offsets = vec![0i64];
    for &l in lens {
        offsets.push(offsets.last().copied().unwrap_or(0) + l as i64);
    }
    // Reference: the training MaxSim with the documents padded to the longest.
    let lp = lens.iter().copied().max().unwrap_or(0).max(1);
    let (mut pf, mut pmask) = (vec![0.0; n * lp * dim], vec![0u8; n * lp]);
    for (i, &l) in lens.iter().enumerate() {
        let o = offsets[i] as usize;
        pf[i * lp * dim..][..l * dim].copy_from_slice(&sf[o * dim..(o + l) * dim]);
        pmask[i * lp..i * lp + l].iter_mut().for_each(|v| *v = 1);
    }
    let d = MaxSimDims {
        queries: 1,
        q_len: lq,
        passages: n,
        p_len: lp,
        dim,
    };
    let mut want = vec![0.0; n];
    let mut am = vec![0u32; n * lq];
    cpu::maxsim::maxsim_fwd(&qf, &vec![1u8; lq], &pf, &pmask, d, &mut want, &mut am);
    c.check(&k, &shape, |c| {
        let (bq, bs, bo, bsc) = (
            c.up(&q)?,
            c.up(&store)?,
            c.up(&offsets)?,
            c.zeros::<f32>(n)?,
        );
        // SAFETY: q [lq, dim], store [total, dim], offsets [n + 1] i64, scores [n] f32.
        unsafe {
            km::maxsim_docs_with(
                c.dev,
                imp,
                T::DT,
                bq.ptr,
                lq,
                bs.ptr,
                bo.ptr,
                bsc.ptr,
                n,
                dim,
            )?
        };
        let got = c.down::<f32>(&bsc, n)?;
        c.cmp(&k, &shape, "scores", &got, &want, TOL_F32);
        Ok(())
    });
}

/// One side's lexical lists in the kernels' layout: (ids, w, pos, count).
type Lists = (Vec<u32>, Vec<f32>, Vec<i32>, Vec<i32>);

fn lists_layout(entries: &[Vec<LexEntry>], cap: usize) -> Lists {
    let n = entries.len();
    let (mut ids, mut w, mut pos) = (
        vec![u32::MAX; n * cap],
        vec![0.0; n * cap],
        vec![-1; n * cap],
    );
    let mut count = vec![0; n];
    for (t, list) in entries.iter().enumerate() {
        count[t] = list.len() as i32;
        for (e, x) in list.iter().enumerate() {
            ids[t * cap + e] = x.id;
            w[t * cap + e] = x.weight;
            pos[t * cap + e] = x.pos as i32;
        }
    }
    (ids, w, pos, count)
}

/// Device copies of one side's lists.
type DevLists = LexBufs;

fn upload_lists(c: &M3Ctx, l: &Lists, texts: usize, cap: usize) -> Result<DevLists> {
    Ok(LexBufs {
        ids: c.up(&l.0)?,
        w: c.up(&l.1)?,
        pos: c.up(&l.2)?,
        count: c.up(&l.3)?,
        texts,
        cap,
    })
}

fn empty_lists(c: &M3Ctx, texts: usize, cap: usize) -> Result<DevLists> {
    Ok(LexBufs {
        ids: c.zeros::<u32>(texts * cap)?,
        w: c.zeros::<f32>(texts * cap)?,
        pos: c.zeros::<i32>(texts * cap)?,
        count: c.zeros::<i32>(texts)?,
        texts,
        cap,
    })
}

/// One side of a sparse case: inputs and the reference forward.
struct SparseSide<T> {
    texts: usize,
    len: usize,
    h: Vec<T>,
    hf: Vec<f32>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    entries: Vec<Vec<LexEntry>>,
}

fn sparse_side<T: Store>(
    c: &mut M3Ctx,
    texts: usize,
    len: usize,
    hidden: usize,
    vocab: usize,
    ws: &[f32],
    b: f32,
    with_nan: bool,
) -> SparseSide<T> {
    let (mut h, mut hf) = c.randn::<T>(texts * len * hidden, 1.0, 0.0);
    let mut ids = Vec::with_capacity(texts * len);
    for t in 0..texts {
        // Text 1 (if any) is all padding; the others: cls, random ids (repeats, specials), pads.
        let mut real = if t == 1 { 0 } else { 1 + c.below(len) };
        if with_nan && t % 2 == 0 {
            real = real.max(len.min(2)); // position 1 holds a token to put the NaN on
        }
        for l in 0..len {
            ids.push(match l {
                _ if l >= real => 1,
                0 => 0,
                _ if c.below(9) == 0 => c.below(4) as u32,
                _ => (4 + c.below(vocab - 4)) as u32,
            });
        }
    }
    if with_nan {
        // One NaN in the hidden state at position 1 of every other text: its weight is NaN, and
        // NaN wins its token id's maximum (an overflowing model is reported, not hidden).
        for t in (0..texts).step_by(2) {
            if len > 1 && ids[t * len + 1] != 1 {
                let at = (t * len + 1) * hidden + c.below(hidden);
                h[at] = T::from_f32(f32::NAN);
                hf[at] = f32::NAN;
            }
        }
    }
    let mut weights = vec![0.0; texts * len];
    cpu::sparse::term_weights_fwd(&hf, ws, b, &mut weights);
    let entries = (0..texts)
        .map(|t| {
            let r = t * len..(t + 1) * len;
            cpu::sparse::max_by_token_id(&weights[r.clone()], &ids[r], &DROP)
        })
        .collect();
    SparseSide {
        texts,
        len,
        h,
        hf,
        ids,
        weights,
        entries,
    }
}

fn sparse<T: Store>(
    c: &mut M3Ctx,
    (bq, lq): (usize, usize),
    (bp, lp): (usize, usize),
    hidden: usize,
    vocab: usize,
) {
    let sfx = T::DT.suffix();
    let shape = format!("{bq}x{lq} vs {bp}x{lp} H{hidden} V{vocab}");
    let (ws, wsf) = c.randn::<T>(hidden, 1.0 / (hidden as f32).sqrt(), 0.0);
    let (bias, bf) = c.randn::<T>(1, 0.0, -0.3);
    let q = sparse_side::<T>(c, bq, lq, hidden, vocab, &wsf, bf[0], false);
    let p = sparse_side::<T>(c, bp, lp, hidden, vocab, &wsf, bf[0], false);
    // Seen by the forward only (the scores' rows need finite lists).
    let nan = sparse_side::<T>(c, bq, lq, hidden, vocab, &wsf, bf[0], true);
    let (ql, pl) = (lists_layout(&q.entries, lq), lists_layout(&p.entries, lp));
    // Reference scores and their backward.
    let mut scores = vec![0.0; bq * bp];
    let (_, ds) = c.randn::<f32>(bq * bp, 1.0, 0.0);
    let (mut dwq, mut dwp) = (vec![0.0; bq * lq], vec![0.0; bp * lp]);
    for i in 0..bq {
        for j in 0..bp {
            scores[i * bp + j] = cpu::sparse::lexical_score(&q.entries[i], &p.entries[j]);
            let (a, b) = (
                &mut dwq[i * lq..(i + 1) * lq],
                &mut dwp[j * lp..(j + 1) * lp],
            );
            cpu::sparse::lexical_score_bwd(&q.entries[i], &p.entries[j], ds[i * bp + j], a, b);
        }
    }
    for (side, tag) in [(&q, ""), (&p, ""), (&nan, " NaN")] {
        let k = format!("sparse_fwd_{sfx}");
        let (texts, len) = (side.texts, side.len);
        let shape = format!("{texts}x{len} H{hidden} V{vocab}{tag}");
        let want = lists_layout(&side.entries, len);
        c.check(&k, &shape, |c| {
            let (bh, bws, bb, bids, bdrop) = (
                c.up(&side.h)?,
                c.up(&ws)?,
                c.up(&bias)?,
                c.up(&side.ids)?,
                c.up(&DROP)?,
            );
            let bw = c.zeros::<f32>(texts * len)?;
            let out = empty_lists(c, texts, len)?;
            // SAFETY: h [texts * len, hidden], ws [hidden], bias [1], ids [texts * len],
            // drop [4], weights [texts * len], lists [texts, len] / [texts].
            unsafe {
                km::sparse_fwd(
                    c.dev,
                    T::DT,
                    bh.ptr,
                    bws.ptr,
                    bb.ptr,
                    bids.ptr,
                    bdrop.ptr,
                    DROP.len(),
                    bw.ptr,
                    &out.lists(),
                    hidden,
                    vocab,
                )?
            };
            let got = c.down::<f32>(&bw, texts * len)?;
            c.cmp(&k, &shape, "weights", &got, &side.weights, TOL_F32);
            let f = |v: Vec<i32>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
            let got = f(c.down_i32(&out.count, texts)?);
            c.cmp(&k, &shape, "count", &got, &f(want.3.clone()), EXACT);
            let got: Vec<f32> = download::<u32>(c.dev, &out.ids, texts * len)?
                .into_iter()
                .map(|x| x as f32)
                .collect();
            let wid: Vec<f32> = want.0.iter().map(|&x| x as f32).collect();
            c.cmp(&k, &shape, "ids", &got, &wid, EXACT);
            let got = c.down::<f32>(&out.w, texts * len)?;
            c.cmp(&k, &shape, "w", &got, &want.1, TOL_F32);
            let got = f(c.down_i32(&out.pos, texts * len)?);
            c.cmp(&k, &shape, "pos", &got, &f(want.2.clone()), EXACT);
            Ok(())
        });
    }
    let k = "sparse_scores_f32";
    c.check(k, &shape, |c| {
        let (dq, dp) = (upload_lists(c, &ql, bq, lq)?, upload_lists(c, &pl, bp, lp)?);
        let bs = c.zeros::<f32>(bq * bp)?;
        // SAFETY: the lists as LexLists documents, scores [bq, bp] f32.
        unsafe { km::sparse_scores(c.dev, &dq.lists(), &dp.lists(), bs.ptr)? };
        let got = c.down::<f32>(&bs, bq * bp)?;
        c.cmp(k, &shape, "scores", &got, &scores, TOL_F32);
        Ok(())
    });
    let k = "sparse_scores_bwd_f32";
    c.check(k, &shape, |c| {
        let (dq, dp) = (upload_lists(c, &ql, bq, lq)?, upload_lists(c, &pl, bp, lp)?);
        let bds = c.up(&ds)?;
        // Garbage in the outputs: the kernel assigns every position.
        let (bwq, bwp) = (c.up(&vec![7.0f32; bq * lq])?, c.up(&vec![7.0f32; bp * lp])?);
        // SAFETY: the lists as LexLists documents, dscores [bq, bp], dwq [bq, lq], dwp [bp, lp].
        unsafe {
            km::sparse_scores_bwd(c.dev, &dq.lists(), &dp.lists(), bds.ptr, bwq.ptr, bwp.ptr)?
        };
        let got = c.down::<f32>(&bwq, bq * lq)?;
        c.cmp(k, &shape, "dwq", &got, &dwq, TOL_F32);
        let got = c.down::<f32>(&bwp, bp * lp)?;
        c.cmp(k, &shape, "dwp", &got, &dwp, TOL_F32);
        Ok(())
    });
    // The head's backward on the passage side, with a dense random upstream gradient (the ReLU
    // gate still zeroes about half of the rows).
    let k = format!("sparse_weights_bwd_{sfx}");
    let rows = bp * lp;
    let (_, dw) = c.randn::<f32>(rows, 1.0, 0.0);
    let (_, dws0) = c.randn::<f32>(hidden + 1, 1.0, 0.0);
    let mut dh = vec![0.0; rows * hidden];
    let (mut dws, mut db) = (dws0[..hidden].to_vec(), dws0[hidden]);
    cpu::sparse::term_weights_bwd(&p.hf, &wsf, &p.weights, &dw, &mut dh, &mut dws, &mut db);
    let shape = format!("{rows}x{hidden}");
    c.check(&k, &shape, |c| {
        let (bh, bws, bw, bdw) = (c.up(&p.h)?, c.up(&ws)?, c.up(&p.weights)?, c.up(&dw)?);
        let (bdh, bdws, bdb) = (
            c.zeros::<T>(rows * hidden)?,
            c.up(&dws0[..hidden])?,
            c.up(&dws0[hidden..])?,
        );
        // SAFETY: h, dh [rows, hidden], ws [hidden], weights / dw [rows] f32, dws [hidden] f32,
        // db [1] f32.
        unsafe {
            km::sparse_weights_bwd(
                c.dev,
                T::DT,
                bh.ptr,
                bws.ptr,
                bw.ptr,
                bdw.ptr,
                bdh.ptr,
                bdws.ptr,
                bdb.ptr,
                rows,
                hidden,
            )?
        };
        let got = c.down::<T>(&bdh, rows * hidden)?;
        c.cmp(&k, &shape, "dh", &got, &dh, T::TOL);
        let got = c.down::<f32>(&bdws, hidden)?;
        c.cmp(&k, &shape, "dws+=", &got, &dws, TOL_F32);
        // db is one sum over every row, which cancels far below its terms (|db| ~ 4e-3 from
        // 2400 terms of ~1 on an H200, seed 20261128): its rounding scales with Σ|terms|, not
        // with |db|, so the absolute floor does (a dropped or flipped row moves it by ~1).
        let l1: f64 = dw.iter().map(|x| f64::from(x.abs())).sum();
        let got = c.down::<f32>(&bdb, 1)?;
        c.cmp(
            &k,
            &shape,
            "db+=",
            &got,
            &[db],
            TOL_F32.with_floor(1e-7 * l1),
        );
        Ok(())
    });
}

const INV_T: f32 = 1.0 / 0.05;
/// Upstream gradient of the losses.
const G0: f32 = 0.75;

/// Random scores [rows, cols] of cosine size, as the kernels store them and as f32.
fn score_matrix<T: Store>(c: &mut M3Ctx, rows: usize, cols: usize) -> (Vec<T>, Vec<f32>) {
    c.randn::<T>(rows * cols, 0.3, 0.0)
}

/// Tolerance of a cross-entropy loss `lse - x[target]`: a difference of two f32 values of the
/// logits' size, so a loss near 0 (a row sure of its target) is only known to a few ulps of the
/// logits (the reference rounds its lse to f32 too), not to 2e-5 of itself.
fn loss_tol(logits: &[f32], classes: usize) -> Tol {
    let big = logits
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, &v| m.max((v as f64).abs()))
        + (classes.max(1) as f64).ln();
    Tol {
        floor: 8.0 * f32::EPSILON as f64 * big,
        ..TOL_F32
    }
}

/// In-batch InfoNCE on [b, b·g] (target b·g, row 1 ignored) or, with `local`, the no-in-batch
/// mode as a -inf mask outside each row's own group (target its first column).
fn infonce<T: Store>(c: &mut M3Ctx, b: usize, g: usize, local: bool) {
    let n = b * g;
    let shape = format!("{b}x{n} G{g}{}", if local { " masked" } else { "" });
    let k = format!("infonce_{}", T::DT.suffix());
    let (s, sf) = score_matrix::<T>(c, b, n);
    let mask: Vec<f32> = (0..b * n)
        .map(|i| {
            let (r, j) = (i / n, i % n);
            if !local || (r * g..(r + 1) * g).contains(&j) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let targets: Vec<i64> = (0..b)
        .map(|r| {
            if !local && r == 1 {
                cpu::loss::IGNORE_INDEX
            } else {
                (r * g) as i64
            }
        })
        .collect();
    let x: Vec<f32> = sf.iter().zip(&mask).map(|(&v, &m)| v * INV_T + m).collect();
    let mut lse = vec![0.0; b];
    let (_, count) = cpu::loss::cross_entropy_fwd(&x, &targets, n, &mut lse);
    let row_loss: Vec<f32> = (0..b)
        .map(|r| match targets[r] {
            cpu::loss::IGNORE_INDEX => 0.0,
            t => (lse[r] as f64 - x[r * n + t as usize] as f64) as f32,
        })
        .collect();
    let mut dx = vec![0.0; b * n];
    cpu::loss::cross_entropy_bwd(&x, &targets, n, &lse, count, G0, &mut dx);
    let ds: Vec<f32> = dx.iter().map(|&v| v * INV_T).collect();
    let g_row = G0 / count.max(1) as f32;
    c.check(&k, &shape, |c| {
        let (bs, bt) = (c.up(&s)?, c.up(&targets)?);
        let bm = if local { Some(c.up(&mask)?) } else { None };
        let (blse, brl, bds) = (c.zeros::<f32>(b)?, c.zeros::<f32>(b)?, c.zeros::<T>(b * n)?);
        let mptr = bm.as_ref().map_or(DevPtr::NULL, |m| m.ptr);
        // SAFETY: scores / dscores [b, n], mask [b, n] f32 or NULL, targets [b] i64,
        // lse / row_loss [b] f32.
        unsafe {
            km::infonce(
                c.dev,
                T::DT,
                bs.ptr,
                mptr,
                bt.ptr,
                INV_T,
                g_row,
                blse.ptr,
                brl.ptr,
                bds.ptr,
                b,
                n,
            )?
        };
        let got = c.down::<f32>(&blse, b)?;
        c.cmp(&k, &shape, "lse", &got, &lse, TOL_F32);
        let got = c.down::<f32>(&brl, b)?;
        c.cmp(&k, &shape, "row_loss", &got, &row_loss, loss_tol(&x, n));
        let got = c.down::<T>(&bds, b * n)?;
        c.cmp(&k, &shape, "dscores", &got, &ds, T::TOL);
        Ok(())
    });
}

/// Softmax of a random teacher per row; row 0 puts all its mass on few columns (exact zeros).
fn teacher_probs(c: &mut M3Ctx, rows: usize, cols: usize, sharp: bool) -> Vec<f32> {
    let mut t = vec![0.0f32; rows * cols];
    for r in 0..rows {
        let z: Vec<f64> = (0..cols).map(|_| 2.0 * c.normal() as f64).collect();
        let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = z
            .iter()
            .enumerate()
            .map(|(j, &v)| {
                if sharp && r == 0 && j % 3 != 0 {
                    0.0
                } else {
                    (v - m).exp()
                }
            })
            .collect();
        let s: f64 = e.iter().sum();
        for j in 0..cols {
            t[r * cols + j] = (e[j] / s) as f32;
        }
    }
    t
}

fn soft_ce<T: Store>(c: &mut M3Ctx, b: usize, g: usize) {
    let n = b * g;
    let shape = format!("{b}x{n}");
    let k = format!("soft_ce_{}", T::DT.suffix());
    let (s, sf) = score_matrix::<T>(c, b, n);
    let t = teacher_probs(c, b, n, true);
    let x: Vec<f32> = sf.iter().map(|&v| v * INV_T).collect();
    let mut lse = vec![0.0; b];
    let loss = cpu::loss::soft_cross_entropy_fwd(&x, &t, n, &mut lse);
    let mut dx = vec![0.0; b * n];
    cpu::loss::soft_cross_entropy_bwd(&x, &t, n, &lse, G0, &mut dx);
    let ds: Vec<f32> = dx.iter().map(|&v| v * INV_T).collect();
    c.check(&k, &shape, |c| {
        let (bs, bt) = (c.up(&s)?, c.up(&t)?);
        let (blse, brl, bds) = (c.zeros::<f32>(b)?, c.zeros::<f32>(b)?, c.zeros::<T>(b * n)?);
        // SAFETY: scores / dscores [b, n], targets [b, n] f32, lse / row_loss [b] f32.
        unsafe {
            km::soft_ce(
                c.dev,
                T::DT,
                bs.ptr,
                bt.ptr,
                INV_T,
                G0 / b as f32,
                blse.ptr,
                brl.ptr,
                bds.ptr,
                b,
                n,
            )?
        };
        let got = c.down::<f32>(&blse, b)?;
        c.cmp(&k, &shape, "lse", &got, &lse, TOL_F32);
        let rl = c.down::<f32>(&brl, b)?;
        let mean = (rl.iter().map(|&v| v as f64).sum::<f64>() / b as f64) as f32;
        c.cmp(&k, &shape, "loss", &[mean], &[loss], loss_tol(&x, n));
        let got = c.down::<T>(&bds, b * n)?;
        c.cmp(&k, &shape, "dscores", &got, &ds, T::TOL);
        Ok(())
    });
}

/// m3_kd_loss on the in-batch [b, b·g] matrix or, with `local`, on [b, g] blocks (column stride
/// 0; the reference is then the op on each row as its own batch, as the trainer's no-in-batch
/// mode does).
fn m3_kd<T: Store>(c: &mut M3Ctx, b: usize, g: usize, local: bool) {
    let n = if local { g } else { b * g };
    let shape = format!("{b}x{n} G{g}{}", if local { " local" } else { "" });
    let k = format!("m3_kd_{}", T::DT.suffix());
    let (s, sf) = score_matrix::<T>(c, b, n);
    let t = teacher_probs(c, b, g, false);
    let x: Vec<f32> = sf.iter().map(|&v| v * INV_T).collect();
    // Reference through the op and the tape: (loss, d loss / d x).
    let reference = |x: &[f32], t: &[f32], rows: usize| -> Result<(f32, Vec<f32>)> {
        let mut tape = Tape::new();
        let sv = tape.leaf(Tensor::from_vec(x.to_vec(), &[rows, n])?);
        let tt = Tensor::from_vec(t.to_vec(), &[rows, g])?;
        let l = ops::m3_kd_loss(&mut tape, &sv, &tt, g)?;
        let loss = l.value().f32s()?[0];
        let grads = tape.backward(&l)?;
        let d = grads
            .get(&sv)
            .map_or(Ok(vec![0.0; rows * n]), |d| d.f32s().map(<[f32]>::to_vec))?;
        Ok((loss, d))
    };
    c.check(&k, &shape, |c| {
        let (loss, ds) = if local {
            let (mut loss, mut ds) = (0.0f64, Vec::with_capacity(b * n));
            for r in 0..b {
                let (l, d) = reference(&x[r * n..(r + 1) * n], &t[r * g..(r + 1) * g], 1)?;
                loss += l as f64 / b as f64;
                ds.extend(d.iter().map(|&v| v * G0 / b as f32 * INV_T));
            }
            (loss as f32, ds)
        } else {
            let (l, d) = reference(&x, &t, b)?;
            (l, d.iter().map(|&v| v * G0 * INV_T).collect())
        };
        let (bs, bt) = (c.up(&s)?, c.up(&t)?);
        let (blse, brl, bds) = (
            c.zeros::<f32>(b * g)?,
            c.zeros::<f32>(b)?,
            c.zeros::<T>(b * n)?,
        );
        let stride = if local { 0 } else { g };
        // SAFETY: scores / dscores [b, n], teacher [b, g] f32, lse [b, g] f32, row_loss [b] f32.
        unsafe {
            km::m3_kd(
                c.dev,
                T::DT,
                bs.ptr,
                bt.ptr,
                INV_T,
                G0 / b as f32,
                stride,
                blse.ptr,
                brl.ptr,
                bds.ptr,
                b,
                n,
                g,
            )?
        };
        let rl = c.down::<f32>(&brl, b)?;
        let mean = (rl.iter().map(|&v| v as f64).sum::<f64>() / b as f64) as f32;
        c.cmp(&k, &shape, "loss", &[mean], &[loss], loss_tol(&x, n));
        let got = c.down::<T>(&bds, b * n)?;
        c.cmp(&k, &shape, "dscores", &got, &ds, T::TOL);
        Ok(())
    });
}
