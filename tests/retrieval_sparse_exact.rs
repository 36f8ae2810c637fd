//! Exactness of the sparse top-k searches (`ImpactIndex::search`, the block-max search with its
//! term-at-a-time switch; `search_block_max_only`, always block by block; and
//! `ImpactIndex::search_maxscore`) against an integer brute force, over many small random corpora
//! and queries: ties, empty queries, ids outside the vocabulary or without postings, duplicate
//! ids, non-positive weights, k = 0 and k larger than the number of matching documents, corpus
//! sizes around the block (8) and skip (64) boundaries, and a larger corpus where pruning engages,
//! also after a round trip through the index file.

use retrom3::data::rng::Rng;
use retrom3::retrieval::index_format::{write_container, Container};
use retrom3::retrieval::sparse::{ImpactIndex, SPARSE_SECTIONS};
use retrom3::retrieval::Hit;

/// The oracle: (score, doc) of every matching document, score desc then doc asc, first k.
fn brute(idx: &ImpactIndex, q: &[(u32, f32)], k: usize) -> Vec<(u64, u32)> {
    let mut v: Vec<(u64, u32)> = idx
        .score_all_quantised(q)
        .into_iter()
        .enumerate()
        .filter(|x| x.1 > 0)
        .map(|(d, s)| (s, d as u32))
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v.truncate(k);
    v
}

fn check(idx: &ImpactIndex, q: &[(u32, f32)], k: usize, what: &str) {
    let want = brute(idx, q, k);
    let floats = idx.score_all(q);
    let want_hits: Vec<Hit> = want
        .iter()
        .map(|&(_, d)| Hit {
            doc: d,
            score: floats[d as usize],
        })
        .collect();
    assert_eq!(idx.search(q, k), want_hits, "block-max, {what}, k {k}");
    assert_eq!(
        idx.search_maxscore(q, k),
        want_hits,
        "MaxScore, {what}, k {k}"
    );
}

/// A weight: coarse (four levels, so ties are common) or continuous, sometimes not positive.
fn weight(rng: &mut Rng, coarse: bool) -> f32 {
    match rng.below(20) {
        0 => 0.0,
        1 => -0.5,
        _ if coarse => (1 + rng.below(4)) as f32 * 0.25,
        _ => (rng.uniform() as f32) * 2.0 + 1e-3,
    }
}

/// A term id, small ids frequent (log-uniform); occasionally outside the vocabulary.
fn term(rng: &mut Rng, vocab: u32, outside: bool) -> u32 {
    if outside && rng.below(10) == 0 {
        return vocab + rng.below(5) as u32;
    }
    let u = rng.uniform() as f32;
    (((vocab as f32 + 1.0).powf(u) - 1.0) as u32).min(vocab - 1)
}

fn doc(rng: &mut Rng, vocab: u32, len: usize, coarse: bool) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = (0..len)
        .map(|_| (term(rng, vocab, false), weight(rng, coarse)))
        .collect();
    v.sort_by_key(|x| x.0);
    v.dedup_by_key(|x| x.0);
    v
}

fn query(rng: &mut Rng, vocab: u32, coarse: bool) -> Vec<(u32, f32)> {
    let n = rng.below(9);
    // Duplicates allowed (they are summed), ids may be outside the vocabulary.
    (0..n)
        .map(|_| (term(rng, vocab, true), weight(rng, coarse)))
        .collect()
}

#[test]
fn random_small_corpora_match_brute_force() {
    let mut rng = Rng::new(2024, 0);
    let sizes = [0usize, 1, 2, 7, 8, 9, 15, 16, 63, 64, 65, 127, 129, 500];
    let mut n_checks = 0;
    for case in 0..120 {
        let n_docs = if case < sizes.len() {
            sizes[case]
        } else {
            rng.below(3000)
        };
        let vocab = 1 + rng.below(300) as u32;
        let coarse = case % 3 != 2;
        let max_len = 1 + rng.below(25);
        let docs: Vec<Vec<(u32, f32)>> = (0..n_docs)
            .map(|_| {
                let len = rng.below(max_len + 1);
                doc(&mut rng, vocab, len, coarse)
            })
            .collect();
        // The vocabulary is larger than the ids used, so some ids have empty lists.
        let idx = ImpactIndex::build(&docs, vocab as usize + 3).unwrap();
        for qi in 0..12 {
            let q = query(&mut rng, vocab + 3, coarse);
            for k in [0usize, 1, 2, 5, 10, 37, 5000] {
                check(
                    &idx,
                    &q,
                    k,
                    &format!("case {case} ({n_docs} docs) query {qi} {q:?}"),
                );
                n_checks += 1;
            }
        }
        // Explicit edge queries.
        check(&idx, &[], 10, &format!("case {case} empty query"));
        check(
            &idx,
            &[(vocab + 100, 1.0)],
            10,
            &format!("case {case} absent id"),
        );
        check(
            &idx,
            &[(vocab + 1, 1.0)],
            10,
            &format!("case {case} empty list"),
        );
        check(
            &idx,
            &[(0, 1.0), (0, 2.0)],
            3,
            &format!("case {case} duplicate ids"),
        );
        check(
            &idx,
            &[(0, -1.0)],
            3,
            &format!("case {case} negative weight"),
        );
    }
    assert!(n_checks > 5000);
}

/// All documents identical: every match ties, so the top-k is the k smallest document numbers.
#[test]
fn all_ties_resolve_by_document_number() {
    let docs: Vec<Vec<(u32, f32)>> = (0..1000).map(|_| vec![(1, 0.5), (4, 0.25)]).collect();
    let idx = ImpactIndex::build(&docs, 10).unwrap();
    for k in [1, 10, 999, 1000, 1001] {
        let hits = idx.search(&[(1, 1.0), (4, 1.0)], k);
        let got: Vec<u32> = hits.iter().map(|h| h.doc).collect();
        let want: Vec<u32> = (0..k.min(1000) as u32).collect();
        assert_eq!(got, want, "k {k}");
        check(&idx, &[(1, 1.0), (4, 1.0)], k, "all ties");
    }
}

/// A corpus big enough that long lists get block maxima and skips and most blocks are pruned;
/// the same results after writing the index to a file and mapping it back.
#[test]
fn larger_zipf_corpus_and_file_round_trip() {
    let mut rng = Rng::new(99, 1);
    let vocab = 2000u32;
    let n_docs = 20_000;
    let docs: Vec<Vec<(u32, f32)>> = (0..n_docs)
        .map(|_| {
            let len = 10 + rng.below(30);
            doc(&mut rng, vocab, len, false)
        })
        .collect();
    let idx = ImpactIndex::build(&docs, vocab as usize).unwrap();
    let dir = std::env::temp_dir().join(format!("retrom3-sparse-exact-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sparse.r3i");
    write_container(&path, 0, &idx.sections(SPARSE_SECTIONS)).unwrap();
    let c = Container::open(&path).unwrap();
    let loaded = ImpactIndex::from_container(&c, SPARSE_SECTIONS, n_docs, idx.scale()).unwrap();
    for qi in 0..40 {
        let n = 1 + rng.below(15);
        let q: Vec<(u32, f32)> = (0..n)
            .map(|_| (term(&mut rng, vocab, false), weight(&mut rng, qi % 2 == 0)))
            .collect();
        for k in [1usize, 10, 100, 1000] {
            check(&idx, &q, k, &format!("zipf query {qi}"));
            assert_eq!(
                loaded.search(&q, k),
                idx.search(&q, k),
                "loaded, query {qi}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
