//! The RetroMAE decoder's device pieces against the CPU model: the two-input BERT layer
//! (`DeviceEncoder::cross_layer_fwd` / `_bwd` vs `model::encoder::bert_layer`, two-stream mask
//! and dropout on the decoder's streams) and the LM head with its cross-entropy
//! (`engine::lm_head::lm_head_loss` vs `lm_head_logits` + `ops::cross_entropy`, in chunks of rows).

use super::encoder::tol_model;
use super::{compare, SelftestRow};
use crate::autograd::Tape;
use crate::device::kernels::AttnKernelMask;
use crate::device::launch::{KDType, KernelDevice};
use crate::engine::lm_head::{lm_head_loss, LmHeadGrads, LmHeadWeights};
use crate::engine::{upload_pod, DBuf, DeviceEncoder};
use crate::error::Result;
use crate::model::config::EncoderConfig;
use crate::model::encoder::LAYER_TENSORS;
use crate::model::encoder::{
    bert_layer, layer_param_specs, normal_vec, DropoutCfg, Encoder, LayerDropout,
};
use crate::model::lm_head::{lm_head_logits, lm_head_specs, LM_HEAD_TENSORS};
use crate::ops::AttentionMask;
use crate::tensor::Tensor;
use std::sync::Arc;

/// Random tensors for `specs` (LayerNorm gammas near 1), seeded.
fn random_params(specs: &[crate::model::params::ParamSpec], seed: u64) -> Result<Vec<Tensor>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.dims.iter().product();
            let v = normal_vec(n, 0.1, seed, 100 + i as u64);
            let v = if s.name.ends_with("LayerNorm.weight") || s.name.ends_with("layer_norm.weight")
            {
                v.iter().map(|x| 1.0 + x).collect()
            } else {
                v
            };
            Tensor::from_vec(v, &s.dims)
        })
        .collect()
}

fn grad_of(g: &crate::autograd::Grads, v: &crate::autograd::Var) -> Result<Vec<f32>> {
    Ok(match g.get(v) {
        Some(t) => t.f32s()?.to_vec(),
        None => vec![0.0; v.dims().iter().product()],
    })
}

/// Rows `decoder_layer_{f32,bf16}` and `lm_head_loss_{f32,bf16}`.
pub fn rows(dev: &dyn KernelDevice, quick: bool, seed: u64) -> Result<Vec<SelftestRow>> {
    let mut rows = Vec::new();
    // (hidden, heads, batch, len)
    let mut layers = vec![(64usize, 2usize, 3usize, 11usize)];
    if !quick {
        layers.push((128, 4, 2, 70));
    }
    for (h, heads, b, l) in layers {
        let c = EncoderConfig::new_xlmr(50, h, 1, heads, 2 * h, l + 4)?;
        let shape = format!("h{h} hd{} {b}x{l}", h / heads);
        let specs = layer_param_specs("c_head.", &c);
        let weights = random_params(&specs, seed ^ 0xDEC)?;
        let xq = normal_vec(b * l * h, 1.0, seed, 1);
        let xkv = normal_vec(b * l * h, 1.0, seed, 2);
        let dy = normal_vec(b * l * h, 1.0, seed, 3);
        let mut key_mask = vec![1u8; b * l];
        key_mask[l - 2..l].iter_mut().for_each(|m| *m = 0);
        let words: Vec<u32> = (0..b * l).map(|i| ((i % l) / 2) as u32).collect();
        let (p, mseed) = (0.5f32, seed ^ 0x77);
        let drop = DropoutCfg {
            hidden: 0.1,
            attention: 0.1,
            seed: seed ^ 0x991,
        };
        let mut tape = Tape::new();
        let pv: Vec<_> = weights.iter().map(|t| tape.leaf(t.clone())).collect();
        let q = tape.leaf(Tensor::from_vec(xq.clone(), &[b, l, h])?);
        let kv = tape.leaf(Tensor::from_vec(xkv.clone(), &[b, l, h])?);
        let mask = AttentionMask::TwoStream {
            key_mask: Arc::from(key_mask.as_slice()),
            words: Arc::from(words.as_slice()),
            p,
            seed: mseed,
        };
        let ld = LayerDropout {
            hidden: drop.hidden,
            attention: drop.attention,
            seed: drop.seed,
            stream: 2,
            texts: None,
        };
        let y = bert_layer(&mut tape, &c, &pv, &q, &kv, &mask, Some(ld.clone()))?;
        let want_y = y.value().f32s()?.to_vec();
        let enc = Encoder::init_random(c.clone(), 3)?;
        let (km, wd) = (upload_pod(dev, &key_mask)?, upload_pod(dev, &words)?);
        let dmask = AttnKernelMask::TwoStream {
            key_mask: km.ptr,
            words: wd.ptr,
            p,
            seed: mseed,
        };
        for dt in [KDType::F32, KDType::BF16] {
            let name = format!("decoder_layer_{}", dt.suffix());
            let t = tol_model(dt);
            let denc = DeviceEncoder::upload(dev, &enc, dt)?;
            let up = |v: &[f32]| DBuf::from_f32(dev, v, dt);
            let w = weights
                .iter()
                .map(|t| up(t.f32s()?))
                .collect::<Result<Vec<_>>>()?;
            let gw = weights
                .iter()
                .map(|t| DBuf::zeros(dev, t.numel(), KDType::F32))
                .collect::<Result<Vec<_>>>()?;
            let (dq, dkv, ddy) = (up(&xq)?, up(&xkv)?, up(&dy)?);
            let fwd = denc.cross_layer_fwd(dev, &w, (&dq, &dkv), (b, l), dmask, Some(drop), 2)?;
            rows.push(compare(&name, &shape, "y", &fwd.y.to_f32(dev)?, &want_y, t));
            // The CPU backward gets dy as the device stores it.
            let dy_dev = ddy.to_f32(dev)?;
            let mut t2 = Tape::new();
            let pv2: Vec<_> = weights.iter().map(|t| t2.leaf(t.clone())).collect();
            let q2 = t2.leaf(Tensor::from_vec(dq.to_f32(dev)?, &[b, l, h])?);
            let kv2 = t2.leaf(Tensor::from_vec(dkv.to_f32(dev)?, &[b, l, h])?);
            let y2 = bert_layer(&mut t2, &c, &pv2, &q2, &kv2, &mask, Some(ld.clone()))?;
            let g = t2.backward_with(&y2, Tensor::from_vec(dy_dev, &[b, l, h])?)?;
            let (gq, gkv) = denc.cross_layer_bwd(dev, (&w, &gw), (&dq, &dkv), fwd, &ddy)?;
            rows.push(compare(
                &name,
                &shape,
                "dq_in",
                &gq.to_f32(dev)?,
                &grad_of(&g, &q2)?,
                t,
            ));
            rows.push(compare(
                &name,
                &shape,
                "dkv_in",
                &gkv.to_f32(dev)?,
                &grad_of(&g, &kv2)?,
                t,
            ));
            let mut key_scale = 0f64;
            for ((s, v), gb) in specs.iter().zip(&pv2).zip(&gw) {
                let want = grad_of(&g, v)?;
                let scale = want.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
                // The key bias's exact gradient is 0: rounding noise on the key weight's scale.
                let tol = if s.name.ends_with("key.bias") {
                    t.with_floor(t.atol * key_scale)
                } else {
                    t
                };
                if s.name.ends_with("key.weight") {
                    key_scale = scale;
                }
                let out = format!("d{}", s.name.trim_start_matches("c_head."));
                rows.push(compare(&name, &shape, &out, &gb.to_f32(dev)?, &want, tol));
            }
        }
        let _ = tape;
    }
    // LM head + cross-entropy: (hidden, vocab, rows, chunk).
    let mut heads = vec![(32usize, 301usize, 13usize, 5usize)];
    if !quick {
        heads.push((128, 4099, 40, 16));
    }
    for (h, v, n, chunk) in heads {
        let c = EncoderConfig::new_xlmr(v, h, 1, 2, 2 * h, 40)?;
        let shape = format!("{n}x{h} V{v} chunk{chunk}");
        let specs = lm_head_specs(&c);
        let head = random_params(&specs, seed ^ 0x1A)?;
        let emb = Tensor::from_vec(normal_vec(v * h, 0.3, seed, 50), &[v, h])?;
        let x = normal_vec(n * h, 1.0, seed, 51);
        let targets: Vec<i64> = (0..n as i64)
            .map(|i| {
                if i % 4 == 1 {
                    -100
                } else {
                    (i * 37 + (seed % 7) as i64) % v as i64
                }
            })
            .collect();
        let g = 0.5f32;
        for dt in [KDType::F32, KDType::BF16] {
            let name = format!("lm_head_loss_{}", dt.suffix());
            let t = tol_model(dt);
            let up = |v: &[f32]| DBuf::from_f32(dev, v, dt);
            let wb = head
                .iter()
                .map(|t| up(t.f32s()?))
                .collect::<Result<Vec<_>>>()?;
            let (eb, xb) = (up(emb.f32s()?)?, up(&x)?);
            // The CPU side takes the values as the device stores them.
            let mut tape = Tape::new();
            let pv = wb
                .iter()
                .zip(&head)
                .map(|(b, t)| Ok(tape.leaf(Tensor::from_vec(b.to_f32(dev)?, t.dims())?)))
                .collect::<Result<Vec<_>>>()?;
            let ev = tape.leaf(Tensor::from_vec(eb.to_f32(dev)?, &[v, h])?);
            let xv = tape.leaf(Tensor::from_vec(xb.to_f32(dev)?, &[n, h])?);
            let logits = lm_head_logits(&mut tape, &c, &pv, &ev, &xv)?;
            let loss = crate::ops::cross_entropy(&mut tape, &logits, &targets)?;
            let want_loss = loss.value().f32s()?[0];
            let gr = tape.backward_with(&loss, Tensor::from_vec(vec![g], &[1])?)?;
            let gb = head
                .iter()
                .map(|t| DBuf::zeros(dev, t.numel(), KDType::F32))
                .collect::<Result<Vec<_>>>()?;
            let ge = DBuf::zeros(dev, v * h, KDType::F32)?;
            let w = LmHeadWeights {
                dense_w: &wb[0],
                dense_b: &wb[1],
                ln_g: &wb[2],
                ln_b: &wb[3],
                bias: &wb[4],
                word_emb: &eb,
            };
            let gw = LmHeadGrads {
                dense_w: &gb[0],
                dense_b: &gb[1],
                ln_g: &gb[2],
                ln_b: &gb[3],
                bias: &gb[4],
                word_emb: &ge,
            };
            let (l, dx) = lm_head_loss(dev, &w, &gw, &xb, &targets, g, 1e-5, chunk)?;
            rows.push(compare(&name, &shape, "loss", &[l], &[want_loss], t));
            rows.push(compare(
                &name,
                &shape,
                "dx",
                &dx.to_f32(dev)?,
                &grad_of(&gr, &xv)?,
                t,
            ));
            rows.push(compare(
                &name,
                &shape,
                "dE",
                &ge.to_f32(dev)?,
                &grad_of(&gr, &ev)?,
                t,
            ));
            for ((s, p), b) in specs.iter().zip(&pv).zip(&gb) {
                let out = format!("d{}", s.name.trim_start_matches("lm_head."));
                rows.push(compare(
                    &name,
                    &shape,
                    &out,
                    &b.to_f32(dev)?,
                    &grad_of(&gr, p)?,
                    t,
                ));
            }
        }
    }
    Ok(rows)
}

/// Rows `retromae_step_{f32,bf16}`: one whole RetroMAE step on the device
/// (`engine::retromae::retromae_step`: encoder, MLM head, both decoder streams, the two-stream
/// decoder layer, their backward, dropout on) against the CPU tape (`RetroMae::loss`): both
/// losses and every parameter's gradient.
pub fn step_rows(dev: &dyn KernelDevice, quick: bool, seed: u64) -> Result<Vec<SelftestRow>> {
    use crate::data::masking::{make_batch, MaskingConfig, MaskingVocab};
    use crate::engine::retromae::{retromae_step, DeviceRetroMaeHeads};
    use crate::model::retromae::RetroMae;
    let mut rows = Vec::new();
    // (vocab, hidden, layers, heads, batch lengths)
    let mut cases = vec![(61usize, 64usize, 2usize, 2usize, vec![13usize, 6, 10])];
    if !quick {
        cases.push((97, 128, 1, 2, vec![37, 20, 29, 8]));
    }
    let mut rng = super::checks::Rng::new(seed ^ 0x3E7_40AE);
    for (vocab, h, layers, heads, lens) in cases {
        let max_len = lens.iter().max().copied().unwrap_or(3) + 2;
        let c = EncoderConfig::new_xlmr(vocab, h, layers, heads, 2 * h, max_len + 4)?;
        let enc = super::encoder::random_encoder(c.clone(), seed ^ 0x3E7)?;
        let mut model = RetroMae::new(enc, &Default::default(), 0.5, seed)?;
        let n_enc = model.params.values().len() - LM_HEAD_TENSORS - LAYER_TENSORS;
        let rest = random_params(&model.params.specs()[n_enc..], seed ^ 0x4EAD)?;
        let mut values = model.params.values()[..n_enc].to_vec();
        values.extend(rest);
        model.params.set_values(values)?;
        let mv = MaskingVocab::synthetic(vocab);
        let docs: Vec<Vec<u32>> = lens
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| 4 + rng.below(vocab - 5) as u32)
                    .collect::<Vec<u32>>()
            })
            .collect();
        let doc_refs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
        let mcfg = MaskingConfig {
            p_enc: 0.3,
            p_dec: 0.5,
            reference_compat: false,
        };
        let mut brng = crate::data::rng::Rng::new(seed, 0x3E7);
        let batch = make_batch(&doc_refs, &mv, &mcfg, max_len, &mut brng)?;
        let drop = DropoutCfg {
            hidden: 0.1,
            attention: 0.1,
            seed: seed ^ 0xD120,
        };
        let mut tape = Tape::new();
        let p = model.params.bind(&mut tape);
        let loss = model.loss(&mut tape, &p, &batch, Some(drop))?;
        let gr = tape.backward(&loss.total)?;
        let shape = format!("h{h} x{layers} b{} L{}", lens.len(), batch.enc.len);
        for dt in [KDType::F32, KDType::BF16] {
            let name = format!("retromae_step_{}", dt.suffix());
            let t = tol_model(dt);
            let denc = DeviceEncoder::upload(dev, &model.encoder()?, dt)?;
            let dheads = DeviceRetroMaeHeads::upload(dev, &model.params.values()[n_enc..], dt)?;
            let eg = denc.zero_grads(dev)?;
            let hg = model.params.values()[n_enc..]
                .iter()
                .map(|t| DBuf::zeros(dev, t.numel(), KDType::F32))
                .collect::<Result<Vec<_>>>()?;
            let (le, ld) = retromae_step(
                dev,
                &denc,
                &dheads,
                (&eg, &hg),
                &batch,
                model.p_dec,
                Some(drop),
                1.0,
            )?;
            rows.push(compare(&name, &shape, "enc_loss", &[le], &[loss.enc], t));
            rows.push(compare(&name, &shape, "dec_loss", &[ld], &[loss.dec], t));
            let mut key_scale = 0f64;
            for ((spec, v), b) in model
                .params
                .specs()
                .iter()
                .zip(&p)
                .zip(eg.iter().chain(&hg))
            {
                let short = spec
                    .name
                    .replace("encoder.layer.", "l")
                    .replace("attention.self.", "")
                    .replace("embeddings.", "emb.");
                let want = grad_of(&gr, v)?;
                // Key biases: rounding noise only (exact gradient 0), on the scale of the key
                // weight's gradient (the tensor before).
                let t = if spec.name.ends_with("key.bias") {
                    t.with_floor(t.atol * key_scale)
                } else {
                    t
                };
                if spec.name.ends_with("key.weight") {
                    key_scale = want.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
                }
                rows.push(compare(
                    &name,
                    &shape,
                    &format!("d{short}"),
                    &b.to_f32(dev)?,
                    &want,
                    t,
                ));
            }
        }
    }
    Ok(rows)
}
