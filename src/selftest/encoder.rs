//! Selftest rows of kernels/encoder.cu (against `cpu::fused`) and of the whole device encoder
//! (`engine::DeviceEncoder`, forward and backward with dropout) against the CPU engine (tape) on
//! random models shaped like the tiny fixtures but with the head dims the fused attention takes.

use super::checks::Rng;
use super::{compare, SelftestRow, Tol};
use crate::autograd::Tape;
use crate::device::cpu::fused;
use crate::device::kernels::{self as k, HashDropout};
use crate::device::launch::{KDType, KernelDevice};
use crate::engine::{DBuf, DeviceEncoder};
use crate::error::Result;
use crate::model::config::EncoderConfig;
use crate::model::encoder::{DropoutCfg, Encoder, EncoderInput};
use crate::tensor::Tensor;

fn tol(dt: KDType) -> Tol {
    match dt {
        KDType::F32 => super::TOL_F32,
        KDType::BF16 => super::TOL_BF16,
    }
}

/// The whole encoder end to end: f32 accumulates rounding differently from the f64-accumulating
/// CPU reference through every layer; bf16 rounds every activation to 8 bits of mantissa.
pub(super) fn tol_model(dt: KDType) -> Tol {
    match dt {
        KDType::F32 => Tol {
            atol: 1e-4,
            rtol: 1e-3,
            floor: 0.0,
        },
        KDType::BF16 => Tol {
            atol: 4e-2,
            rtol: 1e-1,
            floor: 0.0,
        },
    }
}

fn vals(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

/// Rows for residual_layernorm_fwd, dropout_fwd, add_bias and colsum.
pub fn kernel_rows(dev: &dyn KernelDevice, quick: bool, seed: u64) -> Result<Vec<SelftestRow>> {
    let mut rows = Vec::new();
    let mut rng = Rng::new(seed ^ 0xE1C0);
    let shapes: &[(usize, usize)] = if quick {
        &[(37, 96), (9, 1024)]
    } else {
        &[(37, 96), (9, 1024), (301, 768), (64, 4096)]
    };
    for &dt in &[KDType::F32, KDType::BF16] {
        let sfx = dt.suffix();
        for &(r, d) in shapes {
            let shape = format!("{r}x{d}");
            // Inputs rounded to the storage type, so both sides start from the same values.
            let up = |v: Vec<f32>| -> Result<(DBuf, Vec<f32>)> {
                let b = DBuf::from_f32(dev, &v, dt)?;
                let back = b.to_f32(dev)?;
                Ok((b, back))
            };
            let (a, av) = up(vals(&mut rng, r * d))?;
            let (res, rv) = up(vals(&mut rng, r * d))?;
            let (bias, bv) = up(vals(&mut rng, d))?;
            let (gamma, gv) = up(vals(&mut rng, d).iter().map(|x| 1.0 + 0.2 * x).collect())?;
            let (beta, bev) = up(vals(&mut rng, d))?;
            let drop = HashDropout {
                p: 0.1,
                seed: seed ^ 77,
                stream: 3,
            };
            let (z, y) = (DBuf::zeros(dev, r * d, dt)?, DBuf::zeros(dev, r * d, dt)?);
            let (mean, rstd) = (
                DBuf::zeros(dev, r, KDType::F32)?,
                DBuf::zeros(dev, r, KDType::F32)?,
            );
            // SAFETY: every buffer holds the element counts the wrappers document.
            unsafe {
                k::residual_layernorm_fwd(
                    dev,
                    dt,
                    a.ptr(),
                    bias.ptr(),
                    res.ptr(),
                    gamma.ptr(),
                    beta.ptr(),
                    z.ptr(),
                    y.ptr(),
                    mean.ptr(),
                    rstd.ptr(),
                    r,
                    d,
                    1e-5,
                    Some(drop),
                )?;
            }
            let (zr, yr, mr, sr) = fused::residual_layernorm_fwd(
                &av,
                Some(&bv),
                Some(&rv),
                &gv,
                &bev,
                1e-5,
                Some((drop.p, drop.seed, drop.stream)),
                d,
            );
            let name = format!("residual_layernorm_fwd_{sfx}");
            rows.push(compare(&name, &shape, "z", &z.to_f32(dev)?, &zr, tol(dt)));
            // y and the statistics are computed from z as stored (rounded for bf16).
            let zs = z.to_f32(dev)?;
            let (_, yr2, mr2, sr2) =
                fused::residual_layernorm_fwd(&zs, None, None, &gv, &bev, 1e-5, None, d);
            let _ = (yr, mr, sr);
            rows.push(compare(&name, &shape, "y", &y.to_f32(dev)?, &yr2, tol(dt)));
            rows.push(compare(
                &name,
                &shape,
                "mean",
                &mean.to_f32(dev)?,
                &mr2,
                super::TOL_F32,
            ));
            rows.push(compare(
                &name,
                &shape,
                "rstd",
                &rstd.to_f32(dev)?,
                &sr2,
                super::TOL_F32,
            ));
            // dropout, in place.
            let (x, xv) = up(vals(&mut rng, r * d))?;
            // SAFETY: x holds r × d elements; in place is allowed.
            unsafe { k::dropout_fwd(dev, dt, x.ptr(), x.ptr(), r * d, drop)? };
            let want = fused::dropout(&xv, drop.p, drop.seed, drop.stream);
            rows.push(compare(
                &format!("dropout_fwd_{sfx}"),
                &shape,
                "y",
                &x.to_f32(dev)?,
                &want,
                tol(dt),
            ));
            // add_bias, in place.
            let (x, xv) = up(vals(&mut rng, r * d))?;
            // SAFETY: x holds r × d, bias d.
            unsafe { k::add_bias(dev, dt, x.ptr(), bias.ptr(), r, d)? };
            let mut want = xv;
            fused::add_bias(&mut want, &bv);
            rows.push(compare(
                &format!("add_bias_{sfx}"),
                &shape,
                "x",
                &x.to_f32(dev)?,
                &want,
                tol(dt),
            ));
            // colsum, accumulating into a non-zero f32 buffer.
            let init = vals(&mut rng, d);
            let db = DBuf::from_f32(dev, &init, KDType::F32)?;
            // SAFETY: a holds r × d, db d f32.
            unsafe { k::colsum(dev, dt, a.ptr(), db.ptr(), r, d)? };
            let mut want = init;
            fused::colsum(&av, &mut want);
            rows.push(compare(
                &format!("colsum_{sfx}"),
                &shape,
                "db",
                &db.to_f32(dev)?,
                &want,
                super::TOL_F32,
            ));
        }
        // add_bias over logits-sized rows: past 4 × the capped grid's threads, so each thread
        // runs the unrolled loop (4 loads in flight) and its remainder.
        let (r, d) = (5, 250_002);
        let bv = vals(&mut rng, d);
        let bias = DBuf::from_f32(dev, &bv, dt)?;
        let xv = vals(&mut rng, r * d);
        let x = DBuf::from_f32(dev, &xv, dt)?;
        let (bv, mut want) = (bias.to_f32(dev)?, x.to_f32(dev)?);
        // SAFETY: x holds r × d, bias d.
        unsafe { k::add_bias(dev, dt, x.ptr(), bias.ptr(), r, d)? };
        fused::add_bias(&mut want, &bv);
        rows.push(compare(
            &format!("add_bias_{sfx}"),
            &format!("{r}x{d}"),
            "x",
            &x.to_f32(dev)?,
            &want,
            tol(dt),
        ));
    }
    Ok(rows)
}

/// A random encoder with noisy LayerNorm and bias values (so a kernel that ignores them fails).
pub(super) fn random_encoder(cfg: EncoderConfig, seed: u64) -> Result<Encoder> {
    let mut enc = Encoder::init_random(cfg, seed)?;
    let mut rng = Rng::new(seed ^ 0xB1A5);
    let values = enc
        .params
        .values()
        .iter()
        .zip(enc.params.specs())
        .map(|(t, s)| {
            let v: Vec<f32> = t
                .f32s()?
                .iter()
                .map(|&x| {
                    if s.name.contains("LayerNorm") || s.name.ends_with(".bias") {
                        x + 0.1 * rng.normal()
                    } else {
                        x * 2.0
                    }
                })
                .collect();
            Tensor::from_vec(v, t.dims())
        })
        .collect::<Result<Vec<_>>>()?;
    enc.params.set_values(values)?;
    Ok(enc)
}

/// A padded batch: three texts of lengths len, len - 4 and 3, ids avoiding the pad id.
fn random_input(rng: &mut Rng, vocab: usize, pad: u32, len: usize) -> EncoderInput {
    random_texts(rng, vocab, pad, &[len, len.saturating_sub(4).max(2), 3])
}

/// Texts of the given lengths with random ids (never `pad`), right-padded.
pub(super) fn random_texts(rng: &mut Rng, vocab: usize, pad: u32, lens: &[usize]) -> EncoderInput {
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    let mut id = (rng.next_u64() % vocab as u64) as u32;
                    if id == pad {
                        id = (id + 1) % vocab as u32;
                    }
                    id
                })
                .collect()
        })
        .collect();
    EncoderInput::pad(&seqs, pad)
}

/// The device encoder against the CPU engine: inference forward, then a training forward with
/// hidden and attention dropout and the backward from a random d(hidden), every weight gradient.
pub fn model_rows(dev: &dyn KernelDevice, quick: bool, seed: u64) -> Result<Vec<SelftestRow>> {
    let mut rows = Vec::new();
    let mut rng = Rng::new(seed ^ 0x05EE_DE1C);
    // (kind, vocab, hidden, layers, heads, intermediate, max positions, length)
    let mut cases = vec![(true, 97, 64, 2, 2, 96, 40, 13)];
    if !quick {
        cases.push((false, 120, 128, 2, 2, 256, 64, 37));
        cases.push((true, 80, 256, 1, 2, 512, 72, 70));
    }
    for (xlmr, vocab, h, layers, heads, f, maxpos, len) in cases {
        let cfg = if xlmr {
            EncoderConfig::new_xlmr(vocab, h, layers, heads, f, maxpos)?
        } else {
            EncoderConfig::new_bert(vocab, h, layers, heads, f, maxpos)?
        };
        let pad = cfg.pad_token_id;
        let kind = if xlmr { "xlmr" } else { "bert" };
        let enc = random_encoder(cfg, seed ^ h as u64)?;
        let input = random_input(&mut rng, vocab, pad, len);
        let shape = format!(
            "{kind} h{h} x{layers} hd{} {}x{}",
            h / heads,
            input.batch,
            input.len
        );
        let drop = DropoutCfg {
            hidden: 0.1,
            attention: 0.1,
            seed: seed ^ 0xD0,
        };
        // CPU references.
        let mut nt = Tape::no_grad();
        let p0 = enc.params.bind(&mut nt);
        let want_eval = enc.forward(&mut nt, &p0, &input, None)?;
        let mut tape = Tape::new();
        let p = enc.params.bind(&mut tape);
        let want_train = enc.forward(&mut tape, &p, &input, Some(drop))?;
        let dh: Vec<f32> = vals(&mut rng, input.batch * input.len * h);
        for &dt in &[KDType::F32, KDType::BF16] {
            let name = format!("encoder_{}", dt.suffix());
            let t = tol_model(dt);
            let denc = match DeviceEncoder::upload(dev, &enc, dt) {
                Ok(d) => d,
                Err(e) => {
                    let mut r = compare(&name, &shape, "upload", &[], &[], t);
                    r.error = Some(e.to_string());
                    rows.push(r);
                    continue;
                }
            };
            let got = denc.forward(dev, &input, None, false)?.hidden.to_f32(dev)?;
            rows.push(compare(
                &format!("{name}_fwd"),
                &shape,
                "hidden",
                &got,
                want_eval.value().f32s()?,
                t,
            ));
            let fwd = denc.forward(dev, &input, Some(drop), true)?;
            rows.push(compare(
                &format!("{name}_fwd_dropout"),
                &shape,
                "hidden",
                &fwd.hidden.to_f32(dev)?,
                want_train.value().f32s()?,
                t,
            ));
            let grads = denc.zero_grads(dev)?;
            let dhd = DBuf::from_f32(dev, &dh, dt)?;
            // The CPU side gets the gradient as the device stores it.
            let dh_dev = dhd.to_f32(dev)?;
            denc.backward(dev, fwd, &dhd, &grads)?;
            let tape_c = {
                let mut t2 = Tape::new();
                let p2 = enc.params.bind(&mut t2);
                let out = enc.forward(&mut t2, &p2, &input, Some(drop))?;
                let g = t2.backward_with(&out, Tensor::from_vec(dh_dev.clone(), out.dims())?)?;
                p2.iter()
                    .map(|v| g.get(v).map(|t| t.f32s().map(<[f32]>::to_vec)))
                    .collect::<Vec<_>>()
            };
            // The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared
            // by all keys of a row): both sides return rounding noise, compared on the scale of
            // the key weight's gradient, which the same dK produces.
            let mut key_scale = 0f64;
            for ((spec, g), want) in enc.params.specs().iter().zip(&grads).zip(tape_c) {
                let want = match want {
                    Some(w) => w?,
                    None => vec![0.0; g.len()],
                };
                let scale = want.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
                let t = if spec.name.ends_with("key.bias") {
                    t.with_floor(t.atol * key_scale)
                } else {
                    t
                };
                if spec.name.ends_with("key.weight") {
                    key_scale = scale;
                }
                let short = spec
                    .name
                    .replace("encoder.layer.", "l")
                    .replace("attention.self.", "")
                    .replace("attention.output.", "attn_out.")
                    .replace("embeddings.", "emb.");
                rows.push(compare(
                    &format!("{name}_bwd"),
                    &shape,
                    &format!("d{short}"),
                    &g.to_f32(dev)?,
                    &want,
                    t,
                ));
            }
        }
        let _ = tape;
    }
    Ok(rows)
}

/// Rows for kernels/topk.cu against `cpu::topk`: heavy ties (8 distinct values), k = 1, k = n,
/// k at the kernel's maximum; about one score in 150 is a NaN of either sign or an infinity (a
/// NaN ranks above `inf`, so the columns show where the kernel put it).
pub fn topk_rows(dev: &dyn KernelDevice, quick: bool, seed: u64) -> Result<Vec<SelftestRow>> {
    let mut rng = Rng::new(seed ^ 0x70_9C);
    let mut cases: Vec<(usize, usize, usize)> = vec![(3, 1000, 10), (4, 33, 1), (2, 257, 257)];
    if !quick {
        cases.push((2, 5000, 2048));
        cases.push((64, 4096, 100));
    }
    let mut rows = Vec::new();
    for (r, n, kk) in cases {
        let shape = format!("{r}x{n} k{kk}");
        let s: Vec<f32> = (0..r * n)
            .map(|_| match rng.below(600) {
                0 => f32::NAN,
                1 => -f32::NAN,
                2 => f32::INFINITY,
                3 => f32::NEG_INFINITY,
                _ => (rng.below(8) as f32 - 3.5) * 0.25 + 0.001 * rng.below(3) as f32,
            })
            .collect();
        let sb = DBuf::from_f32(dev, &s, KDType::F32)?;
        let (os, oi) = (
            DBuf::zeros(dev, r * kk, KDType::F32)?,
            DBuf::zeros(dev, r * kk, KDType::F32)?,
        );
        // SAFETY: scores r·n f32, outputs r·k f32 / i32 (the i32 buffer is read back as bits).
        unsafe { k::topk_rows(dev, sb.ptr(), os.ptr(), oi.ptr(), r, n, kk)? };
        let want = crate::device::cpu::topk::topk_rows(&s, n, kk);
        let ws: Vec<f32> = want.iter().flatten().map(|p| p.1).collect();
        let wi: Vec<f32> = want.iter().flatten().map(|p| p.0 as f32).collect();
        let gi: Vec<f32> = oi
            .to_f32(dev)?
            .into_iter()
            .map(|x| x.to_bits() as i32 as f32)
            .collect();
        let exact = Tol {
            atol: 0.0,
            rtol: 0.0,
            floor: 0.0,
        };
        rows.push(compare(
            "topk_rows_f32",
            &shape,
            "scores",
            &os.to_f32(dev)?,
            &ws,
            exact,
        ));
        rows.push(compare("topk_rows_f32", &shape, "columns", &gi, &wi, exact));
    }
    Ok(rows)
}
