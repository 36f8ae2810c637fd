//! M3 fine-tuning loss parity with FlagEmbedding's own code (tools/dump_m3_loss.py: FlagEmbedding
//! 1.4.2 EncoderOnlyEmbedderM3Model on the tiny XLM-R, dropout off, self-distillation active):
//! the three score matrices, every loss component, the total, and the gradient of every parameter,
//! for plain InfoNCE, m3_kd_loss and kl_div teacher distillation, at τ = 0.02 and τ = 1.

mod common;

use retrom3::autograd::Tape;
use retrom3::io::read_safetensors;
use retrom3::model::encoder::{Encoder, EncoderInput};
use retrom3::model::m3_train::{KdLoss, M3Batch, M3LossConfig, M3Student};
use retrom3::{EncoderConfig, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn input(ids: &Value, mask: &Value) -> EncoderInput {
    let rows: Vec<Vec<u32>> = serde_json::from_value(ids.clone()).unwrap();
    let masks: Vec<Vec<u8>> = serde_json::from_value(mask.clone()).unwrap();
    EncoderInput {
        batch: rows.len(),
        len: rows[0].len(),
        ids: rows.concat(),
        mask: masks.concat(),
    }
}

fn close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= atol + rtol * b.abs(),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

fn check(file: &str, kd: Option<KdLoss>, temperature: f32) {
    let d = fixture("m3-loss");
    let b: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("batch.json")).unwrap()).unwrap();
    let want = read_safetensors(&d.join(file)).unwrap();
    let model_dir = fixture("tiny-xlmr");
    let cfg = EncoderConfig::from_file(model_dir.join("config.json")).unwrap();
    let (map, path) = retrom3::io::read_backbone(&model_dir).unwrap();
    let enc = Encoder::from_tensors(cfg, &map, &path).unwrap();
    let heads = retrom3::io::read_heads(&model_dir, 32).unwrap().unwrap();
    let student = M3Student::new(enc, &heads).unwrap();
    let group = b["G"].as_u64().unwrap() as usize;
    let teacher = kd.map(|_| {
        let s: Vec<f32> = serde_json::from_value(b["teacher_scores"].clone()).unwrap();
        let mut t = Vec::new();
        for g in s.chunks(group) {
            let m = g.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
            let z: f64 = g.iter().map(|&x| (x as f64 - m).exp()).sum();
            t.extend(g.iter().map(|&x| ((x as f64 - m).exp() / z) as f32));
        }
        Tensor::from_vec(t, &[s.len() / group, group]).unwrap()
    });
    let batch = M3Batch {
        queries: input(&b["q_input_ids"], &b["q_attention_mask"]),
        passages: input(&b["p_input_ids"], &b["p_attention_mask"]),
        group,
        teacher,
        no_in_batch: false,
        cross_device: None,
    };
    let lcfg = M3LossConfig {
        temperature,
        unified: true,
        self_distill: true,
        kd: kd.unwrap_or(KdLoss::M3KdLoss),
    };
    let mut tape = Tape::new();
    let p = student.params.bind(&mut tape);
    let s = student
        .scores(
            &mut Tape::no_grad(),
            &student.params.bind(&mut Tape::no_grad()),
            &batch,
            &lcfg,
            None,
            &[0, 1, 2, 3],
        )
        .unwrap();
    for (name, v) in [
        ("dense", &s.dense),
        ("sparse", s.sparse.as_ref().unwrap()),
        ("colbert", s.colbert.as_ref().unwrap()),
    ] {
        close(
            &format!("{file} scores.{name}"),
            v.value().f32s().unwrap(),
            want[&format!("scores.{name}")].f32s().unwrap(),
            2e-5,
            1e-4,
        );
    }
    let loss = student
        .loss(&mut tape, &p, &batch, &lcfg, None, &[0, 1, 2, 3])
        .unwrap();
    let w = |k: &str| want[k].f32s().unwrap()[0];
    for (name, got) in [
        ("loss.dense", loss.dense),
        ("loss.sparse", loss.sparse),
        ("loss.colbert", loss.colbert),
        ("loss.ensemble", loss.ensemble),
        ("loss.self_distill", loss.self_distill),
        ("loss", loss.total.value().f32s().unwrap()[0]),
    ] {
        close(&format!("{file} {name}"), &[got], &[w(name)], 1e-5, 1e-6);
    }
    let grads = tape.backward(&loss.total).unwrap();
    let mut worst = (0.0f64, String::new());
    for (k, spec) in student.params.specs().iter().enumerate() {
        let wg = &want[&format!("grad.{}", spec.name)];
        let g = grads
            .get(&p[k])
            .unwrap_or_else(|| panic!("no gradient reached {}", spec.name));
        if let Some(rel) = common::check_grad(
            &format!("{file} grad.{}", spec.name),
            g.f32s().unwrap(),
            wg.f32s().unwrap(),
            1e-4,
            1e-4,
        ) {
            if rel > worst.0 {
                worst = (rel, spec.name.clone());
            }
        }
    }
    eprintln!(
        "m3 parity {file}: loss {} vs {}; {} gradients, worst norm-wise rel err {:.2e} ({})",
        loss.total.value().f32s().unwrap()[0],
        w("loss"),
        student.params.specs().len(),
        worst.0,
        worst.1
    );
}

#[test]
fn plain_infonce_with_self_distillation() {
    check("plain.safetensors", None, 0.02);
}

#[test]
fn plain_at_temperature_one() {
    check("plain_tau1.safetensors", None, 1.0);
}

#[test]
fn teacher_scores_with_m3_kd_loss() {
    check("m3_kd.safetensors", Some(KdLoss::M3KdLoss), 0.02);
}

#[test]
fn teacher_scores_with_kl_div() {
    check("kl_div.safetensors", Some(KdLoss::KlDiv), 0.02);
}
