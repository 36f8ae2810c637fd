//! RetroMAE: the loss's backward against finite differences (both mask modes), pre-training
//! lowers the loss, and a resumed run is bit-identical to an uninterrupted one.

mod common;

use common::Rng as TRng;
use retrom3::autograd::Tape;
use retrom3::data::masking::{make_batch, MaskingConfig, MaskingVocab};
use retrom3::data::rng::Rng;
use retrom3::model::encoder::Encoder;
use retrom3::model::retromae::RetroMae;
use retrom3::train::retromae::{pretrain, PretrainConfig};
use retrom3::train::{AdamW, TrainState};
use retrom3::{EncoderConfig, Tensor};
use std::path::{Path, PathBuf};

fn vocab(n: usize) -> MaskingVocab {
    MaskingVocab {
        cls: 0,
        eos: 2,
        pad: 1,
        mask: (n - 1) as u32,
        vocab_size: n,
        word_start: (0..n).map(|i| i < 5 || i % 3 != 0).collect(),
        special: (0..n).map(|i| i < 4 || i == n - 1).collect(),
    }
}

fn tiny_model(seed: u64) -> RetroMae {
    model_of(seed, 8, 0.3)
}

fn model_of(seed: u64, hidden: usize, noise: f32) -> RetroMae {
    let cfg = EncoderConfig::new_xlmr(40, hidden, 1, 2, 2 * hidden, 24).unwrap();
    let enc = Encoder::init_random(cfg, seed).unwrap();
    let mut m = RetroMae::new(enc, &Default::default(), 0.5, seed).unwrap();
    // Larger, randomised weights so every tensor matters for the loss.
    let mut rng = TRng::new(seed);
    let vals: Vec<Tensor> = m
        .params
        .values()
        .iter()
        .map(|t| {
            let d = t.dims().to_vec();
            let noise = rng.tensor(&d, noise);
            let v: Vec<f32> = t
                .f32s()
                .unwrap()
                .iter()
                .zip(noise.f32s().unwrap())
                .map(|(a, b)| a + b)
                .collect();
            Tensor::from_vec(v, &d).unwrap()
        })
        .collect();
    m.params.set_values(vals).unwrap();
    m
}

fn check_grads(reference_compat: bool) {
    let model = tiny_model(3);
    let v = vocab(40);
    let docs: Vec<Vec<u32>> = vec![(5..17).collect(), (20..27).collect()];
    let refs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
    let cfg = MaskingConfig {
        p_enc: 0.3,
        p_dec: 0.5,
        reference_compat,
    };
    let batch = make_batch(&refs, &v, &cfg, 16, &mut Rng::new(5, 0)).unwrap();
    let loss_of = |m: &RetroMae| -> f64 {
        let mut t = Tape::no_grad();
        let p = m.params.bind(&mut t);
        m.loss(&mut t, &p, &batch, None)
            .unwrap()
            .total
            .value()
            .f32s()
            .unwrap()[0] as f64
    };
    let mut tape = Tape::new();
    let p = model.params.bind(&mut tape);
    let loss = model.loss(&mut tape, &p, &batch, None).unwrap();
    let grads = tape.backward(&loss.total).unwrap();
    let eps = 1e-2f32;
    let mut checked = 0;
    for (k, spec) in model.params.specs().iter().enumerate() {
        let g = grads
            .get(&p[k])
            .unwrap_or_else(|| panic!("no gradient for {}", spec.name));
        let n = spec.dims.iter().product::<usize>();
        let coords: Vec<usize> = if spec.name.contains("word_embeddings") {
            vec![6 * 8 + 1, 21 * 8 + 3, 39 * 8 + 2]
        } else if spec.name.contains("position_embeddings") {
            vec![2 * 8, 5 * 8 + 4, 9 * 8 + 7]
        } else {
            (0..3).map(|i| (i * 7919 + k * 31) % n).collect()
        };
        for c in coords {
            let eval = |delta: f32| {
                let mut m = model.clone();
                let mut vals = m.params.values().to_vec();
                let mut d = vals[k].f32s().unwrap().to_vec();
                d[c] += delta;
                vals[k] = Tensor::from_vec(d, &spec.dims).unwrap();
                m.params.set_values(vals).unwrap();
                loss_of(&m)
            };
            let num = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
            let ana = g.f32s().unwrap()[c] as f64;
            let err = (num - ana).abs() / num.abs().max(ana.abs()).max(2e-2);
            assert!(
                err < 5e-2,
                "compat={reference_compat} {}[{c}]: analytic {ana}, numeric {num}",
                spec.name
            );
            checked += 1;
        }
    }
    assert!(checked > 60);
}

#[test]
fn retromae_backward_matches_finite_differences() {
    check_grads(false);
}

#[test]
fn retromae_backward_matches_finite_differences_reference_compat() {
    check_grads(true);
}

fn corpus() -> Vec<Vec<u32>> {
    let mut r = Rng::new(11, 0);
    // A learnable corpus: documents are runs of a few recurring "sentences".
    let sentences: Vec<Vec<u32>> = (0..6)
        .map(|s| (0..9).map(|i| 5 + ((s * 7 + i * 3) % 34) as u32).collect())
        .collect();
    (0..64).map(|_| sentences[r.below(6)].clone()).collect()
}

fn config(steps: u64, save_every: Option<u64>) -> PretrainConfig {
    PretrainConfig {
        steps: Some(steps),
        epochs: None,
        batch_size: 8,
        max_len: 16,
        lr: 3e-3,
        warmup_ratio: 0.1,
        weight_decay: 0.01,
        grad_accum: 2,
        masking: MaskingConfig {
            p_enc: 0.3,
            p_dec: 0.5,
            reference_compat: false,
        },
        seed: 7,
        save_every,
        max_grad_norm: Some(1.0),
        dropout: true,
    }
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retrom3-rmae-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tok_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr")
}

#[test]
fn pretraining_lowers_both_losses() {
    let mut model = model_of(1, 32, 0.0);
    let out = tmp("learn");
    let r = pretrain(
        &mut model,
        &corpus(),
        &vocab(40),
        &config(150, None),
        &tok_dir(),
        &out,
        None,
        &mut |_, _, _, _, _| {},
    )
    .unwrap();
    let mean = |xs: &[(u64, f32, f32)], f: fn(&(u64, f32, f32)) -> f32| {
        xs.iter().map(f).sum::<f32>() / xs.len() as f32
    };
    let (first, last) = (&r.losses[..8], &r.losses[r.losses.len() - 8..]);
    let (e0, e1) = (mean(first, |x| x.1), mean(last, |x| x.1));
    let (d0, d1) = (mean(first, |x| x.2), mean(last, |x| x.2));
    eprintln!("enc {e0:.3} -> {e1:.3}, dec {d0:.3} -> {d1:.3}");
    assert!(e1 < 0.6 * e0, "encoder loss {e0} -> {e1}");
    assert!(d1 < 0.6 * d0, "decoder loss {d0} -> {d1}");
    assert!(out.join("metrics.svg").is_file() && out.join("model.safetensors").is_file());
    let rows = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 150);
}

#[test]
fn resume_is_bit_identical() {
    let docs = corpus();
    let v = vocab(40);
    let a_out = tmp("a");
    let mut a = tiny_model(2);
    pretrain(
        &mut a,
        &docs,
        &v,
        &config(6, Some(3)),
        &tok_dir(),
        &a_out,
        None,
        &mut |_, _, _, _, _| {},
    )
    .unwrap();

    let ckpt = a_out.join("checkpoint-3");
    let state = TrainState::load(&ckpt).unwrap();
    assert_eq!(state.step, 3);
    let cfg = EncoderConfig::from_file(ckpt.join("config.json")).unwrap();
    let (map, path) = retrom3::io::read_backbone(&ckpt).unwrap();
    let enc = Encoder::from_tensors(cfg, &map, &path).unwrap();
    let mut b = RetroMae::new(enc, &RetroMae::read_heads(&ckpt).unwrap(), 0.5, 0).unwrap();
    let mut opt = AdamW::new(
        b.params.specs(),
        retrom3::device::cpu::adamw::AdamWHyper {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        Some(1.0),
    );
    opt.load_dir(&ckpt, b.params.specs(), state.step).unwrap();
    let b_out = tmp("b");
    pretrain(
        &mut b,
        &docs,
        &v,
        &config(6, Some(3)),
        &tok_dir(),
        &b_out,
        Some((state, opt)),
        &mut |_, _, _, _, _| {},
    )
    .unwrap();
    for (x, y) in a.params.values().iter().zip(b.params.values()) {
        assert_eq!(
            x.f32s().unwrap(),
            y.f32s().unwrap(),
            "resumed weights differ"
        );
    }
    assert_eq!(
        std::fs::read(a_out.join("model.safetensors")).unwrap(),
        std::fs::read(b_out.join("model.safetensors")).unwrap()
    );
}
