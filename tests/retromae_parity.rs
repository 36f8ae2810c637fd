//! RetroMAE parity with the reference implementation (FlagEmbedding 1.2.11's retromae_pretrain,
//! dumped by tools/dump_retromae.py on the tiny XLM-R with fixed masks): both losses and the
//! gradient of every tensor (encoder, LM head, decoder layer).

mod common;

use retrom3::autograd::Tape;
use retrom3::data::masking::RetroMaeBatch;
use retrom3::io::read_safetensors;
use retrom3::model::encoder::{Encoder, EncoderInput};
use retrom3::model::retromae::RetroMae;
use retrom3::{EncoderConfig, Tensor};
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.to_f32()
        .f32s()
        .unwrap()
        .iter()
        .map(|&x| x as i64)
        .collect()
}

#[test]
fn losses_and_gradients_match_the_reference_code() {
    let dir = fixture("retromae");
    let weights = read_safetensors(&dir.join("weights.safetensors")).unwrap();
    let batch = read_safetensors(&dir.join("batch.safetensors")).unwrap();
    let want = read_safetensors(&dir.join("expected.safetensors")).unwrap();
    let cfg = EncoderConfig::from_file(fixture("tiny-xlmr/config.json")).unwrap();
    let enc = Encoder::from_tensors(cfg, &weights, &dir).unwrap();
    let model = RetroMae::new(enc, &weights, 0.5, 0).unwrap();
    // Every tensor comes from the fixture: none may be freshly initialised.
    for s in model.params.specs() {
        assert!(weights.contains_key(&s.name), "fixture lacks {}", s.name);
    }
    let (b, l) = (
        batch["enc_input_ids"].dims()[0],
        batch["enc_input_ids"].dims()[1],
    );
    let mask: Vec<u8> = ints(&batch["attention_mask"])
        .iter()
        .map(|&x| x as u8)
        .collect();
    let to_u32 = |t: &Tensor| ints(t).iter().map(|&x| x as u32).collect::<Vec<u32>>();
    let vis: Vec<u8> = ints(&batch["dec_visibility"])
        .iter()
        .map(|&x| x as u8)
        .collect();
    assert_eq!(vis.len(), b * l * l);
    let rb = RetroMaeBatch {
        enc: EncoderInput {
            ids: to_u32(&batch["enc_input_ids"]),
            mask: mask.clone(),
            batch: b,
            len: l,
        },
        enc_labels: ints(&batch["enc_labels"]),
        dec: EncoderInput {
            ids: to_u32(&batch["dec_input_ids"]),
            mask,
            batch: b,
            len: l,
        },
        dec_labels: ints(&batch["dec_labels"]),
        words: vec![0; b * l],
        mask_seed: 0,
        dense_visibility: Some(vis),
    };
    let mut tape = Tape::new();
    let p = model.params.bind(&mut tape);
    let loss = model.loss(&mut tape, &p, &rb, None).unwrap();
    let (we, wd) = (
        want["loss.enc"].f32s().unwrap()[0],
        want["loss.dec"].f32s().unwrap()[0],
    );
    eprintln!(
        "retromae parity: enc {} vs {we}, dec {} vs {wd}",
        loss.enc, loss.dec
    );
    assert!(
        (loss.enc - we).abs() <= 1e-5 * we.abs(),
        "enc loss {} vs {we}",
        loss.enc
    );
    assert!(
        (loss.dec - wd).abs() <= 1e-5 * wd.abs(),
        "dec loss {} vs {wd}",
        loss.dec
    );
    let grads = tape.backward(&loss.total).unwrap();
    let mut worst = (0.0f64, String::new());
    for (k, s) in model.params.specs().iter().enumerate() {
        let w = want
            .get(&format!("grad.{}", s.name))
            .unwrap_or_else(|| panic!("no grad.{}", s.name));
        let g = grads
            .get(&p[k])
            .unwrap_or_else(|| panic!("no gradient reached {}", s.name));
        if let Some(rel) = common::check_grad(
            &format!("grad.{}", s.name),
            g.f32s().unwrap(),
            w.f32s().unwrap(),
            1e-4,
            1e-4,
        ) {
            if rel > worst.0 {
                worst = (rel, s.name.clone());
            }
        }
    }
    eprintln!(
        "retromae parity: {} gradients, worst norm-wise rel err {:.2e} ({})",
        model.params.specs().len(),
        worst.0,
        worst.1
    );
}
