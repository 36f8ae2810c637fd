//! Hard-negative mining (SPEC §4.8) on the tiny fixture: negatives come from the requested ranks
//! of the dense retrieval list, never a positive or the query, random top-ups when the range is
//! short, other fields kept, and `retrom3 mine` writes the same rows.

use retrom3::data::jsonl::read_jsonl;
use retrom3::train::m3::{mine_hard_negatives, pool_from_rows, MineConfig};
use retrom3::{Device, EncodeOptions, M3Model};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn cfg(range: (usize, usize), negatives: usize) -> MineConfig {
    MineConfig {
        range,
        negatives,
        seed: 7,
        max_length: 40,
        batch_size: 8,
        source: None,
    }
}

#[test]
fn mined_negatives_come_from_the_rank_range() {
    let model = M3Model::load(fixture("tiny-xlmr"), Device::Cpu).unwrap();
    let rows: Vec<Value> = read_jsonl(&fixture("m3-train/train.jsonl")).unwrap();
    let pool = pool_from_rows(&rows);
    assert!(pool.len() >= 12, "pool of {}", pool.len());
    let mut mined = rows.clone();
    let stats = mine_hard_negatives(&model, &mut mined, &pool, &cfg((2, 12), 4)).unwrap();
    assert_eq!(stats.queries, rows.len());
    assert_eq!(stats.mined + stats.random, 4 * rows.len());
    // The ranking, recomputed by brute force.
    let opts = EncodeOptions {
        max_length: Some(40),
        ..Default::default()
    };
    let texts: Vec<&str> = pool.iter().map(String::as_str).collect();
    let docs = model.encode(&texts, &opts).unwrap().dense.unwrap();
    for (r, m) in rows.iter().zip(&mined) {
        let q = r["query"].as_str().unwrap();
        let pos: Vec<&str> = r["pos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let qv = &model.encode(&[q], &opts).unwrap().dense.unwrap()[0];
        let mut rank: Vec<(f32, usize)> = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.iter().zip(qv).map(|(a, b)| a * b).sum(), i))
            .collect();
        rank.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let window: Vec<&str> = rank[2..12].iter().map(|&(_, i)| pool[i].as_str()).collect();
        let neg: Vec<&str> = m["neg"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(neg.len(), 4);
        let eligible = window
            .iter()
            .filter(|t| !pos.contains(t) && **t != q)
            .count();
        for n in &neg {
            assert!(
                !pos.contains(n) && *n != q,
                "{n:?} is a positive or the query"
            );
        }
        // With enough eligible hits in the window, every negative is from it.
        if eligible >= 4 {
            assert!(
                neg.iter().all(|n| window.contains(n)),
                "{neg:?} not in {window:?}"
            );
        }
        let mut d = neg.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 4, "distinct negatives");
        assert!(m.get("neg_scores").is_none());
        assert_eq!(m["pos_scores"], r["pos_scores"], "other fields kept");
    }
    // Deterministic for a seed.
    let mut again = rows.clone();
    mine_hard_negatives(&model, &mut again, &pool, &cfg((2, 12), 4)).unwrap();
    assert_eq!(again, mined);
    // A range beyond the pool: all negatives are random top-ups.
    let mut far = rows.clone();
    let s = mine_hard_negatives(&model, &mut far, &pool, &cfg((500, 600), 3)).unwrap();
    assert_eq!((s.mined, s.random), (0, 3 * rows.len()));
    assert_eq!((s.short_rows, s.rows_without_negatives), (0, 0));
    // More negatives than the pool holds besides a row's query and positives: counted.
    let mut short = rows.clone();
    let s = mine_hard_negatives(&model, &mut short, &pool, &cfg((0, 600), pool.len())).unwrap();
    assert_eq!(s.short_rows, rows.len());
    assert_eq!(s.rows_without_negatives, 0);
    let tiny = vec![rows[0]["pos"][0].as_str().unwrap().to_string()];
    let mut one = vec![rows[0].clone()];
    let s = mine_hard_negatives(&model, &mut one, &tiny, &cfg((0, 10), 2)).unwrap();
    assert_eq!((s.short_rows, s.rows_without_negatives), (1, 1));
    assert_eq!(one[0]["neg"], serde_json::json!([]));
}

#[test]
fn mine_cli_with_a_candidate_pool() {
    let d = std::env::temp_dir().join(format!("retrom3-mine-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let pool = d.join("pool.jsonl");
    let texts = [
        "The fox is a wild animal.",
        "Paris is in France.",
        "Berlin is the capital of Germany.",
        "Pizza comes from Naples.",
        "Water boils at 100 degrees.",
        "Cats like to sleep.",
        "The moon orbits the earth.",
    ];
    std::fs::write(
        &pool,
        // Every text twice: the pool is de-duplicated (SPEC §4.8), so a row never gets one
        // text as two of its negatives.
        texts
            .iter()
            .chain(&texts)
            .map(|t| format!("{{\"text\": {t:?}}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let out = d.join("mined.jsonl");
    // `retrom3 mine` on the fixture's rows with this pool + `extra`.
    let mine = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
            .args(["mine", "--model"])
            .arg(fixture("tiny-xlmr"))
            .arg("--input")
            .arg(fixture("m3-train/train.jsonl"))
            .arg("--output")
            .arg(&out)
            .args(["--max-length", "40", "--candidate-pool"])
            .arg(&pool)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        err
    };
    mine(&["--range", "1-5", "--negatives", "3"]);
    let rows: Vec<Value> = read_jsonl(&out).unwrap();
    assert_eq!(rows.len(), 18);
    for r in &rows {
        let neg = r["neg"].as_array().unwrap();
        assert_eq!(neg.len(), 3);
        assert!(neg.iter().all(|n| texts.contains(&n.as_str().unwrap())));
        let distinct: std::collections::HashSet<&str> =
            neg.iter().map(|n| n.as_str().unwrap()).collect();
        assert_eq!(distinct.len(), neg.len(), "{neg:?}");
    }
    // More negatives than the 7 texts hold besides a row's own: written, with a warning.
    let err = mine(&["--negatives", "10"]);
    assert!(
        err.contains("warning: 18 of 18 rows got fewer than --negatives 10"),
        "{err}"
    );
}

#[test]
fn mine_cli_names_the_file_and_line_of_a_bad_row() {
    let d = std::env::temp_dir().join(format!("retrom3-mine-bad-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let run = |input: &Path, extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
            .args(["mine", "--model"])
            .arg(fixture("tiny-xlmr"))
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(d.join("out.jsonl"))
            .args(["--range", "0-4"])
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let good = r#"{"query": "q one", "pos": ["a"], "neg": ["b", "c", "d"]}"#;
    for (row, want) in [
        (
            r#"{"query": "  ", "pos": ["a"], "neg": ["b"]}"#,
            "\"query\": empty text",
        ),
        (r#"{"query": "q", "pos": [], "neg": ["b"]}"#, "\"pos\""),
        (r#"{"query": "q", "pos": [""], "neg": ["b"]}"#, "\"pos\""),
        (r#"{"pos": ["a"], "neg": ["b"]}"#, "\"query\": missing"),
        (
            r#"{"query": "q", "pos": ["a"], "neg": [1, 2]}"#,
            "\"neg\": not a list of strings",
        ),
        (
            r#"{"query": "q", "pos": ["a"], "neg": "b"}"#,
            "\"neg\": not a list of strings",
        ),
    ] {
        let input = d.join("in.jsonl");
        std::fs::write(&input, format!("{good}\n{row}\n")).unwrap();
        // No --max-length: the default is clamped to the tiny model's 40 positions.
        let (code, err) = run(&input, &["--negatives", "2"]);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains("in.jsonl:2") && err.contains(want),
            "{row}: {err}"
        );
    }
    let input = d.join("ok.jsonl");
    std::fs::write(&input, format!("{good}\n")).unwrap();
    let (code, err) = run(&input, &["--negatives", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--negatives 0"), "{err}");
    let (code, err) = run(&input, &["--negatives", "2"]);
    assert_eq!(code, Some(0), "{err}");
}
