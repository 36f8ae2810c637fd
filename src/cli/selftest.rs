//! `retrom3 selftest`: every kernel on the device against the CPU reference on fresh random
//! inputs, forward and backward, printed as a table. Exit status: 0 all passed, 1 a mismatch,
//! 2 the device is not available in this build or on this machine.

use clap::Args;
use retrom3::{Device, Error, Result};

#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// cuda[:N] (a GPU) or emu (the kernels compiled for the CPU; `emu` feature). Not cpu: the
    /// CPU is the reference the kernels are compared with.
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    /// Fewer and smaller shapes (the CI setting).
    #[arg(long)]
    pub quick: bool,
    /// Seed of the random inputs (default: a fresh one, printed).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// The device cannot run here (no driver, no GPU, not in this build): one line, exit 2.
fn is_unavailable(e: &Error) -> bool {
    matches!(
        e,
        Error::NoCudaDriver
            | Error::CudaUnavailable(_)
            | Error::FeatureMissing(_)
            | Error::Unsupported { .. }
    )
}

fn unavailable(e: Error) -> ! {
    eprintln!("retrom3: error: {e}");
    std::process::exit(if is_unavailable(&e) { 2 } else { 1 });
}

#[cfg(feature = "cuda")]
fn describe_cuda(ordinal: usize) -> Result<String> {
    Ok(retrom3::device::cuda::CudaDevice::new(ordinal)?.describe())
}

#[cfg(not(feature = "cuda"))]
fn describe_cuda(_ordinal: usize) -> Result<String> {
    Err(Error::FeatureMissing("cuda"))
}

pub fn run(a: SelftestArgs) -> Result<()> {
    if a.device == Device::Cpu {
        // Nothing to compare: the CPU is the reference (it used to pass "all 0 rows").
        return Err(Error::invalid(
            "--device cpu: the selftest compares a device's kernels with the CPU reference; \
             use --device cuda[:N] or emu",
        ));
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    if let Device::Cuda(ordinal) = a.device {
        // What was loaded, from where, before any kernel runs (so it is in the log even when a
        // kernel faults): device, driver and libcuda, libcublas, kernel build.
        match describe_cuda(ordinal) {
            Ok(text) => outln!("{text}"),
            Err(e) => unavailable(e),
        }
    }
    let schedule = match (a.device, std::env::var("R3EMU_SCHEDULE")) {
        (Device::Emu, Ok(v)) if !v.is_empty() => format!(", emulator schedule {v}"),
        _ => String::new(),
    };
    eprintln!("selftest on {} (seed {seed}{schedule})", a.device);
    let report = match retrom3::selftest::run_with_seed(a.device, a.quick, seed) {
        Ok(r) => r,
        Err(e) if is_unavailable(&e) => unavailable(e),
        Err(e) => return Err(e),
    };
    outln!("{report}");
    if !report.all_passed() {
        std::process::exit(1);
    }
    Ok(())
}
