//! The selftest on a GPU: the device-agnostic checks of `crate::selftest` (the same rows as on
//! the emulator) plus the rows only CUDA has: cuBLAS GEMMs (f32 and bf16 storage) against the CPU
//! `sgemm` on the same random inputs.

use super::CudaDevice;
use crate::device::cpu::gemm::{sgemm, Trans};
use crate::device::launch::{download, upload, KernelDevice};
use crate::error::Result;
use crate::selftest::{compare, run_on, SelftestReport, SelftestRow, TOL_BF16, TOL_F32};
use half::bf16;
use std::time::Instant;

/// Open `cuda:<ordinal>` and run every check on it.
pub fn run(ordinal: usize, quick: bool, seed: u64) -> Result<SelftestReport> {
    let dev = CudaDevice::new(ordinal)?;
    let mut report = run_on(&dev, quick, seed)?;
    let start = Instant::now();
    report.rows.extend(gemm_rows(&dev, quick, seed));
    report.elapsed += start.elapsed();
    let stats = dev.memory_stats();
    report.note = Some(format!(
        "{}\nallocator: {} cuMemAlloc, {} reuses, peak {:.1} MiB",
        dev.info().summary(),
        stats.driver_allocs,
        stats.reuses,
        stats.peak_bytes as f64 / (1 << 20) as f64
    ));
    Ok(report)
}

/// splitmix64 normals, seeded from the report's seed (offset so the GEMM inputs differ from the
/// kernel checks' first inputs).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn normal(&mut self) -> f32 {
        let u = |r: &mut Rng| ((r.next() >> 40) as f64 + 0.5) / (1u64 << 24) as f64;
        let (u1, u2) = (u(self), u(self));
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// (m, k, n, op(A), op(B), alpha, beta): odd sizes, every transpose, beta = 0 and accumulation.
type GemmCase = (usize, usize, usize, Trans, Trans, f32, f32);

fn gemm_cases(quick: bool) -> Vec<GemmCase> {
    let mut cases = vec![
        (37, 29, 45, Trans::N, Trans::N, 1.0, 0.0),
        (64, 96, 128, Trans::N, Trans::T, 1.0, 0.0),
        (33, 65, 17, Trans::T, Trans::N, 0.5, 1.0),
        (1, 300, 7, Trans::T, Trans::T, 1.0, 0.0),
    ];
    if !quick {
        cases.push((512, 1024, 768, Trans::N, Trans::T, 1.0, 0.0));
        cases.push((257, 768, 3072, Trans::N, Trans::N, 1.0, 0.5));
        cases.push((1024, 511, 1024, Trans::T, Trans::N, 0.125, 0.0));
    }
    cases
}

fn trans_name(t: Trans) -> &'static str {
    match t {
        Trans::N => "n",
        Trans::T => "t",
    }
}

/// One row per GEMM case and storage dtype.
fn gemm_rows(dev: &CudaDevice, quick: bool, seed: u64) -> Vec<SelftestRow> {
    let mut rng = Rng(seed ^ 0x6E44_B1A5);
    let mut rows = Vec::new();
    for (m, k, n, ta, tb, alpha, beta) in gemm_cases(quick) {
        let shape = format!("{m}x{k}x{n} {}{}", trans_name(ta), trans_name(tb));
        let a = rng.vec(m * k);
        let b = rng.vec(k * n);
        let c0 = rng.vec(m * n);
        for bf in [false, true] {
            let kernel = if bf {
                "gemm_bf16 (cuBLAS)"
            } else {
                "gemm_f32 (cuBLAS)"
            };
            // The reference sees exactly the (rounded) values the GPU sees.
            let round = |v: &[f32]| -> Vec<f32> {
                if bf {
                    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
                } else {
                    v.to_vec()
                }
            };
            let (ar, br, cr) = (round(&a), round(&b), round(&c0));
            let mut want = cr.clone();
            sgemm(ta, tb, m, k, n, alpha, &ar, &br, beta, &mut want);
            let got = if bf {
                run_gemm_bf16(dev, (m, k, n, ta, tb, alpha, beta), &ar, &br, &cr)
            } else {
                run_gemm_f32(dev, (m, k, n, ta, tb, alpha, beta), &ar, &br, &cr)
            };
            let tol = if bf { TOL_BF16 } else { TOL_F32 };
            rows.push(match got {
                Ok(got) => compare(kernel, &shape, "c", &got, &want, tol),
                Err(e) => {
                    let mut row = compare(kernel, &shape, "-", &[], &[], tol);
                    row.error = Some(e.to_string());
                    row
                }
            });
        }
    }
    rows
}

fn run_gemm_f32(
    dev: &CudaDevice,
    g: GemmCase,
    a: &[f32],
    b: &[f32],
    c: &[f32],
) -> Result<Vec<f32>> {
    let (m, k, n, ta, tb, alpha, beta) = g;
    let blas = dev.blas()?;
    let (da, db, dc) = (upload(dev, a)?, upload(dev, b)?, upload(dev, c)?);
    // SAFETY: da, db, dc hold m·k, k·n and m·n f32 on this device and do not overlap.
    unsafe { blas.gemm_f32(ta, tb, m, k, n, alpha, da.ptr, db.ptr, beta, dc.ptr)? };
    download::<f32>(dev as &dyn KernelDevice, &dc, m * n)
}

fn run_gemm_bf16(
    dev: &CudaDevice,
    g: GemmCase,
    a: &[f32],
    b: &[f32],
    c: &[f32],
) -> Result<Vec<f32>> {
    let (m, k, n, ta, tb, alpha, beta) = g;
    let blas = dev.blas()?;
    let to_bf = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
    let (da, db, dc) = (
        upload(dev, &to_bf(a))?,
        upload(dev, &to_bf(b))?,
        upload(dev, &to_bf(c))?,
    );
    // SAFETY: da, db, dc hold m·k, k·n and m·n bf16 on this device and do not overlap.
    unsafe { blas.gemm_bf16(ta, tb, m, k, n, alpha, da.ptr, db.ptr, beta, dc.ptr)? };
    Ok(download::<bf16>(dev as &dyn KernelDevice, &dc, m * n)?
        .into_iter()
        .map(bf16::to_f32)
        .collect())
}
