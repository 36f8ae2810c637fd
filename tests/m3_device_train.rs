//! The M3 trainer with the encoder and its AdamW on the (emulated) device follows the CPU
//! trainer: gradient clipping over device + host gradients, weight decay by the HF rule, a frozen
//! tensor left untouched, checkpoints that bring the device state home, and a resume that
//! continues the run.
#![cfg(feature = "emu")]

mod common;

use common::{fixture, rel_err};
use retrom3::data::m3_data::read_train_file;
use retrom3::data::TextTokenizer;
use retrom3::model::encoder::Encoder;
use retrom3::model::m3_train::{fresh_heads, M3LossConfig, M3Student};
use retrom3::train::m3::{finetune_on, FinetuneConfig, M3TrainData};
use retrom3::train::{AdamW, TrainState};
use retrom3::{Device, EncoderConfig};
use std::path::{Path, PathBuf};

/// A head-dim-32 student with the tiny-xlmr fixture's vocabulary (the device attention kernels
/// take head dims 32, 64, 128).
fn student() -> M3Student {
    let c = EncoderConfig::from_file(fixture("tiny-xlmr/config.json")).unwrap();
    let cfg =
        EncoderConfig::new_xlmr(c.vocab_size, 64, 2, 2, 128, c.max_position_embeddings).unwrap();
    M3Student::new(
        Encoder::init_random(cfg, 21).unwrap(),
        &fresh_heads(64, 5).unwrap(),
    )
    .unwrap()
}

fn config() -> FinetuneConfig {
    FinetuneConfig {
        steps: Some(4),
        batch_size: 3,
        group_size: 4,
        query_max_len: 16,
        passage_max_len: 24,
        loss: M3LossConfig {
            temperature: 0.05,
            ..Default::default()
        },
        self_distill_start_step: 0,
        lr: 1e-3,
        warmup_ratio: 0.25,
        weight_decay: 0.1,
        // Small enough that every step clips.
        max_grad_norm: Some(0.05),
        seed: 9,
        save_every: Some(2),
        fix_position_embedding: true,
        dropout: false,
        ..Default::default()
    }
}

fn train(device: Device, m: &mut M3Student, out: &Path, resume: Option<(TrainState, AdamW)>) {
    let dir = fixture("tiny-xlmr");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    finetune_on(
        device,
        m,
        &M3TrainData::single(ex, 3),
        &tok,
        &config(),
        &dir,
        out,
        resume,
        &mut |_, _, _| {},
    )
    .unwrap();
}

#[test]
fn device_optimizer_follows_the_host_one_and_resumes_bit_identically() {
    let start = student();
    let (mut cpu, mut emu) = (start.clone(), start.clone());
    let (cpu_out, emu_out) = (tmp("cpu"), tmp("emu"));
    train(Device::Cpu, &mut cpu, &cpu_out, None);
    train(Device::Emu, &mut emu, &emu_out, None);
    let specs = start.params.specs();
    for (i, spec) in specs.iter().enumerate() {
        let (a, b, s) = (
            emu.params.values()[i].f32s().unwrap(),
            cpu.params.values()[i].f32s().unwrap(),
            start.params.values()[i].f32s().unwrap(),
        );
        if spec.name == "embeddings.position_embeddings.weight" {
            assert_eq!(a, s, "the frozen position embeddings moved on the device");
            assert_eq!(b, s);
            continue;
        }
        if spec.name.ends_with("key.bias") {
            continue; // exact gradient zero: Adam turns rounding noise into steps
        }
        assert!(rel_err(a, s) > 1e-6, "{} did not train", spec.name);
        let e = rel_err(a, b);
        assert!(
            e < 1e-4,
            "{}: device vs host optimizer differ by {e}",
            spec.name
        );
    }
    // The checkpoint carries the device's weights and moments: resuming from it on the device
    // continues the run. Not bit for bit: the device backward accumulates some gradients with
    // atomic adds (bias / LayerNorm / embedding columns), whose order varies between runs (here
    // between emulator threads, on a GPU between blocks), so two uninterrupted device runs differ
    // by ~1e-7 too. Bit-identical resume is a CPU property (tests/m3_finetune.rs).
    let ckpt = emu_out.join("checkpoint-2");
    let state = TrainState::load(&ckpt).unwrap();
    let cfg = config();
    let mut opt = AdamW::new(
        start.params.specs(),
        retrom3::train::optim::adamw_hyper(cfg.lr, cfg.weight_decay),
        cfg.max_grad_norm,
    );
    opt.load_dir(&ckpt, start.params.specs(), state.step)
        .unwrap();
    let mut resumed = M3Student::load_dir(&ckpt, 0).unwrap();
    train(
        Device::Emu,
        &mut resumed,
        &tmp("resumed"),
        Some((state, opt)),
    );
    for ((a, b), spec) in resumed
        .params
        .values()
        .iter()
        .zip(emu.params.values())
        .zip(specs)
    {
        if spec.name.ends_with("key.bias") {
            continue;
        }
        let e = rel_err(a.f32s().unwrap(), b.f32s().unwrap());
        assert!(e < 1e-5, "{}: resumed run differs by {e}", spec.name);
    }
}

fn tmp(tag: &str) -> PathBuf {
    common::tmp_dir(&format!("devtrain-{tag}"))
}

/// A non-finite gradient on the device is an error naming the tensor and the step, before any
/// weight moves.
#[test]
fn non_finite_device_gradient_names_its_tensor() {
    use retrom3::device::emu::EmuDevice;
    use retrom3::engine::optim::DeviceAdamW;
    use retrom3::engine::DeviceEncoder;
    let m = student();
    let dev = EmuDevice::new();
    let denc = DeviceEncoder::upload(
        &dev,
        &m.encoder().unwrap(),
        retrom3::device::launch::KDType::F32,
    )
    .unwrap();
    let opt = AdamW::new(
        m.params.specs(),
        retrom3::train::optim::adamw_hyper(1e-3, 0.0),
        None,
    );
    let frozen = vec![false; m.params.values().len()];
    let dopt = DeviceAdamW::new(&dev, &denc, &m.params, &opt, &frozen).unwrap();
    assert_eq!(dopt.grad_sumsq(&dev, 1.0, 1).unwrap(), 0.0);
    let mut g = vec![0.5f32; dopt.grads()[3].len()];
    g[1] = f32::NAN;
    dopt.grads()[3].write_f32(&dev, &g).unwrap();
    let e = dopt.grad_sumsq(&dev, 1.0, 7).unwrap_err().to_string();
    let name = &m.params.specs()[3].name;
    assert!(e.contains(&format!("gradient of {name} at step 7")), "{e}");
}
