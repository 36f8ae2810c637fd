//! `retrom3 selftest`: every kernel of kernels/*.cu against its CPU reference (`device::cpu`) on
//! fresh random inputs of several shapes (odd sizes, rows that are not a multiple of the block,
//! f32 and bf16 storage), forward and backward — llm.c's dev/cuda validation, run on the device
//! the trainer uses. The checks only need a [`KernelDevice`] (launch + copy), so the same code
//! runs on the emulator now and on CUDA once its runtime exists.
//!
//! Rule (llm.c's, scaled to the tensor): an element passes when
//! `|got - ref| <= max(atol * max|ref|, floor) + rtol * |ref|`; non-finite reference values are
//! skipped.

mod attention;
mod checks;
pub mod encoder;
mod m3;
mod m3_step;
mod retromae;

use crate::device::launch::KernelDevice;
use crate::device::Device;
use crate::error::Result;
use std::fmt;
use std::time::{Duration, Instant};

/// One compared output of one kernel on one shape.
#[derive(Clone, Debug)]
pub struct SelftestRow {
    /// Kernel name as in kernels/*.cu (`layernorm_fwd_bf16`).
    pub kernel: String,
    /// The shape tested (`37x300`).
    pub shape: String,
    /// Which output was compared (`y`, `dgamma`, ...).
    pub output: String,
    pub max_abs_err: f64,
    /// Largest |got - ref| / |ref| over elements with |ref| above the absolute tolerance.
    pub max_rel_err: f64,
    /// Elements outside the tolerance.
    pub mismatches: usize,
    /// The first mismatch, e.g. `[17] got 0.1 want 0.3`.
    pub first_mismatch: Option<String>,
    /// Whether the row failed to run at all (launch error): the error text.
    pub error: Option<String>,
}

impl SelftestRow {
    /// True when the kernel ran and every element was within tolerance.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.mismatches == 0
    }
}

/// The result of a selftest run.
#[derive(Clone, Debug)]
pub struct SelftestReport {
    pub device: Device,
    /// The seed of the random inputs (rerun with [`run_with_seed`] to reproduce).
    pub seed: u64,
    pub quick: bool,
    pub rows: Vec<SelftestRow>,
    pub elapsed: Duration,
    /// A remark instead of rows (e.g. nothing to compare on the CPU).
    pub note: Option<String>,
}

impl SelftestReport {
    /// True when every row passed.
    pub fn all_passed(&self) -> bool {
        self.rows.iter().all(SelftestRow::passed)
    }
    /// The failing rows.
    pub fn failures(&self) -> Vec<&SelftestRow> {
        self.rows.iter().filter(|r| !r.passed()).collect()
    }
}

impl fmt::Display for SelftestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "selftest on {} ({}, seed {}): {} rows in {:.2} s",
            self.device,
            if self.quick { "quick" } else { "full" },
            self.seed,
            self.rows.len(),
            self.elapsed.as_secs_f64()
        )?;
        if let Some(note) = &self.note {
            writeln!(f, "{note}")?;
        }
        if self.rows.is_empty() {
            return Ok(());
        }
        let kw = self
            .rows
            .iter()
            .map(|r| r.kernel.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let sw = self
            .rows
            .iter()
            .map(|r| r.shape.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let ow = self
            .rows
            .iter()
            .map(|r| r.output.len())
            .max()
            .unwrap_or(6)
            .max(6);
        writeln!(
            f,
            "{:kw$}  {:sw$}  {:ow$}  {:>10}  {:>10}  result",
            "kernel", "shape", "output", "max_abs", "max_rel"
        )?;
        for r in &self.rows {
            let result = match (&r.error, &r.first_mismatch) {
                (Some(e), _) => format!("ERROR {e}"),
                (None, Some(m)) => format!("FAIL ({} bad, first {m})", r.mismatches),
                (None, None) => "ok".to_string(),
            };
            writeln!(
                f,
                "{:kw$}  {:sw$}  {:ow$}  {:>10.3e}  {:>10.3e}  {result}",
                r.kernel, r.shape, r.output, r.max_abs_err, r.max_rel_err
            )?;
        }
        let bad = self.failures().len();
        if bad == 0 {
            write!(f, "all {} rows passed", self.rows.len())
        } else {
            write!(f, "{bad} of {} rows FAILED", self.rows.len())
        }
    }
}

/// Tolerances of one comparison (see the module rule); `floor` is a lower bound of the absolute
/// term for outputs whose reference is itself only accurate to an absolute error (e.g. GELU's
/// erf fit, 1.2e-7).
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
    pub floor: f64,
}

impl Tol {
    /// The same tolerance with an absolute floor.
    pub fn with_floor(self, floor: f64) -> Tol {
        Tol { floor, ..self }
    }
}

/// f32 outputs (and f32 accumulators of bf16 kernels).
pub const TOL_F32: Tol = Tol {
    atol: 2e-5,
    rtol: 2e-4,
    floor: 0.0,
};
/// bf16 outputs: 8 mantissa bits, so rounding alone is up to 2^-9 relative.
pub const TOL_BF16: Tol = Tol {
    atol: 2e-3,
    rtol: 1e-2,
    floor: 0.0,
};

/// Compare `got` against the reference `want` under `tol`.
pub fn compare(
    kernel: &str,
    shape: &str,
    output: &str,
    got: &[f32],
    want: &[f32],
    tol: Tol,
) -> SelftestRow {
    let mut row = SelftestRow {
        kernel: kernel.to_string(),
        shape: shape.to_string(),
        output: output.to_string(),
        max_abs_err: 0.0,
        max_rel_err: 0.0,
        mismatches: 0,
        first_mismatch: None,
        error: None,
    };
    if got.len() != want.len() {
        row.error = Some(format!("length {} vs reference {}", got.len(), want.len()));
        return row;
    }
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, &v| m.max((v as f64).abs()));
    let abs_tol = (tol.atol * scale).max(tol.floor).max(f64::MIN_POSITIVE);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !w.is_finite() {
            // A non-finite reference value must be met exactly: NaN by a NaN (either sign), an
            // infinity by the same infinity.
            if !(w.is_nan() && g.is_nan() || w == g) {
                row.mismatches += 1;
                if row.first_mismatch.is_none() {
                    row.first_mismatch = Some(format!("[{i}] got {g:.6e} want {w:.6e}"));
                }
            }
            continue;
        }
        let (g, w) = (g as f64, w as f64);
        let err = if g.is_finite() {
            (g - w).abs()
        } else {
            f64::INFINITY
        };
        row.max_abs_err = row.max_abs_err.max(err);
        if w.abs() > abs_tol {
            row.max_rel_err = row.max_rel_err.max(err / w.abs());
        }
        if err > abs_tol + tol.rtol * w.abs() {
            row.mismatches += 1;
            if row.first_mismatch.is_none() {
                row.first_mismatch = Some(format!("[{i}] got {g:.6e} want {w:.6e}"));
            }
        }
    }
    row
}

/// Run the selftest on `device` with a fresh seed (`quick`: the small shapes CI uses).
pub fn run(device: Device, quick: bool) -> Result<SelftestReport> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x5EED, |d| d.as_nanos() as u64);
    run_with_seed(device, quick, seed)
}

/// Run the selftest on `device` with the given input seed.
pub fn run_with_seed(device: Device, quick: bool, seed: u64) -> Result<SelftestReport> {
    match device {
        Device::Cpu => Ok(SelftestReport {
            device,
            seed,
            quick,
            rows: Vec::new(),
            elapsed: Duration::ZERO,
            note: Some(
                "the CPU engine is the reference itself: nothing to compare (use --device emu \
                 or --device cuda)"
                    .into(),
            ),
        }),
        Device::Emu => run_emu(quick, seed),
        Device::Cuda(ordinal) => run_cuda(ordinal, quick, seed),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda(ordinal: usize, quick: bool, seed: u64) -> Result<SelftestReport> {
    crate::device::cuda::selftest::run(ordinal, quick, seed)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_ordinal: usize, _quick: bool, _seed: u64) -> Result<SelftestReport> {
    Err(crate::error::Error::FeatureMissing("cuda"))
}

#[cfg(feature = "emu")]
fn run_emu(quick: bool, seed: u64) -> Result<SelftestReport> {
    run_on(&crate::device::emu::EmuDevice::try_new()?, quick, seed)
}

#[cfg(not(feature = "emu"))]
fn run_emu(_quick: bool, _seed: u64) -> Result<SelftestReport> {
    Err(crate::error::Error::FeatureMissing("emu"))
}

/// Run every check on a device that can launch kernels and copy memory.
pub fn run_on(dev: &dyn KernelDevice, quick: bool, seed: u64) -> Result<SelftestReport> {
    let start = Instant::now();
    let mut rows = checks::all(dev, quick, seed)?;
    rows.extend(m3::all(dev, quick, seed)?);
    rows.extend(encoder::kernel_rows(dev, quick, seed)?);
    rows.extend(encoder::model_rows(dev, quick, seed)?);
    rows.extend(encoder::topk_rows(dev, quick, seed)?);
    rows.extend(m3_step::rows(dev, quick, seed)?);
    rows.extend(retromae::rows(dev, quick, seed)?);
    rows.extend(retromae::step_rows(dev, quick, seed)?);
    Ok(SelftestReport {
        device: dev.device(),
        seed,
        quick,
        rows,
        elapsed: start.elapsed(),
        note: None,
    })
}
