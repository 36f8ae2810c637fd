//! Whole M3 training steps on the device against the CPU trainer: the encoder, the three heads
//! on the device (`engine::m3_heads`) and the losses on the host
//! (`M3Student::device_grads_resident`), whole and in sub-batches, versus one CPU tape
//! (`M3Student::loss`). f32 storage compares the loss and every parameter's gradient; bf16
//! storage (what training on a GPU uses) the loss.

use super::checks::Rng;
use super::encoder::{random_encoder, random_texts, tol_model};
use super::{compare, SelftestRow};
use crate::autograd::Tape;
use crate::device::launch::{KDType, KernelDevice};
use crate::engine::DeviceEncoder;
use crate::error::Result;
use crate::model::config::EncoderConfig;
use crate::model::m3_train::{fresh_heads, KdLoss, M3Batch, M3LossConfig, M3Student};

/// Rows `m3_step_{f32,bf16}` (sub 0 and sub-batches of 2).
pub fn rows(dev: &dyn KernelDevice, quick: bool, seed: u64) -> Result<Vec<SelftestRow>> {
    let mut rows = Vec::new();
    let mut rng = Rng::new(seed ^ 0x3_57E9);
    // (vocab, hidden, layers, heads, intermediate, query lengths, passage lengths, group)
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        Vec<usize>,
        Vec<usize>,
        usize,
    );
    let mut cases: Vec<Case> = vec![(97, 64, 2, 2, 96, vec![7, 4, 9], vec![12, 5, 9, 3, 14, 8], 2)];
    if !quick {
        cases.push((
            150,
            128,
            1,
            4,
            256,
            vec![17, 9],
            vec![40, 7, 33, 21, 12, 29],
            3,
        ));
    }
    for (vocab, h, layers, heads, f, qlens, plens, group) in cases {
        let cfg = EncoderConfig::new_xlmr(vocab, h, layers, heads, f, 48)?;
        let pad = cfg.pad_token_id;
        let student = M3Student::new(
            random_encoder(cfg, seed ^ 0x57E9 ^ h as u64)?,
            &fresh_heads(h, seed ^ 0x4EAD)?,
        )?;
        let batch = M3Batch {
            queries: random_texts(&mut rng, vocab, pad, &qlens),
            passages: random_texts(&mut rng, vocab, pad, &plens),
            group,
            teacher: None,
            no_in_batch: false,
            cross_device: None,
        };
        let loss_cfg = M3LossConfig {
            temperature: 0.1,
            unified: true,
            self_distill: true,
            kd: KdLoss::M3KdLoss,
        };
        let drop_ids = [0u32, 1, 2, 3];
        // CPU reference: one tape, no dropout.
        let mut tape = Tape::new();
        let p = student.params.bind(&mut tape);
        let loss = student.loss(&mut tape, &p, &batch, &loss_cfg, None, &drop_ids)?;
        let want_loss = loss.values()?.total;
        let g = tape.backward(&loss.total)?;
        let want: Vec<Vec<f32>> = p
            .iter()
            .zip(student.params.specs())
            .map(|(v, spec)| match g.get(v) {
                Some(t) => t.f32s().map(<[f32]>::to_vec),
                None => Ok(vec![0.0; spec.dims.iter().product::<usize>()]),
            })
            .collect::<Result<_>>()?;
        let norm = |gs: &[Vec<f32>]| -> f32 {
            gs.iter()
                .flatten()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt() as f32
        };
        let want_norm = norm(&want);
        for &dt in &[KDType::F32, KDType::BF16] {
            let name = format!("m3_step_{}", dt.suffix());
            let denc = DeviceEncoder::upload(dev, &student.encoder()?, dt)?;
            let dgrads = denc.zero_grads(dev)?;
            for sub in [0usize, 2] {
                let shape = format!(
                    "h{h} x{layers} q{} p{} g{group} sub{sub}",
                    qlens.len(),
                    plens.len()
                );
                let (vals, head) = student.device_grads_resident(
                    dev, &denc, &dgrads, &batch, &loss_cfg, None, &drop_ids, None, sub,
                )?;
                let mut got: Vec<Vec<f32>> = dgrads
                    .iter()
                    .map(|b| b.to_f32(dev))
                    .collect::<Result<_>>()?;
                for (t, spec) in head.iter().zip(&student.params.specs()[got.len()..]) {
                    got.push(match t {
                        Some(t) => t.f32s()?.to_vec(),
                        None => vec![0.0; spec.dims.iter().product::<usize>()],
                    });
                }
                let t = tol_model(dt);
                rows.push(compare(
                    &name,
                    &shape,
                    "loss",
                    &[vals.total],
                    &[want_loss],
                    t,
                ));
                if dt == KDType::BF16 {
                    // Only the loss: bf16 rounding can flip a sparse argmax between two
                    // positions of one token id (or a term weight across ReLU's zero), which
                    // legitimately routes that term's gradient elsewhere.
                    continue;
                }
                for ((spec, gd), w) in student.params.specs().iter().zip(&got).zip(&want) {
                    // Key biases: rounding noise only (exact gradient 0), on the global scale.
                    let t = if spec.name.ends_with("key.bias") {
                        t.with_floor(1e-6 * want_norm as f64)
                    } else {
                        t
                    };
                    rows.push(compare(
                        &name,
                        &shape,
                        &format!("d{}", short(&spec.name)),
                        gd,
                        w,
                        t,
                    ));
                }
            }
        }
    }
    Ok(rows)
}

fn short(name: &str) -> String {
    name.replace("encoder.layer.", "l")
        .replace("attention.self.", "")
        .replace("attention.output.", "attn_out.")
        .replace("embeddings.", "emb.")
}
