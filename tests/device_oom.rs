//! Out of device memory is a clear error, never a panic or a leak: the emulated device with a
//! memory limit (feature `emu`) drives the paths a CUDA allocation failure takes (the CUDA
//! allocator reports the same `Error::OutOfMemory` after giving its cached blocks back).
#![cfg(feature = "emu")]

use retrom3::device::emu::EmuDevice;
use retrom3::device::launch::{KDType, KernelDevice};
use retrom3::engine::DeviceEncoder;
use retrom3::model::encoder::{Encoder, EncoderInput};
use retrom3::{EncoderConfig, Error};

fn encoder() -> Encoder {
    let cfg = EncoderConfig::new_xlmr(100, 64, 2, 2, 128, 40).unwrap();
    Encoder::init_random(cfg, 1).unwrap()
}

fn weight_bytes(e: &Encoder) -> usize {
    e.params.values().iter().map(|t| t.numel() * 4).sum()
}

#[test]
fn weights_that_do_not_fit_are_an_out_of_memory_error() {
    let e = encoder();
    let dev = EmuDevice::new().with_memory_limit(weight_bytes(&e) / 2);
    match DeviceEncoder::upload(&dev, &e, KDType::F32) {
        Err(Error::OutOfMemory {
            device, requested, ..
        }) => {
            assert_eq!(device, "emu");
            assert!(requested > 0);
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
}

#[test]
fn activations_that_do_not_fit_fail_the_forward_and_free_what_it_took() {
    let e = encoder();
    let w = weight_bytes(&e);
    // Room for the weights and a little more: a training forward over a long batch does not fit.
    let dev = EmuDevice::new().with_memory_limit(w + 64 * 1024);
    let denc = DeviceEncoder::upload(&dev, &e, KDType::F32).unwrap();
    let seqs: Vec<Vec<u32>> = (0..16)
        .map(|i| (0..38).map(|j| 3 + (i + j) % 90).collect())
        .collect();
    let input = EncoderInput::pad(&seqs, 1);
    let err = denc
        .forward(&dev, &input, None, true)
        .err()
        .expect("must not fit");
    let msg = err.to_string();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{msg}");
    assert!(
        msg.contains("out of memory on emu") && msg.contains("--sub-batch"),
        "{msg}"
    );
    // Everything the failed forward allocated was given back: a small batch still runs.
    let small = EncoderInput::pad(&[vec![5, 6, 7]], 1);
    let out = denc.forward(&dev, &small, None, false).unwrap();
    assert_eq!(
        out.hidden.to_f32(&dev as &dyn KernelDevice).unwrap().len(),
        3 * 64
    );
}

/// The largest-batch search (`retrom3 bench max-batch`) under an emulated memory limit: without
/// sub-batches B is bounded by the activations and found exactly (B fits, B + 1 does not); with
/// sub-batches of 2 the device holds one piece's activations at a time and reaches the cap.
#[test]
fn max_batch_search_finds_the_memory_bound_and_sub_batches_lift_it() {
    let cfg = EncoderConfig::new_xlmr(1000, 64, 2, 2, 256, 66).unwrap();
    let dev = EmuDevice::new().with_memory_limit(6_000_000);
    let rows = retrom3::engine::bench::max_batch(&dev, cfg, &[32], &[0, 2], 16, 60.0, KDType::F32)
        .unwrap();
    assert_eq!(rows.len(), 2);
    let (whole, split) = (&rows[0], &rows[1]);
    assert!(!whole.lower_bound, "{whole:?}");
    assert!((1..16).contains(&whole.max_batch), "{whole:?}");
    assert_eq!(
        (split.max_batch, split.lower_bound),
        (16, true),
        "{split:?}"
    );
}

/// `encode` on a device backs off on out-of-memory (FlagEmbedding's 3/4 rule) and gives the same
/// vectors as with room to spare: the binary on the emulated device with `R3EMU_MEMORY_LIMIT`.
#[test]
fn encode_backs_off_on_out_of_memory() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let d = std::env::temp_dir().join(format!("retrom3-oom-encode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let model = d.join("model");
    // Head dim 32 (the device attention kernels' smallest); the tiny XLM-R tokenizer.
    let cfg = EncoderConfig::new_xlmr(1000, 64, 2, 2, 128, 40).unwrap();
    let enc = Encoder::init_random(cfg, 3).unwrap();
    retrom3::io::write_backbone(&model, &enc.params.to_map()).unwrap();
    std::fs::write(
        model.join("config.json"),
        enc.config.to_hf_json().to_string(),
    )
    .unwrap();
    retrom3::io::copy_tokenizer_files(&fixtures.join("tiny-xlmr"), &model).unwrap();
    let input = d.join("texts.jsonl");
    let texts: String = (0..32)
        .map(|i| {
            let words: Vec<String> = (0..8 + i % 5)
                .map(|j| format!("word{j} alpha beta"))
                .collect();
            format!("{{\"text\": \"{}\"}}\n", words.join(" "))
        })
        .collect();
    std::fs::write(&input, texts).unwrap();
    let run = |limit: Option<usize>, out: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"));
        c.args(["encode", "--device", "emu", "--batch-size", "32", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(d.join(out));
        if let Some(l) = limit {
            c.env("R3EMU_MEMORY_LIMIT", l.to_string());
        }
        let o = c.output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (ok, err) = run(None, "free.jsonl");
    assert!(ok, "{err}");
    let free = std::fs::read_to_string(d.join("free.jsonl")).unwrap();
    // Lower the limit until the batch of 32 no longer fits: the encode backs off (and says so)
    // and gives the same output, until even one text does not fit.
    let mut backed_off = false;
    let mut limit = 4_000_000usize;
    loop {
        let (ok, err) = run(Some(limit), "tight.jsonl");
        if !ok {
            assert!(err.contains("out of memory"), "{limit}: {err}");
            break;
        }
        assert_eq!(
            std::fs::read_to_string(d.join("tight.jsonl")).unwrap(),
            free,
            "{limit}"
        );
        backed_off |= err.contains("batches of");
        limit = limit * 3 / 4;
    }
    assert!(backed_off, "no limit exercised the back-off (last {limit})");
}
