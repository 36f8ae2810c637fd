//! Encode throughput on the committed tiny BGE-M3 fixture (CPU): all three heads, the README's
//! texts repeated, length-sorted batches. Named `{device}_{op}_{dtype}_{shape}`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use retrom3::{Device, EncodeOptions, M3Model};
use std::path::Path;

fn bench_encode(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr");
    let model = M3Model::load(&dir, Device::Cpu).expect("fixture model loads");
    let base = [
        "What is BGE M3?",
        "Defination of BM25",
        "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
        "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing in each document",
    ];
    let texts: Vec<&str> = base.iter().cycle().take(64).copied().collect();
    let opts = EncodeOptions {
        max_length: Some(40),
        batch_size: 16,
        ..EncodeOptions::all()
    };
    let tokens: usize = texts
        .iter()
        .map(|t| model.tokenizer.encode(t, 40).map(|v| v.len()).unwrap_or(0))
        .sum();
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(tokens as u64));
    g.bench_function("cpu_encode_f32_tiny-xlmr_64x40", |b| {
        b.iter(|| model.encode(&texts, &opts).expect("encode"))
    });
    g.finish();
}

criterion_group!(benches, bench_encode);
criterion_main!(benches);
