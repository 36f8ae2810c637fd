//! Mutation tests of the text inputs (config.json, tokenizer.json, sentence-transformers files,
//! JSONL): truncations at every length and random byte flips must give `Err` or a valid load —
//! never a panic. (Binary checkpoints are covered by io_mutation.rs.)

use retrom3::data::jsonl::{read_pairs, read_texts};
use retrom3::data::m3_data::read_train_file;
use retrom3::data::TextTokenizer;
use retrom3::model::config::read_sentence_transformers_info;
use retrom3::EncoderConfig;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Feed `check` every truncation (or every `step`-th) and `flips` random single/double byte
/// mutations of `bytes`, written to `path`; a panic fails with the case named.
fn mutate(
    name: &str,
    bytes: &[u8],
    path: &Path,
    step: usize,
    flips: usize,
    check: impl Fn(&Path) -> bool,
) {
    let mut cases = Vec::new();
    for len in (0..bytes.len()).step_by(step.max(1)) {
        cases.push((format!("truncate {len}"), bytes[..len].to_vec()));
    }
    let mut rng = XorShift(0x9E37_79B9 ^ bytes.len() as u64);
    for i in 0..flips {
        let mut b = bytes.to_vec();
        for _ in 0..1 + i % 2 {
            let at = (rng.next() as usize) % b.len();
            b[at] = match rng.next() % 4 {
                0 => b'"',
                1 => b'{',
                2 => 0xff,
                _ => rng.next() as u8,
            };
        }
        cases.push((format!("flip #{i}"), b));
    }
    let (mut ok, mut err) = (0, 0);
    for (what, data) in cases {
        std::fs::write(path, &data).unwrap();
        match catch_unwind(AssertUnwindSafe(|| check(path))) {
            Ok(true) => ok += 1,
            Ok(false) => err += 1,
            Err(_) => panic!("{name}: {what} panicked"),
        }
    }
    eprintln!("{name}: {ok} loads, {err} errors, 0 panics");
    assert!(err > 0, "{name}: mutations must be able to fail");
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retrom3-mut-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn config_json_mutations() {
    let d = scratch("cfg");
    let bytes = std::fs::read(fixture("tiny-xlmr/config.json")).unwrap();
    mutate(
        "config.json",
        &bytes,
        &d.join("config.json"),
        1,
        3000,
        |p| EncoderConfig::from_file(p).is_ok(),
    );
}

#[test]
fn sentence_transformers_files_mutations() {
    let d = scratch("st");
    std::fs::create_dir_all(d.join("1_Pooling")).unwrap();
    for f in [
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        std::fs::copy(fixture("tiny-bert").join(f), d.join(f)).unwrap();
    }
    for f in [
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        let bytes = std::fs::read(fixture("tiny-bert").join(f)).unwrap();
        let dir = d.clone();
        mutate(f, &bytes, &d.join(f), 1, 1000, move |_| {
            read_sentence_transformers_info(&dir).is_ok()
        });
        std::fs::copy(fixture("tiny-bert").join(f), d.join(f)).unwrap();
    }
}

#[test]
fn tokenizer_json_mutations() {
    let d = scratch("tok");
    let bytes = std::fs::read(fixture("tiny-bert/tokenizer.json")).unwrap();
    mutate(
        "tokenizer.json (WordPiece)",
        &bytes,
        &d.join("tokenizer.json"),
        7,
        1500,
        |p| {
            TextTokenizer::from_file(p)
                .and_then(|t| t.encode("hello world [MASK]", 16))
                .is_ok()
        },
    );
}

#[test]
fn jsonl_mutations() {
    let d = scratch("jsonl");
    let texts = "{\"text\": \"The quick brown fox\"}\n{\"text\": \"北京是中国的首都\"}\n{\"text\": \"Москва\"}\n";
    mutate(
        "texts.jsonl",
        texts.as_bytes(),
        &d.join("t.jsonl"),
        1,
        2000,
        |p| read_texts(p).is_ok(),
    );
    let pairs =
        "{\"query\": \"what\", \"passage\": \"this\"}\n{\"query\": \"q2\", \"passage\": \"p2\"}\n";
    mutate(
        "pairs.jsonl",
        pairs.as_bytes(),
        &d.join("p.jsonl"),
        1,
        2000,
        |p| read_pairs(p).is_ok(),
    );
    let train = std::fs::read(fixture("m3-train/train.jsonl")).unwrap();
    mutate(
        "train.jsonl",
        &train[..1200.min(train.len())],
        &d.join("tr.jsonl"),
        3,
        2000,
        |p| read_train_file(p).is_ok(),
    );
}
