//! The CLI contract: `retrom3 encode` / `retrom3 score` outputs, and one-line errors with a
//! non-zero exit code on bad input.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_retrom3"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retrom3-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run retrom3")
}

/// `retrom3 encode --model MODEL --input INPUT --output OUTPUT` + `extra`.
fn encode(model: &Path, input: &Path, output: &Path, extra: &[&str]) -> Output {
    bin()
        .arg("encode")
        .arg("--model")
        .arg(model)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .expect("run retrom3")
}

/// `retrom3 convert --model SRC --output OUT`.
fn convert(src: &Path, out: &Path) -> Output {
    bin()
        .arg("convert")
        .arg("--model")
        .arg(src)
        .arg("--output")
        .arg(out)
        .output()
        .expect("run retrom3")
}

/// A run that must have succeeded (its stderr on failure).
fn expect_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// No temporary (dot) file or directory left in `dir`.
fn assert_no_temporaries(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// A copy of a fixture model directory (flat) at `dst`, to damage.
fn copy_model(name: &str, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in std::fs::read_dir(fixture(name)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn expect_error(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "expected failure, got success");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "error must be one line: {err}"
    );
    assert!(err.starts_with("retrom3: error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn encode_jsonl_all_heads_matches_the_library() {
    let d = tmpdir("enc");
    let input = d.join("in.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"The quick brown fox\"}\n{\"text\": \"北京是中国的首都\"}\n",
    )
    .unwrap();
    let output = d.join("out.jsonl");
    let model = fixture("tiny-xlmr");
    expect_success(&encode(
        &model,
        &input,
        &output,
        &["--dense", "--sparse", "--colbert", "--max-length", "16"],
    ));
    let rows = read_jsonl(&output);
    assert_eq!(rows.len(), 2);
    let lib = retrom3::M3Model::load(&model, retrom3::Device::Cpu).unwrap();
    let want = lib
        .encode(
            &["The quick brown fox", "北京是中国的首都"],
            &retrom3::EncodeOptions {
                max_length: Some(16),
                ..retrom3::EncodeOptions::all()
            },
        )
        .unwrap();
    for (i, row) in rows.iter().enumerate() {
        let obj = row.as_object().unwrap();
        assert_eq!(obj.len(), 3);
        let dense: Vec<f32> = serde_json::from_value(row["dense"].clone()).unwrap();
        assert_eq!(dense, want.dense.as_ref().unwrap()[i]);
        let sparse = row["sparse"].as_object().unwrap();
        let ws = &want.sparse.as_ref().unwrap()[i];
        assert_eq!(sparse.len(), ws.len());
        for (id, w) in ws {
            assert_eq!(sparse[&id.to_string()].as_f64().unwrap() as f32, *w);
        }
        let colbert: Vec<Vec<f32>> = serde_json::from_value(row["colbert"].clone()).unwrap();
        assert_eq!(&colbert, &want.colbert.as_ref().unwrap()[i]);
    }
}

#[test]
fn encode_plain_text_defaults_to_dense_only() {
    let d = tmpdir("plain");
    let input = d.join("in.txt");
    std::fs::write(&input, "first line\nsecond line\n").unwrap();
    let output = d.join("out.jsonl");
    // A batch size over encode's cap (65,535) is cut without the out-of-memory note.
    let o = encode(
        &fixture("tiny-bert"),
        &input,
        &output,
        &["--batch-size", "70000"],
    );
    expect_success(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("out of device memory"), "{err}");
    let rows = read_jsonl(&output);
    assert_eq!(rows.len(), 2);
    for r in rows {
        let o = r.as_object().unwrap();
        assert_eq!(o.keys().collect::<Vec<_>>(), vec!["dense"]);
        let v: Vec<f32> = serde_json::from_value(r["dense"].clone()).unwrap();
        let n: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            (n - 1.0).abs() < 1e-5,
            "normalised by the Normalize module: {n}"
        );
    }
}

#[test]
fn score_writes_five_keys_per_pair() {
    let d = tmpdir("score");
    let pairs = d.join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"query\": \"What is BGE M3?\", \"passage\": \"BGE M3 is an embedding model\"}\n{\"query\": \"BM25\", \"passage\": \"a bag-of-words retrieval function\"}\n",
    )
    .unwrap();
    let output = d.join("scores.jsonl");
    let model = fixture("tiny-xlmr");
    let out = run(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--pairs",
        pairs.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--weights",
        "0.4,0.2,0.4",
        "--max-query-length",
        "12",
        "--max-passage-length",
        "20",
    ]);
    expect_success(&out);
    let rows = read_jsonl(&output);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        for k in [
            "dense",
            "sparse",
            "colbert",
            "sparse+dense",
            "colbert+sparse+dense",
        ] {
            assert!(r[k].is_number(), "{k} missing in {r}");
        }
        let (dn, sp, co) = (
            r["dense"].as_f64().unwrap(),
            r["sparse"].as_f64().unwrap(),
            r["colbert"].as_f64().unwrap(),
        );
        let fused = (0.4 * co + 0.2 * sp + 0.4 * dn) / 1.0;
        assert!((r["colbert+sparse+dense"].as_f64().unwrap() - fused).abs() < 1e-5);
        let sd = (0.2 * sp + 0.4 * dn) / 0.6;
        assert!((r["sparse+dense"].as_f64().unwrap() - sd).abs() < 1e-5);
    }
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let d = tmpdir("bad");
    let model = fixture("tiny-xlmr");
    let m = model.to_str().unwrap();
    let out_path = d.join("out.jsonl");
    let o = out_path.to_str().unwrap();

    let broken = d.join("broken.jsonl");
    std::fs::write(&broken, "{\"text\": \"ok\"}\n{\"text\": oops}\n").unwrap();
    expect_error(
        &encode(&model, &broken, &out_path, &[]),
        &["broken.jsonl:2"],
    );

    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, "{\"text\": \"ok\"}\n{\"text\": \"\"}\n").unwrap();
    expect_error(
        &encode(&model, &empty, &out_path, &[]),
        &["empty.jsonl:2", "empty text"],
    );

    let bad_utf8 = d.join("bytes.txt");
    std::fs::write(&bad_utf8, b"fine\nnot \xff utf8\n").unwrap();
    expect_error(
        &encode(&model, &bad_utf8, &out_path, &[]),
        &["bytes.txt:2", "UTF-8"],
    );

    let good = d.join("good.jsonl");
    std::fs::write(&good, "{\"text\": \"ok\"}\n").unwrap();
    expect_error(
        &encode(&model, &good, &out_path, &["--max-length", "1"]),
        &["max_length"],
    );
    expect_error(
        &encode(&model, &good, &out_path, &["--max-length", "100000"]),
        &["max_length"],
    );
    expect_error(
        &encode(Path::new("/nonexistent/model"), &good, &out_path, &[]),
        &["/nonexistent/model"],
    );
    expect_error(
        &encode(&fixture("tiny-bert"), &good, &out_path, &["--sparse"]),
        &["sparse_linear.pt"],
    );

    // A truncated checkpoint in an otherwise valid model dir.
    let broken_model = d.join("model");
    copy_model("tiny-xlmr", &broken_model);
    let st = broken_model.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(
        &encode(&broken_model, &good, &out_path, &[]),
        &["model.safetensors"],
    );
    assert!(
        !out_path.exists(),
        "no output file may appear after an error"
    );

    let pairs = d.join("pairs.jsonl");
    std::fs::write(&pairs, "{\"query\": \"q\"}\n").unwrap();
    expect_error(
        &run(&[
            "score",
            "--model",
            m,
            "--pairs",
            pairs.to_str().unwrap(),
            "--output",
            o,
        ]),
        &["pairs.jsonl:1", "passage"],
    );
    std::fs::write(&pairs, "{\"query\": \"q\", \"passage\": \"p\"}\n").unwrap();
    expect_error(
        &run(&[
            "score",
            "--model",
            m,
            "--pairs",
            pairs.to_str().unwrap(),
            "--output",
            o,
            "--weights",
            "1,2",
        ]),
        &["--weights"],
    );
}

#[test]
fn convert_bin_layout_to_safetensors_keeps_outputs() {
    let d = tmpdir("convert");
    let out_dir = d.join("converted");
    let src = fixture("tiny-bge-m3-layout");
    expect_success(&convert(&src, &out_dir));
    for f in [
        "model.safetensors",
        "config.json",
        "colbert_linear.pt",
        "sparse_linear.pt",
        "tokenizer.json",
    ] {
        assert!(out_dir.join(f).is_file(), "{f} missing");
    }
    let texts = ["The quick brown fox", "Москва — столица России", ""];
    let opts = retrom3::EncodeOptions::all();
    let a = retrom3::M3Model::load(&src, retrom3::Device::Cpu)
        .unwrap()
        .encode(&texts, &opts)
        .unwrap();
    let b = retrom3::M3Model::load(&out_dir, retrom3::Device::Cpu)
        .unwrap()
        .encode(&texts, &opts)
        .unwrap();
    assert_eq!(a.dense, b.dense);
    assert_eq!(a.sparse, b.sparse);
    assert_eq!(a.colbert, b.colbert);
    // Into a non-empty directory (another model's files would be left to load with this one)
    // or onto a file: refused, the directory untouched.
    let again = convert(&src, &out_dir);
    expect_error(&again, &["converted", "exists and is not empty"]);
    assert!(out_dir.join("colbert_linear.pt").is_file());
    let file = d.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let onto = convert(&src, &file);
    expect_error(&onto, &["a-file", "not a directory"]);
    // A dangling symlink: an error, and no temporary copy of the model left beside it.
    let link = d.join("dangling");
    std::os::unix::fs::symlink(d.join("nowhere"), &link).unwrap();
    expect_error(&convert(&src, &link), &["dangling"]);
    assert_no_temporaries(&d);
    // An existing empty directory (a mount point, say) is kept and filled.
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    expect_success(&convert(&src, &empty));
    assert!(empty.join("model.safetensors").is_file() && empty.join("colbert_linear.pt").is_file());
    assert_no_temporaries(&empty);
    // The library's save of a model without heads drops the heads a directory held.
    let mut m = retrom3::M3Model::load(&out_dir, retrom3::Device::Cpu).unwrap();
    m.heads = None;
    m.save(&out_dir).unwrap();
    assert!(!out_dir.join("colbert_linear.pt").exists());
    assert!(!out_dir.join("sparse_linear.pt").exists());
    assert!(retrom3::M3Model::load(&out_dir, retrom3::Device::Cpu)
        .unwrap()
        .heads
        .is_none());
}

#[test]
fn malformed_tokenizer_is_a_one_line_error() {
    let d = tmpdir("badtok");
    let model = d.join("model");
    copy_model("tiny-xlmr", &model);
    let tok = std::fs::read(model.join("tokenizer.json")).unwrap();
    std::fs::write(model.join("tokenizer.json"), &tok[..tok.len() - 300]).unwrap();
    let input = d.join("in.txt");
    std::fs::write(&input, "hello\n").unwrap();
    let out = encode(&model, &input, &d.join("o.jsonl"), &[]);
    expect_error(&out, &["tokenizer.json"]);
}

/// The environment's switches are checked by every command before any work (a bad
/// RETROM3_ATTN_BWD used to be read only on the bf16 tensor-core backward path, so a CPU run
/// ignored it), and a selftest of the CPU against itself is refused rather than "all 0 rows
/// passed".
#[test]
fn bad_switches_and_a_cpu_selftest_are_errors() {
    let d = tmpdir("switches");
    let out = d.join("o.jsonl");
    let encode_with = |attn_bwd: &str| {
        bin()
            .env("RETROM3_ATTN_BWD", attn_bwd)
            .arg("encode")
            .arg("--model")
            .arg(fixture("tiny-xlmr"))
            .arg("--input")
            .arg(fixture("texts.jsonl"))
            .arg("--output")
            .arg(&out)
            .output()
            .expect("run retrom3")
    };
    expect_error(
        &encode_with("foo"),
        &["RETROM3_ATTN_BWD=\"foo\"", "expected tc"],
    );
    assert!(!out.exists());
    for good in ["tc", "cc"] {
        expect_success(&encode_with(good));
    }
    expect_error(
        &run(&["selftest", "--device", "cpu"]),
        &["--device cpu", "CPU reference"],
    );
}
