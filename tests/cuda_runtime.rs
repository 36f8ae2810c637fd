//! The CUDA runtime on a machine without an NVIDIA driver (the CPU machines and CI): opening a
//! GPU is a clean `Error::NoCudaDriver`, never a panic inside cudarc, and `retrom3 selftest
//! --device cuda` says so in one line and exits 2. On a machine with a driver these tests check
//! nothing (tools/gpu-check.sh runs the real selftest there).
#![cfg(feature = "cuda")]

use retrom3::device::cuda::{driver_present, CudaDevice};
use retrom3::{Device, Error};
use std::process::Command;

#[test]
fn selftest_without_a_driver_is_no_cuda_driver() {
    if driver_present() {
        eprintln!("libcuda is present: skipping the no-driver check");
        return;
    }
    match retrom3::selftest::run(Device::Cuda(0), true) {
        Err(Error::NoCudaDriver) => {}
        other => panic!("expected Err(NoCudaDriver), got {other:?}"),
    }
    assert!(matches!(CudaDevice::new(3), Err(Error::NoCudaDriver)));
}

#[test]
fn cli_selftest_without_a_driver_exits_2_with_one_line() {
    if driver_present() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .args(["selftest", "--device", "cuda", "--quick"])
        .output()
        .expect("run retrom3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr: {stderr}");
    assert!(
        lines[0].starts_with("retrom3: error: no CUDA driver"),
        "{stderr}"
    );
}
