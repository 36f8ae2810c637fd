//! Whole-encoder checks on a random tiny model: padding invariance, and backward against finite
//! differences through every layer (a subset of coordinates of every parameter tensor).

mod common;

use common::Rng;
use retrom3::autograd::{Tape, Var};
use retrom3::model::encoder::{Encoder, EncoderInput};
use retrom3::model::DropoutCfg;
use retrom3::{ops, EncoderConfig, Tensor};

fn tiny(kind_bert: bool) -> Encoder {
    let cfg = if kind_bert {
        EncoderConfig::new_bert(50, 8, 2, 2, 16, 20)
    } else {
        EncoderConfig::new_xlmr(50, 8, 2, 2, 16, 22)
    };
    let mut enc = Encoder::init_random(cfg.unwrap(), 11).unwrap();
    // Randomise LayerNorm and biases too, so a bug that ignores them shows.
    let mut rng = Rng::new(5);
    let vals: Vec<Tensor> = enc
        .params
        .values()
        .iter()
        .map(|t| {
            let d = t.dims().to_vec();
            let noise = rng.tensor(&d, 0.2);
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
    enc.params.set_values(vals).unwrap();
    enc
}

fn hidden(enc: &Encoder, input: &EncoderInput) -> Vec<f32> {
    let mut tape = Tape::no_grad();
    let p = enc.params.bind(&mut tape);
    enc.forward(&mut tape, &p, input, None)
        .unwrap()
        .value()
        .f32s()
        .unwrap()
        .to_vec()
}

#[test]
fn right_padding_does_not_change_real_tokens() {
    for bert in [false, true] {
        let enc = tiny(bert);
        let a = vec![0u32, 7, 9, 12, 2];
        let b = vec![0u32, 5, 2];
        let single = hidden(&enc, &EncoderInput::pad(std::slice::from_ref(&b), 1));
        let batch = hidden(&enc, &EncoderInput::pad(&[a, b], 1));
        let h = 8;
        // Rows of text b inside the padded batch (len 5): rows 5..8.
        for r in 0..3 {
            for c in 0..h {
                let x = single[r * h + c];
                let y = batch[(5 + r) * h + c];
                assert!(
                    (x - y).abs() < 1e-5,
                    "bert={bert} row {r} col {c}: {x} vs {y}"
                );
            }
        }
    }
}

#[test]
fn per_text_dropout_gives_each_text_its_own_forward() {
    // M3's batched training forward (`forward_texts`): each text gets the hidden states it gets
    // when encoded alone with its own seed, dropout on (hidden and attention), whatever shares
    // its batch; and a different seed or a plain batch-seeded forward gives other masks.
    let drop = DropoutCfg {
        hidden: 0.2,
        attention: 0.2,
        seed: 0,
    };
    let run = |enc: &Encoder, x: &EncoderInput, seeds: Option<&[u64]>, seed: u64| {
        let mut tape = Tape::no_grad();
        let p = enc.params.bind(&mut tape);
        let d = DropoutCfg { seed, ..drop };
        let h = match seeds {
            Some(s) => enc.forward_texts(&mut tape, &p, x, d, s),
            None => enc.forward(&mut tape, &p, x, Some(d)),
        };
        h.unwrap().value().f32s().unwrap().to_vec()
    };
    // (ids, mask) per text: plain texts, one with a padded position inside it, one all padding.
    let texts: [(Vec<u32>, Vec<u8>); 5] = [
        (vec![0, 7, 9, 12, 2], vec![1; 5]),
        (vec![0, 5, 2], vec![1; 3]),
        (vec![0, 8, 8, 2], vec![1; 4]),
        (vec![0, 6, 1, 9, 2], vec![1, 1, 0, 1, 1]),
        (vec![1, 1], vec![0, 0]),
    ];
    let len = 6;
    let mut batch = EncoderInput {
        ids: Vec::new(),
        mask: Vec::new(),
        batch: texts.len(),
        len,
    };
    for (ids, mask) in &texts {
        batch
            .ids
            .extend(ids.iter().copied().chain(std::iter::repeat(1)).take(len));
        batch
            .mask
            .extend(mask.iter().copied().chain(std::iter::repeat(0)).take(len));
    }
    let seeds = [901u64, 902, 903, 904, 905];
    for bert in [false, true] {
        let enc = tiny(bert);
        let got = run(&enc, &batch, Some(&seeds), 0);
        let h = 8;
        for (b, (ids, mask)) in texts.iter().enumerate() {
            // Alone: its rows through its last real token (one row when it has none).
            let n = batch.text_len(b);
            let alone_in = EncoderInput {
                ids: ids[..n].to_vec(),
                mask: mask[..n].to_vec(),
                batch: 1,
                len: n,
            };
            let alone = run(&enc, &alone_in, None, seeds[b]);
            let rows = &got[b * len * h..(b * len + n) * h];
            let worst = rows
                .iter()
                .zip(&alone)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "bert={bert} text {b}: differs by {worst}");
            let other = run(&enc, &alone_in, None, 7);
            assert!(
                rows.iter().zip(&other).any(|(x, y)| (x - y).abs() > 1e-3),
                "bert={bert} text {b}: the seed makes no difference"
            );
        }
        // The batch-seeded forward draws other masks.
        let plain = run(&enc, &batch, None, seeds[0]);
        assert!(got.iter().zip(&plain).any(|(x, y)| (x - y).abs() > 1e-3));
    }
}

#[test]
fn roberta_positions_skip_pads() {
    let enc = tiny(false);
    let input = EncoderInput::pad(&[vec![0, 7, 1, 9, 2], vec![0, 2]], 1);
    let pos = enc.position_ids(&input);
    // padding_idx = 1: real tokens count from 2, pad tokens (literal or padding) get 1.
    assert_eq!(pos, vec![2, 3, 1, 4, 5, 2, 3, 1, 1, 1]);
    let bert = tiny(true);
    assert_eq!(
        bert.position_ids(&input),
        vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    );
}

/// L = Σ H ⊙ R over real tokens; checks dL/dθ for a few coordinates of every parameter.
fn check_encoder_grads(enc: &Encoder, drop: Option<DropoutCfg>) {
    let input = EncoderInput::pad(&[vec![0, 7, 9, 12, 2], vec![0, 5, 2]], 1);
    let mut rng = Rng::new(99);
    let r = rng.tensor(&[2, 5, 8], 1.0);
    let masked: Vec<f32> = r
        .f32s()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, &v)| if input.mask[i / 8] != 0 { v } else { 0.0 })
        .collect();
    let r = Tensor::from_vec(masked, &[2, 5, 8]).unwrap();
    let loss_of = |e: &Encoder, tape: &mut Tape, p: &[Var]| -> Var {
        let h = e.forward(tape, p, &input, drop).unwrap();
        ops::dot_sum(tape, &h, &r).unwrap()
    };
    let mut tape = Tape::new();
    let p = enc.params.bind(&mut tape);
    let loss = loss_of(enc, &mut tape, &p);
    let grads = tape.backward(&loss).unwrap();
    let eps = 1e-2f32;
    let mut worst = 0.0f64;
    for (k, spec) in enc.params.specs().iter().enumerate() {
        let g = grads.get(&p[k]).expect("every parameter gets a gradient");
        let n = spec.dims.iter().product::<usize>();
        // Coordinates used by the input: for embeddings pick touched rows.
        let coords: Vec<usize> = if spec.name.contains("word_embeddings") {
            vec![7 * 8, 7 * 8 + 3, 12 * 8 + 5, 9 * 8 + 2]
        } else if spec.name.contains("position_embeddings") {
            vec![2 * 8, 4 * 8 + 1, 6 * 8 + 7]
        } else {
            (0..4).map(|i| (i * 7919 + k) % n).collect()
        };
        for c in coords {
            let eval = |delta: f32| -> f64 {
                let mut e2 = enc.clone();
                let mut vals = e2.params.values().to_vec();
                let mut v = vals[k].f32s().unwrap().to_vec();
                v[c] += delta;
                vals[k] = Tensor::from_vec(v, &spec.dims).unwrap();
                e2.params.set_values(vals).unwrap();
                let mut t = Tape::no_grad();
                let pp = e2.params.bind(&mut t);
                loss_of(&e2, &mut t, &pp).value().f32s().unwrap()[0] as f64
            };
            let num = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
            let ana = g.f32s().unwrap()[c] as f64;
            let err = (num - ana).abs() / (num.abs().max(ana.abs()).max(1e-2));
            assert!(
                err < 3e-2,
                "{} [{c}]: analytic {ana} numeric {num} (rel {err:.2e})",
                spec.name
            );
            worst = worst.max(err);
        }
    }
    eprintln!("encoder grad check: worst rel err {worst:.2e}");
}

#[test]
fn encoder_backward_matches_finite_differences() {
    check_encoder_grads(&tiny(false), None);
    check_encoder_grads(&tiny(true), None);
}

#[test]
fn encoder_backward_with_dropout_matches_finite_differences() {
    let drop = Some(DropoutCfg {
        hidden: 0.1,
        attention: 0.1,
        seed: 1234,
    });
    check_encoder_grads(&tiny(false), drop);
}
