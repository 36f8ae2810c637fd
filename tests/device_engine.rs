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
fn hd32_model_dir() -> std::path::PathBuf {
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
    let dir = std::env::temp_dir().join(format!("retrom3-engine-{}", std::process::id()));
    m.save(&dir).unwrap();
    dir
}

#[test]
fn m3_encode_on_the_emulated_device_matches_the_cpu() {
    let dir = hd32_model_dir();
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
