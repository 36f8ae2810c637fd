//! The emulated device (feature `emu`): every kernel of kernels/*.cu, compiled as host C++, must
//! agree with the CPU reference on the quick selftest shapes; and the harness must catch broken
//! kernels (a mutant built from kernels/loss.cu with the block reductions' __syncthreads removed,
//! one of kernels/attention.cu that skips the last partial key tile, one that reads a cp.async
//! tile before its wait, one that refills a cp.async buffer other warps still read (caught under
//! the warp-serial schedules), one of kernels/maxsim.cu that skips the last partial passage tile,
//! and launches the GPU would refuse are errors).
#![cfg(feature = "emu")]

use retrom3::device::emu::{self, EmuDevice, Schedule};
use retrom3::device::launch::{KernelArgs, LaunchConfig, Launcher};
use retrom3::selftest;

#[test]
fn quick_selftest_passes_on_the_emulator() {
    let report = selftest::run(retrom3::Device::Emu, true).unwrap();
    println!("{report}");
    assert!(report.rows.len() > 100, "{} rows", report.rows.len());
    assert!(report.all_passed(), "{report}");
}

/// Every kernel is checked, and a seed of 2^63 or more works as well as a small one (an `as i64`
/// of the seed made an LM-head target -1 and failed the run as if a kernel were wrong).
#[test]
fn every_kernel_has_a_selftest_row() {
    let report = selftest::run_with_seed(retrom3::Device::Emu, true, u64::MAX).unwrap();
    assert!(report.all_passed(), "{report}");
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

/// Runs the quick selftest with `kernel` replaced by its `mutant_<tag>_` build: the mutant must
/// fail some row, and only the rows of `kernel` or of `also` (whole steps that run it) may fail.
fn only_the_mutant_fails(kernel: &str, tag: &str, seed: u64, also: &[&str]) {
    only_the_mutant_fails_under(Schedule::Lockstep, kernel, tag, seed, also)
}

/// [`only_the_mutant_fails`] with the block's threads taking turns as `schedule` says.
fn only_the_mutant_fails_under(
    schedule: Schedule,
    kernel: &str,
    tag: &str,
    seed: u64,
    also: &[&str],
) {
    let dev = EmuDevice::new()
        .with_schedule(schedule)
        .substitute(kernel, &format!("mutant_{tag}_{kernel}"));
    let report = selftest::run_on(&dev, true, seed).unwrap();
    let bad: Vec<_> = report.failures();
    assert!(
        bad.iter().any(|r| r.kernel == kernel),
        "the mutant passed the kernel's own rows"
    );
    assert!(
        bad.iter()
            .all(|r| r.kernel == kernel || also.contains(&r.kernel.as_str())),
        "only the mutated kernel may fail: {:?}",
        bad.iter().map(|r| &r.kernel).collect::<Vec<_>>()
    );
}

#[test]
fn dropped_last_key_tile_is_caught() {
    // The mutant computes the number of 32-wide key tiles as Lk / 32 (an off-by-one in the tile
    // bound): the keys of the last partial tile are never seen, which every odd length exposes.
    only_the_mutant_fails("attention_fwd_d64_f32", "attn", 13, &[]);
}

#[test]
fn reading_a_tile_still_in_flight_is_caught() {
    // The mutant waits for one cp.async group too few in the double-buffered attention forward:
    // from the second key tile on it reads a tile whose copies have not landed (the emulator
    // holds NaN there until the wait), which every case with more than one key tile exposes.
    only_the_mutant_fails("attention_fwd_tcdb_d32_bf16", "attn", 17, &[]);
}

#[test]
fn refilling_a_buffer_still_being_read_is_caught() {
    // The mutant drops the double-buffered two-stream forward's trailing barrier: a warp that
    // finishes tile t issues tile t + 2's copies into the buffer the other warps still read for
    // tile t. In lockstep the warps advance together and it passes; each warp-serial schedule
    // lets one warp run a whole tile ahead (the copy's NaN fill lands in the readers' tile).
    for schedule in [Schedule::WarpSerial, Schedule::WarpSerialReverse] {
        only_the_mutant_fails_under(
            schedule,
            "attention_fwd_tcdb_twostream_d32_bf16",
            "attn",
            17,
            &[],
        );
    }
}

/// Every kernel passes under every schedule (a race between warps that one order hides,
/// another shows).
#[test]
fn quick_selftest_passes_under_every_schedule() {
    for schedule in [
        Schedule::Reverse,
        Schedule::WarpSerial,
        Schedule::WarpSerialReverse,
    ] {
        let dev = EmuDevice::new().with_schedule(schedule);
        let report = selftest::run_on(&dev, true, 23).unwrap();
        let bad: Vec<_> = report.failures().iter().map(|r| r.kernel.clone()).collect();
        assert!(bad.is_empty(), "{schedule:?}: {bad:?}");
    }
}

#[test]
fn dropped_last_passage_tile_is_caught() {
    // The MaxSim mutant stops at the last full 128-token passage tile: every passage shorter than
    // 128 tokens (or with a partial last tile) loses tokens, so its scores and argmax change.
    // The f32 whole-M3-step rows run the same kernel, so they fail with it; nothing else may.
    only_the_mutant_fails("maxsim_fwd_f32", "mstiles", 17, &["m3_step_f32"]);
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

/// The tensor-core attention kernels load K/V (and Q/dO) tiles 16 bytes at a time: a q, k or v
/// that is only 8-byte aligned is refused by name when the tensor cores are asked for, and the
/// default path (`attention_fwd`) takes the CUDA-core kernel for it, with the same output as on
/// aligned copies of the inputs.
#[test]
fn misaligned_attention_inputs_avoid_the_tensor_cores() {
    use half::bf16;
    use retrom3::device::cpu::attention::AttnDims;
    use retrom3::device::kernels::{self as k, AttnImpl, AttnKernelMask};
    use retrom3::device::launch::{DevPtr, KDType, KernelDevice};
    let dev = EmuDevice::new();
    // One head of D = 32: a row is 64 bytes, so the view from element 4 is 8-byte aligned only.
    let d = AttnDims {
        batch: 1,
        q_len: 5,
        k_len: 7,
        heads: 1,
        head_dim: 32,
    };
    let vals = |n: usize, s: f32| -> Vec<bf16> {
        (0..n)
            .map(|i| bf16::from_f32((i as f32 * s).sin() * 0.5))
            .collect()
    };
    let up = |v: &[bf16], pad: usize| {
        let mut p = vec![bf16::ZERO; pad];
        p.extend_from_slice(v);
        dev.upload(bytemuck::cast_slice(&p)).unwrap()
    };
    let (q, kk, v) = (vals(5 * 32, 0.37), vals(7 * 32, 0.91), vals(7 * 32, 1.3));
    let mask = AttnKernelMask::KeyPadding {
        key_mask: DevPtr::NULL,
    };
    let run = |imp: Option<AttnImpl>, pad: usize| {
        let (bq, bk, bv) = (up(&q, pad), up(&kk, pad), up(&v, pad));
        let at = |b: &retrom3::device::launch::DevBuf| DevPtr(b.ptr.0 + 2 * pad as u64);
        let out = dev.alloc_zeroed(5 * 32 * 2).unwrap();
        let lse = dev.alloc_zeroed(5 * 4).unwrap();
        // None: the kernel attention_fwd picks for these pointers.
        let imp = imp.unwrap_or(k::attention_fwd_default(
            KDType::BF16,
            32,
            at(&bq),
            at(&bk),
            at(&bv),
            out.ptr,
        ));
        // SAFETY: q [5, 32], k and v [7, 32] bf16 from the views; out [5, 32] bf16, lse [5] f32.
        let r = unsafe {
            k::attention_fwd_with(
                &dev,
                imp,
                KDType::BF16,
                at(&bq),
                at(&bk),
                at(&bv),
                out.ptr,
                lse.ptr,
                mask,
                &d,
                0.2,
                None,
            )
        };
        r.map(|()| {
            let mut o = vec![0u8; 5 * 32 * 2];
            dev.download(&out, &mut o).unwrap();
            o
        })
    };
    let err = run(Some(AttnImpl::TensorCores), 4).unwrap_err();
    assert!(err.to_string().contains("16-byte aligned"), "{err}");
    let misaligned = run(None, 4).unwrap();
    let aligned_cc = run(Some(AttnImpl::CudaCores), 0).unwrap();
    assert_eq!(misaligned, aligned_cc);
    // The aligned default takes the tensor cores (bf16 rounding of P: close, not equal).
    assert!(run(None, 0).is_ok());
    let (a, m) = (DevPtr(1 << 20), DevPtr((1 << 20) + 8));
    assert_ne!(
        k::attention_fwd_default(KDType::BF16, 32, a, a, a, m),
        AttnImpl::CudaCores
    );
    assert_eq!(
        k::attention_fwd_default(KDType::BF16, 32, a, m, a, a),
        AttnImpl::CudaCores
    );
    // The output is stored a bf16 pair at a time: 4-byte aligned, or the CUDA cores.
    assert_eq!(
        k::attention_fwd_default(KDType::BF16, 32, a, a, a, DevPtr((1 << 20) + 2)),
        AttnImpl::CudaCores
    );
}
