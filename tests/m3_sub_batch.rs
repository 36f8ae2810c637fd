//! Exact sub-batching (issue 5 item 5): the two-pass scheme of `M3Student::sub_batch_grads`
//! (no-tape encode in sub-batches → loss on the head outputs → re-encode each sub-batch and
//! backpropagate the cached head gradients) gives the same loss and parameter gradients as one
//! tape over the whole batch (to f32 rounding: sub-batches change the products' shapes), with
//! dropout on (per-text seeds), for sub-batch sizes 1, 2 and the whole batch, in in-batch and
//! no-in-batch mode, with and without teacher scores.

use retrom3::autograd::Tape;
use retrom3::data::m3_data::read_train_file;
use retrom3::data::rng::Rng;
use retrom3::data::TextTokenizer;
use retrom3::model::encoder::{DropoutCfg, Encoder};
use retrom3::model::m3_train::{KdLoss, M3Batch, M3LossConfig, M3Student};
use retrom3::train::m3::{make_m3_batch, FinetuneConfig};
use retrom3::EncoderConfig;
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn student(dir: &Path) -> M3Student {
    let cfg = EncoderConfig::from_file(dir.join("config.json")).unwrap();
    let (map, path) = retrom3::io::read_backbone(dir).unwrap();
    let enc = Encoder::from_tensors(cfg, &map, &path).unwrap();
    let heads = retrom3::io::read_heads(dir, enc.config.hidden_size)
        .unwrap()
        .unwrap();
    M3Student::new(enc, &heads).unwrap()
}

fn lcfg(kd: KdLoss, unified: bool) -> M3LossConfig {
    M3LossConfig {
        temperature: 0.02,
        unified,
        self_distill: unified,
        kd,
    }
}

fn batch(teacher: bool, no_in_batch: bool) -> (M3Batch, Vec<u32>) {
    let dir = fixture("tiny-xlmr");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let mut ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    if !teacher {
        for e in &mut ex {
            e.pos_scores = None;
            e.neg_scores = None;
        }
    }
    let cfg = FinetuneConfig {
        steps: Some(1),
        batch_size: 3,
        group_size: 4,
        query_max_len: 16,
        passage_max_len: 24,
        loss: lcfg(KdLoss::M3KdLoss, true),
        self_distill_start_step: 0,
        lr: 1e-4,
        warmup_ratio: 0.0,
        weight_decay: 0.0,
        max_grad_norm: None,
        seed: 1,
        ..Default::default()
    };
    let exs: Vec<_> = [0, 4, 9].iter().map(|&i| &ex[i]).collect();
    let mut b = make_m3_batch(&exs, &tok, &cfg, 1, &mut Rng::new(5, 0)).unwrap();
    b.no_in_batch = no_in_batch;
    (b, tok.special_ids())
}

fn drop_cfg() -> Option<DropoutCfg> {
    Some(DropoutCfg {
        hidden: 0.1,
        attention: 0.1,
        seed: 0xC0FFEE,
    })
}

#[test]
fn two_pass_sub_batches_give_the_full_batch_gradients() {
    let m = student(&fixture("tiny-xlmr"));
    let cases = [
        ("in-batch, plain", false, false, KdLoss::M3KdLoss, true),
        ("in-batch, m3_kd_loss", true, false, KdLoss::M3KdLoss, true),
        ("in-batch, kl_div", true, false, KdLoss::KlDiv, true),
        (
            "in-batch, dense only",
            false,
            false,
            KdLoss::M3KdLoss,
            false,
        ),
        ("no-in-batch, plain", false, true, KdLoss::M3KdLoss, true),
        (
            "no-in-batch, m3_kd_loss",
            true,
            true,
            KdLoss::M3KdLoss,
            true,
        ),
    ];
    for (name, teacher, nib, kd, unified) in cases {
        let (b, drop_ids) = batch(teacher, nib);
        let c = lcfg(kd, unified);
        // Reference: one tape over the whole batch.
        let mut tape = Tape::new();
        let p = m.params.bind(&mut tape);
        let loss = m
            .loss(&mut tape, &p, &b, &c, drop_cfg(), &drop_ids)
            .unwrap();
        let want = loss.values().unwrap();
        let g = tape.backward(&loss.total).unwrap();
        let want_g: Vec<Option<Vec<f32>>> = p
            .iter()
            .map(|v| g.get(v).map(|t| t.f32s().unwrap().to_vec()))
            .collect();
        let g_max = want_g
            .iter()
            .flatten()
            .flatten()
            .fold(0.0f32, |a, &b| a.max(b.abs()));
        // Dropout is really on: an eval-mode loss differs.
        let mut t2 = Tape::no_grad();
        let p2 = m.params.bind(&mut t2);
        let eval = m.loss(&mut t2, &p2, &b, &c, None, &drop_ids).unwrap();
        assert!((eval.values().unwrap().total - want.total).abs() > 1e-4);
        for sub in [1, 2, b.passages.batch] {
            let (got, grads) = m
                .sub_batch_grads(&b, &c, drop_cfg(), &drop_ids, sub)
                .unwrap();
            let rel = |a: f32, w: f32| (a - w).abs() / w.abs().max(1e-6);
            assert!(
                rel(got.total, want.total) < 1e-5,
                "{name} sub {sub}: loss {} vs {}",
                got.total,
                want.total
            );
            assert!(rel(got.self_distill, want.self_distill) < 1e-5 || !unified);
            let mut worst = 0.0f64;
            for (k, (gg, wg)) in grads.iter().zip(&want_g).enumerate() {
                let spec = &m.params.specs()[k];
                match (gg, wg) {
                    (None, None) => {}
                    (Some(gg), Some(wg)) => {
                        let gv = gg.f32s().unwrap();
                        let diff = gv
                            .iter()
                            .zip(wg)
                            .map(|(&a, &b)| ((a - b) as f64).powi(2))
                            .sum::<f64>()
                            .sqrt();
                        let norm = wg.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
                        let max_abs = gv
                            .iter()
                            .zip(wg)
                            .map(|(&a, &b)| (a - b).abs())
                            .fold(0.0, f32::max);
                        let inf = wg.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
                        let r = diff / norm.max(1e-12);
                        // The key bias's gradient is zero in exact arithmetic (softmax ignores
                        // the constant q·b_k a row adds to every score): it is rounding noise,
                        // held to the rounding of the batch's largest gradient.
                        let noise = spec.name.ends_with("attention.self.key.bias");
                        let zero_exact = noise && max_abs <= 1e-6 * g_max;
                        assert!(
                            zero_exact
                                || (norm < 1e-7 && max_abs < 1e-7)
                                || (r < 1e-5 && max_abs <= 1e-5 * inf),
                            "{name} sub {sub} grad.{}: rel {r:.2e} max abs {max_abs:.2e}",
                            spec.name
                        );
                        if norm >= 1e-7 && !noise {
                            worst = worst.max(r);
                        }
                    }
                    (a, b) => panic!(
                        "{name} sub {sub} grad.{}: present {} vs {}",
                        spec.name,
                        a.is_some(),
                        b.is_some()
                    ),
                }
            }
            // Without dropout the sub-batches are encoded as padded batches: same loss too.
            let eval_sub = m.sub_batch_grads(&b, &c, None, &drop_ids, sub).unwrap().0;
            assert!(rel(eval_sub.total, eval.values().unwrap().total) < 1e-5);
            eprintln!(
                "{name}, sub-batch {sub}: loss {} vs {} (full batch); {} gradients, worst norm-wise rel err {worst:.2e}",
                got.total,
                want.total,
                grads.len()
            );
        }
    }
}
