//! Kernel microbenchmarks, named `{device}_{op}_{dtype}_{shape}` with throughput in elements
//! (FLOP for GEMM / attention) or bytes (memory-bound ops). CPU reference kernels always; with the
//! `cuda` feature and a GPU present, the CUDA kernels at H100-sized shapes too (timed with
//! `iter_custom` between two stream synchronisations, so the clock stops when the GPU is done).
//! Without a GPU the CUDA group says why it is skipped.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use retrom3::device::cpu::attention::{
    attention_fwd, AttnDims, AttnDropout, AttnMask, TwoStreamMask,
};
use retrom3::device::cpu::{elementwise, gemm, layernorm};

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_kernels");
    g.sample_size(10);

    let (m, k, n) = (512, 1024, 1024);
    let (a, b) = (data(m * k), data(k * n));
    let mut out = vec![0.0; m * n];
    g.throughput(Throughput::Elements((2 * m * k * n) as u64));
    g.bench_function("cpu_gemm_f32_512x1024x1024", |bch| {
        bch.iter(|| {
            gemm::sgemm(
                gemm::Trans::N,
                gemm::Trans::T,
                m,
                k,
                n,
                1.0,
                &a,
                &b,
                0.0,
                &mut out,
            )
        })
    });

    let (rows, dim) = (2048, 1024);
    let x = data(rows * dim);
    let (gamma, beta) = (vec![1.0; dim], vec![0.0; dim]);
    let (mut y, mut mean, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
    g.throughput(Throughput::Bytes((2 * rows * dim * 4) as u64));
    g.bench_function("cpu_layernorm_fwd_f32_2048x1024", |bch| {
        bch.iter(|| {
            layernorm::layernorm_fwd(&x, &gamma, &beta, 1e-5, dim, &mut y, &mut mean, &mut rstd)
        })
    });
    g.bench_function("cpu_gelu_fwd_f32_2048x1024", |bch| {
        bch.iter(|| elementwise::gelu_fwd(&x, &mut y))
    });

    let d = AttnDims {
        batch: 1,
        q_len: 256,
        k_len: 256,
        heads: 4,
        head_dim: 64,
    };
    let w = d.heads * d.head_dim;
    let (q, kk, v) = (data(256 * w), data(256 * w), data(256 * w));
    let mask = vec![1u8; 256];
    let (mut o, mut lse) = (vec![0.0; 256 * w], vec![0.0; 4 * 256]);
    g.throughput(Throughput::Elements((4 * 256 * 256 * 64 * 4) as u64));
    g.bench_function("cpu_attention_fwd_f32_b1_h4_s256_d64", |bch| {
        bch.iter(|| {
            attention_fwd(
                &q,
                &kk,
                &v,
                AttnMask::KeyPadding(&mask),
                d,
                0.125,
                None,
                &mut o,
                &mut lse,
            )
        })
    });
    // The RetroMAE decoder's attention: the two-stream mask drawn per score, with attention
    // dropout 0.1 (both draws counter-based, CPU twins of the kernels').
    let words: Vec<u32> = (0..256u32).map(|i| i / 2).collect();
    let ts = TwoStreamMask {
        key_mask: &mask,
        words: &words,
        p: 0.5,
        seed: 7,
    };
    let drop = AttnDropout {
        p: 0.1,
        seed: 3,
        stream: 1,
    };
    g.bench_function(
        "cpu_attention_fwd_f32_b1_h4_s256_d64_twostream_drop",
        |bch| {
            bch.iter(|| {
                attention_fwd(
                    &q,
                    &kk,
                    &v,
                    AttnMask::TwoStream(ts),
                    d,
                    0.125,
                    Some(drop),
                    &mut o,
                    &mut lse,
                )
            })
        },
    );
    g.finish();
}

#[cfg(feature = "cuda")]
fn bench_cuda(c: &mut Criterion) {
    use retrom3::device::kernels::{self as k, AttnKernelMask};
    use retrom3::device::launch::{DevPtr, DeviceGemm, KDType, KernelDevice};
    use retrom3::engine::{self, DBuf};
    use std::time::{Duration, Instant};

    let dev = match engine::open(retrom3::Device::Cuda(0)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cuda kernel benches skipped: {e}");
            return;
        }
    };
    let dev: &dyn KernelDevice = &*dev;
    let bf = KDType::BF16;
    let buf = |n: usize| DBuf::from_f32(dev, &data(n), bf).expect("upload");
    // Runs `op` `iters` times between two synchronisations.
    fn timed(dev: &dyn KernelDevice, iters: u64, mut op: impl FnMut()) -> Duration {
        dev.synchronize().expect("sync");
        let t = Instant::now();
        for _ in 0..iters {
            op();
        }
        dev.synchronize().expect("sync");
        t.elapsed()
    }
    let mut g = c.benchmark_group("cuda_kernels");
    g.sample_size(20);

    let (b, s, h, d) = (32, 512, 16, 64);
    let n = b * s * h * d;
    let (q, kk, v, o) = (buf(n), buf(n), buf(n), buf(n));
    let lse = DBuf::zeros(dev, b * h * s, KDType::F32).expect("alloc");
    let dims = AttnDims {
        batch: b,
        q_len: s,
        k_len: s,
        heads: h,
        head_dim: d,
    };
    let mask = AttnKernelMask::KeyPadding {
        key_mask: DevPtr::NULL,
    };
    g.throughput(Throughput::Elements((4 * b * h * s * s * d) as u64));
    g.bench_function("cuda_attention_fwd_bf16_b32_s512_h16_d64", |bch| {
        bch.iter_custom(|iters| {
            timed(dev, iters, || {
                // SAFETY: q, k, v, o hold B·S·H·D bf16, lse B·H·S f32.
                unsafe {
                    k::attention_fwd(
                        dev,
                        bf,
                        q.ptr(),
                        kk.ptr(),
                        v.ptr(),
                        o.ptr(),
                        lse.ptr(),
                        mask,
                        &dims,
                        0.125,
                        None,
                    )
                    .expect("attention")
                }
            })
        })
    });

    let (m, kd, nn) = (16384, 1024, 4096);
    let (ga, gb, gc) = (buf(m * kd), buf(nn * kd), buf(m * nn));
    let gm = DeviceGemm {
        ta: gemm::Trans::N,
        tb: gemm::Trans::T,
        m,
        k: kd,
        n: nn,
        alpha: 1.0,
        beta: 0.0,
        ab: bf,
        c: bf,
    };
    g.throughput(Throughput::Elements((2 * m * kd * nn) as u64));
    g.bench_function("cuda_gemm_bf16_16384x1024x4096", |bch| {
        bch.iter_custom(|iters| {
            timed(dev, iters, || {
                // SAFETY: ga m·k, gb n·k, gc m·n bf16.
                unsafe { dev.gemm(&gm, ga.ptr(), gb.ptr(), gc.ptr()).expect("gemm") }
            })
        })
    });

    let (rows, dim) = (16384, 1024);
    let (x, r, y, gam, bet) = (
        buf(rows * dim),
        buf(rows * dim),
        buf(rows * dim),
        buf(dim),
        buf(dim),
    );
    g.throughput(Throughput::Bytes((3 * rows * dim * 2) as u64));
    g.bench_function("cuda_residual_layernorm_fwd_bf16_16384x1024", |bch| {
        bch.iter_custom(|iters| {
            timed(dev, iters, || {
                // SAFETY: x, r, y rows·dim bf16; gamma, beta dim; no stats, no z.
                unsafe {
                    k::residual_layernorm_fwd(
                        dev,
                        bf,
                        x.ptr(),
                        DevPtr::NULL,
                        r.ptr(),
                        gam.ptr(),
                        bet.ptr(),
                        DevPtr::NULL,
                        y.ptr(),
                        DevPtr::NULL,
                        DevPtr::NULL,
                        rows,
                        dim,
                        1e-5,
                        None,
                    )
                    .expect("layernorm")
                }
            })
        })
    });
    g.finish();
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_c: &mut Criterion) {}

criterion_group!(benches, bench, bench_cuda);
criterion_main!(benches);
