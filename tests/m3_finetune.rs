//! M3 fine-tuning on the CPU engine: the loss falls, the output directory is a model that loads and
//! encodes, a resumed run is bit-identical, and malformed training rows are clear errors.

use retrom3::data::m3_data::read_train_file;
use retrom3::data::TextTokenizer;
use retrom3::device::cpu::adamw::AdamWHyper;
use retrom3::model::encoder::Encoder;
use retrom3::model::m3_train::{KdLoss, M3LossConfig, M3Student};
use retrom3::train::m3::{finetune, FinetuneConfig, M3TrainData};
use retrom3::train::{AdamW, TrainState};
use retrom3::{Device, EncodeOptions, EncoderConfig, Error, M3Model};
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retrom3-ft-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
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

fn config(steps: u64, kd: KdLoss) -> FinetuneConfig {
    FinetuneConfig {
        steps: Some(steps),
        batch_size: 3,
        group_size: 4,
        query_max_len: 16,
        passage_max_len: 24,
        loss: M3LossConfig {
            kd,
            ..Default::default()
        },
        self_distill_start_step: 0,
        lr: 5e-4,
        seed: 3,
        save_every: Some(4),
        ..Default::default()
    }
}

#[test]
fn finetuning_lowers_the_loss_and_writes_a_loadable_model() {
    let dir = fixture("tiny-xlmr");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    // Without teacher scores: plain InfoNCE per head + self-distillation.
    let ex_plain: Vec<_> = ex
        .iter()
        .cloned()
        .map(|mut e| {
            e.pos_scores = None;
            e.neg_scores = None;
            e
        })
        .collect();
    for (examples, kd) in [
        (&ex_plain, KdLoss::M3KdLoss),
        (&ex, KdLoss::M3KdLoss),
        (&ex, KdLoss::KlDiv),
    ] {
        let mut m = student(&dir);
        let out = tmp("learn");
        let r = finetune(
            &mut m,
            &M3TrainData::single(examples.clone(), 3),
            &tok,
            &config(36, kd),
            &dir,
            &out,
            None,
            &mut |_, _, _| {},
        )
        .unwrap();
        let mean = |s: &[retrom3::train::m3::StepLosses]| {
            s.iter().map(|x| x.1).sum::<f32>() / s.len() as f32
        };
        let (a, b) = (mean(&r[..6]), mean(&r[r.len() - 6..]));
        eprintln!("{kd:?}: loss {a:.3} -> {b:.3}");
        assert!(b < 0.7 * a, "{kd:?}: loss {a} -> {b}");
        let model = M3Model::load(&out, Device::Cpu).unwrap();
        let o = model
            .encode(&["capital of China?"], &EncodeOptions::all())
            .unwrap();
        assert_eq!(o.dense.unwrap()[0].len(), 32);
    }
}

#[test]
fn resume_is_bit_identical() {
    let dir = fixture("tiny-xlmr");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    let cfg = config(8, KdLoss::M3KdLoss);
    let data = M3TrainData::single(ex, 3);
    let (a_out, b_out) = (tmp("a"), tmp("b"));
    let mut a = student(&dir);
    finetune(
        &mut a,
        &data,
        &tok,
        &cfg,
        &dir,
        &a_out,
        None,
        &mut |_, _, _| {},
    )
    .unwrap();
    let ckpt = a_out.join("checkpoint-4");
    let hyper = AdamWHyper {
        lr: cfg.lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: cfg.weight_decay,
    };
    // The checkpoint's model resumed on `data` with its state as `edit` leaves it.
    let resume = |data: &M3TrainData, edit: &dyn Fn(&mut TrainState), out: &Path| {
        let mut state = TrainState::load(&ckpt).unwrap();
        edit(&mut state);
        let mut m = student(&ckpt);
        let mut opt = AdamW::new(m.params.specs(), hyper, cfg.max_grad_norm);
        opt.load_dir(&ckpt, m.params.specs(), state.step).unwrap();
        let r = finetune(
            &mut m,
            data,
            &tok,
            &cfg,
            &dir,
            out,
            Some((state, opt)),
            &mut |_, _, _| {},
        );
        r.map(|_| m)
    };
    let b = resume(&data, &|_| {}, &b_out).unwrap();
    for (x, y) in a.params.values().iter().zip(b.params.values()) {
        assert_eq!(x.f32s().unwrap(), y.f32s().unwrap());
    }
    // A trainer state whose data cursor disagrees with its step count (edited, or mixed with
    // another run's) is refused before any step.
    let e = resume(&data, &|s| s.batches_seen += 1, &tmp("c"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("5 batches seen in 4 steps"), "{e}");
    // A file setting changed since the checkpoint (a row's train_group_size): refused by name.
    let mut ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    ex.iter_mut().for_each(|e| e.train_group_size = Some(3));
    let e = resume(&M3TrainData::single(ex, 3), &|_| {}, &tmp("d"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("per-file type/batch_size/train_group_size"),
        "{e}"
    );
}

/// A divergent run stops at the first non-finite loss or gradient, names the step, and keeps the
/// last good checkpoint whole (no later checkpoint, no final model).
#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = fixture("tiny-xlmr");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    let out = tmp("diverge");
    // The first update makes the weights huge; a later loss or gradient is not finite.
    let cfg = FinetuneConfig {
        lr: 1e36,
        warmup_ratio: 0.0,
        max_grad_norm: None,
        save_every: Some(1),
        ..config(6, KdLoss::M3KdLoss)
    };
    let mut m = student(&dir);
    let e = finetune(
        &mut m,
        &M3TrainData::single(ex, 3),
        &tok,
        &cfg,
        &dir,
        &out,
        None,
        &mut |_, _, _| {},
    )
    .expect_err("a divergent run fails")
    .to_string();
    let rows = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let done = rows.lines().count() as u64;
    assert!((1..6).contains(&done), "{done} steps logged: {e}");
    eprintln!("stopped after {done} good steps: {e}");
    assert!(e.starts_with("non-finite value in "), "{e}");
    // Either the op that met the value or the trainer's loss check names the failing step.
    let step = done + 1;
    assert!(
        e.contains(&format!("M3 step {step}")) || e.contains(&format!("at step {step}")),
        "{e}"
    );
    let ckpt = out.join(format!("checkpoint-{done}"));
    assert_eq!(TrainState::load(&ckpt).unwrap().step, done);
    let kept = student(&ckpt);
    for (spec, t) in kept.params.specs().iter().zip(kept.params.values()) {
        assert!(
            t.f32s().unwrap().iter().all(|x| x.is_finite()),
            "{} in checkpoint-{done} is not finite",
            spec.name
        );
    }
    assert!(!out.join(format!("checkpoint-{step}")).exists());
    assert!(!out.join("model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn malformed_training_rows_name_the_line() {
    let d = tmp("bad");
    std::fs::create_dir_all(&d).unwrap();
    let cases = [
        ("{\"query\": \"q\", \"pos\": [], \"neg\": [\"n\"]}", "pos"),
        // (An empty "neg" is checked by the trainer: an_empty_neg_is_for_group_size_one.)
        (
            "{\"query\": \"q\", \"pos\": [\"p\"], \"neg\": [\" \"]}",
            "neg",
        ),
        (
            "{\"query\": \"q\", \"pos\": [\"p\"], \"neg\": [\"n\"], \"neg_scores\": [0.1, 0.2]}",
            "neg_scores",
        ),
        ("{\"query\": \"q\", \"neg\": [\"n\"]}", "pos"),
        (
            "{\"query\": \"\", \"pos\": [\"p\"], \"neg\": [\"n\"]}",
            "query",
        ),
    ];
    for (i, (row, field)) in cases.iter().enumerate() {
        let f = d.join(format!("c{i}.jsonl"));
        std::fs::write(
            &f,
            format!("{{\"query\": \"ok\", \"pos\": [\"p\"], \"neg\": [\"n\"]}}\n{row}\n"),
        )
        .unwrap();
        match read_train_file(&f) {
            Err(Error::Input { line, msg, .. }) => {
                assert_eq!(line, 2, "{msg}");
                assert!(msg.contains(field), "{msg} should name {field}");
            }
            other => panic!("case {i}: expected an input error, got {other:?}"),
        }
    }
}

#[test]
fn sub_batched_training_follows_the_full_batch_run() {
    let dir = fixture("tiny-xlmr");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    let data = M3TrainData::single(ex, 3);
    let mut runs = Vec::new();
    for sub in [0, 2, 5] {
        let mut cfg = config(5, KdLoss::M3KdLoss);
        cfg.sub_batch = sub;
        cfg.save_every = None;
        let mut m = student(&dir);
        let r = finetune(
            &mut m,
            &data,
            &tok,
            &cfg,
            &dir,
            &tmp(&format!("sub{sub}")),
            None,
            &mut |_, _, _| {},
        )
        .unwrap();
        runs.push(r.iter().map(|x| x.1).collect::<Vec<f32>>());
    }
    eprintln!("losses per step, sub-batch 0 / 2 / 5: {runs:?}");
    for r in &runs[1..] {
        for (a, b) in r.iter().zip(&runs[0]) {
            assert!((a - b).abs() <= 1e-4 * b.abs(), "{r:?} vs {:?}", runs[0]);
        }
    }
}

#[test]
fn cli_with_length_buckets_no_in_batch_files_and_sub_batches() {
    let d = tmp("cli");
    std::fs::create_dir_all(&d).unwrap();
    let src = std::fs::read_to_string(fixture("m3-train/train.jsonl")).unwrap();
    let lines: Vec<&str> = src.lines().collect();
    std::fs::write(d.join("a.jsonl"), lines[..10].join("\n")).unwrap();
    std::fs::write(d.join("b_no_in_batch_neg.jsonl"), lines[10..].join("\n")).unwrap();
    let out = d.join("out");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .arg("finetune")
        .arg("--model")
        .arg(fixture("tiny-xlmr"))
        .arg("--train")
        .arg(d.join("a.jsonl"))
        .arg(d.join("b_no_in_batch_neg.jsonl"))
        .arg("--output")
        .arg(&out)
        .args([
            "--group-size",
            "3",
            "--query-max-len",
            "16",
            "--passage-max-len",
            "24",
        ])
        .args([
            "--length-buckets",
            "12",
            "--bucket-batch-sizes",
            "3,2",
            "--sub-batch",
            "2",
        ])
        .args(["--steps", "6", "--lr", "1e-4"])
        .status()
        .unwrap();
    assert!(st.success());
    let m = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(m.lines().count(), 6);
    assert!(M3Model::load(&out, Device::Cpu).is_ok());
    // Bad bucket settings are refused.
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .arg("finetune")
        .arg("--model")
        .arg(fixture("tiny-xlmr"))
        .arg("--train")
        .arg(d.join("a.jsonl"))
        .arg("--output")
        .arg(d.join("out2"))
        .args([
            "--length-buckets",
            "12",
            "--bucket-batch-sizes",
            "3",
            "--steps",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("bucket-batch-sizes"));
    // `finetune --resume DIR` into a fresh output with the given flags: its stderr, on failure.
    let resume_fails = |dir: &Path, output: &str, extra: &[&str]| {
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
            .arg("finetune")
            .arg("--model")
            .arg(fixture("tiny-xlmr"))
            .arg("--train")
            .arg(d.join("a.jsonl"))
            .arg("--output")
            .arg(d.join(output))
            .arg("--resume")
            .arg(dir)
            .args(extra)
            .output()
            .unwrap();
        assert!(!st.status.success());
        String::from_utf8_lossy(&st.stderr).to_string()
    };
    // A resumed run keeps its seed: another --seed is refused, not silently ignored.
    let err = resume_fails(&out, "out3", &["--seed", "7", "--steps", "6"]);
    assert!(
        err.contains("--seed 7 differs from the resumed run's 42"),
        "{err}"
    );
    // A unified run's checkpoint without its heads: refused (the base model's untrained heads
    // would have been paired with the checkpoint's optimizer moments).
    let ck = d.join("no-heads");
    std::fs::create_dir_all(&ck).unwrap();
    for f in std::fs::read_dir(&out).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        if f.is_file() && !name.ends_with("_linear.pt") {
            std::fs::copy(&f, ck.join(&name)).unwrap();
        }
    }
    // As a checkpoint written before the file digests (which would name the missing file).
    let st = ck.join("trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&st).unwrap()).unwrap();
    assert!(state["files"]["colbert_linear.pt"].is_string(), "{state}");
    state.as_object_mut().unwrap().remove("files");
    std::fs::write(&st, state.to_string()).unwrap();
    let err = resume_fails(&ck, "out4", &["--steps", "6"]);
    assert!(
        err.contains("no-heads") && err.contains("keeps its trained heads"),
        "{err}"
    );
}

fn run(
    cfg: &FinetuneConfig,
    examples: Vec<retrom3::data::m3_data::TrainExample>,
    out: &Path,
) -> Vec<retrom3::train::m3::StepLosses> {
    try_run(cfg, examples, out).unwrap()
}

fn try_run(
    cfg: &FinetuneConfig,
    examples: Vec<retrom3::data::m3_data::TrainExample>,
    out: &Path,
) -> retrom3::Result<Vec<retrom3::train::m3::StepLosses>> {
    let dir = fixture("tiny-xlmr");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let mut m = student(&dir);
    finetune(
        &mut m,
        &M3TrainData::single(examples, 3),
        &tok,
        cfg,
        &dir,
        out,
        None,
        &mut |_, _, _| {},
    )
}

#[test]
fn self_distillation_starts_after_the_start_step() {
    // FlagEmbedding: active when the 0-based step index exceeds the start step (strict).
    let ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    for start in [-1i64, 0, 2] {
        let mut cfg = config(4, KdLoss::M3KdLoss);
        cfg.self_distill_start_step = start;
        cfg.save_every = None;
        let r = run(&cfg, ex.clone(), &tmp("sd"));
        for (i, s) in r.iter().enumerate() {
            let on = i as i64 > start;
            assert_eq!(
                s.6 != 0.0,
                on,
                "start {start}, step {i}: self-distill {}",
                s.6
            );
        }
    }
}

#[test]
fn knowledge_distillation_off_ignores_teacher_scores() {
    let ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    assert!(ex.iter().all(|e| e.pos_scores.is_some()));
    let plain: Vec<_> = ex
        .iter()
        .cloned()
        .map(|mut e| {
            e.pos_scores = None;
            e.neg_scores = None;
            e
        })
        .collect();
    let mut cfg = config(3, KdLoss::M3KdLoss);
    cfg.save_every = None;
    let with_scores = run(&cfg, ex.clone(), &tmp("kd-on"));
    let without = run(&cfg, plain.clone(), &tmp("kd-plain"));
    cfg.knowledge_distillation = false;
    let ignored = run(&cfg, ex, &tmp("kd-off"));
    assert_eq!(ignored, without, "scores ignored = no scores");
    assert_ne!(with_scores, without, "the scores matter when used");
}

#[test]
fn group_size_one_trains_on_in_batch_negatives() {
    // SPEC §5.2's unsupervised pairs: G = 1, the other queries' positives are the negatives.
    let ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    let mut cfg = config(24, KdLoss::M3KdLoss);
    cfg.group_size = 1;
    cfg.save_every = None;
    let r = run(&cfg, ex, &tmp("g1"));
    let mean =
        |s: &[retrom3::train::m3::StepLosses]| s.iter().map(|x| x.1).sum::<f32>() / s.len() as f32;
    let (a, b) = (mean(&r[..6]), mean(&r[r.len() - 6..]));
    assert!(r.iter().all(|s| s.1.is_finite()));
    assert!(b < 0.7 * a, "loss {a} -> {b}");
}

#[test]
fn dense_only_runs_save_no_heads() {
    // SPEC §4.7 / §2: heads are saved only with unified fine-tuning; stale ones are removed.
    let ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    let mut cfg = config(4, KdLoss::M3KdLoss);
    cfg.loss.unified = false;
    cfg.loss.self_distill = false;
    cfg.save_every = Some(2);
    let out = tmp("dense-only");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["colbert_linear.pt", "sparse_linear.pt"] {
        std::fs::copy(fixture("tiny-xlmr").join(f), out.join(f)).unwrap();
    }
    // A RetroMAE run's decoder there too (`pretrain --model` would continue from it).
    std::fs::write(out.join("retromae_heads.safetensors"), "stale").unwrap();
    run(&cfg, ex.clone(), &out);
    for d in [out.clone(), out.join("checkpoint-2")] {
        assert!(d.join("config.json").exists());
        for f in [
            "colbert_linear.pt",
            "sparse_linear.pt",
            "retromae_heads.safetensors",
        ] {
            assert!(!d.join(f).exists(), "{}", d.join(f).display());
        }
    }
    // A unified run removes a RetroMAE decoder too.
    let out2 = tmp("unified-stale");
    std::fs::create_dir_all(&out2).unwrap();
    std::fs::write(out2.join("retromae_heads.safetensors"), "stale").unwrap();
    run(&config(2, KdLoss::M3KdLoss), ex, &out2);
    assert!(out2.join("sparse_linear.pt").is_file());
    assert!(!out2.join("retromae_heads.safetensors").exists());
    // The dense model loads and encodes.
    let model = M3Model::load(&out, Device::Cpu).unwrap();
    let o = model
        .encode(&["capital of China?"], &EncodeOptions::default())
        .unwrap();
    assert_eq!(o.dense.unwrap()[0].len(), 32);
}

#[test]
fn an_empty_neg_is_for_group_size_one() {
    // Pairs without negatives (unsupervised data) train with G = 1; with G > 1 the row is an
    // error naming its line.
    let d = tmp("emptyneg");
    std::fs::create_dir_all(&d).unwrap();
    let src = std::fs::read_to_string(fixture("m3-train/train.jsonl")).unwrap();
    let mut rows: Vec<serde_json::Value> = src
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for r in &mut rows[1..] {
        r["neg"] = serde_json::json!([]);
        r.as_object_mut().unwrap().remove("neg_scores");
        r.as_object_mut().unwrap().remove("pos_scores");
    }
    let p = d.join("pairs.jsonl");
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&p, text).unwrap();
    let ex = read_train_file(&p).unwrap();
    assert_eq!(ex[1].line, 2);
    let mut cfg = config(2, KdLoss::M3KdLoss);
    cfg.save_every = None;
    let e = try_run(&cfg, ex.clone(), &tmp("emptyneg-g4"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(":2:") && e.contains("\"neg\"") && e.contains("--group-size 1"),
        "{e}"
    );
    cfg.group_size = 1;
    let r = run(&cfg, ex, &tmp("emptyneg-g1"));
    assert!(r.iter().all(|s| s.1.is_finite()));
}

/// Both trainers save the source checkpoint's `pooler.*` tensors back unchanged (outside every
/// loss, as in PyTorch), so transformers loads their output without re-initialising a pooler.
#[test]
fn trainers_carry_the_pooler_through() {
    let src = fixture("tiny-bge-m3-layout");
    let (map, _) = retrom3::io::read_backbone(&src).unwrap();
    let pooler: Vec<_> = map.keys().filter(|k| k.starts_with("pooler.")).collect();
    assert_eq!(pooler.len(), 2, "the fixture has a pooler");
    let d = tmp("pooler");
    std::fs::create_dir_all(&d).unwrap();
    let train = std::fs::read_to_string(fixture("m3-train/train.jsonl")).unwrap();
    std::fs::write(d.join("t.jsonl"), train).unwrap();
    let bin = env!("CARGO_BIN_EXE_retrom3");
    let ft = std::process::Command::new(bin)
        .arg("finetune")
        .arg("--model")
        .arg(&src)
        .arg("--train")
        .arg(d.join("t.jsonl"))
        .arg("--output")
        .arg(d.join("ft"))
        .args(["--group-size", "2", "--batch-size", "2", "--steps", "1"])
        .args(["--query-max-len", "16", "--passage-max-len", "16"])
        .output()
        .unwrap();
    assert!(
        ft.status.success(),
        "{}",
        String::from_utf8_lossy(&ft.stderr)
    );
    let pt = std::process::Command::new(bin)
        .arg("pretrain")
        .arg("--model")
        .arg(&src)
        .arg("--tokenizer")
        .arg(&src)
        .arg("--data")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo/pretrain.txt"))
        .arg("--output")
        .arg(d.join("pt"))
        .args(["--steps", "1", "--batch-size", "2", "--max-len", "16"])
        .output()
        .unwrap();
    assert!(
        pt.status.success(),
        "{}",
        String::from_utf8_lossy(&pt.stderr)
    );
    for out in ["ft", "pt"] {
        let (saved, _) = retrom3::io::read_backbone(&d.join(out)).unwrap();
        for k in &pooler {
            let want = map[*k].to_f32().into_f32_vec().unwrap();
            let got = saved[*k].to_f32().into_f32_vec().unwrap();
            assert_eq!(got, want, "{out}: {k}");
        }
    }
}

/// Rows and settings built in code get the checks the file reader and the CLI make: a clear
/// error naming the field (a row without a positive, or with a score list of the wrong length,
/// used to index out of bounds in the sampler).
#[test]
fn rows_and_settings_built_in_code_are_checked() {
    let out = tmp("checked");
    let cfg = config(1, KdLoss::M3KdLoss);
    let rows = || {
        (0..6)
            .map(|i| {
                retrom3::data::m3_data::TrainExample::new(
                    format!("query {i}"),
                    vec![format!("passage {i}")],
                    vec![format!("other {i}"); 3],
                )
            })
            .collect::<Vec<_>>()
    };
    let mut no_pos = rows();
    no_pos[2].pos.clear();
    let mut bad_scores = rows();
    bad_scores[4].pos_scores = Some(vec![]);
    for (examples, want) in [
        (no_pos, "field \"pos\": empty list"),
        (bad_scores, "0 scores for 1 texts"),
    ] {
        let e = try_run(&cfg, examples, &out).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    for (cfg, want) in [
        (
            FinetuneConfig {
                loss: M3LossConfig {
                    temperature: 0.0,
                    ..cfg.loss
                },
                ..cfg.clone()
            },
            "temperature 0",
        ),
        (
            FinetuneConfig {
                query_max_len: 512,
                ..cfg.clone()
            },
            "query_max_len 512",
        ),
        (
            FinetuneConfig {
                shuffle_ratio: 5.0,
                ..cfg.clone()
            },
            "shuffle_ratio 5",
        ),
        (
            FinetuneConfig {
                group_size: 5000,
                ..cfg.clone()
            },
            "group_size 5000: above 4096",
        ),
    ] {
        let e = try_run(&cfg, rows(), &out).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert!(try_run(&cfg, rows(), &out).is_ok());
    // A row asking for a group past the limit (a typo would allocate without bound).
    let mut big = rows();
    big[0].train_group_size = Some(1 << 40);
    let e = try_run(&cfg, big, &out).unwrap_err().to_string();
    assert!(
        e.contains("\"train_group_size\": 1099511627776 is above 4096"),
        "{e}"
    );
    // One query per batch and one passage per query: no negative anywhere, loss always 0.
    let e = finetune(
        &mut student(&fixture("tiny-xlmr")),
        &M3TrainData::single(rows(), 1),
        &TextTokenizer::from_dir(fixture("tiny-xlmr")).unwrap(),
        &FinetuneConfig {
            group_size: 1,
            ..cfg.clone()
        },
        &fixture("tiny-xlmr"),
        &out,
        None,
        &mut |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("identically 0"), "{e}");
    // Another model's tokenizer: BERT's pads with id 0, the XLM-R model with 1, although its
    // vocabulary is the smaller one.
    let bert = fixture("tiny-bert");
    let e = finetune(
        &mut student(&fixture("tiny-xlmr")),
        &M3TrainData::single(rows(), 3),
        &TextTokenizer::from_dir(&bert).unwrap(),
        &cfg,
        &bert,
        &out,
        None,
        &mut |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("pads with id 0") && e.contains("config.json with 1"),
        "{e}"
    );
}

/// A loaded model becomes the same student as its directory does.
#[test]
fn student_from_a_loaded_model_equals_the_directorys() {
    let dir = fixture("tiny-bge-m3-layout");
    let a = M3Student::from_model(&M3Model::load(&dir, Device::Cpu).unwrap(), 1).unwrap();
    let b = M3Student::load_dir(&dir, 1).unwrap();
    assert_eq!(a.params.specs(), b.params.specs());
    for (x, y) in a.params.values().iter().zip(b.params.values()) {
        assert_eq!(x.f32s().unwrap(), y.f32s().unwrap());
    }
    assert_eq!(
        a.extra_tensors.keys().collect::<Vec<_>>(),
        ["pooler.dense.bias", "pooler.dense.weight"]
    );
}

/// `--output` may not be a `--train` directory: the run's own JSON files would be read back as
/// training data by the next run or a resume.
#[test]
fn output_into_a_train_directory_is_refused() {
    let d = tmp("train-out");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(fixture("m3-train/train.jsonl"), d.join("train.jsonl")).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .arg("finetune")
        .arg("--model")
        .arg(fixture("tiny-xlmr"))
        .arg("--train")
        .arg(&d)
        .arg("--output")
        .arg(&d)
        .args(["--steps", "1", "--batch-size", "2"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("the same directory as --train"), "{e}");
    let files: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
    assert_eq!(files.len(), 1, "the run wrote into the data directory");
    let _ = std::fs::remove_dir_all(&d);
}
