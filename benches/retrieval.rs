//! Retrieval benchmarks (issue 6, item 7), named `{device}_{op}_{dtype}_{shape}`, throughput in
//! queries (so criterion's elem/s is queries/s and its time ÷ queries per iteration is ms/query).
//!
//! - dense exact top-10: 1,000 queries × 100k docs × 384-d, the blocked GEMM search against a
//!   naive per-document dot-product loop (the naive one times a 16-query subset per iteration);
//! - sparse exact top-10 on a synthetic BGE-M3-shaped corpus (vocabulary 250k, Zipf s = 1.1 term
//!   ids, ~60 terms per document, ~10 per query, ReLU-like positive weights), 1M documents
//!   (`RETRIEVAL_BENCH_SPARSE_DOCS` overrides), single thread: the block-max search
//!   (`ImpactIndex::search`) and the earlier document-at-a-time MaxScore
//!   (`ImpactIndex::search_maxscore`) against `score_all` + a top-k pass, side by side; the index
//!   is built once outside the timed loop and both pruned searches are checked against brute
//!   force before timing;
//! - MaxSim re-rank of 1,000 candidates per query (32 × 128-d query vectors, 128 × 128-d f16
//!   vectors per candidate);
//! - the model fingerprint every `index` / `search` / `eval` computes (xxh64 of each MiB of the
//!   weights file): a 512 MiB file, read from the page cache (throughput in bytes).

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use half::f16;
use retrom3::retrieval::colbert::ColbertStore;
use retrom3::retrieval::dense::DenseIndex;
use retrom3::retrieval::sparse::ImpactIndex;
use retrom3::retrieval::{top_k_of, Hit, TopK};
use std::hint::black_box;
use std::time::Instant;

const K: usize = 10;

/// SplitMix64: a small deterministic generator (no `rand` dependency in the crate).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize
    }
}

/// Unit-norm random vectors, `n × dim`, flattened.
fn unit_vectors(rng: &mut Rng, n: usize, dim: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n * dim).map(|_| rng.normal() as f32).collect();
    for row in v.chunks_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// The naive baseline: one f32 dot product per document, a bounded heap per query.
fn naive_dense(docs: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<Hit> {
    let mut top = TopK::new(k);
    for (d, row) in docs.chunks_exact(dim).enumerate() {
        let s: f32 = q.iter().zip(row).map(|(a, b)| a * b).sum();
        top.push(d as u32, s);
    }
    top.into_sorted()
}

fn bench_dense(c: &mut Criterion) {
    let (n_docs, n_queries, dim) = (100_000, 1_000, 384);
    let mut rng = Rng(1);
    let docs = unit_vectors(&mut rng, n_docs, dim);
    let queries: Vec<Vec<f32>> = unit_vectors(&mut rng, n_queries, dim)
        .chunks(dim)
        .map(<[f32]>::to_vec)
        .collect();
    let rows: Vec<Vec<f32>> = docs.chunks(dim).map(<[f32]>::to_vec).collect();
    let index = DenseIndex::build(&rows).expect("dense index");
    drop(rows);
    // Sanity: the blocked search and the naive loop agree on the documents.
    let got = index.search(&queries[..4], K).expect("search");
    for (q, hits) in queries.iter().zip(&got) {
        let want = naive_dense(&docs, dim, q, K);
        let (a, b): (Vec<u32>, Vec<u32>) = (
            hits.iter().map(|h| h.doc).collect(),
            want.iter().map(|h| h.doc).collect(),
        );
        assert_eq!(a, b, "blocked and naive dense top-10 differ");
    }

    let mut g = c.benchmark_group("cpu_dense_search");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(n_queries as u64));
    g.bench_function("cpu_dense_top10_blocked_f32_q1000_n100k_d384", |b| {
        b.iter(|| black_box(index.search(black_box(&queries), K).expect("search")))
    });
    let sub = 16;
    g.throughput(Throughput::Elements(sub as u64));
    g.bench_function("cpu_dense_top10_naive_f32_q16_n100k_d384", |b| {
        b.iter(|| {
            for q in &queries[..sub] {
                black_box(naive_dense(&docs, dim, black_box(q), K));
            }
        })
    });
    g.finish();
}

/// Zipf(s) sampler over `0..n` by inverse CDF (binary search).
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|r| {
                acc += (r as f64).powf(-s);
                acc
            })
            .collect();
        cdf.iter_mut().for_each(|x| *x /= acc);
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut Rng) -> u32 {
        let u = rng.uniform();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1) as u32
    }
}

/// A sparse vector of `mean_terms` ± 50% (uniform) distinct Zipf-distributed ids with ReLU-like
/// weights `max(0, 0.1 + 0.1·z)`: ids whose weight comes out 0 are dropped (as a ReLU head
/// emits nothing there) and more are drawn until the vector has its length.
fn sparse_vec(rng: &mut Rng, zipf: &Zipf, mean_terms: usize) -> Vec<(u32, f32)> {
    let n = mean_terms / 2 + rng.below(mean_terms + 1);
    let mut v: Vec<(u32, f32)> = Vec::with_capacity(n);
    while v.len() < n {
        let t = zipf.sample(rng);
        let w = (0.1 + 0.1 * rng.normal()) as f32;
        if w > 0.0 && !v.iter().any(|x| x.0 == t) {
            v.push((t, w));
        }
    }
    v.sort_unstable_by_key(|x| x.0);
    v
}

fn bench_sparse(c: &mut Criterion) {
    let vocab = 250_000;
    let n_docs: usize = std::env::var("RETRIEVAL_BENCH_SPARSE_DOCS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let n_queries = 50;
    let mut rng = Rng(2);
    let zipf = Zipf::new(vocab, 1.1);
    let t0 = Instant::now();
    let docs: Vec<Vec<(u32, f32)>> = (0..n_docs)
        .map(|_| sparse_vec(&mut rng, &zipf, 60))
        .collect();
    let queries: Vec<Vec<(u32, f32)>> = (0..n_queries)
        .map(|_| sparse_vec(&mut rng, &zipf, 10))
        .collect();
    let t_gen = t0.elapsed();
    let index = ImpactIndex::build(&docs, vocab).expect("sparse index");
    drop(docs);
    eprintln!(
        "sparse corpus: {n_docs} docs, {} postings ({:.1}/doc), {:.1} terms/query; generated in \
         {:.1} s, index built in {:.1} s",
        index.n_postings(),
        index.n_postings() as f64 / n_docs as f64,
        queries.iter().map(Vec::len).sum::<usize>() as f64 / n_queries as f64,
        t_gen.as_secs_f64(),
        (t0.elapsed() - t_gen).as_secs_f64()
    );
    // Exactness check before timing: block-max == MaxScore == brute force (same documents, same
    // order).
    for q in &queries {
        let want: Vec<u32> = top_k_of(&index.score_all(q), K)
            .iter()
            .filter(|h| h.score > 0.0)
            .map(|h| h.doc)
            .collect();
        let got: Vec<u32> = index.search(q, K).iter().map(|h| h.doc).collect();
        assert_eq!(got, want, "block-max top-10 differs from brute force");
        let got: Vec<u32> = index.search_maxscore(q, K).iter().map(|h| h.doc).collect();
        assert_eq!(got, want, "MaxScore top-10 differs from brute force");
    }

    // Side-by-side timing interleaved query by query (so that load from other processes hits
    // the three methods alike): ms/query, printed before criterion's runs.
    let reps = 3;
    let mut t = [0f64; 3];
    for _ in 0..reps {
        for q in &queries {
            let t0 = Instant::now();
            black_box(index.search(black_box(q), K));
            let t1 = Instant::now();
            black_box(index.search_maxscore(black_box(q), K));
            let t2 = Instant::now();
            black_box(top_k_of(&index.score_all(black_box(q)), K));
            let t3 = Instant::now();
            t[0] += (t1 - t0).as_secs_f64();
            t[1] += (t2 - t1).as_secs_f64();
            t[2] += (t3 - t2).as_secs_f64();
        }
    }
    let ms = |x: f64| x * 1e3 / (reps * n_queries) as f64;
    eprintln!(
        "sparse interleaved ms/query: block-max {:.2}, MaxScore {:.2}, brute force {:.2} \
         (block-max {:.2}x brute force's speed, {:.2}x MaxScore's)",
        ms(t[0]),
        ms(t[1]),
        ms(t[2]),
        t[2] / t[0],
        t[1] / t[0]
    );

    let label = if n_docs.is_multiple_of(1_000_000) {
        format!("{}m", n_docs / 1_000_000)
    } else {
        format!("{}k", n_docs / 1_000)
    };
    let mut g = c.benchmark_group("cpu_sparse_search");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(n_queries as u64));
    g.bench_function(
        format!("cpu_sparse_top10_blockmax_u16_q50_n{label}_v250k"),
        |b| {
            b.iter(|| {
                for q in &queries {
                    black_box(index.search(black_box(q), K));
                }
            })
        },
    );
    g.bench_function(
        format!("cpu_sparse_top10_maxscore_u16_q50_n{label}_v250k"),
        |b| {
            b.iter(|| {
                for q in &queries {
                    black_box(index.search_maxscore(black_box(q), K));
                }
            })
        },
    );
    g.bench_function(
        format!("cpu_sparse_top10_brute_u16_q50_n{label}_v250k"),
        |b| {
            b.iter(|| {
                for q in &queries {
                    black_box(top_k_of(&index.score_all(black_box(q)), K));
                }
            })
        },
    );
    g.finish();
}

fn bench_maxsim(c: &mut Criterion) {
    let (n_store, n_cand, doc_len, q_len, dim) = (4_000, 1_000, 128, 32, 128);
    let mut rng = Rng(3);
    let vecs: Vec<f16> = unit_vectors(&mut rng, n_store * doc_len, dim)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let offsets: Vec<u64> = (0..=n_store as u64).map(|d| d * doc_len as u64).collect();
    let store = ColbertStore::from_parts(dim, offsets, vecs).expect("colbert store");
    let query: Vec<Vec<f32>> = unit_vectors(&mut rng, q_len, dim)
        .chunks(dim)
        .map(<[f32]>::to_vec)
        .collect();
    let mut cands: Vec<u32> = (0..n_store as u32).collect();
    for i in 0..n_cand {
        let j = i + rng.below(n_store - i);
        cands.swap(i, j);
    }
    cands.truncate(n_cand);

    let mut g = c.benchmark_group("cpu_maxsim_rerank");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    g.bench_function("cpu_maxsim_rerank_f16_q32x128_c1000x128", |b| {
        b.iter(|| black_box(store.maxsim(black_box(&query), &cands).expect("maxsim")))
    });
    g.finish();
}

fn bench_fingerprint(c: &mut Criterion) {
    use retrom3::retrieval::ModelFingerprint;
    let dir = std::env::temp_dir().join(format!("retrom3-bench-fp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let size = 512usize << 20;
    let mut rng = Rng(4);
    let bytes: Vec<u8> = (0..size / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    std::fs::write(dir.join("model.safetensors"), &bytes).expect("weights");
    std::fs::write(dir.join("config.json"), "{}").expect("config");
    std::fs::write(dir.join("tokenizer.json"), "{}").expect("tokenizer");
    let tok = dir.join("tokenizer.json");
    let mut g = c.benchmark_group("cpu_fingerprint");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_function("cpu_fingerprint_xxh64_512MiB", |b| {
        b.iter(|| black_box(ModelFingerprint::of_files(&dir, &tok).expect("fingerprint")))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(
    benches,
    bench_dense,
    bench_sparse,
    bench_maxsim,
    bench_fingerprint
);
criterion_main!(benches);
