//! The emulated device (feature `emu`): every kernel of kernels/*.cu, compiled as host C++, must
//! agree with the CPU reference on the quick selftest shapes; and the harness must catch broken
//! kernels (a mutant built from kernels/loss.cu with the block reductions' __syncthreads removed,
//! one of kernels/attention.cu that skips the last partial key tile, one of kernels/maxsim.cu that
//! skips the last partial passage tile, and launches the GPU would refuse are errors).
#![cfg(feature = "emu")]

use retrom3::device::emu::{self, EmuDevice};
use retrom3::device::launch::{KernelArgs, LaunchConfig, Launcher};
use retrom3::selftest;

#[test]
fn quick_selftest_passes_on_the_emulator() {
    let report = selftest::run(retrom3::Device::Emu, true).unwrap();
    println!("{report}");
    assert!(report.rows.len() > 100, "{} rows", report.rows.len());
    assert!(report.all_passed(), "{report}");
}

#[test]
fn every_kernel_has_a_selftest_row() {
    let report = selftest::run_with_seed(retrom3::Device::Emu, true, 7).unwrap();
    for name in emu::kernel_names().filter(|n| !n.starts_with("mutant_")) {
        // Reductions that only serve another kernel are checked through it.
        let covered_by = match name {
            "cross_entropy_reduce" => "cross_entropy_fwd_f32",
            "sum_final_f32" => "grad_sumsq_partial_f32",
            n => n,
        };
        assert!(
            report.rows.iter().any(|r| r.kernel == covered_by),
            "kernel {name} has no selftest row"
        );
    }
}

#[test]
fn missing_syncthreads_is_caught() {
    // The mutant's block reductions read the per-warp partials before every warp has written
    // them. One worker thread: the catch must not depend on OS scheduling.
    let dev = EmuDevice::new().with_workers(1).substitute(
        "cross_entropy_fwd_f32",
        "mutant_nosync_cross_entropy_fwd_f32",
    );
    let report = selftest::run_on(&dev, true, 11).unwrap();
    let bad: Vec<_> = report.failures();
    println!("{report}");
    assert!(
        bad.iter().any(|r| r.kernel == "cross_entropy_fwd_f32"),
        "the mutant passed the kernel's own rows"
    );
    // The f32 LM-head and whole-RetroMAE-step rows run the same kernel, so they may fail with
    // it; nothing else may.
    assert!(
        bad.iter().all(|r| matches!(
            r.kernel.as_str(),
            "cross_entropy_fwd_f32" | "lm_head_loss_f32" | "retromae_step_f32"
        )),
        "only the mutated kernel may fail: {:?}",
        bad.iter().map(|r| &r.kernel).collect::<Vec<_>>()
    );
}

#[test]
fn dropped_last_key_tile_is_caught() {
    // The mutant computes the number of 32-wide key tiles as Lk / 32 (an off-by-one in the tile
    // bound): the keys of the last partial tile are never seen, which every odd length exposes.
    let dev = EmuDevice::new().substitute(
        "attention_fwd_d64_f32",
        "mutant_tilebound_attention_fwd_d64_f32",
    );
    let report = selftest::run_on(&dev, true, 13).unwrap();
    let bad: Vec<_> = report.failures();
    assert!(!bad.is_empty(), "the mutant passed the selftest");
    assert!(
        bad.iter().all(|r| r.kernel == "attention_fwd_d64_f32"),
        "only the mutated kernel may fail: {:?}",
        bad.iter().map(|r| &r.kernel).collect::<Vec<_>>()
    );
}

#[test]
fn dropped_last_passage_tile_is_caught() {
    // The MaxSim mutant stops at the last full 128-token passage tile: every passage shorter than
    // 128 tokens (or with a partial last tile) loses tokens, so its scores and argmax change.
    // The f32 whole-M3-step rows run the same kernel, so they fail with it; nothing else may.
    let dev = EmuDevice::new().substitute("maxsim_fwd_f32", "mutant_mstiles_maxsim_fwd_f32");
    let report = selftest::run_on(&dev, true, 17).unwrap();
    let bad: Vec<_> = report.failures();
    assert!(
        bad.iter().any(|r| r.kernel == "maxsim_fwd_f32"),
        "the mutant passed the kernel's own rows"
    );
    assert!(
        bad.iter()
            .all(|r| r.kernel == "maxsim_fwd_f32" || r.kernel == "m3_step_f32"),
        "only the mutated kernel may fail: {:?}",
        bad.iter().map(|r| &r.kernel).collect::<Vec<_>>()
    );
}

#[test]
fn bad_launches_are_errors() {
    let dev = EmuDevice::new().with_workers(1);
    let mut args = KernelArgs::new();
    args.arg(0u64)
        .arg(0u64)
        .arg(0u64)
        .arg(0i32)
        .arg(4i32)
        .arg(1i32);
    let cfg = LaunchConfig {
        grid: [1, 1, 1],
        block: [2048, 1, 1],
        shared_bytes: 0,
    };
    // SAFETY: the launch is rejected for its shape before any pointer is touched.
    let err = unsafe { dev.launch("gather_fwd_f32", &cfg, &mut args) }.unwrap_err();
    assert!(err.to_string().contains("invalid launch shape"), "{err}");
    // SAFETY: no kernel of that name exists; nothing runs.
    let err = unsafe { dev.launch("no_such_kernel", &cfg, &mut args) }.unwrap_err();
    assert!(err.to_string().contains("no_such_kernel"), "{err}");
}

/// `RETROM3_ATTN_BWD=tc` routes every bf16 attention backward at head dims 32 / 64 through the
/// tensor-core kernels: the whole-model rows (device encoder, decoder layer, M3 and RetroMAE
/// steps) then run them and must still pass; a bad value is a one-line error naming the variable.
#[test]
fn tensor_core_backward_in_the_whole_model_rows() {
    let run = |v: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
            .args(["selftest", "--device", "emu", "--quick", "--seed", "19"])
            .env("RETROM3_ATTN_BWD", v)
            .output()
            .expect("run retrom3")
    };
    let o = run("tc");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("rows passed"), "{out}");
    let o = run("fast");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("RETROM3_ATTN_BWD=\"fast\""), "{err}");
}
