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
    MaskingVocab::synthetic(n)
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
        max_len: 16,
        lr: 3e-3,
        grad_accum: 2,
        seed: 7,
        save_every,
        ..Default::default()
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

/// A 6-step run of `a` on `device` saving at step 3, and a second run resumed from that checkpoint:
/// (uninterrupted model, resumed model, their output directories).
fn run_and_resume(
    device: retrom3::Device,
    mut a: RetroMae,
    tag: &str,
) -> (RetroMae, RetroMae, PathBuf, PathBuf) {
    let docs = corpus();
    let a_out = tmp(&format!("{tag}-a"));
    run_pretrain_on(device, &mut a, &docs, &config(6, Some(3)), &a_out, None).unwrap();

    let ckpt = a_out.join("checkpoint-3");
    let state = TrainState::load(&ckpt).unwrap();
    assert_eq!(state.step, 3);
    let cfg = EncoderConfig::from_file(ckpt.join("config.json")).unwrap();
    let (map, path) = retrom3::io::read_backbone(&ckpt).unwrap();
    let enc = Encoder::from_tensors(cfg, &map, &path).unwrap();
    let heads = RetroMae::read_heads(&ckpt, &enc.config).unwrap();
    let mut b = RetroMae::new(enc, &heads, 0.5, 0).unwrap();
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
    let b_out = tmp(&format!("{tag}-b"));
    run_pretrain_on(
        device,
        &mut b,
        &docs,
        &config(6, Some(3)),
        &b_out,
        Some((state, opt)),
    )
    .unwrap();
    (a, b, a_out, b_out)
}

#[test]
fn resume_is_bit_identical() {
    let (a, b, a_out, b_out) = run_and_resume(retrom3::Device::Cpu, tiny_model(2), "cpu");
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

// ---- bad input (issue #4, item 9) ----

fn err_of<T>(r: retrom3::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn run_pretrain(
    model: &mut RetroMae,
    docs: &Vec<Vec<u32>>,
    cfg: &PretrainConfig,
    out: &Path,
) -> retrom3::Result<retrom3::train::retromae::PretrainReport> {
    run_pretrain_on(retrom3::Device::Cpu, model, docs, cfg, out, None)
}

/// `pretrain_on` with the test vocabulary and tokenizer, no progress callback.
fn run_pretrain_on(
    device: retrom3::Device,
    model: &mut RetroMae,
    docs: &Vec<Vec<u32>>,
    cfg: &PretrainConfig,
    out: &Path,
    resume: Option<(TrainState, AdamW)>,
) -> retrom3::Result<retrom3::train::retromae::PretrainReport> {
    retrom3::train::retromae::pretrain_on(
        device,
        model,
        docs,
        &vocab(40),
        cfg,
        &tok_dir(),
        out,
        resume,
        &mut |_, _, _, _, _| {},
    )
}

#[test]
fn bad_corpora_are_clear_errors() {
    let out = tmp("bad");
    let cfg = config(2, None);
    let mut m = tiny_model(4);
    // Empty corpus.
    let e = err_of(run_pretrain(&mut m, &Vec::new(), &cfg, &out));
    assert!(e.contains("no document"), "{e}");
    // Fewer documents than one batch.
    let e = err_of(run_pretrain(&mut m, &corpus()[..3].to_vec(), &cfg, &out));
    assert!(e.contains("fewer than one batch"), "{e}");
    // Texts without content (`<s> </s>`, shorter than 3 tokens): nothing to mask or rebuild.
    let e = err_of(run_pretrain(&mut m, &vec![Vec::new(); 16], &cfg, &out));
    assert!(e.contains("no encoder-masked token"), "{e}");
    // Ids outside the model's vocabulary (a corpus from a bigger tokenizer).
    let mut docs = corpus();
    docs[5][2] = 40;
    let e = err_of(run_pretrain(&mut m, &docs, &config(4, None), &out));
    assert!(e.contains("token id 40 >= vocab size 40"), "{e}");
    // Every text one word of 4 pieces: longer than round(6 * 0.3) = 2, so whole-word masking
    // masks nothing in the encoder (as HF's collator); the decoder still trains.
    let one_word: Vec<Vec<u32>> = (0..16).map(|i| vec![5 + 3 * (i % 5), 6, 9, 12]).collect();
    let r = run_pretrain(&mut m, &one_word, &config(2, None), &out).unwrap();
    assert!(r
        .losses
        .iter()
        .all(|l| l.1 == 0.0 && l.2.is_finite() && l.2 > 0.0));
    // The shortest trainable text: one content token (3 with the specials) trains finitely.
    let short: Vec<Vec<u32>> = (0..16).map(|i| vec![5 + i % 30]).collect();
    let r = run_pretrain(&mut m, &short, &config(3, None), &out).unwrap();
    assert!(r.losses.iter().all(|l| l.1.is_finite() && l.2.is_finite()));
    let _ = std::fs::remove_dir_all(&out);
}

/// Settings a program builds in code get the CLI's checks, named by field.
#[test]
fn bad_settings_are_named() {
    let out = tmp("settings");
    let mut m = tiny_model(4);
    let base = config(2, None);
    let mut enc2 = base.clone();
    enc2.masking.p_enc = 2.0;
    let mut dec0 = base.clone();
    dec0.masking.p_dec = 0.0;
    let long = PretrainConfig {
        max_len: 512,
        ..base.clone()
    };
    // The model's decoder rate (0.5) and the config's must be one value.
    let mut dec7 = base.clone();
    dec7.masking.p_dec = 0.7;
    for (cfg, want) in [
        (enc2, "masking.p_enc 2"),
        (dec0, "masking.p_dec 0"),
        (long, "max_len 512"),
        (dec7, "the model's p_dec 0.5 differs from masking.p_dec 0.7"),
    ] {
        let e = err_of(run_pretrain(&mut m, &corpus(), &cfg, &out));
        assert!(e.contains(want), "{e}");
    }
    // A masking vocabulary (tokenizer) bigger than the model's embedding table.
    let r = retrom3::train::retromae::pretrain_on(
        retrom3::Device::Cpu,
        &mut m,
        &corpus(),
        &vocab(50),
        &base,
        &tok_dir(),
        &out,
        None,
        &mut |_, _, _, _, _| {},
    );
    let e = err_of(r);
    assert!(e.contains("the tokenizer has 50 tokens"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    diverge_and_check(retrom3::Device::Cpu, model_of(5, 32, 0.0), "nan");
}

/// The same on the emulated device (the whole step there: the LM head's cross-entropy or the
/// device optimizer's gradient norm reports the non-finite value).
#[cfg(feature = "emu")]
#[test]
fn non_finite_loss_on_the_device_stops_and_keeps_the_last_good_checkpoint() {
    diverge_and_check(retrom3::Device::Emu, model_of(5, 64, 0.0), "nan-emu");
}

fn diverge_and_check(device: retrom3::Device, mut m: RetroMae, tag: &str) {
    let out = tmp(tag);
    // A divergent learning rate: the first update makes the weights huge, a later loss or
    // gradient is not finite.
    let cfg = PretrainConfig {
        lr: 1e36,
        warmup_ratio: 0.0,
        max_grad_norm: None,
        ..config(6, Some(1))
    };
    let e = err_of(run_pretrain_on(device, &mut m, &corpus(), &cfg, &out, None));
    let rows = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let done = rows.lines().count() as u64;
    assert!((1..6).contains(&done), "{done} steps logged");
    eprintln!("stopped after {done} good steps: {e}");
    // The cross-entropy op may report the non-finite loss itself; the trainer adds the step.
    assert!(e.starts_with("non-finite value in "), "{e}");
    assert!(e.contains("RetroMAE step") || e.contains("at step"), "{e}");
    // The last checkpoint is complete and loadable; nothing after it, no final model.
    let ckpt = out.join(format!("checkpoint-{done}"));
    assert_eq!(TrainState::load(&ckpt).unwrap().step, done);
    let cfg = EncoderConfig::from_file(ckpt.join("config.json")).unwrap();
    let (map, path) = retrom3::io::read_backbone(&ckpt).unwrap();
    Encoder::from_tensors(cfg, &map, &path).unwrap();
    for (name, t) in &map {
        assert!(
            t.to_f32().f32s().unwrap().iter().all(|x| x.is_finite()),
            "{name} in checkpoint-{done} is not finite"
        );
    }
    assert!(!out.join(format!("checkpoint-{}", done + 1)).exists());
    assert!(!out.join("model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&out);
}

fn cli_pretrain(config: &Path, data: &Path, out: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .args(["pretrain", "--config"])
        .arg(config)
        .arg("--tokenizer")
        .arg(tok_dir())
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(out)
        .args(["--steps", "1", "--batch-size", "2", "--max-len", "16"])
        .output()
        .expect("run retrom3")
}

/// A failed run: exit code 1 (not a panic) and a one-line message holding every needle.
fn expect_cli_error(o: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("retrom3: error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
}

#[test]
fn pretrain_cli_rejects_bad_input_in_one_line() {
    let d = tmp("cli");
    std::fs::create_dir_all(&d).unwrap();
    let config = tok_dir().join("config.json");
    let out = d.join("out");
    // Empty corpus (only blank lines).
    let blank = d.join("blank.txt");
    std::fs::write(&blank, "\n  \n\n").unwrap();
    expect_cli_error(
        &cli_pretrain(&config, &blank, &out),
        &["blank.txt", "no document"],
    );
    // A model whose embedding table is smaller than the tokenizer's vocabulary.
    let text = d.join("t.txt");
    std::fs::write(&text, "hello world\nsecond text here\nthird\n").unwrap();
    let small = d.join("small.json");
    let cfg = std::fs::read_to_string(&config).unwrap();
    assert!(cfg.contains("\"vocab_size\": 1000"));
    std::fs::write(
        &small,
        cfg.replace("\"vocab_size\": 1000", "\"vocab_size\": 500"),
    )
    .unwrap();
    expect_cli_error(
        &cli_pretrain(&small, &text, &out),
        &[
            "vocab_size",
            "tokenizer has 1000 tokens",
            "embedding table 500",
        ],
    );
    // Token files: one from another tokenizer, a truncated one, a damaged one.
    let tokenize = |tokenizer: &Path, name: &str| {
        let p = d.join(name);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
            .args(["tokenize", "--tokenizer"])
            .arg(tokenizer)
            .arg("--input")
            .arg(&text)
            .arg("--output")
            .arg(&p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        p
    };
    let bert = tokenize(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert"),
        "bert.r3tok",
    );
    expect_cli_error(
        &cli_pretrain(&config, &bert, &out),
        &["bert.r3tok", "another tokenizer"],
    );
    let good = tokenize(&tok_dir(), "good.r3tok");
    let bytes = std::fs::read(&good).unwrap();
    let trunc = d.join("trunc.r3tok");
    std::fs::write(&trunc, &bytes[..bytes.len() - 8]).unwrap();
    expect_cli_error(&cli_pretrain(&config, &trunc, &out), &["trunc.r3tok"]);
    let mut flipped = bytes.clone();
    let at = flipped.len() - 1;
    flipped[at] ^= 0xFF;
    let bad = d.join("bad.r3tok");
    std::fs::write(&bad, &flipped).unwrap();
    expect_cli_error(&cli_pretrain(&config, &bad, &out), &["bad.r3tok"]);
    // None of them wrote a model.
    assert!(!out.join("model.safetensors").exists());
    // The intact file trains.
    let o = cli_pretrain(&config, &good, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").is_file());
    // The same command with some flags given (the others as above).
    let pretrain = |extra: &[&str], data: &Path| {
        let tok = tok_dir();
        let defaults = [
            ("--config", config.to_str().unwrap()),
            ("--tokenizer", tok.to_str().unwrap()),
            ("--steps", "1"),
            ("--batch-size", "2"),
            ("--max-len", "16"),
        ];
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"));
        cmd.arg("pretrain")
            .arg("--data")
            .arg(data)
            .arg("--output")
            .arg(d.join("out2"));
        for (flag, value) in defaults {
            let model_given = flag == "--config" && extra.contains(&"--model");
            let epochs_given = flag == "--steps" && extra.contains(&"--epochs");
            if !(extra.contains(&flag) || model_given || epochs_given) {
                cmd.args([flag, value]);
            }
        }
        cmd.args(extra).output().expect("run retrom3")
    };
    // A corpus packed into longer blocks than the run's --max-len.
    let packed = d.join("packed.r3tok");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .args(["tokenize", "--pack", "--max-len", "64", "--tokenizer"])
        .arg(tok_dir())
        .arg("--input")
        .arg(&text)
        .arg("--output")
        .arg(&packed)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    expect_cli_error(
        &pretrain(&["--batch-size", "1"], &packed),
        &["packed.r3tok", "packed with --max-len 64", "--max-len 16"],
    );
    // Another model's tokenizer (BERT's, padding with id 0, for an XLM-R model padding with 1),
    // even though its vocabulary is the smaller one.
    expect_cli_error(
        &pretrain(
            &[
                "--tokenizer",
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/tiny-bert")
                    .to_str()
                    .unwrap(),
            ],
            &text,
        ),
        &["pad_token_id", "pads with id 0", "config.json with 1"],
    );
    // --max-len below 3, named, for a text corpus too.
    expect_cli_error(&pretrain(&["--max-len", "2"], &text), &["--max-len 2"]);
    // Fewer documents than one batch, with the file named.
    expect_cli_error(
        &pretrain(&["--batch-size", "9"], &text),
        &["t.txt", "fewer than one batch of 9"],
    );
    // `--model` a previous run's output continues its LM head and decoder: after one step at a
    // negligible learning rate they are (almost) the previous run's, not a fresh draw.
    let o = pretrain(
        &[
            "--model",
            out.to_str().unwrap(),
            "--lr",
            "1e-12",
            "--seed",
            "5",
        ],
        &good,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let heads = |dir: &Path| {
        retrom3::io::read_safetensors(&dir.join("retromae_heads.safetensors")).unwrap()
    };
    let (before, after) = (heads(&out), heads(&d.join("out2")));
    assert_eq!(before.len(), after.len());
    for (name, t) in &before {
        let (a, b) = (t.to_f32(), after[name].to_f32());
        let dev = a
            .f32s()
            .unwrap()
            .iter()
            .zip(b.f32s().unwrap())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(dev < 1e-5, "{name}: moved by {dev}");
    }
    // A NaN in the heads file is named with the file, not only the tensor.
    let bad = d.join("bad-heads");
    std::fs::create_dir_all(&bad).unwrap();
    let mut map = before.clone();
    let name = map.keys().next().unwrap().clone();
    let t = map[&name].to_f32();
    let mut v = t.clone().into_f32_vec().unwrap();
    v[0] = f32::NAN;
    map.insert(name.clone(), Tensor::from_vec(v, t.dims()).unwrap());
    retrom3::io::write_safetensors(&bad.join("retromae_heads.safetensors"), &map, None).unwrap();
    let cfg = EncoderConfig::from_file(out.join("config.json")).unwrap();
    let e = RetroMae::read_heads(&bad, &cfg).unwrap_err().to_string();
    assert!(
        e.contains("bad-heads/retromae_heads.safetensors") && e.contains(&name),
        "{e}"
    );
    // A resumed run keeps its seed.
    expect_cli_error(
        &pretrain(
            &[
                "--resume",
                out.to_str().unwrap(),
                "--seed",
                "7",
                "--steps",
                "2",
            ],
            &good,
        ),
        &["--seed 7 differs from the resumed run's 42"],
    );
    // A corpus edited since the checkpoint with the same counts, first and last documents (two
    // middle texts swapped): refused by the whole-corpus hash.
    let four = d.join("four.txt");
    std::fs::write(
        &four,
        "alpha beta gamma
delta epsilon
zeta eta theta
iota kappa
",
    )
    .unwrap();
    let o = pretrain(&["--batch-size", "2"], &four);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let swapped = d.join("swapped.txt");
    std::fs::write(
        &swapped,
        "alpha beta gamma
zeta eta theta
delta epsilon
iota kappa
",
    )
    .unwrap();
    let out2 = d.join("out2");
    expect_cli_error(
        &pretrain(
            &["--batch-size", "2", "--resume", out2.to_str().unwrap()],
            &swapped,
        ),
        &["corpus_tokens_hash"],
    );
    // --output the --model directory: the run would overwrite its base model.
    expect_cli_error(
        &pretrain(&["--model", out2.to_str().unwrap()], &good),
        &["--output", "the same directory as --model"],
    );
    // More micro-batches per step than the epochs asked for hold (a huge accumulation never
    // ended; a smaller one trained on more epochs than asked).
    expect_cli_error(
        &pretrain(&["--epochs", "1", "--grad-accum", "1000"], &good),
        &["grad accumulation 1000", "1 epoch"],
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// Pre-training on the emulated device (feature `emu`): the whole step there (encoder, LM head,
/// two-stream decoder, device AdamW) and, with `reference_compat`'s materialised decoder mask,
/// the encoder there and the decoder on the host. The same dropout masks, so each run equals the
/// CPU run up to float summation order.
#[cfg(feature = "emu")]
#[test]
fn pretraining_on_the_emulated_device_follows_the_cpu_run() {
    for reference_compat in [false, true] {
        let run = |device: retrom3::Device, tag: &str| {
            let mut model = model_of(3, 64, 0.0);
            let out = tmp(tag);
            let mut cfg = config(4, None);
            cfg.masking.reference_compat = reference_compat;
            let r = run_pretrain_on(device, &mut model, &corpus(), &cfg, &out, None).unwrap();
            let _ = std::fs::remove_dir_all(&out);
            (r.losses, model.params.values().to_vec())
        };
        let (cpu, wc) = run(retrom3::Device::Cpu, "dev-cpu");
        let (emu, we) = run(retrom3::Device::Emu, "dev-emu");
        assert_eq!((cpu.len(), emu.len()), (4, 4));
        for (a, b) in cpu.iter().zip(&emu) {
            assert!(
                (a.1 - b.1).abs() <= 1e-4 * a.1.abs(),
                "reference_compat {reference_compat}: enc {cpu:?} vs {emu:?}"
            );
            assert!(
                (a.2 - b.2).abs() <= 1e-4 * a.2.abs(),
                "reference_compat {reference_compat}: dec {cpu:?} vs {emu:?}"
            );
        }
        // The weights after 4 AdamW steps agree too (every parameter, encoder, LM head and
        // decoder).
        for (x, y) in wc.iter().zip(&we) {
            let d = x.max_abs_diff(y).unwrap();
            assert!(
                d <= 1e-4,
                "reference_compat {reference_compat}: weights differ by {d}"
            );
        }
    }
}

/// The device run's checkpoints (weights and AdamW moments of both device groups, brought back
/// to the host) resume it: the resumed emulated run ends where the uninterrupted one does, up to
/// the emulator's atomics summing in thread order.
#[cfg(feature = "emu")]
#[test]
fn device_run_resumes_from_its_checkpoint() {
    let (a, b, a_out, b_out) =
        run_and_resume(retrom3::Device::Emu, model_of(3, 64, 0.0), "emu-resume");
    for ((x, y), spec) in a
        .params
        .values()
        .iter()
        .zip(b.params.values())
        .zip(a.params.specs())
    {
        let d = x.max_abs_diff(y).unwrap();
        assert!(d <= 1e-5, "{}: resumed weights differ by {d}", spec.name);
    }
    let _ = std::fs::remove_dir_all(&a_out);
    let _ = std::fs::remove_dir_all(&b_out);
}

/// A pre-training run's output holds no M3 heads of an earlier fine-tuning run there (every
/// loader would pair them with the new encoder), and a dead run's partial save is cleared.
#[test]
fn pretrain_output_drops_stale_heads_and_dead_saves() {
    let d = tmp("stale");
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["colbert_linear.pt", "sparse_linear.pt"] {
        std::fs::write(out.join(f), "from a fine-tuning run").unwrap();
    }
    // No process has a pid above the kernel's pid_max (at most 2^22).
    let dead = out.join(format!(".checkpoint-3.tmp-{}", 1u32 << 23));
    std::fs::create_dir_all(&dead).unwrap();
    let text = d.join("t.txt");
    std::fs::write(&text, "hello world\nsecond text here\nthird one\nfourth\n").unwrap();
    let o = cli_pretrain(&tok_dir().join("config.json"), &text, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").is_file());
    for f in ["colbert_linear.pt", "sparse_linear.pt"] {
        assert!(!out.join(f).exists(), "{f}");
    }
    if Path::new("/proc/self").exists() {
        assert!(!dead.exists());
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// `pretrain --resume A/checkpoint-2 --output B` where B holds another run's log: B's log becomes
/// A's rows up to the checkpoint (from the checkpoint's copy) and then the resumed steps, whose
/// losses are the uninterrupted run's (not the other run's rows, nor a mix of both).
#[test]
fn pretrain_resumed_into_another_runs_directory_continues_its_own_log() {
    let d = tmp("foreign");
    std::fs::create_dir_all(&d).unwrap();
    let text = d.join("t.txt");
    std::fs::write(
        &text,
        "alpha beta gamma delta\nepsilon zeta eta\ntheta iota kappa lambda\nmu nu xi omicron\n",
    )
    .unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
            .arg("pretrain")
            .arg("--config")
            .arg(tok_dir().join("config.json"))
            .arg("--tokenizer")
            .arg(tok_dir())
            .arg("--data")
            .arg(&text)
            .arg("--output")
            .arg(out)
            .args(["--steps", "4", "--batch-size", "2", "--max-len", "16"])
            .args(extra)
            .output()
            .expect("run retrom3");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (a, b) = (d.join("a"), d.join("b"));
    run(&a, &["--save-every", "2", "--seed", "1"]);
    run(&b, &["--seed", "2"]);
    let rows = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let losses = |line: &str| {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        (
            v["step"].clone(),
            v["enc_loss"].clone(),
            v["dec_loss"].clone(),
        )
    };
    let (a_rows, b_rows) = (rows(&a), rows(&b));
    assert_eq!(a_rows.len(), 4);
    assert_ne!(
        losses(&a_rows[0]),
        losses(&b_rows[0]),
        "the runs must differ"
    );

    run(&b, &["--resume", a.join("checkpoint-2").to_str().unwrap()]);
    let resumed = rows(&b);
    assert_eq!(resumed.len(), 4, "{resumed:#?}");
    // Rows 1-2 as written by run A; rows 3-4 recomputed with A's losses.
    assert_eq!(resumed[..2], a_rows[..2]);
    for (x, y) in resumed[2..].iter().zip(&a_rows[2..]) {
        assert_eq!(losses(x), losses(y));
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A copy of tokenizer `src`'s files in `dst` with the post-processor removed (no `<s> … </s>`
/// around a text).
fn without_post_processor(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dst.join(f)).unwrap();
        }
    }
    let p = dst.join("tokenizer.json");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    t["post_processor"] = serde_json::Value::Null;
    std::fs::write(&p, t.to_string()).unwrap();
}

/// The losses of a run's metrics.jsonl, one (enc, dec, grad norm) per step.
fn losses(out: &Path) -> Vec<(f64, f64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {l}"));
            (f("enc_loss"), f("dec_loss"), f("grad_norm"))
        })
        .collect()
}

/// `pretrain --data corpus.jsonl` trains on the same documents as `pretrain --data
/// corpus.r3tok` made by `tokenize` (the content ids, the first `max_len - 2` of each text),
/// whatever the tokenizer's post-processor adds: without one, the text path used to drop each
/// text's first and last token (taking them for `<s>` and `</s>`), and to panic on a text the
/// normaliser empties.
#[test]
fn text_corpus_trains_like_its_token_file_without_a_post_processor() {
    let d = tmp("nopp");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (model, text) in [
        ("tiny-xlmr", "{\"text\": \"hello world\"}\n"),
        ("tiny-bert", "{\"text\": \"\\u0001\"}\n"),
    ] {
        let tok = d.join(format!("{model}-tok"));
        without_post_processor(&fixtures.join(model), &tok);
        let corpus = d.join(format!("{model}.jsonl"));
        let texts = std::fs::read_to_string(fixtures.join("texts.jsonl")).unwrap();
        std::fs::write(&corpus, format!("{text}{texts}")).unwrap();
        let run = |data: &Path, out: &Path| {
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
                .arg("pretrain")
                .arg("--config")
                .arg(fixtures.join(model).join("config.json"))
                .arg("--tokenizer")
                .arg(&tok)
                .arg("--data")
                .arg(data)
                .arg("--output")
                .arg(out)
                .args(["--steps", "3", "--batch-size", "2", "--max-len", "12"])
                .output()
                .expect("run retrom3");
            assert!(
                o.status.success(),
                "{model} {}: {}",
                data.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            losses(out)
        };
        let r3tok = d.join(format!("{model}.r3tok"));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
            .args(["tokenize", "--max-len", "12", "--tokenizer"])
            .arg(&tok)
            .arg("--input")
            .arg(&corpus)
            .arg("--output")
            .arg(&r3tok)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let from_text = run(&corpus, &d.join(format!("{model}-text")));
        let from_tokens = run(&r3tok, &d.join(format!("{model}-tokens")));
        assert_eq!(from_text.len(), 3);
        assert_eq!(from_text, from_tokens, "{model}");
    }
    let _ = std::fs::remove_dir_all(&d);
}
