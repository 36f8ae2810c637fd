//! The quickstart end to end on the bundled demo set (data/demo).
//!
//! At CI size (`QuickstartSize::Small`: 1 layer, hidden 32, 10 + 60 steps, 100 test queries over
//! 300 documents) the test checks the report files and that fine-tuning improves the dense+sparse
//! hybrid over the untrained (random-init) model on the test split. The full-size run (the
//! README's command) is the #[ignore]d test below.

use retrom3::quickstart::{default_data_dir, run, QuickstartSize};
use retrom3::retrieval::Mode;
use retrom3::Device;

fn check(size: QuickstartSize, name: &str) -> retrom3::quickstart::QuickstartReport {
    let out =
        std::env::temp_dir().join(format!("retrom3-quickstart-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let r = run(size, Device::Cpu, &default_data_dir(), &out, &mut |l| {
        eprintln!("{l}")
    })
    .unwrap();
    for f in [
        "results.json",
        "summary.md",
        "pretrain_metrics.svg",
        "finetune_metrics.svg",
        "tokenizer/tokenizer.json",
        "finetune/model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    for m in ["dense", "sparse", "colbert", "dense+sparse", "all"] {
        for which in ["untrained", "finetuned"] {
            let v = results["results"][which][m]["ndcg@10"].as_f64();
            assert!(
                v.is_some_and(|x| (0.0..=1.0).contains(&x)),
                "{which} {m}: {v:?}"
            );
        }
    }
    assert!(results["results"]["bm25"]["ndcg@10"].as_f64().unwrap() > 0.0);
    eprintln!("{}", retrom3::quickstart::table(&r));
    let (ft, un) = (
        r.ndcg(true, Mode::DenseSparse).unwrap(),
        r.ndcg(false, Mode::DenseSparse).unwrap(),
    );
    assert!(ft > un, "fine-tuned hybrid nDCG@10 {ft} <= untrained {un}");
    let _ = std::fs::remove_dir_all(&out);
    r
}

#[test]
fn quickstart_small_trains_and_reports() {
    check(QuickstartSize::Small, "small");
}

/// The README's run (minutes in release: `cargo test --release --test quickstart -- --ignored`).
#[test]
#[ignore]
fn quickstart_full_size() {
    check(QuickstartSize::Full, "full");
}

/// The trained tokenizer has XLM-R's special-token layout, and training is reproducible: a
/// second training on the same texts (in the same process, so the tokenizers crate's hash maps
/// get other random seeds) writes the same file, byte for byte (SPEC 11.9: the crate's own
/// `Tokenizer::train` does not).
#[test]
fn trained_tokenizer_has_xlmr_layout() {
    let texts: Vec<String> = std::fs::read_to_string(default_data_dir().join("pretrain.txt"))
        .unwrap()
        .lines()
        .take(200)
        .map(String::from)
        .collect();
    let dir = std::env::temp_dir().join(format!("retrom3-qs-tok-{}", std::process::id()));
    retrom3::quickstart::train_tokenizer(&texts, 2000, &dir).unwrap();
    let first = std::fs::read(dir.join("tokenizer.json")).unwrap();
    for _ in 0..2 {
        retrom3::quickstart::train_tokenizer(&texts, 2000, &dir).unwrap();
        let again = std::fs::read(dir.join("tokenizer.json")).unwrap();
        assert!(
            first == again,
            "a second training gave another tokenizer.json"
        );
    }
    let tok = retrom3::data::TextTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 2000);
    let ids = tok.encode("Redirect directive", 16).unwrap();
    assert_eq!(
        (ids[0], *ids.last().unwrap()),
        (0, 2),
        "<s> ... </s>: {ids:?}"
    );
    assert!(ids[1..ids.len() - 1].iter().all(|&t| t > 3 && t < 1999));
    let mask = tok.encode("<mask>", 8).unwrap();
    assert_eq!(mask, vec![0, 1999, 2]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Data too small to train on is an error naming the file, found before any training (the
/// fine-tuning rows and the test split are read first).
#[test]
fn too_little_data_names_the_file() {
    let base = std::env::temp_dir().join(format!("retrom3-qs-data-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let demo = default_data_dir();
    let copy = |tag: &str| {
        let d = base.join(tag);
        std::fs::create_dir_all(d.join("qrels")).unwrap();
        for f in [
            "corpus.jsonl",
            "queries.jsonl",
            "pretrain.txt",
            "train.jsonl",
        ] {
            std::fs::copy(demo.join(f), d.join(f)).unwrap();
        }
        std::fs::copy(demo.join("qrels/test.tsv"), d.join("qrels/test.tsv")).unwrap();
        d
    };
    let first_lines = |p: &std::path::Path, n: usize| {
        let t = std::fs::read_to_string(p).unwrap();
        let head: Vec<&str> = t.lines().take(n).collect();
        std::fs::write(p, head.join("\n") + "\n").unwrap();
    };
    let run_on = |d: &std::path::Path| {
        let out = d.join("out");
        match run(QuickstartSize::Small, Device::Cpu, d, &out, &mut |_| {}) {
            Ok(_) => panic!("{} trained", d.display()),
            Err(e) => e.to_string(),
        }
    };
    let d = copy("pre");
    first_lines(&d.join("pretrain.txt"), 3);
    let e = run_on(&d);
    assert!(e.contains("pretrain.txt: 3 non-empty lines"), "{e}");
    assert!(!d.join("out/pretrain").exists(), "{e}");
    let d = copy("train");
    first_lines(&d.join("train.jsonl"), 1);
    let e = run_on(&d);
    assert!(e.contains("train.jsonl: 1 training examples"), "{e}");
    assert!(!d.join("out/tokenizer").exists(), "{e}");
    let d = copy("queries");
    std::fs::write(d.join("queries.jsonl"), "").unwrap();
    let e = run_on(&d);
    assert!(e.contains("queries.jsonl"), "{e}");
    assert!(!d.join("out/tokenizer").exists(), "{e}");
    let _ = std::fs::remove_dir_all(&base);
}

/// A step count of 0 is refused as the trainers refuse it (it used to become 1 silently), and
/// an --output that is a file is named before any work.
#[test]
fn quickstart_cli_refuses_zero_steps_and_a_file_output() {
    let d = std::env::temp_dir().join(format!("retrom3-qs-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let file = d.join("afile");
    std::fs::write(&file, "keep").unwrap();
    let run = |args: &[&str], out: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
            .args(["quickstart", "--small", "--output"])
            .arg(out)
            .args(args)
            .output()
            .unwrap()
    };
    for (args, out, want) in [
        (
            ["--pretrain-steps", "0"],
            d.join("o"),
            "--pretrain-steps 0: must be >= 1",
        ),
        (
            ["--finetune-steps", "0"],
            d.join("o"),
            "--finetune-steps 0: must be >= 1",
        ),
        (
            ["--finetune-steps", "1"],
            file.clone(),
            "exists and is not a directory",
        ),
    ] {
        let o = run(&args, &out);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.contains(want), "{e}");
        // The error is the only line (no header for a run that does not start).
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    }
    assert!(!d.join("o").exists());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    let _ = std::fs::remove_dir_all(&d);
}
