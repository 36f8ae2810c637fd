//! CPU reference kernel microbenchmarks, named `{device}_{op}_{dtype}_{shape}` with throughput
//! in elements (bytes moved for memory-bound ops, FLOP for GEMM / attention are in the names'
//! shapes). CUDA variants join these when the backend lands.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use retrom3::device::cpu::attention::{attention_fwd, AttnDims, AttnMask};
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
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
