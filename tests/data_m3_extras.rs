//! M3 training data beyond the basic format (SPEC §4.1-4.3, §5.1-5.2): every malformed row is an
//! error naming the file, the line and the field; the optional fields (`prompt`, `type`,
//! first-row `batch_size` / `train_group_size`) do what FlagEmbedding's same-dataset mode does;
//! small files of a directory are merged into shared batches.

use retrom3::data::m3_data::{
    batches_per_epoch, plan_units, read_train_file, read_train_paths_with, sample_group,
    BucketSpec, MergeRule, TrainDataset, TrainExample,
};
use retrom3::data::rng::Rng;
use retrom3::data::TextTokenizer;
use retrom3::model::encoder::Encoder;
use retrom3::model::m3_train::{M3LossConfig, M3Student};
use retrom3::train::m3::{finetune, FinetuneConfig, M3TrainData};
use retrom3::{EncoderConfig, Error};
use std::path::{Path, PathBuf};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retrom3-m3x-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const OK: &str = r#"{"query": "ok", "pos": ["p"], "neg": ["n"]}"#;

/// `rows` joined into a file; `read_train_file` must fail at `line` naming every `needles`.
fn expect_error(dir: &Path, name: &str, rows: &[&str], line: usize, needles: &[&str]) {
    let f = dir.join(format!("{name}.jsonl"));
    std::fs::write(&f, rows.join("\n") + "\n").unwrap();
    let err = read_train_file(&f).expect_err(name);
    let shown = err.to_string();
    match &err {
        Error::Input { path, line: l, msg } => {
            assert_eq!(path, &f, "{name}: {shown}");
            assert_eq!(*l, line, "{name}: {shown}");
            for n in needles {
                assert!(msg.contains(n), "{name}: {msg:?} should contain {n:?}");
            }
        }
        other => panic!("{name}: expected an input error, got {other:?}"),
    }
    // The message a user sees starts with file:line.
    assert!(
        shown.starts_with(&format!("{}:{line}: ", f.display())),
        "{name}: {shown}"
    );
}

#[test]
fn malformed_rows_name_file_line_and_field() {
    let d = tmp("bad");
    let cases: &[(&str, &str, &[&str])] = &[
        // Missing fields.
        (
            "no_query",
            r#"{"pos": ["p"], "neg": ["n"]}"#,
            &["\"query\"", "missing"],
        ),
        (
            "no_pos",
            r#"{"query": "q", "neg": ["n"]}"#,
            &["\"pos\"", "missing"],
        ),
        (
            "no_neg",
            r#"{"query": "q", "pos": ["p"]}"#,
            &["\"neg\"", "missing"],
        ),
        (
            "null_pos",
            r#"{"query": "q", "pos": null, "neg": ["n"]}"#,
            &["\"pos\"", "missing"],
        ),
        // Empty values.
        (
            "empty_query",
            r#"{"query": " ", "pos": ["p"], "neg": ["n"]}"#,
            &["\"query\"", "empty"],
        ),
        (
            "empty_pos",
            r#"{"query": "q", "pos": [], "neg": ["n"]}"#,
            &["\"pos\"", "empty list"],
        ),
        (
            "empty_pos_text",
            r#"{"query": "q", "pos": [""], "neg": ["n"]}"#,
            &["\"pos\"", "element 1 is an empty text"],
        ),
        (
            "blank_neg_text",
            r#"{"query": "q", "pos": ["p"], "neg": ["n", "  "]}"#,
            &["\"neg\"", "element 2 is an empty text"],
        ),
        // Score lists of the wrong length.
        (
            "short_pos_scores",
            r#"{"query": "q", "pos": ["p", "p2"], "neg": ["n"], "pos_scores": [1.0], "neg_scores": [0.0]}"#,
            &["\"pos_scores\"", "1 scores for 2 texts"],
        ),
        (
            "long_neg_scores",
            r#"{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0], "neg_scores": [0.1, 0.2]}"#,
            &["\"neg_scores\"", "2 scores for 1 texts"],
        ),
        // Wrong types.
        (
            "query_number",
            r#"{"query": 3, "pos": ["p"], "neg": ["n"]}"#,
            &["\"query\"", "expected a string, got a number"],
        ),
        (
            "pos_string",
            r#"{"query": "q", "pos": "p", "neg": ["n"]}"#,
            &["\"pos\"", "expected a list of strings, got a string"],
        ),
        (
            "neg_object",
            r#"{"query": "q", "pos": ["p"], "neg": {"a": 1}}"#,
            &["\"neg\"", "got an object"],
        ),
        (
            "pos_element",
            r#"{"query": "q", "pos": ["p", 7], "neg": ["n"]}"#,
            &["\"pos\"", "element 2 is a number"],
        ),
        (
            "neg_element",
            r#"{"query": "q", "pos": ["p"], "neg": [null]}"#,
            &["\"neg\"", "element 1 is null"],
        ),
        (
            "score_string",
            r#"{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0], "neg_scores": ["high"]}"#,
            &["\"neg_scores\"", "element 1 is a string, expected a number"],
        ),
        (
            "scores_number",
            r#"{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": 1.0}"#,
            &["\"pos_scores\"", "expected a list of numbers"],
        ),
        (
            "score_overflow",
            r#"{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1e300], "neg_scores": [0]}"#,
            &["\"pos_scores\"", "finite"],
        ),
        (
            "prompt_list",
            r#"{"query": "q", "pos": ["p"], "neg": ["n"], "prompt": ["x"]}"#,
            &["\"prompt\"", "expected a string"],
        ),
        (
            "type_bool",
            r#"{"query": "q", "pos": ["p"], "neg": ["n"], "type": true}"#,
            &["\"type\"", "expected a string, got a boolean"],
        ),
        (
            "batch_zero",
            r#"{"query": "q", "pos": ["p"], "neg": ["n"], "batch_size": 0}"#,
            &["\"batch_size\"", "positive integer, got 0"],
        ),
        (
            "batch_float",
            r#"{"query": "q", "pos": ["p"], "neg": ["n"], "batch_size": 2.5}"#,
            &["\"batch_size\"", "positive integer, got 2.5"],
        ),
        (
            "batch_string",
            r#"{"query": "q", "pos": ["p"], "neg": ["n"], "batch_size": "8"}"#,
            &["\"batch_size\"", "got a string"],
        ),
        (
            "group_negative",
            r#"{"query": "q", "pos": ["p"], "neg": ["n"], "train_group_size": -1}"#,
            &["\"train_group_size\"", "got -1"],
        ),
        // Not a training object at all.
        (
            "array_row",
            r#"["q", ["p"], ["n"]]"#,
            &["expected a JSON object, got a list"],
        ),
        (
            "bad_json",
            r#"{"query": "q", "pos": ["p"], "neg": ["n"]"#,
            &["column"],
        ),
    ];
    for (name, row, needles) in cases {
        expect_error(&d, name, &[OK, row], 2, needles);
    }
    // Per-file settings must agree with the first row.
    let typed = r#"{"query": "q", "pos": ["p"], "neg": ["n"], "type": "only_1neg"}"#;
    expect_error(
        &d,
        "type_mixed",
        &[typed, OK],
        2,
        &["\"type\"", "(absent)", "first row"],
    );
    expect_error(
        &d,
        "type_late",
        &[OK, OK, typed],
        3,
        &["\"type\"", "\"only_1neg\""],
    );
    let b4 = r#"{"query": "q", "pos": ["p"], "neg": ["n"], "batch_size": 4}"#;
    let b8 = r#"{"query": "q", "pos": ["p"], "neg": ["n"], "batch_size": 8}"#;
    expect_error(
        &d,
        "batch_mixed",
        &[b4, b4, b8],
        3,
        &["\"batch_size\"", "8 differs", "4"],
    );
    let g3 = r#"{"query": "q", "pos": ["p"], "neg": ["n"], "train_group_size": 3}"#;
    expect_error(&d, "group_mixed", &[g3, OK], 2, &["\"train_group_size\""]);
    // An empty file.
    let f = d.join("empty.jsonl");
    std::fs::write(&f, "").unwrap();
    assert!(
        matches!(read_train_file(&f), Err(Error::Input { line: 0, ref msg, .. }) if msg.contains("no training example"))
    );
}

#[test]
fn optional_fields_are_read() {
    let d = tmp("opt");
    let f = d.join("t.jsonl");
    std::fs::write(
        &f,
        concat!(
            r#"{"query": "q1", "pos": ["p"], "neg": ["n1", "n2"], "prompt": "Represent: ", "type": "symmetric_sts", "batch_size": 2, "train_group_size": 3, "extra": {"kept": false}}"#,
            "\n",
            r#"{"query": "q2", "pos": ["p"], "neg": ["n"], "pos_scores": null, "neg_scores": null, "type": "symmetric_sts", "batch_size": 2, "train_group_size": 3, "prompt": null}"#,
            "\n",
        ),
    )
    .unwrap();
    let rows = read_train_file(&f).unwrap();
    assert_eq!(rows[0].prompt.as_deref(), Some("Represent: "));
    assert_eq!(rows[0].kind.as_deref(), Some("symmetric_sts"));
    assert_eq!(
        (rows[0].batch_size, rows[0].train_group_size),
        (Some(2), Some(3))
    );
    assert_eq!(
        (rows[1].prompt.as_ref(), rows[1].pos_scores.as_ref()),
        (None, None)
    );
    // The fixture file of the basic tests still reads, scores included.
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/m3-train/train.jsonl");
    assert!(read_train_file(&fx).unwrap()[1].neg_scores.is_some());
}

#[test]
fn prompt_and_symmetric_types_format_the_texts() {
    let mut rng = Rng::new(1, 0);
    let mut ex = TrainExample::new("how?", vec!["pos".into()], vec!["neg".into()]);
    ex.prompt = Some("Q: ".into());
    let g = sample_group(&ex, 2, &mut rng);
    assert_eq!(g.query, "Q: how?");
    assert_eq!(g.passages, ["pos", "neg"], "retrieval: passages unchanged");
    for (kind, instructed) in [
        ("symmetric_sts", true),
        ("symmetric_clustering", true),
        ("symmetric_class", false),
        ("only_1neg", false),
    ] {
        ex.kind = Some(kind.into());
        let g = sample_group(&ex, 2, &mut rng);
        let want = if instructed {
            ["Q: pos", "Q: neg"]
        } else {
            ["pos", "neg"]
        };
        assert_eq!(g.passages, want, "{kind}");
    }
    // No prompt: the texts are used as they are (no "None" prefix).
    ex.prompt = None;
    let g = sample_group(&ex, 2, &mut rng);
    assert_eq!((g.query.as_str(), g.passages[0].as_str()), ("how?", "pos"));
}

fn rows(n: usize, extra: &str) -> String {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"query": "q{i}", "pos": ["p{i}"], "neg": ["a{i}", "b{i}", "c{i}"]{extra}}}"#
            ) + "\n"
        })
        .collect()
}

#[test]
fn per_file_batch_and_group_sizes() {
    let d = tmp("perfile");
    let cases = [
        // (fields, batch size for configured 8, group size for configured 8)
        ("", 8, 8),
        (r#", "batch_size": 3"#, 3, 8),
        (r#", "train_group_size": 5"#, 8, 5),
        (r#", "type": "only_1neg""#, 8, 2),
        // symmetric_class: min(len(neg) + 1, G) = 4; any symmetric type halves the batch.
        (r#", "type": "symmetric_class""#, 4, 4),
        (r#", "type": "symmetric_sts", "batch_size": 6"#, 6, 8),
        // With a type, train_group_size is ignored (FlagEmbedding's precedence).
        (r#", "type": "retrieval", "train_group_size": 5"#, 8, 8),
    ];
    for (i, (extra, bs, g)) in cases.iter().enumerate() {
        let f = d.join(format!("f{i}.jsonl"));
        std::fs::write(&f, rows(12, extra)).unwrap();
        let ds = TrainDataset::from_file(f.clone(), read_train_file(&f).unwrap(), false);
        assert_eq!(ds.batch_size(8), *bs, "{extra}");
        assert_eq!(ds.group_size(&[0, 1], 8), *g, "{extra}");
        // The plan uses the file's batch size in every bucket.
        let units = plan_units(&[ds], &[], &BucketSpec::single(8));
        assert_eq!(units[0].batch_size, *bs, "{extra}");
        assert_eq!(batches_per_epoch(&units, 1), 12 / bs);
    }
    // symmetric_class reads the first row of the batch; halving never gives 0.
    let mut ex = TrainExample::new("q", vec!["p".into()], vec!["n".into()]);
    ex.kind = Some("symmetric_class".into());
    let mut long = ex.clone();
    long.neg = (0..9).map(|i| format!("n{i}")).collect();
    let ds = TrainDataset::from_file("x".into(), vec![ex, long], false);
    assert_eq!(ds.group_size(&[0, 1], 8), 2);
    assert_eq!(ds.group_size(&[1, 0], 8), 8);
    assert_eq!(ds.batch_size(1), 1);
}

#[test]
fn small_files_of_a_directory_share_batches() {
    let d = tmp("merge");
    let dir = d.join("train");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.jsonl"), rows(2, r#", "batch_size": 4"#)).unwrap();
    std::fs::write(dir.join("b.jsonl"), rows(3, "")).unwrap();
    std::fs::write(dir.join("big.jsonl"), rows(10, "")).unwrap();
    // Another type: never in the same batch as the others.
    std::fs::write(dir.join("c.jsonl"), rows(4, r#", "type": "only_1neg""#)).unwrap();
    // A small file named directly: its own dataset, not merged.
    let lone = d.join("lone.jsonl");
    std::fs::write(&lone, rows(1, "")).unwrap();
    let paths = [dir.clone(), lone.clone()];

    let none = read_train_paths_with(&paths, MergeRule::default()).unwrap();
    assert_eq!(none.datasets.len(), 5);
    assert!(none.dropped.is_empty());

    let rule = MergeRule {
        small_threshold: 5,
        drop_threshold: 0,
    };
    let got = read_train_paths_with(&paths, rule).unwrap();
    let sizes: Vec<(usize, usize)> = got
        .datasets
        .iter()
        .map(|ds| (ds.examples.len(), ds.files.len()))
        .collect();
    // big; a+b merged; c alone (other type); lone.
    assert_eq!(sizes, [(10, 1), (5, 2), (4, 1), (1, 1)]);
    let merged = &got.datasets[1];
    assert_eq!(merged.source, dir);
    assert_eq!(merged.files[0].0, dir.join("a.jsonl"));
    // Batch size = the smallest of the merged files' (a: 4, b: the configured 8).
    assert_eq!(merged.batch_size(8), 4);
    assert_eq!(merged.batch_size(3), 3);
    let units = plan_units(&got.datasets, &[], &BucketSpec::single(8));
    assert_eq!(units[1].examples.len(), 5);

    // drop_threshold: merged sets below it are dropped and reported; files above are kept.
    let rule = MergeRule {
        small_threshold: 5,
        drop_threshold: 5,
    };
    let got = read_train_paths_with(&paths, rule).unwrap();
    let sizes: Vec<usize> = got.datasets.iter().map(|ds| ds.examples.len()).collect();
    assert_eq!(sizes, [10, 5, 1]);
    assert_eq!(got.dropped, [dir.join("c.jsonl")]);

    // A group size of 1 without in-batch negatives would train on nothing.
    let nib = d.join("x_no_in_batch_neg.jsonl");
    std::fs::write(&nib, rows(3, r#", "train_group_size": 1"#)).unwrap();
    let e = read_train_paths_with(&[nib], MergeRule::default()).unwrap_err();
    assert!(e.to_string().contains("train_group_size"), "{e}");
}

/// Rows whose texts all have one length: "what" and passages "a b".
fn const_rows(n: usize, extra: &str) -> String {
    (0..n)
        .map(|_| {
            format!(r#"{{"query": "what", "pos": ["a b"], "neg": ["a b", "a b", "a b"]{extra}}}"#)
                + "\n"
        })
        .collect()
}

/// The trainer honours per-file batch and group sizes: files with different group sizes train
/// side by side, and every step has the batch and group size of its file.
#[test]
fn trainer_uses_per_file_settings() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr");
    let d = tmp("train");
    let files = [
        ("g2.jsonl", r#", "type": "only_1neg", "batch_size": 2"#, 6),
        ("g3.jsonl", r#", "train_group_size": 3"#, 5),
        (
            "sym.jsonl",
            r#", "type": "symmetric_class", "prompt": "C: ""#,
            4,
        ),
    ];
    for (name, extra, n) in files {
        std::fs::write(d.join(name), const_rows(n, extra)).unwrap();
    }
    let paths: Vec<PathBuf> = files.iter().map(|f| d.join(f.0)).collect();
    let files = read_train_paths_with(&paths, MergeRule::default()).unwrap();
    let tok = TextTokenizer::from_dir(&fx).unwrap();
    let data = M3TrainData::new(files.datasets, &BucketSpec::single(4), &tok).unwrap();
    // g2: 6 / 2; g3: 5 / 4; sym: 4 / (4 / 2).
    assert_eq!(batches_per_epoch(&data.units, 1), 3 + 1 + 2);
    let cfg = EncoderConfig::from_file(fx.join("config.json")).unwrap();
    let (map, path) = retrom3::io::read_backbone(&fx).unwrap();
    let enc = Encoder::from_tensors(cfg, &map, &path).unwrap();
    let heads = retrom3::io::read_heads(&fx, 32).unwrap().unwrap();
    let mut model = M3Student::new(enc, &heads).unwrap();
    let fcfg = FinetuneConfig {
        epochs: Some(1),
        query_max_len: 16,
        passage_max_len: 16,
        loss: M3LossConfig {
            temperature: 0.05,
            ..Default::default()
        },
        self_distill_start_step: 0,
        lr: 1e-4,
        warmup_ratio: 0.0,
        weight_decay: 0.0,
        seed: 1,
        dropout: false,
        ..Default::default()
    };
    let report = finetune(
        &mut model,
        &data,
        &tok,
        &fcfg,
        &fx,
        &d.join("out"),
        None,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!(report.len(), 6);
    // Tokens of a step = B·(query length) + B·G·(passage length).
    let len = |t: &str| tok.encode(t, 16).unwrap().len() as u64;
    let (q, cq, p) = (len("what"), len("C: what"), len("a b"));
    let mut want = vec![
        2 * q + 2 * 2 * p,
        2 * q + 2 * 2 * p,
        2 * q + 2 * 2 * p,
        4 * q + 4 * 3 * p,
        2 * cq + 2 * 4 * p,
        2 * cq + 2 * 4 * p,
    ];
    let metrics = std::fs::read_to_string(d.join("out/metrics.jsonl")).unwrap();
    let mut got: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["tokens"]
                .as_u64()
                .unwrap()
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}
