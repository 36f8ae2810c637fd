//! The device engine on the emulated device (feature `emu`): kernels/encoder.cu against its CPU
//! twin, the whole encoder forward and backward (with dropout) against the CPU engine, and
//! BGE-M3 encode through `M3Model::load(.., Device::Emu)` against the CPU model.
#![cfg(feature = "emu")]

use retrom3::device::emu::EmuDevice;
use retrom3::io::model_dir::M3Heads;
use retrom3::model::encoder::Encoder;
use retrom3::selftest::encoder;
use retrom3::{Device, EncodeOptions, EncoderConfig, M3Model, Tensor};

fn show(rows: &[retrom3::selftest::SelftestRow]) -> String {
    rows.iter()
        .map(|r| {
            format!(
                "{} {} {} abs {:.2e} rel {:.2e} {}{}\n",
                r.kernel,
                r.shape,
                r.output,
                r.max_abs_err,
                r.max_rel_err,
                if r.passed() { "ok" } else { "FAIL " },
                r.first_mismatch
                    .clone()
                    .or(r.error.clone())
                    .unwrap_or_default()
            )
        })
        .collect()
}

#[test]
fn fused_encoder_kernels_match_their_cpu_twins() {
    let rows = encoder::kernel_rows(&EmuDevice::new(), true, 3).unwrap();
    assert!(rows.len() >= 24);
    assert!(rows.iter().all(|r| r.passed()), "{}", show(&rows));
}

#[test]
fn device_encoder_forward_and_backward_match_the_cpu_engine() {
    let rows = encoder::model_rows(&EmuDevice::new(), true, 11).unwrap();
    // 2 dtypes x (2 forward rows + 37 gradients).
    assert_eq!(rows.len(), 2 * (2 + 5 + 2 * 16), "{}", show(&rows));
    assert!(rows.iter().all(|r| r.passed()), "{}", show(&rows));
}

#[test]
fn device_encoder_full_selftest_shapes() {
    // BERT with head dim 64 and XLM-R with head dim 128, longer and odd lengths.
    let rows = encoder::model_rows(&EmuDevice::new(), false, 5).unwrap();
    assert!(rows.iter().all(|r| r.passed()), "{}", show(&rows));
}

/// A model directory like the tiny BGE-M3 fixture but with head dim 32 (the fused attention's
/// smallest), random weights and heads: written by `M3Model::save`, read back by `load`.
fn hd32_model_dir(tag: &str) -> std::path::PathBuf {
    let mut m = M3Model::load("tests/fixtures/tiny-bge-m3-layout", Device::Cpu).unwrap();
    let c = &m.encoder.config;
    let cfg =
        EncoderConfig::new_xlmr(c.vocab_size, 64, 2, 2, 128, c.max_position_embeddings).unwrap();
    m.encoder = Encoder::init_random(cfg, 3).unwrap();
    let r = |dims: &[usize], seed: u64| {
        Tensor::from_vec(
            retrom3::model::encoder::normal_vec(dims.iter().product(), 0.2, seed, 0),
            dims,
        )
        .unwrap()
    };
    m.heads = Some(M3Heads {
        colbert_weight: r(&[64, 64], 1),
        colbert_bias: r(&[64], 2),
        sparse_weight: r(&[1, 64], 3),
        sparse_bias: Tensor::from_vec(vec![0.05], &[1]).unwrap(),
    });
    m.extra_tensors.clear();
    let dir = std::env::temp_dir().join(format!("retrom3-engine-{tag}-{}", std::process::id()));
    m.save(&dir).unwrap();
    dir
}

#[test]
fn m3_encode_on_the_emulated_device_matches_the_cpu() {
    let dir = hd32_model_dir("encode");
    let cpu = M3Model::load(&dir, Device::Cpu).unwrap();
    let emu = M3Model::load(&dir, Device::Emu).unwrap();
    assert!(emu.engine.is_some() && cpu.engine.is_none());
    let texts = [
        "What is BGE M3?",
        "Defination of BM25",
        "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
        "a",
    ];
    let opts = EncodeOptions {
        batch_size: 3,
        ..EncodeOptions::all()
    };
    let a = cpu.encode(&texts, &opts).unwrap();
    let b = emu.encode(&texts, &opts).unwrap();
    let close = |x: &[f32], y: &[f32]| {
        assert_eq!(x.len(), y.len());
        x.iter()
            .zip(y)
            .all(|(p, q)| (p - q).abs() <= 1e-4 + 1e-3 * q.abs())
    };
    for (x, y) in a.dense.unwrap().iter().zip(b.dense.unwrap().iter()) {
        assert!(close(x, y), "dense {x:?} vs {y:?}");
    }
    for (x, y) in a.sparse.unwrap().iter().zip(b.sparse.unwrap().iter()) {
        assert_eq!(x.len(), y.len(), "sparse terms {x:?} vs {y:?}");
        for ((i, w), (j, v)) in x.iter().zip(y.iter()) {
            assert_eq!(i, j);
            assert!((w - v).abs() <= 1e-4 + 1e-3 * w.abs(), "{w} vs {v}");
        }
    }
    for (x, y) in a.colbert.unwrap().iter().zip(b.colbert.unwrap().iter()) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            assert!(close(p, q));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The attention grid holds the batch in a dimension CUDA caps at 65,535, so the device path
/// refused a `batch_size` of 65,536 with that many texts (the CPU ran it); the encode now cuts
/// batches at `MAX_BATCH`. (The failing case takes minutes on the emulator; this checks the cut.)
#[test]
fn a_batch_size_over_the_grid_limit_is_cut() {
    let dir = hd32_model_dir("grid-limit");
    let emu = M3Model::load(&dir, Device::Emu).unwrap();
    let opts = EncodeOptions {
        batch_size: 1 << 20,
        ..Default::default()
    };
    let out = emu.encode(&["a", "b c"], &opts).unwrap();
    assert_eq!(out.batch_size, retrom3::infer::MAX_BATCH);
    assert_eq!(out.dense.unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).ok();
}

/// A random M3 student with head dim 32 and a batch of 2 queries x 3 passages.
fn m3_student_and_batch() -> (
    retrom3::model::m3_train::M3Student,
    retrom3::model::m3_train::M3Batch,
) {
    use retrom3::model::encoder::EncoderInput;
    use retrom3::model::m3_train::{fresh_heads, M3Batch, M3Student};
    let cfg = EncoderConfig::new_xlmr(90, 64, 2, 2, 128, 40).unwrap();
    let enc = Encoder::init_random(cfg, 21).unwrap();
    let student = M3Student::new(enc, &fresh_heads(64, 5).unwrap()).unwrap();
    let mut s = 12345u64;
    let mut text = |n: usize| -> Vec<u32> {
        let mut v = vec![0u32];
        for _ in 0..n {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            v.push(4 + ((s >> 33) % 86) as u32);
        }
        v.push(2);
        v
    };
    let queries: Vec<Vec<u32>> = vec![text(5), text(9)];
    let passages: Vec<Vec<u32>> = [14, 7, 11, 3, 16, 9].iter().map(|&n| text(n)).collect();
    let batch = M3Batch {
        queries: EncoderInput::pad(&queries, 1),
        passages: EncoderInput::pad(&passages, 1),
        group: 3,
        teacher: None,
        no_in_batch: false,
        cross_device: None,
    };
    (student, batch)
}

#[test]
fn m3_device_gradients_match_the_cpu_trainer() {
    use retrom3::autograd::Tape;
    use retrom3::device::launch::KDType;
    use retrom3::engine::DeviceEncoder;
    use retrom3::model::m3_train::{KdLoss, M3Batch, M3LossConfig};
    let (student, batch0) = m3_student_and_batch();
    let cfg0 = M3LossConfig {
        temperature: 0.05,
        unified: true,
        self_distill: true,
        kd: KdLoss::M3KdLoss,
    };
    let drop_ids = [0u32, 1, 2, 3];
    let drop = retrom3::model::encoder::DropoutCfg {
        hidden: 0.1,
        attention: 0.1,
        seed: 77,
    };
    let dev = EmuDevice::new();
    let denc = DeviceEncoder::upload(&dev, &student.encoder().unwrap(), KDType::F32).unwrap();
    let dgrads = denc.zero_grads(&dev).unwrap();
    // Whole batch; sub-batches of 2 (two-pass, recomputed forward); sub-batches of 1 with
    // dropout, whose per-call seeds are then the CPU engine's per-text seeds.
    // Also dense-only (`--unified false`) and no-in-batch batches (the score matrices' columns
    // chosen on the host), whole and in sub-batches.
    let dense_only = M3LossConfig {
        unified: false,
        self_distill: false,
        ..cfg0
    };
    let no_in_batch = M3Batch {
        no_in_batch: true,
        ..batch0.clone()
    };
    for (sub, dropout, cfg, batch) in [
        (0, None, cfg0, &batch0),
        (2, None, cfg0, &batch0),
        (4, None, cfg0, &batch0),
        (1, Some(drop), cfg0, &batch0),
        (0, None, dense_only, &batch0),
        (0, None, cfg0, &no_in_batch),
        (2, None, dense_only, &batch0),
        (3, None, cfg0, &no_in_batch),
    ] {
        let (cfg, batch) = (&cfg, batch);
        // CPU reference: one tape for the whole batch.
        let mut tape = Tape::new();
        let p = student.params.bind(&mut tape);
        let loss = student
            .loss(&mut tape, &p, batch, cfg, dropout, &drop_ids)
            .unwrap();
        let want_total = loss.values().unwrap().total;
        let g = tape.backward(&loss.total).unwrap();
        // Device: the encoder on the emulator, heads and losses on the host.
        let (vals, heads) = student
            .device_grads_resident(
                &dev, &denc, &dgrads, batch, cfg, dropout, &drop_ids, None, sub,
            )
            .unwrap();
        // Encoder gradients from the device buffers, then the heads'.
        let mut got: Vec<_> = dgrads
            .iter()
            .zip(student.params.specs())
            .map(|(b, spec)| Some(Tensor::from_vec(b.to_f32(&dev).unwrap(), &spec.dims).unwrap()))
            .collect();
        got.extend(heads);
        assert!(
            (vals.total - want_total).abs() <= 1e-5 * want_total.abs().max(1.0),
            "sub {sub}: loss {} vs {want_total}",
            vals.total
        );
        assert_eq!(got.len(), p.len());
        let global_scale = p
            .iter()
            .filter_map(|v| g.get(v))
            .flat_map(|t| t.f32s().unwrap().to_vec())
            .fold(0f32, |m, x| m.max(x.abs()));
        for ((v, gd), spec) in p.iter().zip(&got).zip(student.params.specs()) {
            let want = g.get(v).map(|t| t.f32s().unwrap().to_vec());
            let got = gd.as_ref().map(|t| t.f32s().unwrap().to_vec());
            let (want, got) = match (want, got) {
                (Some(w), Some(g)) => (w, g),
                (None, Some(g)) => (vec![0.0; g.len()], g),
                // Dense only: neither side has a gradient for the sparse / ColBERT heads.
                (None, None) if !cfg.unified => continue,
                (w, g) => panic!(
                    "{}: cpu {:?} device {:?}",
                    spec.name,
                    w.is_some(),
                    g.is_some()
                ),
            };
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            // Key biases get rounding noise only (their exact gradient is 0): compare on the
            // key weights' scale, as the selftest does.
            let floor = if spec.name.ends_with("key.bias") {
                1e-6
            } else {
                0.0
            };
            // Dense only: every gradient enters at the [CLS] rows, and the embeddings every text
            // shares (its first token's row, the token type) sum query and passage terms that
            // largely cancel; the emulated encoder gives the same values with the heads on the
            // host (sub 2): allow 1e-3 of the largest encoder gradient there.
            let floor = if cfg.unified {
                floor
            } else {
                floor + 1e-3 * global_scale
            };
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= floor + 1e-4 * scale + 1e-3 * b.abs(),
                    "sub {sub} unified {} no-in-batch {}: {}[{i}]: device {a} cpu {b} (scale {scale})",
                    cfg.unified,
                    batch.no_in_batch,
                    spec.name
                );
            }
        }
    }
}

#[test]
fn finetune_cli_runs_with_the_encoder_on_the_emulated_device() {
    let dir = hd32_model_dir("finetune");
    let work = std::env::temp_dir().join(format!("retrom3-engine-ft-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let rows: String = (0..4)
        .map(|i| {
            format!(
                "{{\"query\": \"what is module {i}\", \"pos\": [\"module {i} handles requests \
                 and responses\"], \"neg\": [\"the weather is {i} degrees\", \"a cat sat\"]}}\n"
            )
        })
        .collect();
    std::fs::write(work.join("train.jsonl"), rows).unwrap();
    let out = work.join("out");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .args(["finetune", "--device", "emu", "--model"])
        .arg(&dir)
        .arg("--train")
        .arg(work.join("train.jsonl"))
        .arg("--output")
        .arg(&out)
        .args([
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--group-size",
            "2",
            "--query-max-len",
            "16",
            "--passage-max-len",
            "24",
            // The two-pass sub-batch scheme on the device (one sub-batch of the passages at a
            // time; gradients checked in m3_device_gradients_match_the_cpu_trainer).
            "--sub-batch",
            "3",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    assert!(metrics.lines().all(|l| !l.contains("NaN")));
    // The result is a model directory the CPU engine loads.
    M3Model::load(&out, Device::Cpu).unwrap();
    std::fs::remove_dir_all(&work).ok();
    std::fs::remove_dir_all(&dir).ok();
}

/// The quickstart pipeline with the encoder on the emulated device: pre-training, fine-tuning,
/// indexing and evaluation all drive the device engine (tiny sizes: emulation is slow).
#[test]
fn quickstart_runs_with_the_encoder_on_the_emulated_device() {
    use retrom3::quickstart::{
        default_data_dir, run_with_settings, QuickstartSettings, QuickstartSize,
    };
    let s = QuickstartSettings {
        hidden: 64,
        heads: 2,
        intermediate: 128,
        pretrain_steps: 3,
        finetune_steps: 3,
        pretrain_lines: 64,
        train_examples: 32,
        corpus_docs: 40,
        test_queries: 10,
        ..QuickstartSettings::of(QuickstartSize::Small)
    };
    let out = std::env::temp_dir().join(format!("retrom3-engine-qs-{}", std::process::id()));
    let r = run_with_settings(
        s,
        QuickstartSize::Small,
        Device::Emu,
        &default_data_dir(),
        &out,
        &mut |_| {},
    )
    .unwrap();
    assert!(r.output.join("results.json").is_file());
    let report = std::fs::read_to_string(r.output.join("results.json")).unwrap();
    assert!(report.contains("\"emu\""), "{report}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn device_dense_search_equals_the_cpu_index() {
    use retrom3::engine::dense::DeviceDenseIndex;
    use retrom3::retrieval::dense::DenseIndex;
    let mut s = 99u64;
    let mut val = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) % 7) as f32 * 0.25 - 0.75
    };
    // 1500 documents of 24 dims from a 7-value alphabet: many exact score ties.
    let docs: Vec<Vec<f32>> = (0..1500)
        .map(|_| (0..24).map(|_| val()).collect())
        .collect();
    let queries: Vec<Vec<f32>> = (0..9).map(|_| (0..24).map(|_| val()).collect()).collect();
    let cpu = DenseIndex::build(&docs).unwrap();
    let dev = EmuDevice::new();
    let gpu = DeviceDenseIndex::upload(&dev, &cpu).unwrap();
    for k in [1, 10, 100, 1500, 3000] {
        let want = cpu.search(&queries, k).unwrap();
        let got = gpu.search(&dev, &queries, k).unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            let g: Vec<(u32, f32)> = g.iter().map(|h| (h.doc, h.score)).collect();
            let w: Vec<(u32, f32)> = w.iter().map(|h| (h.doc, h.score)).collect();
            assert_eq!(g, w, "k = {k}");
        }
    }
}

/// `bench model --rows` runs the named rows only, in the table's order, each with a positive
/// throughput (a profiler runs one of them alone).
#[test]
fn bench_model_runs_only_the_named_rows() {
    use retrom3::device::launch::KDType;
    use retrom3::engine::bench::{model, ModelRow};
    let dev = EmuDevice::new();
    let cfg = EncoderConfig::new_xlmr(300, 64, 1, 2, 128, 18).unwrap();
    let rows = model(
        &dev,
        cfg,
        2,
        16,
        1,
        KDType::F32,
        &[ModelRow::RetroMae, ModelRow::Encode],
    )
    .unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].starts_with("emu_encode_f32_"), "{names:?}");
    assert!(names[1].starts_with("emu_retromae_step_f32_"), "{names:?}");
    assert!(rows.iter().all(|r| r.tokens_per_s.is_some_and(|t| t > 0.0)));
}
