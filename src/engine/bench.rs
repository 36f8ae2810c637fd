//! Device microbenchmarks for `retrom3 bench kernels` and `retrom3 bench model`: each op is
//! launched `iters` times between two device synchronisations, so the clock stops only once the
//! stream has drained; achieved TFLOP/s (compute-bound ops) or GB/s (memory-bound ops) are set
//! against the card's peak: the bf16 dense tensor-core peak from a table of known cards, and the
//! device-to-device copy bandwidth measured in the same run.

use super::{DBuf, DeviceEncoder};
use crate::device::cpu::attention::AttnDims;
use crate::device::cpu::gemm::Trans;
use crate::device::kernels::{self as k, AdamWStep, AttnKernelMask};
use crate::device::launch::{DevPtr, DeviceGemm, KDType, KernelDevice};
use crate::error::{Error, Result};
use crate::model::config::EncoderConfig;
use crate::model::encoder::{DropoutCfg, Encoder, EncoderInput};
use crate::model::params::ParamSet;
use crate::tensor::Tensor;
use std::time::Instant;

/// The dropout of the training rows of `bench model` (encoder, M3 and RetroMAE steps alike): the
/// models' own 0.1, as a training run has it, so that the rows compare with one another and with
/// real steps (dropout costs a hash per element and per attention score).
const TRAIN_DROPOUT: DropoutCfg = DropoutCfg {
    hidden: 0.1,
    attention: 0.1,
    seed: 11,
};

/// One measured op.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// `{device}_{op}_{dtype}_{shape}`.
    pub name: String,
    pub seconds_per_iter: f64,
    /// Achieved TFLOP/s (compute-bound ops).
    pub tflops: Option<f64>,
    /// Achieved GB/s (memory-bound ops).
    pub gbps: Option<f64>,
    /// Fraction of the peak it is compared with (tensor-core peak or measured copy bandwidth).
    pub of_peak: Option<f64>,
    /// Tokens per second (model runs).
    pub tokens_per_s: Option<f64>,
}

impl BenchRow {
    /// One JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "seconds_per_iter": self.seconds_per_iter,
            "tflops": self.tflops,
            "gbps": self.gbps,
            "of_peak": self.of_peak,
            "tokens_per_s": self.tokens_per_s,
        })
    }
}

/// Dense bf16 tensor-core peak (TFLOP/s, no sparsity) of the cards we know, by name.
pub fn bf16_peak_tflops(device_name: &str) -> Option<f64> {
    let n = device_name.to_ascii_uppercase();
    let table: &[(&str, f64)] = &[
        ("H200", 989.0),
        ("H100 PCIE", 756.0),
        ("H100", 989.0),
        ("A100", 312.0),
        ("L40S", 362.0),
        ("A10", 125.0),
    ];
    table.iter().find(|(k, _)| n.contains(k)).map(|&(_, v)| v)
}

/// Time `iters` runs of `f` (after `warmup` untimed ones), seconds per run.
pub fn time(
    dev: &dyn KernelDevice,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters.max(1) {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// Sizes of a kernel run: `quick` shrinks everything so the emulator finishes in seconds.
pub struct KernelBenchCfg {
    pub quick: bool,
    pub iters: usize,
    /// Card name for the peak table (None: no peak ratio for TFLOP/s).
    pub card: Option<String>,
    /// Only the attention rows (e.g. under a profiler).
    pub attention_only: bool,
    /// The attention sequence lengths (None: the default list).
    pub seq_lens: Option<Vec<usize>>,
}

fn fill(dev: &dyn KernelDevice, n: usize, dt: KDType, seed: u64) -> Result<DBuf> {
    let mut s = seed | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect();
    DBuf::from_f32(dev, &v, dt)
}

/// The rows measured so far, each also handed to a callback as soon as it exists (the CLI prints
/// it then, so a run stopped by a time limit still shows what it measured).
struct Rows<'a> {
    rows: Vec<BenchRow>,
    on_row: &'a mut dyn FnMut(&BenchRow),
}

impl Rows<'_> {
    fn push(&mut self, r: BenchRow) {
        (self.on_row)(&r);
        self.rows.push(r);
    }
}

/// Every kernel family at its headline shape (H100-sized unless `quick`).
pub fn kernels(dev: &dyn KernelDevice, cfg: &KernelBenchCfg) -> Result<Vec<BenchRow>> {
    kernels_streaming(dev, cfg, &mut |_| {})
}

/// The tokens of one attention batch in `bench kernels` (`quick`: the emulator's size).
fn attention_tokens(quick: bool) -> usize {
    if quick {
        256
    } else {
        16384
    }
}

/// Attention sequence lengths `bench kernels` can run: each divides the batch's tokens.
pub fn check_attention_seq_lens(seqs: &[usize], quick: bool) -> Result<()> {
    let tokens = attention_tokens(quick);
    if let Some(&sl) = seqs
        .iter()
        .find(|&&sl| sl == 0 || !tokens.is_multiple_of(sl))
    {
        return Err(Error::invalid(format!(
            "attention sequence length {sl}: must divide the {tokens} tokens of a batch"
        )));
    }
    Ok(())
}

/// The smallest vocabulary of the random models of [`model`] and [`max_batch`]: their synthetic
/// texts draw ids from 5..vocab (0-4 are special tokens).
pub const MIN_VOCAB: usize = 6;

/// [`kernels`], handing each row to `on_row` as soon as it is measured.
pub fn kernels_streaming(
    dev: &dyn KernelDevice,
    cfg: &KernelBenchCfg,
    on_row: &mut dyn FnMut(&BenchRow),
) -> Result<Vec<BenchRow>> {
    // Checked before the first row (the copy row moves 2 GiB).
    let seqs: &[usize] = match &cfg.seq_lens {
        Some(s) => s,
        None if cfg.quick => &[64, 128],
        None => &[512, 1024, 2048, 4096, 8192],
    };
    check_attention_seq_lens(seqs, cfg.quick)?;
    let devname = devname(dev);
    let peak = cfg.card.as_deref().and_then(bf16_peak_tflops);
    let it = cfg.iters;
    let mut rows = Rows {
        rows: Vec::new(),
        on_row,
    };
    let bf = KDType::BF16;
    // Copy bandwidth: the reference for memory-bound kernels.
    let n_copy = if cfg.quick { 1 << 16 } else { 1 << 28 };
    let (a, b) = (
        DBuf::zeros(dev, n_copy, KDType::F32)?,
        DBuf::zeros(dev, n_copy, KDType::F32)?,
    );
    // SAFETY: both buffers hold n_copy f32.
    let s = time(dev, 1, it, || unsafe {
        dev.copy_d2d(a.ptr(), b.ptr(), n_copy * 4)
    })?;
    let copy_gbps = 2.0 * (n_copy * 4) as f64 / s / 1e9;
    rows.push(BenchRow {
        name: format!("{devname}_copy_f32_{}MiB", (n_copy * 4) >> 20),
        seconds_per_iter: s,
        tflops: None,
        gbps: Some(copy_gbps),
        of_peak: None,
        tokens_per_s: None,
    });
    drop((a, b));
    let mem_row = |name: String, s: f64, bytes: f64| BenchRow {
        name,
        seconds_per_iter: s,
        tflops: None,
        gbps: Some(bytes / s / 1e9),
        of_peak: Some(bytes / s / 1e9 / copy_gbps),
        tokens_per_s: None,
    };
    let flop_row = |name: String, s: f64, flops: f64| BenchRow {
        name,
        seconds_per_iter: s,
        tflops: Some(flops / s / 1e12),
        gbps: None,
        of_peak: peak.map(|p| flops / s / 1e12 / p),
        tokens_per_s: None,
    };
    // Attention, D = 64, 16 heads, B·S = 16k tokens (the targets of the CUDA issue).
    let tokens = attention_tokens(cfg.quick);
    let (heads, d) = if cfg.quick { (2, 64) } else { (16, 64) };
    for &sl in seqs {
        let batch = tokens / sl;
        let w = heads * d;
        let n = batch * sl * w;
        let (q, kk, v) = (
            fill(dev, n, bf, 1)?,
            fill(dev, n, bf, 2)?,
            fill(dev, n, bf, 3)?,
        );
        let (o, dout) = (DBuf::zeros(dev, n, bf)?, fill(dev, n, bf, 4)?);
        let (dq, dk, dv) = (
            DBuf::zeros(dev, n, bf)?,
            DBuf::zeros(dev, n, bf)?,
            DBuf::zeros(dev, n, bf)?,
        );
        let lse = DBuf::zeros(dev, batch * heads * sl, KDType::F32)?;
        let dims = AttnDims {
            batch,
            q_len: sl,
            k_len: sl,
            heads,
            head_dim: d,
        };
        let plain = AttnKernelMask::KeyPadding {
            key_mask: DevPtr::NULL,
        };
        // The RetroMAE decoder's two-stream mask at the same shapes (issue 4's target: >= 85%
        // of the plain attention's throughput): visibility drawn in the kernel, words of two
        // tokens, p_dec = 0.5.
        let ones = crate::engine::upload_pod(dev, &vec![1u8; batch * sl])?;
        let words: Vec<u32> = (0..batch * sl).map(|i| ((i % sl) / 2) as u32).collect();
        let words = crate::engine::upload_pod(dev, &words)?;
        let two_stream = AttnKernelMask::TwoStream {
            key_mask: ones.ptr,
            words: words.ptr,
            p: 0.5,
            seed: 7,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let fwd_with = |imp: k::AttnImpl, mask: AttnKernelMask| {
            // SAFETY: q, k, v, o hold B·S·H·D bf16, lse B·H·S f32.
            unsafe {
                k::attention_fwd_with(
                    dev,
                    imp,
                    bf,
                    q.ptr(),
                    kk.ptr(),
                    v.ptr(),
                    o.ptr(),
                    lse.ptr(),
                    mask,
                    &dims,
                    scale,
                    None,
                )
            }
        };
        let flops = 4.0 * (batch * heads * sl * sl * d) as f64;
        let s_c = time(dev, 1, it, || fwd_with(k::AttnImpl::CudaCores, plain))?;
        rows.push(flop_row(
            format!("{devname}_attention_fwd_bf16_b{batch}_s{sl}_h{heads}_d{d}"),
            s_c,
            flops,
        ));
        // The plain kernels with a key-padding mask of ones: the issue's "padding-mask
        // attention" (they read the mask; the rows without one read nothing per key), single-
        // and double-buffered.
        let key_pad = AttnKernelMask::KeyPadding { key_mask: ones.ptr };
        for (tag, imp) in [
            ("tc", k::AttnImpl::TensorCores),
            ("tcdb", k::AttnImpl::TensorCoresPipelined),
        ] {
            let s_p = time(dev, 1, it, || fwd_with(imp, key_pad))?;
            rows.push(flop_row(
                format!("{devname}_attention_fwd_{tag}_keypad_bf16_b{batch}_s{sl}_h{heads}_d{d}"),
                s_p,
                flops,
            ));
        }
        // Both forwards with both masks, each with its default heads per block; the two-stream
        // one also with the other head counts (1, 2, 4: the mask drawn once per block for 2 or 4
        // heads over the key tiles its cache holds, against the tail of the last wave of the
        // 2-4x longer blocks; k::TC_MASK_CACHE_BY_DEFAULT, k::tc_mask_tiles).
        // The forward that the fwd + bwd rows below add (the default, double-buffered one), by mask.
        let mut fwd_default = [0.0f64; 2];
        for (db, pipelined) in [("db", true), ("", false)] {
            let (imp, heads_imp): (k::AttnImpl, fn(usize) -> k::AttnImpl) = if pipelined {
                (
                    k::AttnImpl::TensorCoresPipelined,
                    k::AttnImpl::TensorCoresPipelinedHeads,
                )
            } else {
                (k::AttnImpl::TensorCores, k::AttnImpl::TensorCoresHeads)
            };
            for (m, (tag, mask)) in [("", plain), ("_twostream", two_stream)]
                .into_iter()
                .enumerate()
            {
                let s_f = time(dev, 1, it, || fwd_with(imp, mask))?;
                if pipelined {
                    fwd_default[m] = s_f;
                }
                rows.push(flop_row(
                    format!(
                        "{devname}_attention_fwd_tc{db}{tag}_bf16_b{batch}_s{sl}_h{heads}_d{d}"
                    ),
                    s_f,
                    flops,
                ));
                let default = k::tc_heads_per_block_for(mask, &dims, pipelined);
                for n in k::tc_heads_per_block_options(mask, &dims)
                    .into_iter()
                    .filter(|&n| n != default)
                {
                    let name = format!(
                        "{devname}_attention_fwd_tc{db}{tag}_hpb{n}_bf16_b{batch}_s{sl}_h{heads}_d{d}"
                    );
                    // A variant beside the defaults: one that cannot launch here (e.g. its
                    // shared memory) is reported and skipped, not the end of the run.
                    match time(dev, 1, it, || fwd_with(heads_imp(n), mask)) {
                        Ok(s_n) => rows.push(flop_row(name, s_n, flops)),
                        Err(e) => eprintln!("{name}: skipped: {e}"),
                    }
                }
            }
        }
        for (s_f, (tag, mask)) in fwd_default
            .into_iter()
            .zip([("", plain), ("_twostream", two_stream)])
        {
            // The backward: tensor cores at every length; the CUDA-core one (~6 TFLOP/s, for
            // comparison in the same run) at the two shortest only, the longer ones would take
            // most of a lease's minutes.
            for (bwd, imp) in [
                ("bwd", k::AttnImpl::TensorCores),
                ("bwdcc", k::AttnImpl::CudaCores),
            ] {
                if imp == k::AttnImpl::CudaCores && !cfg.quick && sl > 1024 {
                    continue;
                }
                let s_b = time(dev, 1, it, || {
                    // SAFETY: as the forward, plus dout, dq, dk, dv of the same size.
                    unsafe {
                        k::attention_bwd_with(
                            dev,
                            imp,
                            bf,
                            q.ptr(),
                            kk.ptr(),
                            v.ptr(),
                            o.ptr(),
                            lse.ptr(),
                            dout.ptr(),
                            dq.ptr(),
                            dk.ptr(),
                            dv.ptr(),
                            mask,
                            &dims,
                            scale,
                            None,
                        )
                    }
                })?;
                // FlashAttention's convention: the backward does 2.5x the forward's matmul
                // FLOPs; the row is the default (double-buffered tensor-core) forward plus this
                // backward.
                rows.push(flop_row(
                    format!(
                        "{devname}_attention_fwd_tc_{bwd}{tag}_bf16_b{batch}_s{sl}_h{heads}_d{d}"
                    ),
                    s_f + s_b,
                    3.5 * flops,
                ));
            }
        }
    }
    if cfg.attention_only {
        return Ok(rows.rows);
    }
    // GEMM: the FFN up-projection of a bge-m3 layer over 16k tokens.
    let (m, kd, n) = if cfg.quick {
        (256, 128, 512)
    } else {
        (16384, 1024, 4096)
    };
    let (ga, gb, gc) = (
        fill(dev, m * kd, bf, 5)?,
        fill(dev, n * kd, bf, 6)?,
        DBuf::zeros(dev, m * n, bf)?,
    );
    let g = DeviceGemm {
        ta: Trans::N,
        tb: Trans::T,
        m,
        k: kd,
        n,
        alpha: 1.0,
        beta: 0.0,
        ab: bf,
        c: bf,
    };
    // SAFETY: ga m·k, gb n·k, gc m·n bf16.
    let s = time(dev, 1, it, || unsafe {
        dev.gemm(&g, ga.ptr(), gb.ptr(), gc.ptr())
    })?;
    rows.push(flop_row(
        format!("{devname}_gemm_bf16_{m}x{kd}x{n}"),
        s,
        2.0 * (m * n * kd) as f64,
    ));
    drop((ga, gb, gc));
    // Residual LayerNorm forward and LayerNorm backward over 16k x 1024.
    let (r, dim) = if cfg.quick {
        (256, 1024)
    } else {
        (16384, 1024)
    };
    let (x, res, y) = (
        fill(dev, r * dim, bf, 7)?,
        fill(dev, r * dim, bf, 8)?,
        DBuf::zeros(dev, r * dim, bf)?,
    );
    let (gam, bet) = (fill(dev, dim, bf, 9)?, fill(dev, dim, bf, 10)?);
    let (mean, rstd) = (
        DBuf::zeros(dev, r, KDType::F32)?,
        DBuf::zeros(dev, r, KDType::F32)?,
    );
    // SAFETY: x, res, y r·dim; gamma, beta dim; mean, rstd r.
    let s = time(dev, 1, it, || unsafe {
        k::residual_layernorm_fwd(
            dev,
            bf,
            x.ptr(),
            DevPtr::NULL,
            res.ptr(),
            gam.ptr(),
            bet.ptr(),
            DevPtr::NULL,
            y.ptr(),
            mean.ptr(),
            rstd.ptr(),
            r,
            dim,
            1e-5,
            None,
        )
    })?;
    rows.push(mem_row(
        format!("{devname}_residual_layernorm_fwd_bf16_{r}x{dim}"),
        s,
        (3 * r * dim * 2) as f64,
    ));
    let (dg, db) = (
        DBuf::zeros(dev, dim, KDType::F32)?,
        DBuf::zeros(dev, dim, KDType::F32)?,
    );
    // SAFETY: as above; dy = res, dx = y.
    let s = time(dev, 1, it, || unsafe {
        k::layernorm_bwd(
            dev,
            bf,
            x.ptr(),
            gam.ptr(),
            mean.ptr(),
            rstd.ptr(),
            res.ptr(),
            y.ptr(),
            dg.ptr(),
            db.ptr(),
            r,
            dim,
        )
    })?;
    rows.push(mem_row(
        format!("{devname}_layernorm_bwd_bf16_{r}x{dim}"),
        s,
        (3 * r * dim * 2) as f64,
    ));
    drop((x, res, y));
    // Cross-entropy over the XLM-R vocabulary (the MLM head), forward + backward in place.
    let (cr, classes) = if cfg.quick {
        (64, 4096)
    } else {
        (4096, 250_002)
    };
    let logits = fill(dev, cr * classes, bf, 11)?;
    let targets: Vec<i64> = (0..cr).map(|i| (i * 7919 % classes) as i64).collect();
    let tbuf = super::upload_pod(dev, &targets)?;
    let (lse, rl, st) = (
        DBuf::zeros(dev, cr, KDType::F32)?,
        DBuf::zeros(dev, cr, KDType::F32)?,
        DBuf::zeros(dev, 2, KDType::F32)?,
    );
    let grad = DBuf::zeros(dev, cr * classes, bf)?;
    // SAFETY: logits and grad cr·classes bf16, targets cr i64, lse / row loss cr f32, stats 2.
    let s = time(dev, 1, it, || unsafe {
        k::cross_entropy_fwd(
            dev,
            bf,
            logits.ptr(),
            tbuf.ptr,
            lse.ptr(),
            rl.ptr(),
            st.ptr(),
            cr,
            classes,
        )?;
        k::cross_entropy_bwd(
            dev,
            bf,
            logits.ptr(),
            tbuf.ptr,
            lse.ptr(),
            st.ptr(),
            1.0,
            grad.ptr(),
            cr,
            classes,
        )
    })?;
    rows.push(mem_row(
        format!("{devname}_cross_entropy_fwdbwd_bf16_{cr}x{classes}"),
        s,
        (3 * cr * classes * 2) as f64,
    ));
    drop((logits, grad));
    // Fused AdamW over one contiguous f32 buffer (bge-m3: 568M parameters; 128M here).
    let np = if cfg.quick { 1 << 16 } else { 1 << 27 };
    let (p, gr, m1, v1) = (
        fill(dev, np, KDType::F32, 12)?,
        fill(dev, np, KDType::F32, 13)?,
        DBuf::zeros(dev, np, KDType::F32)?,
        DBuf::zeros(dev, np, KDType::F32)?,
    );
    let h = AdamWStep {
        lr: 1e-5,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        max_norm: 0.0,
        grad_scale: 1.0,
    };
    // SAFETY: param, grad, m, v hold np f32; no decay mask, no clipping.
    let s = time(dev, 1, it, || unsafe {
        k::adamw(
            dev,
            p.ptr(),
            gr.ptr(),
            m1.ptr(),
            v1.ptr(),
            DevPtr::NULL,
            DevPtr::NULL,
            None,
            np,
            &h,
        )
    })?;
    rows.push(mem_row(
        format!("{devname}_adamw_f32_{}M", np >> 20),
        s,
        (7 * np * 4) as f64,
    ));
    maxsim_rows(dev, cfg, devname, copy_gbps, &mut rows)?;
    Ok(rows.rows)
}

/// ColBERT MaxSim: the inference scan (one query against a packed document store, issue 5's
/// >= 75% of HBM target at BGE-M3's 1024-d bf16 vectors) and the training forward.
fn maxsim_rows(
    dev: &dyn KernelDevice,
    cfg: &KernelBenchCfg,
    devname: &str,
    copy_gbps: f64,
    rows: &mut Rows,
) -> Result<()> {
    use crate::device::cpu::maxsim::MaxSimDims;
    use crate::device::kernels_m3 as km;
    let it = cfg.iters;
    let bf = KDType::BF16;
    let (docs, doc_len, dim) = if cfg.quick {
        (64, 16, 128)
    } else {
        (20000, 128, 1024)
    };
    let store = fill(dev, docs * doc_len * dim, bf, 21)?;
    let offsets: Vec<i64> = (0..=docs).map(|n| (n * doc_len) as i64).collect();
    let off = dev.upload(bytemuck::cast_slice(&offsets))?;
    let scores = DBuf::zeros(dev, docs, KDType::F32)?;
    for (q_len, imp) in [8usize, 32].into_iter().flat_map(|l| {
        [
            (l, km::MaxSimImpl::Simt),
            (l, km::MaxSimImpl::TensorCores),
            (l, km::MaxSimImpl::TensorCoresPipelined),
        ]
    }) {
        let q = fill(dev, q_len * dim, bf, 22 + q_len as u64)?;
        let tag = match imp {
            km::MaxSimImpl::TensorCores => "_tc",
            km::MaxSimImpl::TensorCoresPipelined => "_tcp",
            km::MaxSimImpl::Simt | km::MaxSimImpl::Auto => "",
        };
        // SAFETY: q [q_len, dim], store [docs * doc_len, dim], offsets [docs + 1], scores [docs].
        let s = time(dev, 1, it, || unsafe {
            km::maxsim_docs_with(
                dev,
                imp,
                bf,
                q.ptr(),
                q_len,
                store.ptr(),
                off.ptr,
                scores.ptr(),
                docs,
                dim,
            )
        })?;
        let bytes = (docs * doc_len * dim * 2 + (docs + 1) * 8 + docs * 4) as f64;
        let flops = 2.0 * (q_len * docs * doc_len * dim) as f64;
        rows.push(BenchRow {
            name: format!("{devname}_maxsim_docs{tag}_bf16_q{q_len}_n{docs}x{doc_len}_d{dim}"),
            seconds_per_iter: s,
            tflops: Some(flops / s / 1e12),
            gbps: Some(bytes / s / 1e9),
            of_peak: Some(bytes / s / 1e9 / copy_gbps),
            tokens_per_s: None,
        });
    }
    drop((store, off, scores));
    // Training forward: 16 queries x 64 tokens against 128 passages x 256 tokens.
    let d = if cfg.quick {
        MaxSimDims {
            queries: 2,
            q_len: 8,
            passages: 4,
            p_len: 16,
            dim,
        }
    } else {
        MaxSimDims {
            queries: 16,
            q_len: 64,
            passages: 128,
            p_len: 256,
            dim,
        }
    };
    let q = fill(dev, d.queries * d.q_len * dim, bf, 31)?;
    let p = fill(dev, d.passages * d.p_len * dim, bf, 32)?;
    let qm = dev.upload(&vec![1u8; d.queries * d.q_len])?;
    let pm = dev.upload(&vec![1u8; d.passages * d.p_len])?;
    let sc = DBuf::zeros(dev, d.queries * d.passages, KDType::F32)?;
    let am = dev.alloc_zeroed(d.queries * d.passages * d.q_len * 4)?;
    // SAFETY: shapes as in `d`.
    let s = time(dev, 1, it, || unsafe {
        km::maxsim_fwd(
            dev,
            bf,
            q.ptr(),
            qm.ptr,
            p.ptr(),
            pm.ptr,
            sc.ptr(),
            am.ptr,
            d,
        )
    })?;
    let flops = 2.0 * (d.queries * d.q_len * d.passages * d.p_len * dim) as f64;
    rows.push(BenchRow {
        name: format!(
            "{devname}_maxsim_fwd_bf16_{}x{}_vs_{}x{}_d{dim}",
            d.queries, d.q_len, d.passages, d.p_len
        ),
        seconds_per_iter: s,
        tflops: Some(flops / s / 1e12),
        gbps: None,
        of_peak: None,
        tokens_per_s: None,
    });
    Ok(())
}

/// A random encoder of `config` without the Box-Muller init (a fast xorshift fill: speed runs
/// only need plausible magnitudes).
pub fn fast_random_encoder(config: EncoderConfig, seed: u64) -> Result<Encoder> {
    let specs = crate::model::encoder::encoder_param_specs(&config);
    let mut s = seed | 1;
    let values = specs
        .iter()
        .map(|sp| {
            let n: usize = sp.dims.iter().product();
            let v: Vec<f32> = if sp.name.ends_with("LayerNorm.weight") {
                vec![1.0; n]
            } else {
                (0..n)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
                    })
                    .collect()
            };
            Tensor::from_vec(v, &sp.dims)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Encoder {
        config,
        params: ParamSet::from_values(specs, values)?,
    })
}

/// The random model of [`model`] / [`max_batch`] and its texts: a vocabulary of at least
/// [`MIN_VOCAB`] ids, texts of 3 tokens or more (the RetroMAE row rebuilds those between the
/// first and the last) within the config's positions.
fn check_random_model(config: &EncoderConfig, seqs: &[usize]) -> Result<()> {
    if config.vocab_size < MIN_VOCAB {
        return Err(Error::invalid(format!(
            "vocab_size {}: the benchmark's synthetic texts need at least {MIN_VOCAB} ids",
            config.vocab_size
        )));
    }
    let max = config.max_tokens();
    if let Some(s) = seqs.iter().find(|&&s| !(3..=max).contains(&s)) {
        return Err(Error::invalid(format!(
            "{s} tokens per text: must be in 3..={max} (the config's positions)"
        )));
    }
    Ok(())
}

/// Encoder throughput on the device: tokens per second of the forward (inference) and of a
/// training forward + backward, on `batch` random texts of `seq` tokens (no padding).
pub fn model(
    dev: &dyn KernelDevice,
    config: EncoderConfig,
    batch: usize,
    seq: usize,
    iters: usize,
    dt: KDType,
    only: &[ModelRow],
) -> Result<Vec<BenchRow>> {
    check_random_model(&config, &[seq])?;
    if batch == 0 {
        return Err(Error::invalid("bench model: batch 0"));
    }
    let want = |r: ModelRow| only.is_empty() || only.contains(&r);
    let devname = devname(dev);
    let shape = format!(
        "l{}_h{}_v{}_b{batch}_s{seq}",
        config.num_hidden_layers, config.hidden_size, config.vocab_size
    );
    use crate::model::m3_train::{fresh_heads, M3Student};
    let vocab = config.vocab_size;
    let hidden = config.hidden_size;
    let student = M3Student::new(fast_random_encoder(config, 7)?, &fresh_heads(hidden, 1)?)?;
    let denc = DeviceEncoder::upload(dev, &student.encoder()?, dt)?;
    let seqs: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..seq)
                .map(|i| (5 + (b * 131 + i * 17) % (vocab - 5)) as u32)
                .collect()
        })
        .collect();
    let input = EncoderInput::pad(&seqs, 1);
    let tokens = (batch * seq) as f64;
    let mut rows = Vec::new();
    if want(ModelRow::Encode) {
        let s = time(dev, 1, iters, || {
            denc.forward(dev, &input, None, false).map(|_| ())
        })?;
        rows.push(BenchRow {
            name: format!("{devname}_encode_{}_{shape}", dt.suffix()),
            seconds_per_iter: s,
            tflops: None,
            gbps: None,
            of_peak: None,
            tokens_per_s: Some(tokens / s),
        });
    }
    let grads = denc.zero_grads(dev)?;
    if want(ModelRow::Train) {
        let dh = fill(dev, batch * seq * denc.config.hidden_size, dt, 3)?;
        let s2 = time(dev, 1, iters, || {
            let f = denc.forward(dev, &input, Some(TRAIN_DROPOUT), true)?;
            denc.backward(dev, f, &dh, &grads)
        })?;
        rows.push(BenchRow {
            name: format!("{devname}_train_fwdbwd_{}_{shape}", dt.suffix()),
            seconds_per_iter: s2,
            tflops: None,
            gbps: None,
            of_peak: None,
            tokens_per_s: Some(tokens / s2),
        });
    }
    if want(ModelRow::M3) {
        rows.push(m3_row(dev, &student, &denc, &grads, batch, seq, iters, dt)?);
    }
    drop(grads);
    if want(ModelRow::RetroMae) {
        rows.push(retromae_row(
            dev,
            &student.encoder()?,
            batch,
            seq,
            iters,
            dt,
        )?);
    }
    Ok(rows)
}

/// The device's name in row names.
fn devname(dev: &dyn KernelDevice) -> &'static str {
    match dev.device() {
        crate::Device::Cuda(_) => "cuda",
        crate::Device::Emu => "emu",
        crate::Device::Cpu => "cpu",
    }
}

/// The rows of [`model`] (all of them when none is named).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelRow {
    /// Encoder forward (inference).
    Encode,
    /// Encoder forward + backward.
    Train,
    /// One M3 unified training step.
    M3,
    /// One RetroMAE pre-training step.
    #[value(name = "retromae")]
    RetroMae,
}

/// One M3 unified training step (all three heads and their losses, self-distillation):
/// batch / 4 queries of min(seq, 64) tokens, each with a group of 4 passages of seq tokens.
#[allow(clippy::too_many_arguments)]
fn m3_row(
    dev: &dyn KernelDevice,
    student: &crate::model::m3_train::M3Student,
    denc: &DeviceEncoder,
    grads: &[DBuf],
    batch: usize,
    seq: usize,
    iters: usize,
    dt: KDType,
) -> Result<BenchRow> {
    use crate::model::m3_train::{KdLoss, M3Batch, M3LossConfig};
    let devname = devname(dev);
    let vocab = denc.config.vocab_size;
    let hidden = denc.config.hidden_size;
    let (bq, group, ql) = ((batch / 4).max(1), 4, seq.min(64));
    let text = |i: usize, len: usize| -> Vec<u32> {
        (0..len)
            .map(|j| (5 + (i * 131 + j * 17) % (vocab - 5)) as u32)
            .collect()
    };
    let queries: Vec<Vec<u32>> = (0..bq).map(|i| text(i + 7, ql)).collect();
    let passages: Vec<Vec<u32>> = (0..bq * group).map(|i| text(i + 1000, seq)).collect();
    let m3 = M3Batch {
        queries: EncoderInput::pad(&queries, 1),
        passages: EncoderInput::pad(&passages, 1),
        group,
        teacher: None,
        no_in_batch: false,
        cross_device: None,
    };
    let loss = M3LossConfig {
        temperature: 0.02,
        unified: true,
        self_distill: true,
        kd: KdLoss::M3KdLoss,
    };
    let drop_ids = [0u32, 1, 2, 3];
    let s3 = time(dev, 1, iters, || {
        student
            .device_grads_resident(
                dev,
                denc,
                grads,
                &m3,
                &loss,
                Some(TRAIN_DROPOUT),
                &drop_ids,
                None,
                0,
            )
            .map(|_| ())
    })?;
    Ok(BenchRow {
        name: format!(
            "{devname}_m3_step_{}_l{}_h{hidden}_q{bq}x{ql}_p{}x{seq}",
            dt.suffix(),
            denc.config.num_hidden_layers,
            bq * group
        ),
        seconds_per_iter: s3,
        tflops: None,
        gbps: None,
        of_peak: None,
        tokens_per_s: Some((bq * ql + bq * group * seq) as f64 / s3),
    })
}

/// One RetroMAE training step (`engine::retromae::retromae_step`: encoder + MLM head, both
/// decoder streams, the two-stream decoder layer and its loss, forward and backward, dropout
/// 0.1) on `batch` random texts of `seq` tokens, 30% / 50% masking.
fn retromae_row(
    dev: &dyn KernelDevice,
    enc: &Encoder,
    batch: usize,
    seq: usize,
    iters: usize,
    dt: KDType,
) -> Result<BenchRow> {
    use crate::data::masking::{make_batch, MaskingConfig, MaskingVocab};
    use crate::model::retromae::RetroMae;
    let c = enc.config.clone();
    let vocab = c.vocab_size;
    let model = RetroMae::new(enc.clone(), &Default::default(), 0.5, 5)?;
    let n_enc = enc.params.values().len();
    let denc = DeviceEncoder::upload(dev, enc, dt)?;
    let heads =
        super::retromae::DeviceRetroMaeHeads::upload(dev, &model.params.values()[n_enc..], dt)?;
    let enc_grads = denc.zero_grads(dev)?;
    let head_grads = model.params.values()[n_enc..]
        .iter()
        .map(|t| DBuf::zeros(dev, t.numel(), KDType::F32))
        .collect::<Result<Vec<_>>>()?;
    let mv = MaskingVocab::synthetic(vocab);
    // make_batch adds [CLS] and [SEP]: seq - 2 content tokens per text.
    let docs: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..seq.saturating_sub(2))
                .map(|i| (5 + (b * 131 + i * 17) % (vocab - 5)) as u32)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
    let mcfg = MaskingConfig {
        p_enc: 0.3,
        p_dec: 0.5,
        reference_compat: false,
    };
    let rb = make_batch(
        &refs,
        &mv,
        &mcfg,
        seq,
        &mut crate::data::rng::Rng::new(5, 1),
    )?;
    let drop = Some(TRAIN_DROPOUT);
    let s = time(dev, 1, iters, || {
        super::retromae::retromae_step(
            dev,
            &denc,
            &heads,
            (&enc_grads, &head_grads),
            &rb,
            0.5,
            drop,
            1.0,
        )
        .map(|_| ())
    })?;
    let devname = devname(dev);
    Ok(BenchRow {
        name: format!(
            "{devname}_retromae_step_{}_l{}_h{}_b{batch}x{}",
            dt.suffix(),
            c.num_hidden_layers,
            c.hidden_size,
            rb.enc.len
        ),
        seconds_per_iter: s,
        tflops: None,
        gbps: None,
        of_peak: None,
        tokens_per_s: Some((batch * rb.enc.len) as f64 / s),
    })
}

/// One cell of the largest-batch search ([`max_batch`]).
#[derive(Clone, Debug, PartialEq)]
pub struct MaxBatchRow {
    pub seq_len: usize,
    /// Texts per encoder call (0: the whole batch at once).
    pub sub_batch: usize,
    /// Largest number of queries B (with B passages) whose training step fits.
    pub max_batch: usize,
    /// True when the search stopped at the cap or the time budget before finding a B that
    /// does not fit: `max_batch` is then a lower bound.
    pub lower_bound: bool,
    pub probes: usize,
    pub seconds: f64,
}

impl MaxBatchRow {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "seq_len": self.seq_len, "sub_batch": self.sub_batch, "max_batch": self.max_batch,
            "lower_bound": self.lower_bound, "probes": self.probes, "seconds": self.seconds,
        })
    }
}

/// The search of [`max_batch`] for the largest B in 1..=cap whose step fits: `probe(B)` runs one
/// step and gives its peak bytes (Some) or None when it ran out of memory; `over()` ends the
/// search early, and no probe after the first two is larger than `afford()` (the largest B whose
/// step the time left can pay for; the search ends when that is no more than the largest fit, a
/// lower bound then). Returns (largest B that fitted, smallest B that did not if one was probed).
///
/// A step's peak grows with B close to linearly (activations and their gradients; the resident
/// weights and optimizer state are the constant). With the device's `capacity` known, each next
/// B is where the line through the two largest fitting probes meets it (a secant step, at most
/// 64x the largest fit so far); once a B that does not fit is known the guess stays inside the
/// bracket, and the bracket's midpoint is taken instead whenever the last probe failed or did
/// not halve it, so the bracket at least halves every two probes. Without a capacity (or with
/// flat peaks) B doubles, then bisects. Near the answer every probe is a full step of the
/// largest sizes; the secant needs a few of them where doubling and bisection need ~2 log2(B).
pub fn search_max_batch(
    cap: usize,
    capacity: Option<usize>,
    over: &dyn Fn() -> bool,
    afford: &dyn Fn() -> usize,
    probe: &mut dyn FnMut(usize) -> Result<Option<usize>>,
) -> Result<(usize, Option<usize>)> {
    let cap = cap.max(1);
    let (mut good, mut bad): (usize, Option<usize>) = (0, None);
    // Fitting probes (B, peak bytes), B ascending.
    let mut fits: Vec<(usize, usize)> = Vec::new();
    // Whether the next probe inside a bracket should be its midpoint.
    let mut bisect = false;
    loop {
        let next = match bad {
            Some(hi) if hi - good <= 1 => break,
            _ if good == cap => break,
            _ if good >= 1 && over() => break,
            None if good < 2 => good + 1,
            _ => {
                let secant = match (capacity, fits.as_slice()) {
                    (Some(c), [.., (b1, p1), (b2, p2)]) if p2 > p1 => {
                        let slope = (p2 - p1) as f64 / (b2 - b1) as f64;
                        Some(*b2 as f64 + (c as f64 - *p2 as f64) / slope)
                    }
                    _ => None,
                };
                let next = match (bad, secant) {
                    (None, Some(e)) => (e.floor().max(0.0) as usize).clamp(good + 1, good * 64),
                    (None, None) => good * 2,
                    (Some(hi), Some(e)) if !bisect => {
                        (e.floor().max(0.0) as usize).clamp(good + 1, hi - 1)
                    }
                    (Some(hi), _) => (good + hi) / 2,
                }
                .min(cap);
                let can = afford();
                if can <= good {
                    break;
                }
                next.min(can)
            }
        };
        let width = bad.map(|hi| hi - good);
        match probe(next)? {
            Some(peak) => {
                good = next;
                fits.push((next, peak));
            }
            None => bad = Some(bad.map_or(next, |hi| hi.min(next))),
        }
        // Midpoint next unless this probe at least halved the bracket.
        bisect = match (width, bad) {
            (Some(w), Some(hi)) => 2 * (hi - good) > w,
            (None, Some(_)) => true,
            _ => false,
        };
    }
    Ok((good, bad))
}

/// The largest batch per device (issue 5 item 5, the paper's Table 10): for each sequence
/// length and sub-batch size, the largest B such that one M3 training step of B queries and B
/// passages (group size 1, every text `seq_len` tokens) runs with the encoder, its gradients and
/// its AdamW state (f32 master weights and moments) resident, as `finetune --device` holds
/// them, with all three heads and the unified loss with self-distillation (their outputs and
/// gradients live on the device too). The search is [`search_max_batch`] (B = 1 and 2, a guess
/// from their peak bytes and the device's capacity, a bracket, a bisection); a cell stops early
/// at `cap` or after `budget_s` seconds (a lower bound then), and no probe is larger than the
/// time left can pay for, reckoning a step's time to grow with B² from the largest fitting probe
/// (the in-batch score matrices are B x B: a sub-batched B = 1024 step at S = 1024 took 144 s of
/// a 20 s budget on an H200 before this rule). Any error other than out-of-memory is returned.
pub fn max_batch(
    dev: &dyn KernelDevice,
    config: EncoderConfig,
    seq_lens: &[usize],
    subs: &[usize],
    cap: usize,
    budget_s: f64,
    dt: KDType,
) -> Result<Vec<MaxBatchRow>> {
    max_batch_logged(dev, config, seq_lens, subs, cap, budget_s, dt, &mut |_| {})
}

/// [`max_batch`], telling `log` about each probe (batch, fits or not, seconds) and each finished
/// cell as they happen.
#[allow(clippy::too_many_arguments)]
pub fn max_batch_logged(
    dev: &dyn KernelDevice,
    config: EncoderConfig,
    seq_lens: &[usize],
    subs: &[usize],
    cap: usize,
    budget_s: f64,
    dt: KDType,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<MaxBatchRow>> {
    use crate::model::m3_train::{fresh_heads, KdLoss, M3Batch, M3LossConfig, M3Student};
    check_random_model(&config, seq_lens)?;
    if cap == 0 {
        return Err(Error::invalid("bench max-batch: cap 0"));
    }
    let hidden = config.hidden_size;
    let vocab = config.vocab_size;
    let student = M3Student::new(fast_random_encoder(config, 7)?, &fresh_heads(hidden, 1)?)?;
    let denc = DeviceEncoder::upload(dev, &student.encoder()?, dt)?;
    let opt = crate::train::optim::AdamW::new(
        student.params.specs(),
        crate::train::optim::adamw_hyper(1e-5, 0.01),
        Some(1.0),
    );
    let frozen = vec![false; student.params.values().len()];
    let dopt = super::optim::DeviceAdamW::new(dev, &denc, &student.params, &opt, &frozen)?;
    let loss = M3LossConfig {
        temperature: 0.02,
        unified: true,
        self_distill: true,
        kd: KdLoss::M3KdLoss,
    };
    let mut rows = Vec::new();
    for &seq in seq_lens {
        for &sub in subs {
            let t0 = Instant::now();
            let mut probes = 0;
            // The most bytes a step may take (measured now, after the last cell's buffers went
            // back to the allocator).
            let capacity = dev.memory().and_then(|m| m.capacity);
            // The largest fitting probe so far: (B, seconds).
            let last_fit = std::cell::Cell::new(None::<(usize, f64)>);
            let mut probe = |b: usize| -> Result<Option<usize>> {
                probes += 1;
                let tp = Instant::now();
                let texts: Vec<Vec<u32>> = (0..b)
                    .map(|i| {
                        (0..seq)
                            .map(|j| (5 + (i * 131 + j * 17) % (vocab - 5)) as u32)
                            .collect()
                    })
                    .collect();
                let batch = M3Batch {
                    queries: EncoderInput::pad(&texts, 1),
                    passages: EncoderInput::pad(&texts, 1),
                    group: 1,
                    teacher: None,
                    no_in_batch: false,
                    cross_device: None,
                };
                dev.reset_memory_peak();
                let r = student.device_grads_resident(
                    dev,
                    &denc,
                    dopt.grads(),
                    &batch,
                    &loss,
                    None,
                    &[],
                    None,
                    sub,
                );
                let fits = match r.and_then(|_| dev.synchronize()) {
                    Ok(()) => true,
                    Err(crate::Error::OutOfMemory { .. }) => false,
                    Err(e) => return Err(e),
                };
                // Peak bytes of the step (weights, gradients and optimizer state included).
                let peak = dev.memory().map_or(0, |m| m.peak_live);
                let secs = tp.elapsed().as_secs_f64();
                if fits && last_fit.get().is_none_or(|(lb, _)| b > lb) {
                    last_fit.set(Some((b, secs)));
                }
                log(&format!(
                    "seq {seq} sub {sub}: B = {b} {} ({:.1} s, peak {:.1} MiB)",
                    if fits { "fits" } else { "out of memory" },
                    secs,
                    peak as f64 / (1u64 << 20) as f64
                ));
                Ok(fits.then_some(peak))
            };
            let over = || t0.elapsed().as_secs_f64() > budget_s;
            let afford = || match last_fit.get() {
                Some((b, secs)) if secs > 0.0 => {
                    let left = budget_s - t0.elapsed().as_secs_f64();
                    if left <= 0.0 {
                        0
                    } else {
                        (b as f64 * (left / secs).sqrt()).floor() as usize
                    }
                }
                _ => usize::MAX,
            };
            let (good, bad) = search_max_batch(cap, capacity, &over, &afford, &mut probe)?;
            let lower_bound = match bad {
                Some(hi) => hi - good > 1,
                None => true,
            };
            let row = MaxBatchRow {
                seq_len: seq,
                sub_batch: sub,
                max_batch: good,
                lower_bound,
                probes,
                seconds: t0.elapsed().as_secs_f64(),
            };
            log(&format!("cell {}", row.to_json()));
            rows.push(row);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::search_max_batch;
    use std::cell::RefCell;

    /// Runs the search against a memory model: a step of B texts peaks at `peak(B)` bytes and
    /// fits when that is at most `limit`. Returns (good, bad, probes).
    fn run(
        cap: usize,
        limit: usize,
        known: bool,
        peak: impl Fn(usize) -> usize,
    ) -> (usize, Option<usize>, Vec<usize>) {
        let seen = RefCell::new(Vec::new());
        let mut probe = |b: usize| {
            seen.borrow_mut().push(b);
            let p = peak(b);
            Ok((p <= limit).then_some(p))
        };
        let (good, bad) = search_max_batch(
            cap,
            known.then_some(limit),
            &|| false,
            &|| usize::MAX,
            &mut probe,
        )
        .unwrap();
        (good, bad, seen.into_inner())
    }

    /// A time budget that cannot pay for the memory bound: no probe after the first two exceeds
    /// what `afford` allows at that moment, and the answer is the largest affordable fit, a
    /// lower bound (no failing B found).
    #[test]
    fn probes_stay_within_what_the_time_affords() {
        let peak = |b: usize| 5_000 + 37 * b;
        let limit = 2_000_000; // memory bound ~53,900
                               // Time left shrinks with every probe: afford = 40 * (probes left).
        let seen = RefCell::new(Vec::<usize>::new());
        let afford = || 40 * 6usize.saturating_sub(seen.borrow().len());
        let mut probe = |b: usize| {
            assert!(
                seen.borrow().len() < 2 || b <= afford(),
                "probe {b} over {} after {:?}",
                afford(),
                seen.borrow()
            );
            seen.borrow_mut().push(b);
            let p = peak(b);
            Ok((p <= limit).then_some(p))
        };
        let (good, bad) =
            search_max_batch(100_000, Some(limit), &|| false, &afford, &mut probe).unwrap();
        let seen = seen.into_inner();
        assert_eq!(bad, None, "{seen:?}");
        assert_eq!(good, *seen.iter().max().unwrap(), "{seen:?}");
        assert!(good < 200 && seen.len() <= 6, "{seen:?}");
    }

    /// The true answer: the largest B <= cap with peak(B) <= limit.
    fn truth(cap: usize, limit: usize, peak: impl Fn(usize) -> usize) -> usize {
        (1..=cap)
            .take_while(|&b| peak(b) <= limit)
            .last()
            .unwrap_or(0)
    }

    #[test]
    fn finds_the_exact_bound_for_linear_and_curved_memory() {
        let linear = |b: usize| 5_000 + 37 * b;
        let curved = |b: usize| 5_000 + 37 * b + b * b / 40; // attention-like growth
        let stepped = |b: usize| 5_000 + 64 * b.div_ceil(8) * 8; // bucket rounding
        for known in [true, false] {
            for limit in [5_036, 5_100, 9_999, 20_000, 60_000] {
                for cap in [1, 2, 3, 100, 5_000] {
                    for (name, m) in [
                        ("linear", &linear as &dyn Fn(usize) -> usize),
                        ("curved", &curved),
                        ("stepped", &stepped),
                    ] {
                        let (good, bad, seen) = run(cap, limit, known, m);
                        let want = truth(cap, limit, m);
                        assert_eq!(good, want, "{name} cap {cap} limit {limit} known {known}");
                        match bad {
                            Some(b) => assert_eq!(b, want + 1, "{name}: {seen:?}"),
                            None => assert_eq!(good, cap, "{name}: {seen:?}"),
                        }
                    }
                }
            }
        }
    }

    /// With the capacity known, the probes near the answer (the expensive ones) are fewer than
    /// doubling + bisection needs.
    #[test]
    fn a_known_capacity_saves_probes_at_scale() {
        let curved = |b: usize| 5_000 + 37 * b + b * b / 40;
        let limit = 2_000_000;
        let want = truth(100_000, limit, curved);
        let big = |seen: &[usize]| seen.iter().filter(|&&b| b * 2 >= want).count();
        let (g1, _, guided) = run(100_000, limit, true, curved);
        let (g2, _, doubling) = run(100_000, limit, false, curved);
        assert_eq!((g1, g2), (want, want));
        assert!(
            big(&guided) < big(&doubling),
            "guided {guided:?} vs doubling {doubling:?}"
        );
    }
}
