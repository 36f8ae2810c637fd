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

/// `retrom3 search --model MODEL --index IDX` + `extra`.
fn search(model: &str, idx: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["search", "--model", model, "--index", idx.to_str().unwrap()];
    a.extend_from_slice(extra);
    run(&a)
}

/// `retrom3 eval --model MODEL --data DATA` + `extra`.
fn eval(model: &str, data: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["eval", "--model", model, "--data", data.to_str().unwrap()];
    a.extend_from_slice(extra);
    run(&a)
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
    let out = ok(&index_cmd(&corpus, &idx, &[]));
    assert!(out.contains("indexed 4 documents"), "{out}");

    let out = ok(&search(
        &model,
        &idx,
        &[
            "--query",
            "capital of France",
            "--mode",
            "hybrid",
            "--k",
            "3",
        ],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[1].starts_with("1\t"));

    let runf = d.join("run.trec");
    ok(&search(
        &model,
        &idx,
        &[
            "--queries",
            data.join("queries.jsonl").to_str().unwrap(),
            "--run",
            runf.to_str().unwrap(),
            "--mode",
            "all",
            "--k",
            "2",
        ],
    ));
    let trec = std::fs::read_to_string(&runf).unwrap();
    let rows: Vec<Vec<&str>> = trec.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(rows.len(), 8);
    assert!(rows
        .iter()
        .all(|r| r.len() == 6 && r[1] == "Q0" && r[5] == "retrom3-all"));
    assert_eq!(rows[0][3], "1");

    let res = d.join("results.json");
    let out = ok(&eval(&model, &data, &["--output", res.to_str().unwrap()]));
    for m in ["bm25", "dense", "sparse", "colbert", "dense+sparse", "all"] {
        assert!(
            out.lines().any(|l| l.starts_with(m)),
            "{m} row missing: {out}"
        );
    }
    assert!(out.contains("1 skipped"), "{out}");
    let text = std::fs::read_to_string(&res).unwrap();
    // A text file: one trailing newline (`cat results.json` leaves the prompt on its own line).
    assert!(text.ends_with("}\n") && !text.ends_with("\n\n"), "{text:?}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
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
        &search(&model, &idx, &["--query", "x"]),
        &["index.r3i", "section", "checksum"],
    );
    std::fs::write(&f, &b[..n / 3]).unwrap();
    err(
        &search(&model, &idx, &["--query", "x"]),
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
        &eval(&model, &data, &["--split", "dev"]),
        &["dev.tsv", "missing qrels", "test"],
    );
    std::fs::write(data.join("corpus.jsonl"), "").unwrap();
    err(
        &run(&["eval", "--model", &model, "--data", data.to_str().unwrap()]),
        &["corpus.jsonl", "empty corpus"],
    );
    err(
        &index_cmd(&data.join("corpus.jsonl"), &d.join("i"), &[]),
        &["empty corpus"],
    );
    err(
        &eval(&model, &data, &["--modes", "dense,bogus"]),
        &["unknown mode"],
    );
}

/// `index` of the tiny BEIR set into `d/idx`; returns the index directory.
/// `retrom3 index --model tiny --corpus CORPUS --output OUT` + `extra`.
fn index_cmd(corpus: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut a = vec![
        "index".to_string(),
        "--model".to_string(),
        tiny(),
        "--corpus".to_string(),
        corpus.display().to_string(),
        "--output".to_string(),
        out.display().to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    run(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

fn build_index(d: &Path, data: &Path) -> PathBuf {
    let idx = d.join("idx");
    ok(&index_cmd(&data.join("corpus.jsonl"), &idx, &[]));
    idx
}

/// Run `score` on one pair file with extra flags.
fn score(d: &Path, pairs: &str, extra: &[&str]) -> Output {
    let p = d.join("pairs.jsonl");
    std::fs::write(&p, pairs).unwrap();
    let out = d.join("scores.jsonl");
    let mut args = vec![
        "score",
        "--model",
        &tiny(),
        "--pairs",
        p.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&refs)
}

#[test]
fn fusion_weights_are_validated_alike_in_search_eval_and_score() {
    let d = tmpdir("weights");
    let data = d.join("beir");
    beir(&data);
    let idx = build_index(&d, &data);
    let model = tiny();
    let search = |w: &str, mode: &str| {
        search(
            &model,
            &idx,
            &[
                "--query",
                "capital of France",
                "--mode",
                mode,
                "--weights",
                w,
            ],
        )
    };
    for (w, mode, why) in [
        ("0,0,0", "all", "all weights are 0"),
        ("0,0,0", "hybrid", "all weights are 0"),
        ("0,0", "hybrid", "w_dense + w_sparse is 0"),
        ("1e38,1e38,1e38", "all", "finite number in [0, 1e6]"),
        ("1,2e6,1", "hybrid", "finite number in [0, 1e6]"),
        ("1,-0.5,1", "all", "finite number in [0, 1e6]"),
        ("1,inf,1", "all", "finite number in [0, 1e6]"),
    ] {
        err(&search(w, mode), &["--weights", w, why]);
    }
    // w_colbert alone is a valid "all" fusion; the weight cap itself is accepted.
    ok(&search("0,0,1", "all"));
    ok(&search("1e6,1e6,1e6", "all"));

    err(
        &eval(&model, &data, &["--weights", "1e38,1e38,1e38"]),
        &["--weights", "finite number in [0, 1e6]"],
    );
    err(
        &eval(&model, &data, &["--weights", "0,0,0"]),
        &["--weights", "all weights are 0"],
    );

    // score: the same rules (its fusions are dense+sparse and all).
    let pair = "{\"query\": \"What is BGE M3?\", \"passage\": \"an embedding model\"}\n";
    err(
        &score(&d, pair, &["--weights", "1e38,1e38,1e38"]),
        &["--weights", "finite number in [0, 1e6]"],
    );
    err(
        &score(&d, pair, &["--weights", "0,0,0"]),
        &["--weights", "all weights are 0"],
    );
    err(
        &score(&d, pair, &["--weights", "0,0,1"]),
        &["--weights", "w_dense + w_sparse is 0"],
    );
    ok(&score(&d, pair, &["--weights", "1e6,1e6,1e6"]));
    let rows = std::fs::read_to_string(d.join("scores.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
    for key in ["sparse+dense", "colbert+sparse+dense"] {
        assert!(v[key].as_f64().is_some_and(f64::is_finite), "{rows}");
    }
}

#[test]
fn ids_with_whitespace_are_refused_where_read() {
    let d = tmpdir("wsid");
    let data = d.join("beir");
    beir(&data);
    let model = tiny();
    let corpus = d.join("corpus.jsonl");
    for (id_json, shown) in [
        (r#""a b""#, r#""a b""#),
        (r#""x\ny""#, r#""x\ny""#),
        (r#""tab\there""#, r#""tab\there""#),
    ] {
        std::fs::write(
            &corpus,
            format!(
                "{{\"_id\": \"ok\", \"text\": \"fine\"}}\n{{\"_id\": {id_json}, \"text\": \"x\"}}\n"
            ),
        )
        .unwrap();
        err(
            &index_cmd(&corpus, &d.join("i"), &[]),
            &["corpus.jsonl:2", shown, "whitespace"],
        );
    }
    // A query id with whitespace: search --queries and eval refuse it.
    let idx = build_index(&d, &data);
    let q = d.join("queries.jsonl");
    std::fs::write(&q, "{\"_id\": \"q 1\", \"text\": \"capital of France\"}\n").unwrap();
    err(
        &search(
            &model,
            &idx,
            &[
                "--queries",
                q.to_str().unwrap(),
                "--run",
                d.join("r.trec").to_str().unwrap(),
            ],
        ),
        &["queries.jsonl:1", "\"q 1\"", "whitespace"],
    );
    std::fs::write(
        data.join("queries.jsonl"),
        "{\"_id\": \"q1\", \"text\": \"What is BGE M3?\"}\n{\"_id\": \"q\\n2\", \"text\": \"x\"}\n",
    )
    .unwrap();
    err(
        &run(&["eval", "--model", &model, "--data", data.to_str().unwrap()]),
        &["queries.jsonl:2", "\"q\\n2\"", "whitespace"],
    );
}

#[test]
fn eval_refuses_unevaluable_qrels_and_warns_about_missing_docs() {
    let d = tmpdir("qrels");
    let data = d.join("beir");
    beir(&data);
    let model = tiny();
    let eval = || eval(&model, &data, &["--modes", "bm25"]);
    // Every judgment non-relevant: nothing to evaluate.
    std::fs::write(
        data.join("qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\nq1\td1\t0\nq2\t4\t0\nq3\td3\t0\n",
    )
    .unwrap();
    err(&eval(), &["test.tsv", "no query has a relevant judgment"]);
    // No judged document in the corpus: refused.
    std::fs::write(
        data.join("qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\nq1\tzz1\t1\nq2\tzz2\t1\n",
    )
    .unwrap();
    err(
        &eval(),
        &[
            "test.tsv",
            "none of its 2 judged document ids",
            "corpus.jsonl",
        ],
    );
    // Some missing: one warning with the count, the evaluation runs.
    std::fs::write(
        data.join("qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\tzz1\t1\nq2\t4\t1\n",
    )
    .unwrap();
    let o = eval();
    ok(&o);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("warning: 1 of the 3 judged document ids") && e.contains("zz1"),
        "{e}"
    );
    // A judged query without its text in queries.jsonl (BEIR's loader raises a KeyError):
    // refused, not scored 0.
    std::fs::write(
        data.join("qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq7\td1\t1\nq2\t4\t1\n",
    )
    .unwrap();
    err(
        &eval(),
        &["test.tsv", "1 judged query is not in", "queries.jsonl: q7"],
    );
    // Invalid UTF-8 is named with its line; a byte-order mark before the header is dropped.
    std::fs::write(
        data.join("qrels/test.tsv"),
        b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\t\xc04\t1\n",
    )
    .unwrap();
    err(&eval(), &["test.tsv:3", "invalid UTF-8"]);
    std::fs::write(
        data.join("qrels/test.tsv"),
        "\u{feff}query-id\tcorpus-id\tscore\nq1\td1\t2\nq2\t4\t1\n",
    )
    .unwrap();
    ok(&eval());
    // Labels are integers: "1.0" is 1, "1.5", NaN, inf and past i32 are refused.
    for (label, good) in [
        ("1.0", true),
        ("1.5", false),
        ("nan", false),
        ("inf", false),
        ("1e300", false),
        ("99999999999", false),
    ] {
        std::fs::write(
            data.join("qrels/test.tsv"),
            format!("query-id\tcorpus-id\tscore\nq1\td1\t{label}\nq2\t4\t1\n"),
        )
        .unwrap();
        if good {
            ok(&eval());
        } else {
            err(
                &eval(),
                &[
                    "test.tsv:2",
                    &format!("score \"{label}\" is not an integer"),
                ],
            );
        }
    }
}

#[test]
fn empty_texts_are_refused_but_empty_corpus_docs_are_indexed_with_a_warning() {
    let d = tmpdir("empty");
    let data = d.join("beir");
    beir(&data);
    let model = tiny();
    // score: an empty query or passage, naming file:line and the field.
    err(
        &score(&d, "{\"query\": \"\", \"passage\": \"x\"}\n", &[]),
        &["pairs.jsonl:1", "\"query\"", "empty text"],
    );
    err(
        &score(
            &d,
            "{\"query\": \"a\", \"passage\": \"x\"}\n{\"query\": \"a\", \"passage\": \"  \\n\"}\n",
            &[],
        ),
        &["pairs.jsonl:2", "\"passage\"", "empty text"],
    );

    // index: documents without text are kept, with one warning (count and first ids).
    let mut corpus = std::fs::read_to_string(data.join("corpus.jsonl")).unwrap();
    for i in 0..7 {
        corpus.push_str(&format!(
            "{{\"_id\": \"e{i}\", \"title\": \"\", \"text\": \"{}\"}}\n",
            if i % 2 == 0 { "" } else { "  " }
        ));
    }
    std::fs::write(data.join("corpus.jsonl"), corpus).unwrap();
    let idx = d.join("idx");
    let o = index_cmd(&data.join("corpus.jsonl"), &idx, &[]);
    assert!(ok(&o).contains("indexed 11 documents"));
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.matches("warning").count(), 1, "{e}");
    assert!(
        e.contains("7 documents with empty title and text")
            && e.contains("\"e0\"")
            && e.contains("…"),
        "{e}"
    );
    assert!(!e.contains("\"e6\""), "only the first few ids: {e}");

    // search: an empty or blank --query, an empty query text in a file.
    for q in ["", "   "] {
        err(
            &search(&model, &idx, &["--query", q]),
            &["--query", "empty text"],
        );
    }
    let qf = d.join("q.jsonl");
    std::fs::write(
        &qf,
        "{\"_id\": \"q1\", \"text\": \"capital\"}\n{\"_id\": \"q2\", \"text\": \" \"}\n",
    )
    .unwrap();
    err(
        &search(&model, &idx, &["--queries", qf.to_str().unwrap()]),
        &["q.jsonl:2", "\"q2\"", "empty text"],
    );
    // eval: the same for its queries file.
    std::fs::copy(&qf, data.join("queries.jsonl")).unwrap();
    err(
        &run(&["eval", "--model", &model, "--data", data.to_str().unwrap()]),
        &["queries.jsonl:2", "empty text"],
    );
}

#[test]
fn k_and_candidates_must_be_at_least_one() {
    let d = tmpdir("k0");
    let data = d.join("beir");
    beir(&data);
    let idx = build_index(&d, &data);
    let model = tiny();
    for flag in ["--k", "--candidates"] {
        let o = search(&model, &idx, &["--query", "capital", flag, "0"]);
        assert_eq!(o.status.code(), Some(2), "usage error expected for {flag}");
        err(&o, &[flag, "must be >= 1"]);
    }
    for flag in ["--candidates", "--depth"] {
        let o = eval(&model, &data, &[flag, "0"]);
        assert_eq!(o.status.code(), Some(2), "usage error expected for {flag}");
        err(&o, &[flag, "must be >= 1"]);
    }
    // --run with a single --query: refused, not ignored (no file was written).
    let trec = d.join("one.trec");
    let o = search(
        &model,
        &idx,
        &["--query", "capital", "--run", trec.to_str().unwrap()],
    );
    err(&o, &["--run", "--queries"]);
    assert!(!trec.exists());
    // An output path that cannot be written is refused before the index is built.
    let o = eval(&model, &data, &["--output", d.to_str().unwrap()]);
    err(&o, &["--output", "a directory, not a file"]);
    let o = eval(
        &model,
        &data,
        &["--output", d.join("no/such/dir/e.json").to_str().unwrap()],
    );
    err(&o, &["--output", "does not exist"]);
    // ColBERT vectors without dense ones: a part no mode could use (it re-ranks the dense
    // candidates), refused before anything is encoded.
    let colb = d.join("colb");
    let index_to = |out: &Path, part: &str| index_cmd(&data.join("corpus.jsonl"), out, &[part]);
    err(&index_to(&colb, "--colbert"), &["--colbert needs --dense"]);
    assert!(!colb.exists());
    // An --output / --run-dir that cannot be a directory is refused before the encoding.
    let file = d.join("afile");
    std::fs::write(&file, "keep").unwrap();
    err(
        &index_to(&file, "--dense"),
        &["--output", "exists and is not a directory"],
    );
    err(
        &index_to(&file.join("sub"), "--dense"),
        &["--output", "afile is not a directory"],
    );
    err(
        &eval(&model, &data, &["--run-dir", file.to_str().unwrap()]),
        &["--run-dir", "exists and is not a directory"],
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    // A --k / --candidates / --depth far above the corpus is the whole corpus (it used to size
    // a buffer: an abort on a failed allocation).
    let huge = "1000000000000";
    let n_docs = std::fs::read_to_string(data.join("corpus.jsonl"))
        .unwrap()
        .lines()
        .count();
    for mode in ["dense", "sparse", "bm25", "colbert", "all"] {
        let o = ok(&search(
            &model,
            &idx,
            &["--query", "capital", "--mode", mode, "--k", huge],
        ));
        let n = o
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .count();
        assert!((1..=n_docs).contains(&n), "{mode}: {o}");
    }
    let o = search(&model, &idx, &["--query", "capital", "--candidates", huge]);
    ok(&o);
    let res = d.join("r.json");
    ok(&eval(
        &model,
        &data,
        &[
            "--modes",
            "colbert,all",
            "--depth",
            huge,
            "--output",
            res.to_str().unwrap(),
        ],
    ));
    // results.json records the candidate depth each mode ran with (at least --depth, at most
    // the corpus), and f32 settings as written.
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&res).unwrap()).unwrap();
    let s = &doc["settings"];
    assert_eq!(
        s["candidates"],
        serde_json::json!({"colbert": n_docs, "all": n_docs}),
        "{s}"
    );
    assert_eq!(s["weights"], serde_json::json!([1.0, 0.3, 1.0]), "{s}");
    assert_eq!(s["bm25"], serde_json::json!({"k1": 0.9, "b": 0.4}), "{s}");
}

/// A model whose sentence-transformers files pool otherwise than the index's model (mean, or no
/// Normalize) is another model to the index; the plain model's fingerprint is unchanged.
#[test]
fn pooling_changes_are_another_model_to_an_index() {
    let d = tmpdir("pool");
    let data = d.join("beir");
    beir(&data);
    let idx = build_index(&d, &data);
    let m = d.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(tiny()).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
        }
    }
    let model = m.to_str().unwrap();
    ok(&search(model, &idx, &["--query", "capital"]));
    std::fs::create_dir_all(m.join("1_Pooling")).unwrap();
    const TRANSFORMER: &str = r#"{"path": "", "type": "sentence_transformers.models.Transformer"}"#;
    const POOLING: &str =
        r#"{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}"#;
    const NORMALIZE: &str =
        r#"{"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}"#;
    // Mean pooling (normalised); then CLS pooling again but no Normalize module: neither is
    // the indexed model.
    for (cls, modules) in [
        (false, vec![TRANSFORMER, POOLING, NORMALIZE]),
        (true, vec![TRANSFORMER, POOLING]),
    ] {
        std::fs::write(
            m.join("1_Pooling/config.json"),
            format!(
                r#"{{"pooling_mode_cls_token": {cls}, "pooling_mode_mean_tokens": {}}}"#,
                !cls
            ),
        )
        .unwrap();
        std::fs::write(m.join("modules.json"), format!("[{}]", modules.join(","))).unwrap();
        err(
            &search(model, &idx, &["--query", "capital"]),
            &["index built with model"],
        );
    }
}

/// A closed stdout (`| head`, `| true`) is an error naming it (exit 1), not a panic, and eval
/// writes its --output before printing the table.
#[test]
fn a_closed_stdout_is_an_error_after_the_results_file() {
    use std::process::Stdio;
    let d = tmpdir("epipe");
    let data = d.join("beir");
    beir(&data);
    let res = d.join("r.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .args(["eval", "--model", &tiny(), "--data"])
        .arg(&data)
        .arg("--output")
        .arg(&res)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    err(&o, &["<stdout>"]);
    assert!(res.is_file());
}

#[test]
fn score_default_lengths_fit_a_small_model() {
    // tiny-xlmr holds 40 tokens: the 512 default is lowered to it, as encode does.
    let d = tmpdir("scorelen");
    let long = "word ".repeat(200);
    let pair = format!("{{\"query\": \"{long}\", \"passage\": \"{long}\"}}\n");
    let o = score(&d, &pair, &[]);
    ok(&o);
    let rows = std::fs::read_to_string(d.join("scores.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 1);
    // An explicit length above the model's maximum is still an error (as encode --max-length).
    err(
        &score(&d, &pair, &["--max-passage-length", "512"]),
        &["max_length 512", "maximum of 40"],
    );
}
