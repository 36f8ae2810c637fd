//! `retrom3 bench`'s size flags are checked before any device work: each bad value is a one-line
//! error naming the flag (exit 1), not a panic in the synthetic texts (`--vocab 5` divided by
//! zero), a failure deep in a row, or a whole run lost to a --json path that cannot be written.

use std::process::Command;

fn bench(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run retrom3");
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn bad_bench_sizes_are_named_before_the_run() {
    let missing = std::env::temp_dir().join(format!("retrom3-no-such-dir-{}", std::process::id()));
    let json = missing.join("rows.json");
    let json = json.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["model", "--vocab", "5"], &["--vocab 5", "at least 6"]),
        (&["max-batch", "--vocab", "0"], &["--vocab 0"]),
        (&["model", "--batch", "0"], &["--batch 0"]),
        (&["model", "--iters", "0"], &["--iters 0"]),
        (&["model", "--seq", "2"], &["--seq 2", "at least 3"]),
        (
            &["model", "--seq", "18446744073709551615"],
            &["18446744073709551615 tokens per text", "too large"],
        ),
        (&["model", "--json", json], &["--json", "does not exist"]),
        (&["max-batch", "--cap", "0"], &["--cap 0"]),
        (&["max-batch", "--budget-s", "nan"], &["--budget-s NaN"]),
        (&["max-batch", "--budget-s", "0"], &["--budget-s 0"]),
        (
            &["max-batch", "--seq-lens", "8,0"],
            &["--seq-lens", "0 tokens"],
        ),
        (
            &["max-batch", "--json", json],
            &["--json", "does not exist"],
        ),
        (
            &["kernels", "--device", "emu"],
            &["--device emu", "--quick"],
        ),
        (
            &["kernels", "--device", "emu", "--quick", "--seq-lens", "0"],
            &["sequence length 0", "must divide"],
        ),
        (&["kernels", "--iters", "0"], &["--iters 0"]),
        (&["kernels", "--quick", "--json", json], &["--json"]),
    ];
    for (args, needles) in cases {
        let (code, err) = bench(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("retrom3: error: "), "{args:?}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{args:?}: {n:?} not in {err}");
        }
    }
}

/// The library's benchmarks refuse the same sizes (programs that link it skip the CLI).
#[cfg(feature = "emu")]
#[test]
fn library_benchmarks_refuse_a_vocabulary_without_synthetic_ids() {
    use retrom3::device::launch::KDType;
    use retrom3::engine::bench;
    let cfg = retrom3::EncoderConfig::new_xlmr(5, 32, 1, 2, 64, 34).unwrap();
    let dev = retrom3::engine::open(retrom3::Device::Emu).unwrap();
    let e = bench::max_batch(&*dev, cfg.clone(), &[8], &[0], 4, 1.0, KDType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab_size 5"), "{e}");
    let e = bench::model(&*dev, cfg, 1, 8, 1, KDType::F32, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab_size 5"), "{e}");
}
