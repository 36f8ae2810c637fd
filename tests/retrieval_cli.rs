//! The retrieval CLI: `retrom3 index`, `search` and `eval` on a tiny BEIR set, and their refusals
//! (another model, corrupt index, missing qrels, empty corpus).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .args(args)
        .output()
        .expect("run retrom3")
}

fn tiny() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-xlmr")
        .display()
        .to_string()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retrom3-rcli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output, needles: &[&str]) {
    assert!(!o.status.success(), "expected failure");
    let e = String::from_utf8_lossy(&o.stderr);
    for n in needles {
        assert!(e.contains(n), "stderr lacks {n:?}: {e}");
    }
    assert!(!e.contains("panicked"), "{e}");
}

fn beir(dir: &Path) {
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    std::fs::write(
        dir.join("corpus.jsonl"),
        concat!(
            r#"{"_id": "d1", "title": "BGE M3", "text": "BGE M3 is an embedding model for dense, lexical and multi-vector retrieval."}"#, "\n",
            r#"{"_id": "d2", "title": "BM25", "text": "BM25 ranks documents with term frequencies."}"#, "\n",
            r#"{"_id": "d3", "title": "", "text": "The cat sat on the mat."}"#, "\n",
            r#"{"_id": 4, "title": "Paris", "text": "Paris is the capital of France."}"#, "\n",
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("queries.jsonl"),
        concat!(
            r#"{"_id": "q1", "text": "What is BGE M3?"}"#,
            "\n",
            r#"{"_id": "q2", "text": "capital of France"}"#,
            "\n",
            r#"{"_id": "q3", "text": "nothing relevant"}"#,
            "\n",
            r#"{"_id": "q9", "text": "not judged in this split"}"#,
            "\n",
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq2\t4\t1\nq3\td3\t0\n",
    )
    .unwrap();
}

#[test]
fn index_search_eval_end_to_end() {
    let d = tmpdir("e2e");
    let data = d.join("beir");
    beir(&data);
    let idx = d.join("idx");
    let model = tiny();
    let corpus = data.join("corpus.jsonl");
    let out = ok(&run(&[
        "index",
        "--model",
        &model,
        "--corpus",
        corpus.to_str().unwrap(),
        "--output",
        idx.to_str().unwrap(),
    ]));
    assert!(out.contains("indexed 4 documents"), "{out}");

    let out = ok(&run(&[
        "search",
        "--model",
        &model,
        "--index",
        idx.to_str().unwrap(),
        "--query",
        "capital of France",
        "--mode",
        "hybrid",
        "--k",
        "3",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[1].starts_with("1\t"));

    let runf = d.join("run.trec");
    ok(&run(&[
        "search",
        "--model",
        &model,
        "--index",
        idx.to_str().unwrap(),
        "--queries",
        data.join("queries.jsonl").to_str().unwrap(),
        "--run",
        runf.to_str().unwrap(),
        "--mode",
        "all",
        "--k",
        "2",
    ]));
    let trec = std::fs::read_to_string(&runf).unwrap();
    let rows: Vec<Vec<&str>> = trec.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(rows.len(), 8);
    assert!(rows
        .iter()
        .all(|r| r.len() == 6 && r[1] == "Q0" && r[5] == "retrom3-all"));
    assert_eq!(rows[0][3], "1");

    let res = d.join("results.json");
    let out = ok(&run(&[
        "eval",
        "--model",
        &model,
        "--data",
        data.to_str().unwrap(),
        "--output",
        res.to_str().unwrap(),
    ]));
    for m in ["bm25", "dense", "sparse", "colbert", "dense+sparse", "all"] {
        assert!(
            out.lines().any(|l| l.starts_with(m)),
            "{m} row missing: {out}"
        );
    }
    assert!(out.contains("1 skipped"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&res).unwrap()).unwrap();
    assert_eq!(v["queries"], 2);
    assert_eq!(v["skipped_no_relevant"], 1);
    let nd = v["results"]["bm25"]["ndcg@10"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&nd));

    // Another model (config.json differs): refused, naming the index's model.
    let m2 = d.join("model2");
    std::fs::create_dir_all(&m2).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m2.join(e.file_name())).unwrap();
    }
    let mut cfg = std::fs::read_to_string(m2.join("config.json")).unwrap();
    cfg.push('\n');
    std::fs::write(m2.join("config.json"), cfg).unwrap();
    err(
        &run(&[
            "search",
            "--model",
            m2.to_str().unwrap(),
            "--index",
            idx.to_str().unwrap(),
            "--query",
            "x",
        ]),
        &["index built with model", "tiny-xlmr", "model2"],
    );

    // Corrupt index: the file and the section are named.
    let f = idx.join("index.r3i");
    let mut b = std::fs::read(&f).unwrap();
    let n = b.len();
    b[n - 100] ^= 0xff;
    std::fs::write(&f, &b).unwrap();
    err(
        &run(&[
            "search",
            "--model",
            &model,
            "--index",
            idx.to_str().unwrap(),
            "--query",
            "x",
        ]),
        &["index.r3i", "section", "checksum"],
    );
    std::fs::write(&f, &b[..n / 3]).unwrap();
    err(
        &run(&[
            "search",
            "--model",
            &model,
            "--index",
            idx.to_str().unwrap(),
            "--query",
            "x",
        ]),
        &["index.r3i", "truncated"],
    );
}

#[test]
fn eval_refuses_missing_qrels_and_empty_corpus() {
    let d = tmpdir("bad");
    let data = d.join("beir");
    beir(&data);
    let model = tiny();
    err(
        &run(&[
            "eval",
            "--model",
            &model,
            "--data",
            data.to_str().unwrap(),
            "--split",
            "dev",
        ]),
        &["dev.tsv", "missing qrels", "test"],
    );
    std::fs::write(data.join("corpus.jsonl"), "").unwrap();
    err(
        &run(&["eval", "--model", &model, "--data", data.to_str().unwrap()]),
        &["corpus.jsonl", "empty corpus"],
    );
    err(
        &run(&[
            "index",
            "--model",
            &model,
            "--corpus",
            data.join("corpus.jsonl").to_str().unwrap(),
            "--output",
            d.join("i").to_str().unwrap(),
        ]),
        &["empty corpus"],
    );
    err(
        &run(&[
            "eval",
            "--model",
            &model,
            "--data",
            data.to_str().unwrap(),
            "--modes",
            "dense,bogus",
        ]),
        &["unknown mode"],
    );
}
