//! `Pooling` and `read_sentence_transformers_info`: the optional sentence-transformers files of a
//! model directory (sentence_bert_config.json, modules.json, 1_Pooling/config.json).

use std::fs;
use std::path::{Path, PathBuf};

use retrom3::model::config::{read_sentence_transformers_info, Pooling, SentenceTransformersInfo};
use retrom3::Error;

/// A fresh, empty directory under the system temp dir, unique per test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retrom3-config-st-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

const MODULES_BGE_M3: &str = r#"[
  {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
  {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
  {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
]"#;

const POOLING_CLS: &str = r#"{
  "word_embedding_dimension": 1024,
  "pooling_mode_cls_token": true,
  "pooling_mode_mean_tokens": false,
  "pooling_mode_max_tokens": false,
  "pooling_mode_mean_sqrt_len_tokens": false
}"#;

const POOLING_MEAN: &str = r#"{
  "word_embedding_dimension": 384,
  "pooling_mode_cls_token": false,
  "pooling_mode_mean_tokens": true,
  "pooling_mode_max_tokens": false,
  "pooling_mode_mean_sqrt_len_tokens": false,
  "pooling_mode_weightedmean_tokens": false,
  "pooling_mode_lasttoken": false
}"#;

#[test]
fn pooling_parses_and_displays() {
    assert_eq!("cls".parse::<Pooling>().unwrap(), Pooling::Cls);
    assert_eq!("mean".parse::<Pooling>().unwrap(), Pooling::Mean);
    assert_eq!("CLS".parse::<Pooling>().unwrap(), Pooling::Cls);
    assert!(matches!("max".parse::<Pooling>(), Err(Error::Invalid(_))));
    assert!("".parse::<Pooling>().is_err());
    for p in [Pooling::Cls, Pooling::Mean] {
        assert_eq!(p.to_string().parse::<Pooling>().unwrap(), p);
    }
    assert_eq!(Pooling::Cls.to_string(), "cls");
    assert_eq!(Pooling::Mean.to_string(), "mean");
}

#[test]
fn empty_dir_gives_all_none() {
    let dir = temp_dir("empty");
    assert_eq!(
        read_sentence_transformers_info(&dir).unwrap(),
        SentenceTransformersInfo::default()
    );
}

#[test]
fn bge_m3_layout() {
    let dir = temp_dir("bge");
    write(
        &dir,
        "sentence_bert_config.json",
        r#"{"max_seq_length": 8192, "do_lower_case": false}"#,
    );
    write(&dir, "modules.json", MODULES_BGE_M3);
    write(&dir, "1_Pooling/config.json", POOLING_CLS);
    let info = read_sentence_transformers_info(&dir).unwrap();
    assert_eq!(
        info,
        SentenceTransformersInfo {
            max_seq_length: Some(8192),
            pooling: Some(Pooling::Cls),
            normalize: Some(true),
        }
    );
}

#[test]
fn mean_pooling_without_normalize() {
    let dir = temp_dir("mean");
    write(
        &dir,
        "sentence_bert_config.json",
        r#"{"max_seq_length": 256}"#,
    );
    write(
        &dir,
        "modules.json",
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"pool","type":"sentence_transformers.models.Pooling"}]"#,
    );
    write(&dir, "pool/config.json", POOLING_MEAN);
    let info = read_sentence_transformers_info(&dir).unwrap();
    assert_eq!(info.max_seq_length, Some(256));
    assert_eq!(info.pooling, Some(Pooling::Mean));
    assert_eq!(info.normalize, Some(false));
}

#[test]
fn pooling_without_modules_json() {
    let dir = temp_dir("nomodules");
    write(&dir, "1_Pooling/config.json", POOLING_MEAN);
    let info = read_sentence_transformers_info(&dir).unwrap();
    assert_eq!(info.pooling, Some(Pooling::Mean));
    assert_eq!(info.normalize, None);
    assert_eq!(info.max_seq_length, None);
}

#[test]
fn pooling_mode_string_is_accepted() {
    let dir = temp_dir("modestring");
    write(&dir, "1_Pooling/config.json", r#"{"pooling_mode": "cls"}"#);
    assert_eq!(
        read_sentence_transformers_info(&dir).unwrap().pooling,
        Some(Pooling::Cls)
    );
}

#[test]
fn null_max_seq_length_is_none() {
    let dir = temp_dir("nullmax");
    write(
        &dir,
        "sentence_bert_config.json",
        r#"{"max_seq_length": null}"#,
    );
    assert_eq!(
        read_sentence_transformers_info(&dir)
            .unwrap()
            .max_seq_length,
        None
    );
}

/// Asserts an error whose path is `dir/rel`.
fn assert_names_file(r: retrom3::Result<SentenceTransformersInfo>, dir: &Path, rel: &str) {
    match r {
        Err(Error::Format { path, msg }) => assert_eq!(path, dir.join(rel), "msg = {msg}"),
        other => panic!("expected Error::Format naming {rel}, got {other:?}"),
    }
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    let dir = temp_dir("bad-sbert");
    write(&dir, "sentence_bert_config.json", "{not json");
    assert_names_file(
        read_sentence_transformers_info(&dir),
        &dir,
        "sentence_bert_config.json",
    );

    let dir = temp_dir("bad-maxlen");
    write(
        &dir,
        "sentence_bert_config.json",
        r#"{"max_seq_length": "512"}"#,
    );
    assert_names_file(
        read_sentence_transformers_info(&dir),
        &dir,
        "sentence_bert_config.json",
    );

    let dir = temp_dir("bad-modules");
    write(&dir, "modules.json", r#"{"idx": 0}"#);
    assert_names_file(read_sentence_transformers_info(&dir), &dir, "modules.json");

    let dir = temp_dir("modules-no-type");
    write(&dir, "modules.json", r#"[{"idx": 0, "path": ""}]"#);
    assert_names_file(read_sentence_transformers_info(&dir), &dir, "modules.json");

    let dir = temp_dir("bad-pooling");
    write(&dir, "modules.json", MODULES_BGE_M3);
    write(&dir, "1_Pooling/config.json", "[]");
    assert_names_file(
        read_sentence_transformers_info(&dir),
        &dir,
        "1_Pooling/config.json",
    );

    let dir = temp_dir("pooling-missing");
    write(&dir, "modules.json", MODULES_BGE_M3);
    assert_names_file(read_sentence_transformers_info(&dir), &dir, "modules.json");

    let dir = temp_dir("pooling-escape");
    write(
        &dir,
        "modules.json",
        r#"[{"idx":1,"name":"1","path":"../elsewhere","type":"sentence_transformers.models.Pooling"}]"#,
    );
    assert_names_file(read_sentence_transformers_info(&dir), &dir, "modules.json");

    // A module this engine does not run (a Dense projection after the pooling): an error naming
    // it, not vectors of the wrong width.
    let dir = temp_dir("dense-module");
    write(
        &dir,
        "modules.json",
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
            {"idx":2,"name":"2","path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#,
    );
    write(
        &dir,
        "1_Pooling/config.json",
        r#"{"pooling_mode_cls_token": true}"#,
    );
    let e = read_sentence_transformers_info(&dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("modules.json") && e.contains("module 2") && e.contains("models.Dense"),
        "{e}"
    );
}

#[test]
fn unsupported_pooling_modes_are_errors() {
    for (name, body) in [
        ("max", r#"{"pooling_mode_max_tokens": true}"#),
        (
            "both",
            r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true}"#,
        ),
        ("none", r#"{"pooling_mode_cls_token": false}"#),
        ("lasttoken", r#"{"pooling_mode": "lasttoken"}"#),
        ("mistyped", r#"{"pooling_mode_cls_token": "yes"}"#),
    ] {
        let dir = temp_dir(&format!("mode-{name}"));
        write(&dir, "1_Pooling/config.json", body);
        assert_names_file(
            read_sentence_transformers_info(&dir),
            &dir,
            "1_Pooling/config.json",
        );
    }
}

/// `do_lower_case` of sentence_bert_config.json lower-cases every text before the tokenizer, as
/// sentence-transformers does (it was ignored: "Hello World" and "hello world" got other vectors
/// than sentence-transformers gives); the index fingerprint sees it; a bad value names the file.
#[test]
fn do_lower_case_lowercases_before_the_tokenizer() {
    use retrom3::{Device, EncodeOptions, M3Model};
    let d = tiny_xlmr_copy("lower");
    let texts = ["Hello World", "hello world"];
    let opts = EncodeOptions::all();
    let plain = M3Model::load(&d, Device::Cpu).unwrap();
    assert!(!plain.tokenizer.lowercases());
    let a = plain.encode(&texts, &opts).unwrap();
    // The fixture's tokenizer keeps case: the two texts differ without the flag.
    assert_ne!(a.dense.as_ref().unwrap()[0], a.dense.as_ref().unwrap()[1]);
    let fp_plain = retrom3::retrieval::ModelFingerprint::of_model(&plain).unwrap();

    write(
        &d,
        "sentence_bert_config.json",
        r#"{"max_seq_length": 64, "do_lower_case": true}"#,
    );
    let lower = M3Model::load(&d, Device::Cpu).unwrap();
    assert!(lower.tokenizer.lowercases());
    let b = lower.encode(&texts, &opts).unwrap();
    assert_eq!(b.dense.as_ref().unwrap()[0], b.dense.as_ref().unwrap()[1]);
    assert_eq!(b.dense.as_ref().unwrap()[1], a.dense.as_ref().unwrap()[1]);
    assert_eq!(b.sparse.as_ref().unwrap()[0], a.sparse.as_ref().unwrap()[1]);
    assert_eq!(
        b.colbert.as_ref().unwrap()[0],
        a.colbert.as_ref().unwrap()[1]
    );
    assert_eq!(
        lower.tokenizer.encode_pair("Q A", "P B", 16).unwrap(),
        plain.tokenizer.encode_pair("q a", "p b", 16).unwrap()
    );
    let fp_lower = retrom3::retrieval::ModelFingerprint::of_model(&lower).unwrap();
    assert_ne!(fp_plain, fp_lower);

    write(
        &d,
        "sentence_bert_config.json",
        r#"{"do_lower_case": "yes"}"#,
    );
    let e = M3Model::load(&d, Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("sentence_bert_config.json") && e.contains("do_lower_case"),
        "{e}"
    );
}

/// A copy of the tiny XLM-R fixture (its files) in a fresh directory.
fn tiny_xlmr_copy(name: &str) -> PathBuf {
    let d = temp_dir(name);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr");
    for e in fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    }
    d
}

/// `compute_score`'s default lengths are 512 within the position table, as FlagEmbedding's: a
/// max_seq_length of 8 in sentence_bert_config.json (encode's default) does not cut the pair.
#[test]
fn score_defaults_ignore_max_seq_length() {
    use retrom3::{Device, M3Model};
    let d = tiny_xlmr_copy("scorelen");
    let pairs = [(
        "what is the capital city of france",
        "paris is the capital and largest city of france by population",
    )];
    let opts = retrom3::ScoreOptions::default();
    let want = M3Model::load(&d, Device::Cpu)
        .unwrap()
        .compute_score(&pairs, &opts)
        .unwrap();
    write(&d, "sentence_bert_config.json", r#"{"max_seq_length": 8}"#);
    let m = M3Model::load(&d, Device::Cpu).unwrap();
    assert_eq!(m.max_length, 8);
    let got = m.compute_score(&pairs, &opts).unwrap();
    assert_eq!(got, want);
}
