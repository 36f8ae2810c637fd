//! Our ids against the Python HF fast tokenizer's, on committed fixtures:
//! tests/fixtures/tiny-xlmr/ and tiny-bge-m3-layout/ (SentencePiece) and tests/fixtures/tiny-bert/
//! (WordPiece, a sentence-transformers directory), each with a tokenizer.json and an expected.json
//! written by tools/make_fixtures.py with
//! `tokenizer(text, truncation=True, max_length=max_length)["input_ids"]`.
//!
//! expected.json: `{"texts": [...], "input_ids": [[...], ...], "max_length": N}`; `max_length` may
//! also be a per-text array, and when absent it is sentence_bert_config.json's `max_seq_length`.
//! A fixture directory without both files is skipped with a note on stderr (temporary: the
//! fixtures are being generated); once present, any disagreement fails the test.

use std::path::{Path, PathBuf};

use retrom3::data::tokenizer::TextTokenizer;
use retrom3::model::config::{read_sentence_transformers_info, EncoderConfig};
use serde_json::Value;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// One expected case: text, max_length, HF ids.
struct Case {
    text: String,
    max_length: usize,
    ids: Vec<u32>,
}

fn as_ids(v: &Value, what: &str) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: expected an array of ids, got {v}"))
        .iter()
        .map(|x| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or_else(|| panic!("{what}: bad id {x}"))
        })
        .collect()
}

fn as_len(v: &Value, what: &str) -> usize {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or_else(|| panic!("{what}: expected a non-negative integer, got {v}"))
}

/// Reads expected.json (shapes described in the module docs; also accepts a list of
/// `{"text", "max_length", "input_ids"}` objects).
fn read_cases(dir: &Path) -> Vec<Case> {
    let path = dir.join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let default_max = || {
        let info = read_sentence_transformers_info(dir).unwrap();
        info.max_seq_length.unwrap_or_else(|| {
            panic!(
                "{}: no max_length and no sentence_bert_config.json",
                path.display()
            )
        })
    };
    if let Some(list) = v.as_array() {
        return list
            .iter()
            .enumerate()
            .map(|(i, c)| Case {
                text: c["text"]
                    .as_str()
                    .unwrap_or_else(|| panic!("case {i}: no text"))
                    .to_string(),
                max_length: c
                    .get("max_length")
                    .map_or_else(default_max, |m| as_len(m, "max_length")),
                ids: as_ids(&c["input_ids"], &format!("case {i}")),
            })
            .collect();
    }
    let texts = v["texts"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no \"texts\" array", path.display()));
    let ids = v["input_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no \"input_ids\" array", path.display()));
    assert_eq!(
        texts.len(),
        ids.len(),
        "{}: texts and input_ids differ in length",
        path.display()
    );
    let max_lengths: Vec<usize> = match v.get("max_length") {
        None | Some(Value::Null) => vec![default_max(); texts.len()],
        Some(Value::Array(per_text)) => per_text.iter().map(|m| as_len(m, "max_length")).collect(),
        Some(m) => vec![as_len(m, "max_length"); texts.len()],
    };
    assert_eq!(
        max_lengths.len(),
        texts.len(),
        "{}: one max_length per text",
        path.display()
    );
    texts
        .iter()
        .zip(ids)
        .zip(max_lengths)
        .enumerate()
        .map(|(i, ((t, ids), max_length))| Case {
            text: t
                .as_str()
                .unwrap_or_else(|| panic!("text {i} is not a string"))
                .to_string(),
            max_length,
            ids: as_ids(ids, &format!("input_ids[{i}]")),
        })
        .collect()
}

fn check_fixture(name: &str) {
    let dir = fixture_dir(name);
    if !dir.join("tokenizer.json").is_file() || !dir.join("expected.json").is_file() {
        eprintln!(
            "SKIP {name}: {} has no tokenizer.json + expected.json yet (fixture not committed)",
            dir.display()
        );
        return;
    }
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let cases = read_cases(&dir);
    assert!(!cases.is_empty(), "{name}: expected.json has no cases");

    let mut mismatches = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let ours = tok.encode(&case.text, case.max_length).unwrap();
        if ours != case.ids {
            mismatches.push(format!(
                "case {i} (max_length {}) {:?}:\n  hf   {:?}\n  ours {:?}",
                case.max_length, case.text, case.ids, ours
            ));
        }
        let (word_ids, words) = tok.encode_with_words(&case.text, case.max_length).unwrap();
        assert_eq!(
            word_ids, ours,
            "{name} case {i}: encode_with_words ids differ from encode"
        );
        assert_eq!(words.len(), ours.len());
    }
    // The batch path must agree too (same max_length groups).
    let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, c) in cases.iter().enumerate() {
        by_len.entry(c.max_length).or_default().push(i);
    }
    for (max_length, idx) in by_len {
        let texts: Vec<&str> = idx.iter().map(|&i| cases[i].text.as_str()).collect();
        let batch = tok.encode_batch(&texts, max_length).unwrap();
        for (k, &i) in idx.iter().enumerate() {
            if batch[k] != cases[i].ids {
                mismatches.push(format!("case {i}: encode_batch differs from HF"));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{name}: {} of {} cases differ from the HF tokenizer; first ones:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Side checks on a present fixture: config.json parses and its vocab_size equals the tokenizer's;
/// the sentence-transformers files agree with expected.json's "pooling" / "normalize"; pair texts
/// truncate to `full[..max - 1] + [eos]` (what tools/make_fixtures.py asserts for HF).
fn check_fixture_side(name: &str) {
    let dir = fixture_dir(name);
    if !dir.join("tokenizer.json").is_file() || !dir.join("expected.json").is_file() {
        return;
    }
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let config = EncoderConfig::from_file(dir.join("config.json")).unwrap();
    assert_eq!(
        tok.vocab_size(),
        config.vocab_size,
        "{name}: tokenizer vs config vocab_size"
    );

    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    let exp: Value = serde_json::from_str(&text).unwrap();
    if dir.join("modules.json").is_file() {
        let info = read_sentence_transformers_info(&dir).unwrap();
        if let Some(p) = exp.get("pooling").and_then(Value::as_str) {
            assert_eq!(info.pooling, Some(p.parse().unwrap()), "{name}: pooling");
        }
        if let Some(n) = exp.get("normalize").and_then(Value::as_bool) {
            assert_eq!(info.normalize, Some(n), "{name}: normalize");
        }
        if let (Some(m), Some(e)) = (info.max_seq_length, exp.get("max_length")) {
            assert_eq!(
                m,
                as_len(e, "max_length"),
                "{name}: max_seq_length vs max_length"
            );
        }
    }
    let Some(pairs) = exp.get("pairs").and_then(Value::as_array) else {
        return;
    };
    let max_q = as_len(&exp["max_query_length"], "max_query_length");
    let max_p = as_len(&exp["max_passage_length"], "max_passage_length");
    let eos = tok.eos_id().unwrap();
    for pair in pairs {
        for (key, max) in [("query", max_q), ("passage", max_p)] {
            let t = pair[key].as_str().unwrap();
            let full = tok.encode(t, usize::MAX).unwrap();
            let mut want = full.clone();
            if want.len() > max {
                want.truncate(max - 1);
                want.push(eos);
            }
            assert_eq!(tok.encode(t, max).unwrap(), want, "{name}: {key} {t:?}");
        }
    }
}

#[test]
fn tiny_xlmr_matches_hf() {
    check_fixture("tiny-xlmr");
    check_fixture_side("tiny-xlmr");
}

#[test]
fn tiny_bge_m3_layout_matches_hf() {
    check_fixture("tiny-bge-m3-layout");
    check_fixture_side("tiny-bge-m3-layout");
}

#[test]
fn tiny_bert_matches_hf() {
    check_fixture("tiny-bert");
    check_fixture_side("tiny-bert");
}
