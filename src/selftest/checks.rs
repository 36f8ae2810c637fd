//! The per-kernel checks of the selftest: random inputs, the CPU reference, the device run through
//! `device::kernels`, one compared row per output.

use super::{compare, SelftestRow, Tol, TOL_BF16, TOL_F32};
use crate::device::cpu;
use crate::device::kernels::{self, AdamWStep};
use crate::device::launch::{download, upload, DevBuf, DevPtr, KDType, KernelDevice};
use crate::error::Result;
use half::bf16;

/// A storage dtype the kernels come in.
pub(super) trait Store: bytemuck::Pod + Default {
    const DT: KDType;
    const TOL: Tol;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}
impl Store for f32 {
    const DT: KDType = KDType::F32;
    const TOL: Tol = TOL_F32;
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}
impl Store for bf16 {
    const DT: KDType = KDType::BF16;
    const TOL: Tol = TOL_BF16;
    fn from_f32(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// splitmix64 with a Box-Muller normal: reproducible from the report's seed.
pub(super) struct Rng(u64);
impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(super) fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub(super) fn normal(&mut self) -> f32 {
        let u1 = (self.uniform() as f64).max(1e-12);
        let u2 = self.uniform() as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

pub(super) struct Ctx<'a> {
    pub(super) dev: &'a dyn KernelDevice,
    pub(super) rng: Rng,
    rows: Vec<SelftestRow>,
}

impl Ctx<'_> {
    /// n values `shift + scale * N(0,1)` in storage T, and the same values as f32 (already
    /// rounded to T, so the reference sees exactly what the kernel sees).
    pub(super) fn randn<T: Store>(
        &mut self,
        n: usize,
        scale: f32,
        shift: f32,
    ) -> (Vec<T>, Vec<f32>) {
        let s: Vec<T> = (0..n)
            .map(|_| T::from_f32(shift + scale * self.rng.normal()))
            .collect();
        let f = s.iter().map(|&v| v.to_f32()).collect();
        (s, f)
    }
    pub(super) fn up<T: bytemuck::Pod>(&self, v: &[T]) -> Result<DevBuf> {
        upload(self.dev, v)
    }
    pub(super) fn zeros<T: bytemuck::Pod + Default>(&self, n: usize) -> Result<DevBuf> {
        upload(self.dev, &vec![T::default(); n])
    }
    pub(super) fn down<T: Store>(&self, b: &DevBuf, n: usize) -> Result<Vec<f32>> {
        Ok(download::<T>(self.dev, b, n)?
            .into_iter()
            .map(Store::to_f32)
            .collect())
    }
    pub(super) fn cmp(
        &mut self,
        k: &str,
        shape: &str,
        out: &str,
        got: &[f32],
        want: &[f32],
        tol: Tol,
    ) {
        self.rows.push(compare(k, shape, out, got, want, tol));
    }
    /// Run one check; a launch error becomes a failing row instead of ending the selftest.
    pub(super) fn check(
        &mut self,
        kernel: &str,
        shape: &str,
        f: impl FnOnce(&mut Self) -> Result<()>,
    ) {
        if let Err(e) = f(self) {
            let mut row = compare(kernel, shape, "-", &[], &[], TOL_F32);
            row.error = Some(e.to_string());
            self.rows.push(row);
        }
    }
}

/// Every check, both dtypes, on the quick or the full shape list.
pub(super) fn all(dev: &dyn KernelDevice, quick: bool, seed: u64) -> Result<Vec<SelftestRow>> {
    let mut c = Ctx {
        dev,
        rng: Rng(seed),
        rows: Vec::new(),
    };
    let rowdims: &[(usize, usize)] = if quick {
        &[(1, 32), (37, 300), (9, 768)]
    } else {
        &[(1, 32), (37, 300), (64, 768), (129, 1024), (5, 4097)]
    };
    let lens: &[usize] = if quick {
        &[1, 1000, 4099]
    } else {
        &[1, 1000, 4099, 100_003]
    };
    let ce: &[(usize, usize)] = if quick {
        &[(7, 10), (19, 5003)]
    } else {
        &[(7, 10), (19, 5003), (33, 32_771)]
    };
    for &(r, d) in rowdims {
        layernorm::<f32>(&mut c, r, d);
        layernorm::<bf16>(&mut c, r, d);
        l2_normalize::<f32>(&mut c, r, d);
        l2_normalize::<bf16>(&mut c, r, d);
        bias_gelu::<f32>(&mut c, r, d);
        bias_gelu::<bf16>(&mut c, r, d);
        gather::<f32>(&mut c, r + 3, d, r / 2 + 2);
        gather::<bf16>(&mut c, r + 3, d, r / 2 + 2);
    }
    for &n in lens {
        gelu::<f32>(&mut c, n);
        gelu::<bf16>(&mut c, n);
        cast_f32_bf16(&mut c, n);
        adamw(&mut c, n);
    }
    for &(r, k) in ce {
        cross_entropy::<f32>(&mut c, r, k, false);
        cross_entropy::<bf16>(&mut c, r, k, false);
    }
    cross_entropy::<f32>(&mut c, 3, 17, true);
    super::attention::all(&mut c, quick);
    Ok(c.rows)
}

fn layernorm<T: Store>(c: &mut Ctx, rows: usize, dim: usize) {
    let shape = format!("{rows}x{dim}");
    let (eps, sfx) = (1e-5f32, T::DT.suffix());
    let (fwd, bwd) = (
        format!("layernorm_fwd_{sfx}"),
        format!("layernorm_bwd_{sfx}"),
    );
    let (x, xf) = c.randn::<T>(rows * dim, 2.0, 0.5);
    let (g, gf) = c.randn::<T>(dim, 0.2, 1.0);
    let (b, bf) = c.randn::<T>(dim, 0.2, 0.0);
    let (dy, dyf) = c.randn::<T>(rows * dim, 1.0, 0.0);
    let (_, acc0) = c.randn::<f32>(2 * dim, 1.0, 0.0);
    let (mut y, mut mean, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
    cpu::layernorm::layernorm_fwd(&xf, &gf, &bf, eps, dim, &mut y, &mut mean, &mut rstd);
    let mut dx = vec![0.0; rows * dim];
    let (mut dg, mut db) = (acc0[..dim].to_vec(), acc0[dim..].to_vec());
    cpu::layernorm::layernorm_bwd(&xf, &gf, &mean, &rstd, &dyf, dim, &mut dx, &mut dg, &mut db);
    c.check(&fwd, &shape, |c| {
        let (bx, bg, bb) = (c.up(&x)?, c.up(&g)?, c.up(&b)?);
        let (by, bm, br) = (
            c.zeros::<T>(rows * dim)?,
            c.zeros::<f32>(rows)?,
            c.zeros::<f32>(rows)?,
        );
        // SAFETY: buffers sized [rows, dim], [dim] and [rows] as layernorm_fwd documents.
        unsafe {
            kernels::layernorm_fwd(
                c.dev,
                T::DT,
                bx.ptr,
                bg.ptr,
                bb.ptr,
                by.ptr,
                bm.ptr,
                br.ptr,
                rows,
                dim,
                eps,
            )?
        };
        let got = c.down::<T>(&by, rows * dim)?;
        c.cmp(&fwd, &shape, "y", &got, &y, T::TOL);
        let got = c.down::<f32>(&bm, rows)?;
        c.cmp(&fwd, &shape, "mean", &got, &mean, TOL_F32);
        let got = c.down::<f32>(&br, rows)?;
        c.cmp(&fwd, &shape, "rstd", &got, &rstd, TOL_F32);
        Ok(())
    });
    c.check(&bwd, &shape, |c| {
        let (bx, bg, bdy) = (c.up(&x)?, c.up(&g)?, c.up(&dy)?);
        let (bm, br) = (c.up(&mean)?, c.up(&rstd)?);
        let (bdx, bdg, bdb) = (
            c.zeros::<T>(rows * dim)?,
            c.up(&acc0[..dim])?,
            c.up(&acc0[dim..])?,
        );
        // SAFETY: buffers sized [rows, dim], [dim] and [rows] as layernorm_bwd documents.
        unsafe {
            kernels::layernorm_bwd(
                c.dev,
                T::DT,
                bx.ptr,
                bg.ptr,
                bm.ptr,
                br.ptr,
                bdy.ptr,
                bdx.ptr,
                bdg.ptr,
                bdb.ptr,
                rows,
                dim,
            )?
        };
        let got = c.down::<T>(&bdx, rows * dim)?;
        c.cmp(&bwd, &shape, "dx", &got, &dx, T::TOL);
        let got = c.down::<f32>(&bdg, dim)?;
        c.cmp(&bwd, &shape, "dgamma+=", &got, &dg, TOL_F32);
        let got = c.down::<f32>(&bdb, dim)?;
        c.cmp(&bwd, &shape, "dbeta+=", &got, &db, TOL_F32);
        Ok(())
    });
}

fn l2_normalize<T: Store>(c: &mut Ctx, rows: usize, dim: usize) {
    let shape = format!("{rows}x{dim}");
    let (eps, sfx) = (1e-12f32, T::DT.suffix());
    let (fwd, bwd) = (
        format!("l2_normalize_fwd_{sfx}"),
        format!("l2_normalize_bwd_{sfx}"),
    );
    let (mut x, mut xf) = c.randn::<T>(rows * dim, 1.0, 0.0);
    if rows > 2 {
        // A zero row: the eps branch of the forward and of the backward.
        x[dim..2 * dim]
            .iter_mut()
            .for_each(|v| *v = T::from_f32(0.0));
        xf[dim..2 * dim].iter_mut().for_each(|v| *v = 0.0);
    }
    let (dy, dyf) = c.randn::<T>(rows * dim, 1.0, 0.0);
    let mut y = vec![0.0; rows * dim];
    cpu::normalize::l2_normalize_fwd(&xf, dim, eps, &mut y);
    let mut dx = vec![0.0; rows * dim];
    cpu::normalize::l2_normalize_bwd(&xf, &dyf, dim, eps, &mut dx);
    c.check(&fwd, &shape, |c| {
        let (bx, by) = (c.up(&x)?, c.zeros::<T>(rows * dim)?);
        // SAFETY: x and y are [rows, dim].
        unsafe { kernels::l2_normalize_fwd(c.dev, T::DT, bx.ptr, by.ptr, rows, dim, eps)? };
        let got = c.down::<T>(&by, rows * dim)?;
        c.cmp(&fwd, &shape, "y", &got, &y, T::TOL);
        Ok(())
    });
    c.check(&bwd, &shape, |c| {
        let (bx, bdy, bdx) = (c.up(&x)?, c.up(&dy)?, c.zeros::<T>(rows * dim)?);
        // SAFETY: x, dy and dx are [rows, dim].
        unsafe {
            kernels::l2_normalize_bwd(c.dev, T::DT, bx.ptr, bdy.ptr, bdx.ptr, rows, dim, eps)?
        };
        let got = c.down::<T>(&bdx, rows * dim)?;
        if rows > 2 {
            // The zero row's gradient is dy / eps (~1e12): compared on its own, so that its scale
            // does not swamp the tolerance of the other rows.
            let (z, zw) = (&got[dim..2 * dim], &dx[dim..2 * dim]);
            c.cmp(&bwd, &shape, "dx zero row", z, zw, T::TOL);
            let rest = |v: &[f32]| [&v[..dim], &v[2 * dim..]].concat();
            c.cmp(&bwd, &shape, "dx", &rest(&got), &rest(&dx), T::TOL);
        } else {
            c.cmp(&bwd, &shape, "dx", &got, &dx, T::TOL);
        }
        Ok(())
    });
}

/// Absolute accuracy of GELU's reference in the far tail, where 1 + erf cancels: the CPU erf fit
/// is within 1.2e-7, times |x| / 2 for |x| up to ~8 (beyond, both sides give 0 or x).
const ERF_ABS: f64 = 1e-6;

fn gelu<T: Store>(c: &mut Ctx, n: usize) {
    let shape = format!("{n}");
    let sfx = T::DT.suffix();
    let (fwd, bwd) = (format!("gelu_fwd_{sfx}"), format!("gelu_bwd_{sfx}"));
    let (x, xf) = c.randn::<T>(n, 2.5, 0.0);
    let (dy, dyf) = c.randn::<T>(n, 1.0, 0.0);
    let mut y = vec![0.0; n];
    cpu::elementwise::gelu_fwd(&xf, &mut y);
    let mut dx = vec![0.0; n];
    cpu::elementwise::gelu_bwd(&xf, &dyf, &mut dx);
    c.check(&fwd, &shape, |c| {
        let (bx, by) = (c.up(&x)?, c.zeros::<T>(n)?);
        // SAFETY: x and y hold n elements.
        unsafe { kernels::gelu_fwd(c.dev, T::DT, bx.ptr, by.ptr, n)? };
        let got = c.down::<T>(&by, n)?;
        c.cmp(&fwd, &shape, "y", &got, &y, T::TOL.with_floor(ERF_ABS));
        Ok(())
    });
    c.check(&bwd, &shape, |c| {
        let (bx, bdy, bdx) = (c.up(&x)?, c.up(&dy)?, c.zeros::<T>(n)?);
        // SAFETY: x, dy and dx hold n elements.
        unsafe { kernels::gelu_bwd(c.dev, T::DT, bx.ptr, bdy.ptr, bdx.ptr, n)? };
        let got = c.down::<T>(&bdx, n)?;
        c.cmp(&bwd, &shape, "dx", &got, &dx, T::TOL.with_floor(ERF_ABS));
        Ok(())
    });
}

/// The f32 -> bf16 cast: exactly half::bf16::from_f32 (round to nearest even; truncation would
/// be off by one bf16 ulp, ~4e-3 relative, on about half the elements).
fn cast_f32_bf16(c: &mut Ctx, n: usize) {
    let shape = format!("{n}");
    let k = "cast_f32_bf16";
    let (x, xf) = c.randn::<f32>(n, 3.0, 0.0);
    let want: Vec<f32> = xf
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    c.check(k, &shape, |c| {
        let (bx, by) = (c.up(&x)?, c.zeros::<bf16>(n)?);
        // SAFETY: x holds n f32, y n bf16.
        unsafe { kernels::cast_from_f32(c.dev, KDType::BF16, bx.ptr, by.ptr, n)? };
        let got = c.down::<bf16>(&by, n)?;
        c.cmp(k, &shape, "y", &got, &want, TOL_F32);
        Ok(())
    });
}

fn bias_gelu<T: Store>(c: &mut Ctx, rows: usize, dim: usize) {
    let shape = format!("{rows}x{dim}");
    let sfx = T::DT.suffix();
    let (fwd, bwd) = (
        format!("bias_gelu_fwd_{sfx}"),
        format!("bias_gelu_bwd_{sfx}"),
    );
    let (x, xf) = c.randn::<T>(rows * dim, 2.0, 0.0);
    let (b, bf) = c.randn::<T>(dim, 0.5, 0.0);
    let (dy, dyf) = c.randn::<T>(rows * dim, 1.0, 0.0);
    let (_, db0) = c.randn::<f32>(dim, 1.0, 0.0);
    // Reference: the composition bias add (in f32, as the kernel) then the CPU GELU.
    let h: Vec<f32> = xf
        .iter()
        .enumerate()
        .map(|(i, &v)| v + bf[i % dim])
        .collect();
    let mut y = vec![0.0; rows * dim];
    cpu::elementwise::gelu_fwd(&h, &mut y);
    let mut dx = vec![0.0; rows * dim];
    cpu::elementwise::gelu_bwd(&h, &dyf, &mut dx);
    let mut db: Vec<f64> = db0.iter().map(|&v| v as f64).collect();
    for (i, &d) in dx.iter().enumerate() {
        db[i % dim] += d as f64;
    }
    let db: Vec<f32> = db.into_iter().map(|v| v as f32).collect();
    c.check(&fwd, &shape, |c| {
        let (bx, bb, by) = (c.up(&x)?, c.up(&b)?, c.zeros::<T>(rows * dim)?);
        // SAFETY: x, y are [rows, dim]; bias [dim].
        unsafe { kernels::bias_gelu_fwd(c.dev, T::DT, bx.ptr, bb.ptr, by.ptr, rows, dim)? };
        let got = c.down::<T>(&by, rows * dim)?;
        c.cmp(&fwd, &shape, "y", &got, &y, T::TOL.with_floor(ERF_ABS));
        Ok(())
    });
    c.check(&bwd, &shape, |c| {
        let (bx, bb, bdy) = (c.up(&x)?, c.up(&b)?, c.up(&dy)?);
        let (bdx, bdb) = (c.zeros::<T>(rows * dim)?, c.up(&db0)?);
        // SAFETY: x, dy, dx are [rows, dim]; bias and dbias [dim].
        unsafe {
            kernels::bias_gelu_bwd(
                c.dev,
                T::DT,
                bx.ptr,
                bb.ptr,
                bdy.ptr,
                bdx.ptr,
                bdb.ptr,
                rows,
                dim,
            )?
        };
        let got = c.down::<T>(&bdx, rows * dim)?;
        c.cmp(&bwd, &shape, "dx", &got, &dx, T::TOL.with_floor(ERF_ABS));
        let got = c.down::<f32>(&bdb, dim)?;
        c.cmp(&bwd, &shape, "dbias+=", &got, &db, TOL_F32);
        Ok(())
    });
}

fn gather<T: Store>(c: &mut Ctx, n: usize, dim: usize, vocab: usize) {
    let shape = format!("{n}x{dim} v{vocab}");
    let sfx = T::DT.suffix();
    let (fwd, bwd) = (format!("gather_fwd_{sfx}"), format!("gather_bwd_{sfx}"));
    let pad = 1u32;
    let (table, tf) = c.randn::<T>(vocab * dim, 1.0, 0.0);
    // Fewer ids than rows in vocab, so ids repeat (atomic collisions) and padding appears.
    let ids: Vec<u32> = (0..n).map(|_| c.rng.below(vocab) as u32).collect();
    let (dout, doutf) = c.randn::<T>(n * dim, 1.0, 0.0);
    let (_, dt0) = c.randn::<f32>(vocab * dim, 1.0, 0.0);
    let mut out = vec![0.0; n * dim];
    cpu::embedding::gather_fwd(&tf, &ids, dim, &mut out);
    // Reference backward: the CPU scatter-add over the rows whose id is not padding_idx.
    let (kept_ids, kept_rows): (Vec<u32>, Vec<f32>) = {
        let mut ki = Vec::new();
        let mut kr = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            if id != pad {
                ki.push(id);
                kr.extend_from_slice(&doutf[i * dim..(i + 1) * dim]);
            }
        }
        (ki, kr)
    };
    let mut dtable = dt0.clone();
    cpu::embedding::gather_bwd(&kept_rows, &kept_ids, dim, &mut dtable);
    c.check(&fwd, &shape, |c| {
        let (bt, bi, bo) = (c.up(&table)?, c.up(&ids)?, c.zeros::<T>(n * dim)?);
        // SAFETY: table [vocab, dim], ids [n] (all < vocab), out [n, dim].
        unsafe { kernels::gather_fwd(c.dev, T::DT, bt.ptr, bi.ptr, bo.ptr, n, dim, vocab)? };
        let got = c.down::<T>(&bo, n * dim)?;
        c.cmp(&fwd, &shape, "out", &got, &out, T::TOL);
        Ok(())
    });
    c.check(&bwd, &shape, |c| {
        let (bd, bi, bt) = (c.up(&dout)?, c.up(&ids)?, c.up(&dt0)?);
        // SAFETY: dout [n, dim], ids [n] (all < vocab), dtable [vocab, dim] f32.
        unsafe {
            kernels::gather_bwd(
                c.dev,
                T::DT,
                bd.ptr,
                bi.ptr,
                bt.ptr,
                n,
                dim,
                vocab,
                Some(pad),
            )?
        };
        let got = c.down::<f32>(&bt, vocab * dim)?;
        c.cmp(&bwd, &shape, "dtable+=", &got, &dtable, TOL_F32);
        Ok(())
    });
}

fn cross_entropy<T: Store>(c: &mut Ctx, rows: usize, classes: usize, all_ignored: bool) {
    let shape = format!(
        "{rows}x{classes}{}",
        if all_ignored { " ignored" } else { "" }
    );
    let sfx = T::DT.suffix();
    let (fwd, bwd) = (
        format!("cross_entropy_fwd_{sfx}"),
        format!("cross_entropy_bwd_{sfx}"),
    );
    let (logits, lf) = c.randn::<T>(rows * classes, 3.0, 0.0);
    let targets: Vec<i64> = (0..rows)
        .map(|r| {
            if all_ignored || r % 4 == 1 {
                cpu::loss::IGNORE_INDEX
            } else {
                c.rng.below(classes) as i64
            }
        })
        .collect();
    let g = 0.75f32;
    let mut lse = vec![0.0; rows];
    let (loss, count) = cpu::loss::cross_entropy_fwd(&lf, &targets, classes, &mut lse);
    let mut dl = vec![0.0; rows * classes];
    cpu::loss::cross_entropy_bwd(&lf, &targets, classes, &lse, count, g, &mut dl);
    c.check(&fwd, &shape, |c| {
        let (bl, bt) = (c.up(&logits)?, c.up(&targets)?);
        let (blse, brl, bs) = (
            c.zeros::<f32>(rows)?,
            c.zeros::<f32>(rows)?,
            c.zeros::<f32>(2)?,
        );
        // SAFETY: logits [rows, classes], targets/lse/row_loss [rows], stats [2].
        unsafe {
            kernels::cross_entropy_fwd(
                c.dev,
                T::DT,
                bl.ptr,
                bt.ptr,
                blse.ptr,
                brl.ptr,
                bs.ptr,
                rows,
                classes,
            )?
        };
        let got = c.down::<f32>(&blse, rows)?;
        c.cmp(&fwd, &shape, "lse", &got, &lse, TOL_F32);
        let got = c.down::<f32>(&bs, 2)?;
        c.cmp(
            &fwd,
            &shape,
            "loss,count",
            &got,
            &[loss, count as f32],
            TOL_F32,
        );
        Ok(())
    });
    c.check(&bwd, &shape, |c| {
        let (bl, bt, blse) = (c.up(&logits)?, c.up(&targets)?, c.up(&lse)?);
        let (bs, bd) = (c.up(&[loss, count as f32])?, c.zeros::<T>(rows * classes)?);
        // SAFETY: logits/dlogits [rows, classes], targets/lse [rows], stats [2].
        unsafe {
            kernels::cross_entropy_bwd(
                c.dev,
                T::DT,
                bl.ptr,
                bt.ptr,
                blse.ptr,
                bs.ptr,
                g,
                bd.ptr,
                rows,
                classes,
            )?
        };
        let got = c.down::<T>(&bd, rows * classes)?;
        c.cmp(&bwd, &shape, "dlogits", &got, &dl, T::TOL);
        Ok(())
    });
}

fn adamw(c: &mut Ctx, n: usize) {
    let shape = format!("{n}");
    let h = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 3,
        max_norm: 1.0,
        grad_scale: 1.0,
    };
    let (_, p0) = c.randn::<f32>(n, 1.0, 0.0);
    let (_, g) = c.randn::<f32>(n, 0.5, 0.0);
    let (_, m0) = c.randn::<f32>(n, 0.05, 0.0);
    let v0: Vec<f32> = c
        .randn::<f32>(n, 0.01, 0.0)
        .1
        .iter()
        .map(|v| v * v)
        .collect();
    let mask: Vec<u8> = (0..n).map(|i| u8::from(i % 3 != 0)).collect();
    // Reference: the global norm, the clip factor, then AdamW element by element with the
    // element's weight decay (the CPU optimizer applies it per tensor).
    let sumsq = cpu::adamw::grad_norm_sq(&g);
    let scale = cpu::adamw::clip_factor(sumsq.sqrt(), h.max_norm);
    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
    for (i, &decay) in mask.iter().enumerate() {
        let hy = cpu::adamw::AdamWHyper {
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: if decay == 1 { h.weight_decay } else { 0.0 },
        };
        let r = i..i + 1;
        cpu::adamw::adamw_step(
            &mut p[r.clone()],
            &g[r.clone()],
            &mut m[r.clone()],
            &mut v[r],
            &hy,
            h.step,
            scale,
        );
    }
    c.check("grad_sumsq_partial_f32", &shape, |c| {
        let np = kernels::grad_sumsq_partials(n);
        let (bg, bp, bs) = (c.up(&g)?, c.zeros::<f32>(np)?, c.zeros::<f32>(1)?);
        // SAFETY: g [n], partials [grad_sumsq_partials(n)], sumsq [1].
        unsafe { kernels::grad_sumsq(c.dev, bg.ptr, bp.ptr, bs.ptr, n)? };
        let got = c.down::<f32>(&bs, 1)?;
        c.cmp(
            "grad_sumsq_partial_f32",
            &shape,
            "sumsq",
            &got,
            &[sumsq as f32],
            TOL_F32,
        );
        let (bp0, bg0, bm0, bv0) = (c.up(&p0)?, c.up(&g)?, c.up(&m0)?, c.up(&v0)?);
        let bmask = c.up(&mask)?;
        let bcopy = c.zeros::<f32>(n)?;
        // SAFETY: param/grad/m/v [n] f32, decay_mask [n] u8, sumsq [1] f32, copy [n] f32.
        unsafe {
            kernels::adamw(
                c.dev,
                bp0.ptr,
                bg0.ptr,
                bm0.ptr,
                bv0.ptr,
                bmask.ptr,
                bs.ptr,
                Some((bcopy.ptr, KDType::F32)),
                n,
                &h,
            )?
        };
        let got = c.down::<f32>(&bp0, n)?;
        c.cmp("adamw_f32", &shape, "param", &got, &p, TOL_F32);
        let got = c.down::<f32>(&bcopy, n)?;
        c.cmp("adamw_f32", &shape, "f32 copy", &got, &p, TOL_F32);
        let got = c.down::<f32>(&bm0, n)?;
        c.cmp("adamw_f32", &shape, "m", &got, &m, TOL_F32);
        let got = c.down::<f32>(&bv0, n)?;
        c.cmp("adamw_f32", &shape, "v", &got, &v, TOL_F32);
        // No mask, no clipping, gradients scaled by 1/2 (two ranks' sum), a bf16 compute copy:
        // plain AdamW with decay everywhere.
        let (bp1, bm1, bv1) = (c.up(&p0)?, c.up(&m0)?, c.up(&v0)?);
        let b16 = c.zeros::<bf16>(n)?;
        let h2 = AdamWStep {
            grad_scale: 0.5,
            ..h
        };
        // SAFETY: as above, with null mask and sumsq, copy [n] bf16.
        unsafe {
            kernels::adamw(
                c.dev,
                bp1.ptr,
                bg0.ptr,
                bm1.ptr,
                bv1.ptr,
                DevPtr::NULL,
                DevPtr::NULL,
                Some((b16.ptr, KDType::BF16)),
                n,
                &h2,
            )?
        };
        let hy = cpu::adamw::AdamWHyper {
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: h.weight_decay,
        };
        let (mut p1, mut m1, mut v1) = (p0.clone(), m0.clone(), v0.clone());
        cpu::adamw::adamw_step(&mut p1, &g, &mut m1, &mut v1, &hy, h.step, 0.5);
        let got = c.down::<f32>(&bp1, n)?;
        c.cmp("adamw_f32", &shape, "param nomask", &got, &p1, TOL_F32);
        let got = c.down::<bf16>(&b16, n)?;
        c.cmp("adamw_f32", &shape, "bf16 copy", &got, &p1, TOL_BF16);
        Ok(())
    });
}
