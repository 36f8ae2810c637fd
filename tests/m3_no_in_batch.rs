//! No-in-batch mode with the intended [B, G] semantics (decision §10.4): every score matrix is the
//! local [B, G] block of the in-batch one, CE target 0, teacher KD and self-distillation over the G
//! columns — checked against a hand computation from the score values.

use retrom3::autograd::Tape;
use retrom3::model::encoder::{Encoder, EncoderInput};
use retrom3::model::m3_train::{loss_from_scores, KdLoss, M3Batch, M3LossConfig, M3Student};
use retrom3::{EncoderConfig, Tensor};
use std::path::Path;

fn student() -> M3Student {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr");
    let cfg = EncoderConfig::from_file(dir.join("config.json")).unwrap();
    let (map, path) = retrom3::io::read_backbone(&dir).unwrap();
    let enc = Encoder::from_tensors(cfg, &map, &path).unwrap();
    let heads = retrom3::io::read_heads(&dir, 32).unwrap().unwrap();
    M3Student::new(enc, &heads).unwrap()
}

fn lse(r: &[f64]) -> f64 {
    let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + r.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Mean over rows of −log softmax(row)[0].
fn ce0(s: &[Vec<f64>]) -> f64 {
    s.iter().map(|r| lse(r) - r[0]).sum::<f64>() / s.len() as f64
}

/// Mean over rows of −Σ t log softmax(row).
fn soft(s: &[Vec<f64>], t: &[Vec<f64>]) -> f64 {
    s.iter()
        .zip(t)
        .map(|(r, t)| {
            let l = lse(r);
            r.iter().zip(t).map(|(x, p)| -p * (x - l)).sum::<f64>()
        })
        .sum::<f64>()
        / s.len() as f64
}

/// Listwise m3_kd_loss within each row's G columns.
fn m3kd(s: &[Vec<f64>], t: &[Vec<f64>]) -> f64 {
    let mut tot = 0.0;
    for (r, t) in s.iter().zip(t) {
        for g in 0..r.len() {
            tot += t[g] * (lse(&r[g..]) - r[g]);
        }
    }
    tot / s.len() as f64
}

fn rows(v: &[f32], g: usize) -> Vec<Vec<f64>> {
    v.chunks(g)
        .map(|c| c.iter().map(|&x| x as f64).collect())
        .collect()
}

#[test]
fn no_in_batch_loss_matches_a_hand_computation() {
    let m = student();
    let (b, g) = (2, 3);
    let text = |i: usize, len: usize| -> Vec<u32> {
        let mut t = vec![0u32];
        t.extend((1..len - 1).map(|j| 5 + ((i * 37 + j * 11) % 40) as u32));
        t.push(2);
        t
    };
    let q: Vec<Vec<u32>> = (0..b).map(|i| text(i, 6 + i)).collect();
    let p: Vec<Vec<u32>> = (0..b * g).map(|i| text(10 + i, 5 + i % 4)).collect();
    let teacher_scores = [[2.0f64, 0.5, -1.0], [0.3, 1.2, 0.1]];
    let tprob: Vec<Vec<f64>> = teacher_scores
        .iter()
        .map(|r| {
            let l = lse(r);
            r.iter().map(|x| (x - l).exp()).collect()
        })
        .collect();
    let flat: Vec<f32> = tprob.iter().flatten().map(|&x| x as f32).collect();
    for (teacher, kd) in [
        (false, KdLoss::M3KdLoss),
        (true, KdLoss::M3KdLoss),
        (true, KdLoss::KlDiv),
    ] {
        let mut batch = M3Batch {
            queries: EncoderInput::pad(&q, 1),
            passages: EncoderInput::pad(&p, 1),
            group: g,
            teacher: teacher.then(|| Tensor::from_vec(flat.clone(), &[b, g]).unwrap()),
            no_in_batch: false,
            cross_device: None,
        };
        let cfg = M3LossConfig {
            temperature: 0.05,
            unified: true,
            self_distill: true,
            kd,
        };
        let ids = [0, 1, 2, 3];
        let mut nt = Tape::no_grad();
        let pv = m.params.bind(&mut nt);
        let full = m.scores(&mut nt, &pv, &batch, &cfg, None, &ids).unwrap();
        batch.no_in_batch = true;
        let s = m.scores(&mut nt, &pv, &batch, &cfg, None, &ids).unwrap();
        // The [B, G] blocks of the in-batch matrices.
        let mut heads = Vec::new();
        for (loc, inb) in [
            (&s.dense, &full.dense),
            (s.sparse.as_ref().unwrap(), full.sparse.as_ref().unwrap()),
            (s.colbert.as_ref().unwrap(), full.colbert.as_ref().unwrap()),
        ] {
            assert_eq!(loc.dims(), &[b, g]);
            let (l, f) = (loc.value().f32s().unwrap(), inb.value().f32s().unwrap());
            for bi in 0..b {
                for gi in 0..g {
                    assert_eq!(l[bi * g + gi], f[bi * b * g + bi * g + gi]);
                }
            }
            heads.push(rows(l, g));
        }
        let (d, sp, c) = (&heads[0], &heads[1], &heads[2]);
        let e: Vec<Vec<f64>> = (0..b)
            .map(|i| (0..g).map(|j| d[i][j] + 0.3 * sp[i][j] + c[i][j]).collect())
            .collect();
        let head = |x: &[Vec<f64>]| match (teacher, kd) {
            (false, _) => ce0(x),
            (true, KdLoss::M3KdLoss) => m3kd(x, &tprob),
            (true, KdLoss::KlDiv) => soft(x, &tprob) + ce0(x),
        };
        let (ld, ls, lc, le) = (head(d), head(sp), head(c), head(&e));
        let l = (ld + le + 0.1 * ls + lc) / 4.0;
        let te: Vec<Vec<f64>> = e
            .iter()
            .map(|r| {
                let z = lse(r);
                r.iter().map(|x| (x - z).exp()).collect()
            })
            .collect();
        let lsd = (soft(d, &te) + 0.1 * soft(sp, &te) + soft(c, &te)) / 3.0;
        let want = (l + lsd) / 2.0;
        let got = loss_from_scores(&mut Tape::new(), &s, &batch, &cfg)
            .unwrap()
            .values()
            .unwrap();
        for (name, a, w) in [
            ("dense", got.dense, ld),
            ("sparse", got.sparse, ls),
            ("colbert", got.colbert, lc),
            ("ensemble", got.ensemble, le),
            ("self_distill", got.self_distill, lsd),
            ("total", got.total, want),
        ] {
            assert!(
                (a as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                "teacher {teacher} {kd:?} {name}: {a} vs hand {w}"
            );
        }
        eprintln!(
            "no-in-batch, teacher {teacher} {kd:?}: loss {} vs hand {want}",
            got.total
        );
        // The whole-tape path agrees and every head gets a gradient.
        let mut tape = Tape::new();
        let pv = m.params.bind(&mut tape);
        let loss = m.loss(&mut tape, &pv, &batch, &cfg, None, &ids).unwrap();
        assert!((loss.values().unwrap().total as f64 - want).abs() <= 1e-5 * want.abs());
    }
}
