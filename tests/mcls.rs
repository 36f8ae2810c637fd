//! MCLS (SPEC §3.5, decision 10.7) on the tiny XLM-R fixture, with a small chunk size so that
//! the fixture's 40-token limit holds several chunks.

use retrom3::autograd::Tape;
use retrom3::infer::insert_mcls;
use retrom3::model::encoder::EncoderInput;
use retrom3::{Device, EncodeOptions, M3Model};
use std::path::PathBuf;

fn model() -> M3Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr");
    M3Model::load(dir, Device::Cpu).unwrap()
}

const LONG: &str =
    "The quick brown fox jumps over the lazy dog while the server answers every request \
                    with a redirect to another location on the same host";

#[test]
fn insert_mcls_places_and_truncates() {
    let seq: Vec<u32> = [0].into_iter().chain(10..20).chain([2]).collect();
    assert_eq!(
        insert_mcls(&seq, 0, 4, 40),
        vec![0, 10, 11, 12, 13, 0, 14, 15, 16, 17, 0, 18, 19, 2]
    );
    // The inserted tokens count toward max_length; content is cut from the end.
    assert_eq!(
        insert_mcls(&seq, 0, 4, 8),
        vec![0, 10, 11, 12, 13, 0, 14, 2]
    );
    // At most one chunk of content: unchanged.
    assert_eq!(insert_mcls(&seq, 0, 10, 40), seq);
    assert_eq!(insert_mcls(&seq, 0, 256, 40), seq);
}

fn opts(mcls: bool, chunk: usize) -> EncodeOptions {
    EncodeOptions {
        mcls,
        mcls_chunk: chunk,
        max_length: Some(40),
        batch_size: 2,
        ..EncodeOptions::all()
    }
}

#[test]
fn mcls_short_text_equals_plain_cls() {
    let m = model();
    // The second text holds a literal "<s>" (HTML's strikethrough tag): a token of the text, not
    // an MCLS marker (markers are found by place, not by id).
    let texts = ["short text", "another <s> one"];
    let a = m.encode(&texts, &opts(false, 256)).unwrap();
    // A chunk past any length is one chunk too (the marker positions overflowed usize).
    for chunk in [256, usize::MAX - 1, usize::MAX] {
        let b = m.encode(&texts, &opts(true, chunk)).unwrap();
        // Dense: the same vector, to the bit (the dense head's normalisation in both).
        assert_eq!(a.dense, b.dense);
        assert_eq!(a.sparse, b.sparse);
        assert_eq!(a.colbert, b.colbert);
    }
}

#[test]
fn mcls_dense_is_mean_of_cls_states_and_other_heads_skip_inserted_tokens() {
    let m = model();
    let chunk = 6;
    let texts = [LONG, "short"];
    let out = m.encode(&texts, &opts(true, chunk)).unwrap();
    let plain_ids = m.tokenizer.encode(LONG, 40).unwrap();
    let cls = plain_ids[0];
    let ids = insert_mcls(&plain_ids, cls, chunk, 40);
    let n_cls: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == cls).collect();
    assert!(
        n_cls.len() >= 3,
        "the text should span several chunks: {ids:?}"
    );
    assert!(ids.len() <= 40);

    // Reference dense: encoder forward on the inserted sequence, mean of the CLS rows, normalise.
    let input = EncoderInput::pad(std::slice::from_ref(&ids), m.encoder.config.pad_token_id);
    let mut tape = Tape::no_grad();
    let p = m.encoder.params.bind(&mut tape);
    let hs = m.encoder.forward(&mut tape, &p, &input, None).unwrap();
    let v = hs.value().f32s().unwrap().to_vec();
    let h = m.encoder.config.hidden_size;
    let mut mean = vec![0f64; h];
    for &i in &n_cls {
        for (a, &x) in mean.iter_mut().zip(&v[i * h..(i + 1) * h]) {
            *a += x as f64 / n_cls.len() as f64;
        }
    }
    let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
    let dense = &out.dense.as_ref().unwrap()[0];
    for (a, b) in dense.iter().zip(&mean) {
        assert!((*a as f64 - b / norm).abs() < 1e-5, "{a} vs {}", b / norm);
    }
    // It differs from plain CLS pooling of the same text.
    let plain = m.encode(&texts, &opts(false, 256)).unwrap();
    let d = dense
        .iter()
        .zip(&plain.dense.as_ref().unwrap()[0])
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>();
    assert!(d > 1e-4);
    // The short text (one chunk) is unaffected even when batched with a long one.
    let short_alone = m.encode(&["short"], &opts(false, 256)).unwrap();
    let sd = &out.dense.as_ref().unwrap()[1];
    for (a, b) in sd.iter().zip(&short_alone.dense.unwrap()[0]) {
        assert!((a - b).abs() < 1e-5);
    }

    // Same sequence without MCLS pooling: sparse is identical (special ids are dropped) and
    // ColBERT is identical once the inserted positions are removed.
    let no_pool = m
        .encode_ids(vec![ids.clone()], &opts(false, 256), &mut |_| {})
        .unwrap();
    assert_eq!(out.sparse.as_ref().unwrap()[0], no_pool.sparse.unwrap()[0]);
    assert!(out.sparse.as_ref().unwrap()[0]
        .iter()
        .all(|&(t, _)| t != cls));
    let col = &out.colbert.as_ref().unwrap()[0];
    let expect: Vec<Vec<f32>> = no_pool.colbert.unwrap()[0]
        .iter()
        .enumerate()
        .filter(|(j, _)| ids[j + 1] != cls)
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(col.len(), ids.len() - n_cls.len());
    assert_eq!(col, &expect);
}

#[test]
fn mcls_chunk_zero_is_refused() {
    let err = model().encode(&[LONG], &opts(true, 0)).unwrap_err();
    assert!(err.to_string().contains("chunk"), "{err}");
}

#[test]
fn encode_cli_mcls_flag() {
    let dir = std::env::temp_dir().join(format!("retrom3-mcls-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.jsonl");
    std::fs::write(&input, format!("{}\n", serde_json::json!({ "text": LONG }))).unwrap();
    let run = |extra: &[&str], out: &str| {
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
            .args(["encode", "--model"])
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr"))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(dir.join(out))
            .args(["--max-length", "40", "--dense"])
            .args(extra)
            .status()
            .unwrap();
        assert!(st.success());
        let line = std::fs::read_to_string(dir.join(out)).unwrap();
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        v["dense"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect::<Vec<f32>>()
    };
    let cli = run(&["--mcls", "--mcls-chunk", "6"], "mcls.jsonl");
    let lib = model()
        .encode(&[LONG], &opts(true, 6))
        .unwrap()
        .dense
        .unwrap();
    for (a, b) in cli.iter().zip(&lib[0]) {
        assert!((a - b).abs() < 1e-6);
    }
    let plain = run(&[], "plain.jsonl");
    assert!(cli.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-4));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Token-id input that cannot be a tokenized text is refused naming the sequence: empty (it used
/// to panic under MCLS and fail with "select_rows: row 0 of 0" without), and, under MCLS, not
/// starting with the CLS id (the dense vector would silently be zeros).
#[test]
fn encode_ids_refuses_sequences_that_are_not_tokenized_texts() {
    let m = model();
    let cls = m.tokenizer.encode("", 2).unwrap()[0];
    for mcls in [false, true] {
        let opts = EncodeOptions {
            mcls,
            ..EncodeOptions::all()
        };
        let e = m
            .encode_ids(vec![vec![cls, 7, 2], vec![]], &opts, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("sequence 1: no token ids"), "{e}");
    }
    let opts = EncodeOptions {
        mcls: true,
        ..EncodeOptions::all()
    };
    let e = m
        .encode_ids(vec![vec![7, 8, 2]], &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("sequence 0: starts with id 7"), "{e}");
}

/// MCLS pools [CLS] states: with mean pooling (the model's, or asked for) it is an error, not a
/// silently different vector (a one-chunk text would not encode as without MCLS).
#[test]
fn mcls_with_mean_pooling_is_refused() {
    let mean_model = retrom3::M3Model::load(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert"),
        retrom3::Device::Cpu,
    )
    .unwrap();
    assert_eq!(mean_model.pooling, retrom3::Pooling::Mean);
    let o = EncodeOptions {
        sparse: false,
        colbert: false,
        max_length: None,
        ..opts(true, 256)
    };
    let e = mean_model
        .encode(&["short text"], &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("MCLS") && e.contains("mean-pooled"), "{e}");
    let asked = EncodeOptions {
        pooling: Some(retrom3::Pooling::Mean),
        ..opts(true, 256)
    };
    let e = model()
        .encode(&["short text"], &asked)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--pooling mean"), "{e}");
    // Without a dense vector there is nothing mean-pooled: sparse / ColBERT with MCLS run.
    let no_dense = EncodeOptions {
        dense: false,
        ..asked
    };
    model().encode(&["short text"], &no_dense).unwrap();
}
