//! Golden parity against the PyTorch / FlagEmbedding / sentence-transformers dumps in
//! tests/fixtures (made by tools/make_fixtures.py): hidden states, dense / sparse / ColBERT
//! outputs, compute_score, and the gradient of a loss through every parameter and both heads.
//! Every check prints its worst error, so `cargo test --test parity -- --nocapture` is the parity
//! report recorded in docs/parity.md.

mod common;

use retrom3::autograd::Tape;
use retrom3::io::safetensors::read_safetensors;
use retrom3::model::encoder::EncoderInput;
use retrom3::{ops, Device, EncodeOptions, M3Model, ScoreOptions, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        _ => panic!("not a number array: {v}"),
    }
}

/// Element-wise check |a - b| <= atol + rtol·|b| (llm.c's rule); panics naming `what` and the
/// element. Returns the largest absolute difference seen.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> f32 {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs {}",
        got.len(),
        want.len()
    );
    let mut worst = 0.0f32;
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let d = (a - b).abs();
        assert!(
            d <= atol + rtol * b.abs(),
            "{what}[{i}]: got {a}, want {b} (diff {d:.3e})"
        );
        worst = worst.max(d);
    }
    worst
}

fn ids_of(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn hidden_of(model: &M3Model, input: &EncoderInput) -> Vec<f32> {
    let mut tape = Tape::no_grad();
    let p = model.encoder.params.bind(&mut tape);
    model
        .encoder
        .forward(&mut tape, &p, input, None)
        .unwrap()
        .value()
        .f32s()
        .unwrap()
        .to_vec()
}

fn check_hidden_states(name: &str, model: &M3Model, exp: &Value) {
    let ids = ids_of(&exp["input_ids"]);
    let mut worst = 0.0f32;
    for (i, seq) in ids.iter().enumerate() {
        let h = hidden_of(
            model,
            &EncoderInput::pad(std::slice::from_ref(seq), model.encoder.config.pad_token_id),
        );
        let want = floats(&exp["last_hidden_state"][i]);
        worst = worst.max(assert_close(
            &format!("{name} last_hidden_state text {i}"),
            &h,
            &want,
            2e-5,
            1e-5,
        ));
    }
    eprintln!(
        "parity {name}: last_hidden_state ({} texts) max abs diff {worst:.2e}",
        ids.len()
    );
    if exp.get("batch_input_ids").is_some() {
        let bids = ids_of(&exp["batch_input_ids"]);
        let mask: Vec<u8> = floats(&exp["batch_attention_mask"])
            .iter()
            .map(|&m| m as u8)
            .collect();
        let input = EncoderInput {
            batch: bids.len(),
            len: bids[0].len(),
            ids: bids.concat(),
            mask: mask.clone(),
        };
        let h = hidden_of(model, &input);
        let want = floats(&exp["batch_last_hidden_state"]);
        let hidden = model.encoder.config.hidden_size;
        // Only real rows are defined (padded query rows are garbage in the reference too).
        let (mut g, mut w) = (Vec::new(), Vec::new());
        for (r, &m) in mask.iter().enumerate() {
            if m != 0 {
                g.extend_from_slice(&h[r * hidden..(r + 1) * hidden]);
                w.extend_from_slice(&want[r * hidden..(r + 1) * hidden]);
            }
        }
        let e = assert_close(&format!("{name} padded batch hidden"), &g, &w, 2e-5, 1e-5);
        eprintln!("parity {name}: padded batch hidden (real rows) max abs diff {e:.2e}");
    }
}

fn check_m3_outputs(name: &str) {
    let model = M3Model::load(fixture(name), Device::Cpu).unwrap();
    let exp = expected(name);
    check_hidden_states(name, &model, &exp);
    let texts: Vec<String> = exp["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let opts = EncodeOptions {
        max_length: Some(exp["max_length"].as_u64().unwrap() as usize),
        batch_size: 5,
        ..EncodeOptions::all()
    };
    let out = model.encode(&refs, &opts).unwrap();
    let dense = out.dense.unwrap();
    let sparse = out.sparse.unwrap();
    let colbert = out.colbert.unwrap();
    let (mut wd, mut ws, mut wc) = (0.0f32, 0.0f32, 0.0f32);
    for i in 0..texts.len() {
        wd = wd.max(assert_close(
            &format!("{name} dense {i}"),
            &dense[i],
            &floats(&exp["dense"][i]),
            1e-6,
            1e-5,
        ));
        let want: Vec<(u32, f32)> = {
            let mut v: Vec<(u32, f32)> = exp["sparse"][i]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, w)| (k.parse().unwrap(), w.as_f64().unwrap() as f32))
                .collect();
            v.sort_by_key(|e| e.0);
            v
        };
        let got_ids: Vec<u32> = sparse[i].iter().map(|e| e.0).collect();
        let want_ids: Vec<u32> = want.iter().map(|e| e.0).collect();
        assert_eq!(got_ids, want_ids, "{name} sparse token ids of text {i}");
        let gw: Vec<f32> = sparse[i].iter().map(|e| e.1).collect();
        let ww: Vec<f32> = want.iter().map(|e| e.1).collect();
        // A term weight is a 1 x hidden dot product: f32 summation order moves it by ~1e-6 in
        // absolute terms, whatever its size, so the tolerance is absolute here.
        ws = ws.max(assert_close(
            &format!("{name} sparse {i}"),
            &gw,
            &ww,
            5e-6,
            1e-5,
        ));
        let want_c = &exp["colbert"][i];
        assert_eq!(
            colbert[i].len(),
            want_c.as_array().unwrap().len(),
            "{name} colbert rows of text {i}"
        );
        wc = wc.max(assert_close(
            &format!("{name} colbert {i}"),
            &colbert[i].concat(),
            &floats(want_c),
            1e-6,
            1e-5,
        ));
    }
    eprintln!("parity {name}: max abs diff dense {wd:.2e}, sparse {ws:.2e}, colbert {wc:.2e} over {} texts", texts.len());

    let pairs: Vec<(String, String)> = exp["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["query"].as_str().unwrap().into(),
                p["passage"].as_str().unwrap().into(),
            )
        })
        .collect();
    let prefs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(q, p)| (q.as_str(), p.as_str()))
        .collect();
    let w = floats(&exp["weights"]);
    let sopts = ScoreOptions {
        max_query_length: Some(exp["max_query_length"].as_u64().unwrap() as usize),
        max_passage_length: Some(exp["max_passage_length"].as_u64().unwrap() as usize),
        weights: [w[0], w[1], w[2]],
        batch_size: 3,
    };
    let scores = model.compute_score(&prefs, &sopts).unwrap();
    let mut worst = 0.0f32;
    for (key, get) in [
        (
            "dense",
            (|s: &retrom3::PairScores| s.dense) as fn(&retrom3::PairScores) -> f32,
        ),
        ("sparse", |s| s.sparse),
        ("colbert", |s| s.colbert),
        ("sparse+dense", |s| s.sparse_dense),
        ("colbert+sparse+dense", |s| s.colbert_sparse_dense),
    ] {
        let got: Vec<f32> = scores.iter().map(get).collect();
        worst = worst.max(assert_close(
            &format!("{name} score {key}"),
            &got,
            &floats(&exp["scores"][key]),
            1e-6,
            1e-5,
        ));
    }
    eprintln!(
        "parity {name}: compute_score (5 kinds x {} pairs) max abs diff {worst:.2e}",
        pairs.len()
    );
}

#[test]
fn tiny_xlmr_matches_flagembedding() {
    check_m3_outputs("tiny-xlmr");
}

#[test]
fn bge_m3_layout_bin_and_fp16_heads_match_flagembedding() {
    check_m3_outputs("tiny-bge-m3-layout");
}

#[test]
fn tiny_bert_mean_pooling_matches_sentence_transformers() {
    let model = M3Model::load(fixture("tiny-bert"), Device::Cpu).unwrap();
    let exp = expected("tiny-bert");
    assert_eq!(model.pooling, retrom3::Pooling::Mean);
    assert!(model.normalize);
    assert_eq!(model.max_length, 20);
    check_hidden_states("tiny-bert", &model, &exp);
    let texts: Vec<String> = exp["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let out = model.encode(&refs, &EncodeOptions::default()).unwrap();
    let dense = out.dense.unwrap();
    let mut worst = 0.0f32;
    for (i, d) in dense.iter().enumerate() {
        worst = worst.max(assert_close(
            &format!("tiny-bert dense {i}"),
            d,
            &floats(&exp["dense"][i]),
            1e-6,
            1e-5,
        ));
    }
    eprintln!("parity tiny-bert: dense (mean pooling) max abs diff {worst:.2e}");
    // No heads: asking for sparse is a clear error, not freshly initialised heads.
    let err = model
        .encode(&refs, &EncodeOptions::all())
        .unwrap_err()
        .to_string();
    assert!(err.contains("sparse_linear.pt"), "{err}");
}

/// The loss of tools/make_fixtures.py's gradient dump, built from our ops.
#[test]
fn gradients_of_every_parameter_match_pytorch() {
    let model = M3Model::load(fixture("tiny-xlmr"), Device::Cpu).unwrap();
    let g = read_safetensors(&fixture("tiny-xlmr").join("grads.safetensors")).unwrap();
    let ids: Vec<u32> = g["input_ids"]
        .to_f32()
        .f32s()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let mask: Vec<u8> = g["attention_mask"]
        .to_f32()
        .f32s()
        .unwrap()
        .iter()
        .map(|&x| x as u8)
        .collect();
    let (b, l) = (g["input_ids"].dims()[0], g["input_ids"].dims()[1]);
    let hidden = model.encoder.config.hidden_size;
    let input = EncoderInput {
        ids,
        mask: mask.clone(),
        batch: b,
        len: l,
    };
    let heads = model.heads.as_ref().unwrap();

    let mut tape = Tape::new();
    let p = model.encoder.params.bind(&mut tape);
    let cw = tape.leaf(heads.colbert_weight.clone());
    let cb = tape.leaf(heads.colbert_bias.clone());
    let sw = tape.leaf(heads.sparse_weight.clone());
    let sb = tape.leaf(heads.sparse_bias.clone());
    let hs = model.encoder.forward(&mut tape, &p, &input, None).unwrap();

    let masked = |t: &Tensor, m: &[u8], width: usize| -> Tensor {
        let v: Vec<f32> = t
            .f32s()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, &x)| if m[i / width] != 0 { x } else { 0.0 })
            .collect();
        Tensor::from_vec(v, t.dims()).unwrap()
    };
    // sum(H * R * mask)
    let l1 = ops::dot_sum(&mut tape, &hs, &masked(&g["R"], &mask, hidden)).unwrap();
    // sum(H[:, 0] * Rd)
    let cls_rows: Vec<usize> = (0..b).map(|i| i * l).collect();
    let cls = ops::select_rows(&mut tape, &hs, &cls_rows).unwrap();
    let l2 = ops::dot_sum(&mut tape, &cls, &g["Rd"]).unwrap();
    // sum(relu(sparse_linear(H)) * Rs * mask)
    let sw_out = ops::linear(&mut tape, &hs, &sw, Some(&sb)).unwrap();
    let sw_out = ops::relu(&mut tape, &sw_out).unwrap();
    let l3 = ops::dot_sum(&mut tape, &sw_out, &masked(&g["Rs"], &mask, 1)).unwrap();
    // sum(normalize(colbert_linear(H[:, 1:]) * mask[:, 1:]) * Rc)
    let rows: Vec<usize> = (0..b)
        .flat_map(|bi| (1..l).map(move |li| bi * l + li))
        .collect();
    let h1 = ops::select_rows(&mut tape, &hs, &rows).unwrap();
    let c = ops::linear(&mut tape, &h1, &cw, Some(&cb)).unwrap();
    let m1: Arc<[f32]> = rows
        .iter()
        .map(|&r| mask[r] as f32)
        .collect::<Vec<_>>()
        .into();
    let c = ops::mul_rows(&mut tape, &c, m1).unwrap();
    let c = ops::l2_normalize(&mut tape, &c, 1e-12).unwrap();
    let l4 = ops::dot_sum(&mut tape, &c, &g["Rc"]).unwrap();
    let s = ops::add(&mut tape, &l1, &l2).unwrap();
    let s = ops::add(&mut tape, &s, &l3).unwrap();
    let loss = ops::add(&mut tape, &s, &l4).unwrap();
    let want_loss = g["loss"].f32s().unwrap()[0];
    let got_loss = loss.value().f32s().unwrap()[0];
    assert!(
        (got_loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
        "loss {got_loss} vs {want_loss}"
    );
    let grads = tape.backward(&loss).unwrap();

    let mut named: Vec<(String, &retrom3::autograd::Var)> = model
        .encoder
        .params
        .specs()
        .iter()
        .map(|s| s.name.clone())
        .zip(p.iter())
        .collect();
    named.push(("colbert_linear.weight".into(), &cw));
    named.push(("colbert_linear.bias".into(), &cb));
    named.push(("sparse_linear.weight".into(), &sw));
    named.push(("sparse_linear.bias".into(), &sb));
    let mut worst = (0.0f64, String::new());
    for (name, var) in named {
        let want = g
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("fixture lacks grad.{name}"));
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        assert_eq!(got.dims(), want.dims(), "{name}");
        if let Some(rel) = common::check_grad(
            &format!("grad.{name}"),
            got.f32s().unwrap(),
            want.f32s().unwrap(),
            1e-4,
            1e-3,
        ) {
            if rel > worst.0 {
                worst = (rel, name);
            }
        }
    }
    eprintln!(
        "parity tiny-xlmr: loss {got_loss} vs {want_loss}; gradients of {} tensors, worst norm-wise rel err {:.2e} ({})",
        model.encoder.params.specs().len() + 4,
        worst.0,
        worst.1
    );
}
