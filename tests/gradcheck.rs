//! Every op's backward against central finite differences (f32 forward, f64 accumulation of the
//! probe loss). Thresholds are norm-wise relative errors; a wrong backward gives O(1).

mod common;

use common::{grad_check, Rng};
use retrom3::ops::{self, AttentionMask};
use std::sync::Arc;

const TOL: f64 = 2e-2;

#[test]
fn linear_backward() {
    let mut rng = Rng::new(1);
    let ins = [
        rng.tensor(&[2, 3, 5], 1.0),
        rng.tensor(&[4, 5], 0.5),
        rng.tensor(&[4], 0.5),
    ];
    let e = grad_check("linear", &ins, 1e-2, |t, v| {
        ops::linear(t, &v[0], &v[1], Some(&v[2]))
    });
    assert!(e < TOL, "linear rel err {e}");
    let e = grad_check("linear_nobias", &ins[..2], 1e-2, |t, v| {
        ops::linear(t, &v[0], &v[1], None)
    });
    assert!(e < TOL, "linear (no bias) rel err {e}");
}

#[test]
fn add_gelu_relu_backward() {
    let mut rng = Rng::new(2);
    let ins = [rng.tensor(&[3, 7], 1.5), rng.tensor(&[3, 7], 1.0)];
    let e = grad_check("add", &ins, 1e-2, |t, v| ops::add(t, &v[0], &v[1]));
    assert!(e < TOL, "add {e}");
    let e = grad_check("gelu", &ins[..1], 1e-3, |t, v| ops::gelu(t, &v[0]));
    assert!(e < TOL, "gelu {e}");
    let e = grad_check("relu", &ins[..1], 1e-3, |t, v| ops::relu(t, &v[0]));
    assert!(e < TOL, "relu {e}");
}

#[test]
fn dropout_backward_uses_the_same_mask() {
    let mut rng = Rng::new(3);
    let ins = [rng.tensor(&[4, 9], 1.0)];
    let e = grad_check("dropout", &ins, 1e-2, |t, v| {
        ops::dropout(t, &v[0], 0.3, 77, 5)
    });
    assert!(e < TOL, "dropout {e}");
}

#[test]
fn layernorm_backward() {
    let mut rng = Rng::new(4);
    let ins = [
        rng.tensor(&[5, 8], 2.0),
        rng.tensor(&[8], 1.0),
        rng.tensor(&[8], 1.0),
    ];
    let e = grad_check("layernorm", &ins, 1e-2, |t, v| {
        ops::layernorm(t, &v[0], &v[1], &v[2], 1e-5)
    });
    assert!(e < TOL, "layernorm {e}");
}

#[test]
fn attention_backward_with_padding() {
    let mut rng = Rng::new(5);
    let (b, l, h, d) = (2, 5, 2, 3);
    let ins = [
        rng.tensor(&[b, l, h * d], 1.0),
        rng.tensor(&[b, l, h * d], 1.0),
        rng.tensor(&[b, l, h * d], 1.0),
    ];
    // Second example has two padded keys.
    let mask = AttentionMask::KeyPadding(Arc::from(vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0]));
    let e = grad_check("attention", &ins, 1e-2, |t, v| {
        ops::attention(
            t,
            &v[0],
            &v[1],
            &v[2],
            &mask,
            h,
            1.0 / (d as f32).sqrt(),
            None,
        )
    });
    assert!(e < TOL, "attention {e}");
    let drop = Some(ops::AttnDropout {
        p: 0.25,
        seed: 9,
        stream: 4,
    });
    let e = grad_check("attention_dropout", &ins, 1e-2, |t, v| {
        ops::attention(
            t,
            &v[0],
            &v[1],
            &v[2],
            &mask,
            h,
            1.0 / (d as f32).sqrt(),
            drop,
        )
    });
    assert!(e < TOL, "attention with dropout {e}");
}

#[test]
fn per_text_attention_and_dropout_backward() {
    let mut rng = Rng::new(25);
    let (b, l, h, d) = (3, 5, 2, 3);
    let ins = [
        rng.tensor(&[b, l, h * d], 1.0),
        rng.tensor(&[b, l, h * d], 1.0),
        rng.tensor(&[b, l, h * d], 1.0),
    ];
    // Texts of 5, 3 and 4 rows (the third with a padded key inside its rows).
    let mask: Arc<[u8]> = Arc::from(vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 0]);
    let texts = ops::Texts {
        lens: Arc::from(vec![5, 3, 4]),
        seeds: Arc::from(vec![11, 12, 13]),
    };
    let e = grad_check("attention_texts", &ins, 1e-2, |t, v| {
        let a = ops::attention_texts(
            t,
            &v[0],
            &v[1],
            &v[2],
            &mask,
            &texts,
            h,
            0.5,
            Some((0.25, 4)),
        )?;
        ops::dropout_texts(t, &a, 0.2, &texts, 7)
    });
    assert!(e < TOL, "per-text attention + dropout {e}");
}

#[test]
fn two_stream_attention_backward() {
    let mut rng = Rng::new(15);
    let (b, l, h, d) = (2, 6, 2, 3);
    let ins = [
        rng.tensor(&[b, l, h * d], 1.0),
        rng.tensor(&[b, l, h * d], 1.0),
        rng.tensor(&[b, l, h * d], 1.0),
    ];
    let mask = AttentionMask::TwoStream {
        key_mask: Arc::from(vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]),
        words: Arc::from(vec![0, 1, 1, 2, 3, 4, 0, 1, 2, 2, 3, 3]),
        p: 0.5,
        seed: 3,
    };
    let e = grad_check("attention_two_stream", &ins, 1e-2, |t, v| {
        ops::attention(t, &v[0], &v[1], &v[2], &mask, h, 0.5, None)
    });
    assert!(e < TOL, "two-stream attention {e}");
}

#[test]
fn embedding_normalize_select_mean_backward() {
    let mut rng = Rng::new(6);
    let table = [rng.tensor(&[6, 4], 1.0)];
    let e = grad_check("embedding", &table, 1e-2, |t, v| {
        ops::embedding(t, &v[0], &[1, 3, 1, 5], None, "ids")
    });
    assert!(e < TOL, "embedding {e}");
    // padding_idx: row 3 gets no gradient although id 3 is used.
    let mut tape = retrom3::autograd::Tape::new();
    let t = tape.leaf(table[0].clone());
    let y = ops::embedding(&mut tape, &t, &[1, 3, 1, 5], Some(3), "ids").unwrap();
    let g = tape
        .backward_with(
            &y,
            retrom3::Tensor::from_vec(vec![1.0; 16], &[4, 4]).unwrap(),
        )
        .unwrap();
    let g = g.get(&t).unwrap().f32s().unwrap().to_vec();
    assert_eq!(&g[12..16], &[0.0; 4]);
    assert_eq!(&g[4..8], &[2.0; 4]);
    let x = [rng.tensor(&[3, 6], 1.0)];
    let e = grad_check("l2_normalize", &x, 1e-3, |t, v| {
        ops::l2_normalize(t, &v[0], 1e-12)
    });
    assert!(e < TOL, "l2_normalize {e}");
    let e = grad_check("select_rows", &x, 1e-2, |t, v| {
        ops::select_rows(t, &v[0], &[2, 0, 2])
    });
    assert!(e < TOL, "select_rows {e}");
    let x3 = [rng.tensor(&[2, 3, 4], 1.0)];
    let e = grad_check("masked_mean", &x3, 1e-2, |t, v| {
        ops::masked_mean(t, &v[0], &[1, 1, 0, 1, 0, 0])
    });
    assert!(e < TOL, "masked_mean {e}");
    let xv = [rng.tensor(&[3, 6], 1.0), rng.tensor(&[2, 6], 1.0)];
    let e = grad_check("replace_rows", &xv, 1e-2, |t, v| {
        ops::replace_rows(t, &v[0], &[2, 0], &v[1])
    });
    assert!(e < TOL, "replace_rows {e}");
    let f: Arc<[f32]> = Arc::from(vec![1.0, 0.0, 2.5, -1.0, 0.5, 3.0]);
    let e = grad_check("mul_rows", &x3, 1e-2, |t, v| {
        ops::mul_rows(t, &v[0], f.clone())
    });
    assert!(e < TOL, "mul_rows {e}");
}

#[test]
fn losses_backward() {
    let mut rng = Rng::new(7);
    let logits = [rng.tensor(&[4, 6], 2.0)];
    let e = grad_check("cross_entropy", &logits, 1e-2, |t, v| {
        ops::cross_entropy(t, &v[0], &[2, -100, 0, 5])
    });
    assert!(e < TOL, "cross_entropy {e}");
    let mut p: Vec<f32> = (0..24).map(|_| rng.uniform()).collect();
    for row in p.chunks_mut(6) {
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|x| *x /= s);
    }
    let targets = retrom3::Tensor::from_vec(p, &[4, 6]).unwrap();
    let e = grad_check("soft_cross_entropy", &logits, 1e-2, |t, v| {
        ops::soft_cross_entropy(t, &v[0], &targets)
    });
    assert!(e < TOL, "soft_cross_entropy {e}");
}

#[test]
fn maxsim_backward() {
    let mut rng = Rng::new(8);
    let ins = [rng.tensor(&[2, 3, 4], 1.0), rng.tensor(&[3, 5, 4], 1.0)];
    let qmask: Arc<[u8]> = Arc::from(vec![1, 1, 0, 1, 1, 1]);
    let pmask: Arc<[u8]> = Arc::from(vec![1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0]);
    let e = grad_check("maxsim", &ins, 1e-3, |t, v| {
        ops::maxsim(t, &v[0], qmask.clone(), &v[1], pmask.clone())
    });
    assert!(e < TOL, "maxsim {e}");
}

#[test]
fn no_grad_tape_records_nothing() {
    let mut rng = Rng::new(9);
    let mut tape = retrom3::autograd::Tape::no_grad();
    let x = tape.leaf(rng.tensor(&[2, 3], 1.0));
    let y = ops::gelu(&mut tape, &x).unwrap();
    assert!(!y.is_tracked());
    assert!(tape.is_empty());
}

#[test]
fn m3_loss_ops_backward() {
    let mut rng = Rng::new(21);
    let s = [rng.tensor(&[3, 12], 2.0)];
    let mut t: Vec<f32> = (0..12).map(|_| rng.uniform() + 0.1).collect();
    for row in t.chunks_mut(4) {
        let z: f32 = row.iter().sum();
        row.iter_mut().for_each(|x| *x /= z);
    }
    let teacher = retrom3::Tensor::from_vec(t, &[3, 4]).unwrap();
    let e = grad_check("m3_kd_loss", &s, 1e-2, |tp, v| {
        ops::m3_kd_loss(tp, &v[0], &teacher, 4)
    });
    assert!(e < TOL, "m3_kd_loss {e}");
    let e = grad_check("group_columns", &s, 1e-2, |tp, v| {
        ops::group_columns(tp, &v[0], 4)
    });
    assert!(e < TOL, "group_columns {e}");
    let e = grad_check("scale", &s, 1e-2, |tp, v| ops::scale(tp, &v[0], -2.5));
    assert!(e < TOL, "scale {e}");
}

#[test]
fn lexical_scores_backward_goes_to_argmax_positions() {
    let mut rng = Rng::new(22);
    // Positive weights (after ReLU in the model), distinct so the argmax is stable under h.
    let wq: Vec<f32> = (0..10)
        .map(|i| 0.5 + i as f32 * 0.37 + rng.uniform() * 0.1)
        .collect();
    let wp: Vec<f32> = (0..15)
        .map(|i| 0.4 + i as f32 * 0.29 + rng.uniform() * 0.1)
        .collect();
    let ins = [
        retrom3::Tensor::from_vec(wq, &[2, 5]).unwrap(),
        retrom3::Tensor::from_vec(wp, &[3, 5]).unwrap(),
    ];
    let q_ids: Arc<[u32]> = Arc::from(vec![0, 7, 9, 7, 2, 0, 8, 9, 2, 1]);
    let p_ids: Arc<[u32]> = Arc::from(vec![0, 9, 7, 2, 1, 0, 8, 8, 9, 2, 0, 5, 2, 1, 1]);
    let drop: Arc<[u32]> = Arc::from(vec![0, 1, 2, 3]);
    let e = grad_check("lexical_scores", &ins, 1e-3, |t, v| {
        ops::lexical_scores(t, &v[0], q_ids.clone(), &v[1], p_ids.clone(), drop.clone())
    });
    assert!(e < TOL, "lexical_scores {e}");
}

#[test]
fn attention_backward_rectangular_dense_and_fully_masked() {
    let mut rng = Rng::new(11);
    let (b, lq, lk, h, d) = (2, 3, 5, 2, 3);
    let ins = [
        rng.tensor(&[b, lq, h * d], 1.0),
        rng.tensor(&[b, lk, h * d], 1.0),
        rng.tensor(&[b, lk, h * d], 1.0),
    ];
    let scale = 1.0 / (d as f32).sqrt();
    // Lq != Lk with key padding, the second example's last key padded.
    let pad = AttentionMask::KeyPadding(Arc::from(vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 0]));
    let e = grad_check("attention_rect", &ins, 1e-2, |t, v| {
        ops::attention(t, &v[0], &v[1], &v[2], &pad, h, scale, None)
    });
    assert!(e < TOL, "attention Lq != Lk {e}");
    // An explicit [B, Lq, Lk] visibility matrix with one row that sees no key (uniform over
    // all keys, as HF's finfo.min mask gives), with and without dropout.
    let mut vis = vec![1u8; b * lq * lk];
    for (i, v) in vis.iter_mut().enumerate() {
        *v = u8::from((i * 7) % 3 != 0);
    }
    vis[lk..2 * lk].fill(0);
    let dense = AttentionMask::Dense(Arc::from(vis));
    for drop in [
        None,
        Some(ops::AttnDropout {
            p: 0.25,
            seed: 3,
            stream: 1,
        }),
    ] {
        let e = grad_check("attention_dense", &ins, 1e-2, |t, v| {
            ops::attention(t, &v[0], &v[1], &v[2], &dense, h, scale, drop)
        });
        assert!(
            e < TOL,
            "attention with a dense mask (dropout {drop:?}) {e}"
        );
    }
}

#[test]
fn replace_rows_backward_and_a_row_given_twice() {
    let mut rng = Rng::new(12);
    let ins = [rng.tensor(&[4, 3], 1.0), rng.tensor(&[2, 3], 1.0)];
    let e = grad_check("replace_rows", &ins, 1e-2, |t, v| {
        let y = ops::replace_rows(t, &v[0], &[2, 0], &v[1])?;
        ops::gelu(t, &y)
    });
    assert!(e < TOL, "replace_rows {e}");
    // The forward would keep the last value and the backward credit the first: refused.
    let mut tape = retrom3::autograd::Tape::new();
    let x = tape.leaf(ins[0].clone());
    let v = tape.leaf(ins[1].clone());
    let err = ops::replace_rows(&mut tape, &x, &[1, 1], &v).unwrap_err();
    assert!(err.to_string().contains("row 1 is given twice"), "{err}");
}

/// Empty dimensions give an empty result or an error, never a panic.
#[test]
fn degenerate_shapes_are_errors_or_empty_results() {
    use retrom3::Tensor;
    let mut tape = retrom3::autograd::Tape::new();
    // Queries without a token score 0 against every passage.
    let q = tape.leaf(Tensor::from_vec(vec![], &[2, 0, 4]).unwrap());
    let p = tape.leaf(Tensor::from_vec(vec![0.5; 3 * 2 * 4], &[3, 2, 4]).unwrap());
    let s = ops::maxsim(
        &mut tape,
        &q,
        Arc::from(vec![]),
        &p,
        Arc::from(vec![1u8; 6]),
    )
    .unwrap();
    assert_eq!(s.value().to_f32().f32s().unwrap(), &[0.0; 6]);
    // Rows of width 0.
    let x = tape.leaf(Tensor::from_vec(vec![], &[3, 0]).unwrap());
    let y = ops::l2_normalize(&mut tape, &x, 1e-12).unwrap();
    assert_eq!(y.dims(), &[3, 0]);
    let xin = tape.leaf(Tensor::from_vec(vec![1.0; 6], &[3, 2]).unwrap());
    let w = tape.leaf(Tensor::from_vec(vec![], &[0, 2]).unwrap());
    let b = tape.leaf(Tensor::from_vec(vec![], &[0]).unwrap());
    let y = ops::linear(&mut tape, &xin, &w, Some(&b)).unwrap();
    assert_eq!(y.dims(), &[3, 0]);
    // Logits without a class; attention without a key.
    let logits = tape.leaf(Tensor::from_vec(vec![], &[2, 0]).unwrap());
    assert!(ops::cross_entropy(&mut tape, &logits, &[0, 0]).is_err());
    let t = Tensor::from_vec(vec![], &[2, 0]).unwrap();
    assert!(ops::soft_cross_entropy(&mut tape, &logits, &t).is_err());
    let q = tape.leaf(Tensor::from_vec(vec![1.0; 4], &[1, 2, 2]).unwrap());
    let k = tape.leaf(Tensor::from_vec(vec![], &[1, 0, 2]).unwrap());
    let mask = AttentionMask::KeyPadding(Arc::from(vec![]));
    let err = ops::attention(&mut tape, &q, &k, &k, &mask, 1, 1.0, None).unwrap_err();
    assert!(err.to_string().contains("no key"), "{err}");
}

/// `max_abs_diff` is NaN where an element is NaN (tests compare weights with it).
#[test]
fn max_abs_diff_sees_nan() {
    use retrom3::Tensor;
    let a = Tensor::from_vec(vec![1.0, f32::NAN, 2.0], &[3]).unwrap();
    let b = Tensor::from_vec(vec![1.0, 1.0, 2.5], &[3]).unwrap();
    assert!(a.max_abs_diff(&b).unwrap().is_nan());
    assert!(b.max_abs_diff(&a).unwrap().is_nan());
    assert_eq!(b.max_abs_diff(&b).unwrap(), 0.0);
}
