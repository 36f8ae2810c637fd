//! Index structures: exactness of the pruned / blocked searches against brute force, the
//! container format (round trip, checksums, mutations), the model fingerprint refusal.

use retrom3::data::rng::Rng;
use retrom3::retrieval::colbert::ColbertStore;
use retrom3::retrieval::dense::DenseIndex;
use retrom3::retrieval::index_format::xxh64;
use retrom3::retrieval::sparse::{bm25_query, bm25_weights, Bm25Params, ImpactIndex};
use retrom3::retrieval::{
    beir::Doc, top_k_of, Index, IndexParts, Mode, ModelFingerprint, SearchOptions,
};
use retrom3::{Device, M3Model};
use std::path::{Path, PathBuf};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retrom3-ridx-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr")
}

/// Zipf-ish term ids (small ids frequent) with positive weights, sorted by id.
fn zipf_doc(rng: &mut Rng, vocab: u32, len: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = (0..len)
        .map(|_| {
            let u = (rng.uniform() as f32).max(1e-6);
            let t = ((vocab as f32).powf(u) as u32).min(vocab - 1);
            // Coarse weights so that ties are common.
            (t, (1 + ((rng.uniform() as f32) * 4.0) as u32) as f32 * 0.25)
        })
        .collect();
    v.sort_by_key(|x| x.0);
    v.dedup_by_key(|x| x.0);
    v
}

#[test]
fn xxh64_matches_reference_vectors() {
    assert_eq!(xxh64(b"", 0), 0xef46db3751d8e999);
    assert_eq!(xxh64(b"abc", 0), 0x44bc2cf5ad770999);
    let v: Vec<u8> = (0..100).collect();
    assert_eq!(xxh64(&v, 0), 0x6ac1e58032166597);
}

#[test]
fn maxscore_top_k_equals_brute_force() {
    let mut rng = Rng::new(7, 0);
    let vocab = 300;
    let docs: Vec<Vec<(u32, f32)>> = (0..2000).map(|_| zipf_doc(&mut rng, vocab, 12)).collect();
    let idx = ImpactIndex::build(&docs, vocab as usize).unwrap();
    for qi in 0..60 {
        let q = zipf_doc(&mut rng, vocab, 1 + qi % 9);
        let brute = idx.score_all(&q);
        for k in [1, 3, 10, 100] {
            let got = idx.search(&q, k);
            let mut want = top_k_of(&brute, k);
            want.retain(|h| h.score > 0.0);
            assert_eq!(got, want, "query {qi} k {k}");
        }
        // Candidate re-scoring agrees with the full scores.
        let some: Vec<u32> = (0..2000).step_by(37).collect();
        let s = idx.score_docs(&q, &some);
        for (d, x) in some.iter().zip(s) {
            assert_eq!(x, brute[*d as usize]);
        }
        // Quantised scores are close to the float lexical score.
        let exact = retrom3::infer::lexical_score(&q, &docs[5]);
        assert!(
            (brute[5] - exact).abs() <= 1e-3 * (1.0 + exact.abs()),
            "{} vs {exact}",
            brute[5]
        );
    }
}

#[test]
fn bm25_search_is_exact() {
    let mut rng = Rng::new(3, 0);
    let docs: Vec<Vec<u32>> = (0..500)
        .map(|_| {
            zipf_doc(&mut rng, 200, 30)
                .into_iter()
                .map(|x| x.0)
                .collect()
        })
        .collect();
    let w = bm25_weights(&docs, 200, Bm25Params::default());
    let idx = ImpactIndex::build(&w, 200).unwrap();
    let q = bm25_query(&[5, 9, 9, 40, 120]);
    assert_eq!(q, vec![(5, 1.0), (9, 2.0), (40, 1.0), (120, 1.0)]);
    let mut want = top_k_of(&idx.score_all(&q), 10);
    want.retain(|h| h.score > 0.0);
    assert_eq!(idx.search(&q, 10), want);
}

#[test]
fn dense_blocked_search_equals_brute_force() {
    let mut rng = Rng::new(11, 0);
    let dim = 24;
    let docs: Vec<Vec<f32>> = (0..5000)
        .map(|_| (0..dim).map(|_| (rng.uniform() as f32) - 0.5).collect())
        .collect();
    let idx = DenseIndex::build(&docs).unwrap();
    let qs: Vec<Vec<f32>> = (0..70)
        .map(|_| (0..dim).map(|_| (rng.uniform() as f32) - 0.5).collect())
        .collect();
    let got = idx.search(&qs, 10).unwrap();
    for (q, g) in qs.iter().zip(&got) {
        let want = idx.search_brute(q, 10);
        let gd: Vec<u32> = g.iter().map(|h| h.doc).collect();
        let wd: Vec<u32> = want.iter().map(|h| h.doc).collect();
        assert_eq!(gd, wd);
        for (a, b) in g.iter().zip(&want) {
            assert!((a.score - b.score).abs() < 1e-5);
        }
    }
}

#[test]
fn maxsim_matches_colbert_score() {
    let mut rng = Rng::new(5, 0);
    let mut unit = |n: usize| -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                let v: Vec<f32> = (0..16).map(|_| (rng.uniform() as f32) - 0.5).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(|x| x / norm).collect()
            })
            .collect()
    };
    let docs: Vec<Vec<Vec<f32>>> = (0..20).map(|i| unit(1 + i % 7)).collect();
    let store = ColbertStore::build(&docs).unwrap();
    let q = unit(5);
    let ids: Vec<u32> = (0..20).collect();
    let got = store.maxsim(&q, &ids).unwrap();
    for (d, g) in docs.iter().zip(got) {
        let want = retrom3::infer::colbert_score(&q, d);
        assert!((g - want).abs() < 3e-3, "{g} vs {want}"); // f16 storage
    }
}

fn small_corpus() -> Vec<Doc> {
    [
        "BGE M3 supports dense, lexical and multi-vector retrieval.",
        "BM25 ranks documents by term frequency and inverse document frequency.",
        "Paris is the capital of France.",
        "Rust is a systems programming language.",
        "",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| Doc {
        id: format!("doc-{i}"),
        text: t.to_string(),
    })
    .collect()
}

#[test]
fn index_round_trip_refusal_and_mutations() {
    let model = M3Model::load(tiny(), Device::Cpu).unwrap();
    let corpus = small_corpus();
    let built = Index::build(&model, &corpus, IndexParts::all(), &mut |_| {}).unwrap();
    let dir = tmpdir("rt");
    built.save(&dir).unwrap();
    let fp = ModelFingerprint::of_model(&model).unwrap();
    let loaded = Index::load(&dir, Some(&fp)).unwrap();
    assert_eq!(loaded.n_docs(), 5);
    assert_eq!(loaded.doc_id(2), "doc-2");
    let qs =
        retrom3::retrieval::hybrid::encode_queries_for(&model, &["capital of France"], &Mode::ALL)
            .unwrap();
    let opts = SearchOptions::default();
    for mode in Mode::ALL {
        let a = built.search(&qs, mode, &opts).unwrap();
        let b = loaded.search(&qs, mode, &opts).unwrap();
        assert_eq!(a, b, "mode {mode}");
        assert!(!a[0].is_empty() || mode == Mode::Sparse || mode == Mode::Bm25);
    }

    // Another model: refused, naming both.
    let other = ModelFingerprint {
        hash: fp.hash ^ 1,
        model: "other-model".into(),
    };
    let e = Index::load(&dir, Some(&other)).unwrap_err().to_string();
    assert!(
        e.contains("index built with model") && e.contains("other-model"),
        "{e}"
    );

    // Mutations: truncations and bit flips give an error naming the file (or a valid index).
    let path = dir.join("index.r3i");
    let good = std::fs::read(&path).unwrap();
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let bad_file = bad.join("index.r3i");
    let mut cases: Vec<Vec<u8>> = Vec::new();
    for cut in [0, 1, 7, 8, 63, 64, 65, 200, good.len() / 2, good.len() - 1] {
        cases.push(good[..cut].to_vec());
    }
    let mut positions: Vec<usize> = (0..good.len().min(1024)).collect();
    positions.extend((1024..good.len()).step_by(61));
    for &p in &positions {
        let mut m = good.clone();
        m[p] ^= 1 << (p % 8);
        cases.push(m);
    }
    let mut errors = 0;
    for (i, c) in cases.iter().enumerate() {
        std::fs::write(&bad_file, c).unwrap();
        match Index::load(&bad, None) {
            Err(e) => {
                let s = e.to_string();
                assert!(s.contains("index.r3i"), "case {i}: {s}");
                errors += 1;
            }
            Ok(ix) => {
                // Only a flip in padding can load; it must still work.
                for mode in Mode::ALL {
                    ix.search(&qs, mode, &opts).unwrap();
                }
            }
        }
    }
    assert!(errors > cases.len() * 9 / 10, "{errors} of {}", cases.len());
    // A flipped byte inside a section names the section.
    let mut m = good.clone();
    let last = m.len() - 70;
    m[last] ^= 0x10;
    std::fs::write(&bad_file, &m).unwrap();
    let e = Index::load(&bad, None).unwrap_err().to_string();
    assert!(e.contains("section") && e.contains("checksum"), "{e}");
}

#[test]
fn build_refuses_empty_corpus() {
    let model = M3Model::load(tiny(), Device::Cpu).unwrap();
    let e = Index::build(&model, &[], IndexParts::all(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("empty corpus"), "{e}");
}

#[test]
fn fusion_weight_checks_and_fused_search_refusals() {
    use retrom3::retrieval::hybrid::{check_weights, MAX_FUSION_WEIGHT};
    let fused = [Mode::DenseSparse, Mode::All];
    assert!(check_weights([1.0, 0.3, 1.0], &fused).is_ok());
    assert!(check_weights([0.0, 0.0, 1.0], &[Mode::All]).is_ok());
    assert!(check_weights([MAX_FUSION_WEIGHT; 3], &fused).is_ok());
    for w in [
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 1.0],
        [1e38, 1e38, 1e38],
        [f32::INFINITY, 1.0, 1.0],
        [f32::NAN, 1.0, 1.0],
        [1.0, -1.0, 1.0],
        [2e6, 1.0, 1.0],
    ] {
        assert!(check_weights(w, &fused).is_err(), "{w:?}");
    }

    // Index::search refuses bad weights in the fused modes only.
    let model = M3Model::load(tiny(), Device::Cpu).unwrap();
    let built = Index::build(&model, &small_corpus(), IndexParts::all(), &mut |_| {}).unwrap();
    let qs =
        retrom3::retrieval::hybrid::encode_queries_for(&model, &["capital"], &Mode::ALL).unwrap();
    for w in [[0.0; 3], [1e38; 3]] {
        let opts = SearchOptions {
            weights: w,
            ..SearchOptions::default()
        };
        for mode in [Mode::DenseSparse, Mode::All] {
            assert!(built.search(&qs, mode, &opts).is_err(), "{mode} {w:?}");
        }
        built.search(&qs, Mode::Dense, &opts).unwrap();
    }
    let big = SearchOptions {
        weights: [MAX_FUSION_WEIGHT; 3],
        ..SearchOptions::default()
    };
    for h in &built.search(&qs, Mode::All, &big).unwrap()[0] {
        assert!(h.score.is_finite(), "{h:?}");
    }
}

#[test]
fn beir_reader_refuses_whitespace_ids_and_empty_queries() {
    use retrom3::retrieval::beir;
    let d = tmpdir("beirids");
    let p = d.join("corpus.jsonl");
    for id in [r#""a b""#, r#""x\ny""#, r#""\u00a0z""#] {
        std::fs::write(
            &p,
            format!("{{\"_id\": \"ok\", \"text\": \"t\"}}\n{{\"_id\": {id}, \"text\": \"t\"}}\n"),
        )
        .unwrap();
        let e = beir::read_corpus(&p).unwrap_err().to_string();
        assert!(
            e.contains("corpus.jsonl:2") && e.contains("whitespace"),
            "{e}"
        );
        let e = beir::read_queries(&p).unwrap_err().to_string();
        assert!(e.contains(":2") && e.contains("whitespace"), "{e}");
    }
    std::fs::write(&p, "{\"_id\": \"q1\", \"text\": \"\\t \"}\n").unwrap();
    let e = beir::read_queries(&p).unwrap_err().to_string();
    assert!(e.contains(":1") && e.contains("empty text"), "{e}");

    // Documents without text are read (and indexed); empty_docs lists them.
    std::fs::write(
        &p,
        "{\"_id\": \"a\", \"title\": \"\", \"text\": \"\"}\n{\"_id\": \"b\", \"title\": \"T\", \"text\": \"\"}\n{\"_id\": \"c\", \"title\": \" \", \"text\": \" \"}\n",
    )
    .unwrap();
    let corpus = beir::read_corpus(&p).unwrap();
    assert_eq!(beir::empty_docs(&corpus), ["a", "c"]);
    let model = M3Model::load(tiny(), Device::Cpu).unwrap();
    let ix = Index::build(&model, &corpus, IndexParts::all(), &mut |_| {}).unwrap();
    assert_eq!(ix.n_docs(), 3);
    // The blank document is the empty one: the same dense vector, and no sparse or BM25
    // postings (whitespace used to become a "▁" piece that any query could match).
    assert_eq!(corpus[2].text, "");
    let d = ix.dense.as_ref().unwrap();
    assert_eq!(d.vector(0), d.vector(2));
    let q = retrom3::retrieval::hybrid::encode_queries_for(&model, &["capital"], &[Mode::Bm25])
        .unwrap();
    let hits = ix
        .search(&q, Mode::Bm25, &SearchOptions::default())
        .unwrap();
    assert!(hits[0].iter().all(|h| h.doc != 2), "{:?}", hits[0]);

    let mut qrels = beir::Qrels::new();
    qrels
        .entry("q".into())
        .or_default()
        .extend([("a".to_string(), 1), ("zz".to_string(), 0)]);
    let (missing, judged) = beir::judged_docs_missing(&qrels, &corpus);
    assert_eq!((missing, judged), (vec!["zz"], 2));

    // An index holds ids the reader would take: a corpus given to `build` directly with an id
    // twice, an empty one or one with a space is refused (the index would not load).
    for (ids, why) in [
        (["a", "b", "a"], "document 2: id \"a\" repeats"),
        (["a", "", "c"], "document 1: id \"\" is empty"),
        (["a", "b", "c d"], "document 2: id \"c d\" holds whitespace"),
    ] {
        let docs: Vec<beir::Doc> = ids
            .iter()
            .map(|id| beir::Doc {
                id: id.to_string(),
                text: "text".into(),
            })
            .collect();
        let e = Index::build(&model, &docs, IndexParts::all(), &mut |_| {})
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(why), "{e}");
    }

    // Queries: an empty text matters only for the kept (judged) queries; a null text is named;
    // a file without a query is an error.
    std::fs::write(
        &p,
        "{\"_id\": \"q1\", \"text\": \"capital\"}\n{\"_id\": \"q2\", \"text\": \"\"}\n{\"_id\": \"q3\"}\n",
    )
    .unwrap();
    let kept = beir::read_queries_kept(&p, |id| id == "q1").unwrap();
    assert_eq!(kept.len(), 1);
    let e = beir::read_queries_kept(&p, |id| id != "q3")
        .unwrap_err()
        .to_string();
    assert!(e.contains(":2") && e.contains("empty text"), "{e}");
    let e = beir::read_queries_kept(&p, |id| id == "q3")
        .unwrap_err()
        .to_string();
    assert!(e.contains(":3") && e.contains("missing or null"), "{e}");
    std::fs::write(&p, "{\"_id\": \"q1\", \"text\": null}\n").unwrap();
    let e = beir::read_queries(&p).unwrap_err().to_string();
    assert!(e.contains(":1") && e.contains("missing or null"), "{e}");
    std::fs::write(&p, "").unwrap();
    let e = beir::read_queries(&p).unwrap_err().to_string();
    assert!(e.contains("no query"), "{e}");

    // qrels: a trailing tab is not a fourth column.
    let q = p.with_file_name("qrels.tsv");
    std::fs::write(&q, "query-id\tcorpus-id\tscore\nq1\ta\t1\t\nq1\tb\t2\n").unwrap();
    let qrels = beir::read_qrels(&q).unwrap();
    assert_eq!(qrels["q1"]["a"], 1);
    assert_eq!(qrels["q1"]["b"], 2);
}

/// Document numbers past a part, a query of another dimension, and an id listed twice in one
/// document are errors naming them (they used to panic, or build an index that would not load).
#[test]
fn out_of_range_documents_and_repeated_ids_are_errors() {
    let dense = DenseIndex::build(&[vec![1.0, 0.0], vec![0.0, 1.0]]).unwrap();
    assert_eq!(dense.score_docs(&[1.0, 0.0], &[1, 0]).unwrap(), [0.0, 1.0]);
    let e = dense.score_docs(&[1.0, 0.0], &[5]).unwrap_err().to_string();
    assert!(e.contains("document number 5"), "{e}");
    assert!(dense.score_docs(&[1.0], &[0]).is_err());
    let store = ColbertStore::build(&[vec![vec![1.0, 0.0]], vec![vec![0.0, 1.0]]]).unwrap();
    let q = [vec![1.0, 0.0]];
    assert_eq!(store.maxsim(&q, &[0]).unwrap(), [1.0]);
    let e = store.maxsim(&q, &[3]).unwrap_err().to_string();
    assert!(e.contains("document number 3"), "{e}");
    let e = ImpactIndex::build(&[vec![(1, 0.5)], vec![(2, 0.5), (2, 0.3)]], 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("document 1 lists token id 2 twice"), "{e}");
    // A weight <= 0 is dropped, as documented, so it does not count as a repeat.
    assert!(ImpactIndex::build(&[vec![(2, 0.0), (2, 0.5)]], 10).is_ok());
    let e = ColbertStore::build(&[vec![vec![1e6, 0.0]]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside f16's range"), "{e}");
}

/// A weights file that differs from another only in the middle (a fine-tune with the embeddings
/// frozen, an unused pooler at the end) is another model to an index: every byte is hashed.
#[test]
fn the_fingerprint_covers_every_weight_byte() {
    let d = tmpdir("fpmid");
    let tok = tiny().join("tokenizer.json");
    let mut weights: Vec<u8> = (0..5u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let fp = |weights: &[u8]| {
        std::fs::write(d.join("config.json"), "{}").unwrap();
        std::fs::write(d.join("model.safetensors"), weights).unwrap();
        ModelFingerprint::of_files(&d, &tok).unwrap().hash
    };
    let base = fp(&weights);
    assert_eq!(fp(&weights), base, "the same bytes, the same fingerprint");
    for at in [0, (5 << 20) / 2, (5 << 20) - 1] {
        weights[at] ^= 1;
        assert_ne!(fp(&weights), base, "a byte at {at} changed");
        weights[at] ^= 1;
    }
    let _ = std::fs::remove_dir_all(&d);
}
