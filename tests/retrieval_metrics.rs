//! Our metrics against pytrec_eval (trec_eval 9) on the synthetic qrels + run dumped by
//! tools/dump_trec_eval.py: ties, graded relevance, queries without relevant documents, unjudged
//! documents, a judged query with no run. Agreement to 1e-6 per query and on the mean.

use retrom3::retrieval::beir::Qrels;
use retrom3::retrieval::metrics::{evaluate, evaluate_query, Run};
use serde_json::Value;
use std::collections::BTreeMap;

fn fixture() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/trec/pytrec_eval.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn qrels_run(v: &Value) -> (Qrels, Run) {
    let mut qrels = Qrels::new();
    for (q, docs) in v["qrels"].as_object().unwrap() {
        let m: BTreeMap<String, i32> = docs
            .as_object()
            .unwrap()
            .iter()
            .map(|(d, r)| (d.clone(), r.as_i64().unwrap() as i32))
            .collect();
        qrels.insert(q.clone(), m);
    }
    let mut run = Run::new();
    for (q, docs) in v["run"].as_object().unwrap() {
        run.insert(
            q.clone(),
            docs.as_object()
                .unwrap()
                .iter()
                .map(|(d, s)| (d.clone(), s.as_f64().unwrap()))
                .collect(),
        );
    }
    (qrels, run)
}

#[test]
fn per_query_metrics_match_pytrec_eval() {
    let v = fixture();
    let (qrels, run) = qrels_run(&v);
    let per = v["per_query"].as_object().unwrap();
    assert!(per.len() >= 10);
    for (q, want) in per {
        let got = evaluate_query(&qrels[q], &run[q]);
        for (name, ours) in [
            ("ndcg_cut_10", got.ndcg_10),
            ("recall_100", got.recall_100),
            ("map", got.map),
            ("mrr_10", got.mrr_10),
        ] {
            let w = want[name].as_f64().unwrap();
            assert!(
                (ours - w).abs() < 1e-6,
                "query {q} {name}: ours {ours}, pytrec_eval {w}"
            );
        }
    }
}

#[test]
fn means_skip_queries_without_relevant_documents() {
    let v = fixture();
    let (qrels, run) = qrels_run(&v);
    let (per, summary) = evaluate(&qrels, &run);
    // q3 and q9 have judgments, all non-relevant: skipped and counted.
    assert_eq!(summary.skipped_no_relevant, 2);
    assert!(!per.contains_key("q3") && !per.contains_key("q9"));
    // q_noresults is judged but absent from the run: scored 0 (trec_eval -c), pytrec_eval skips it.
    assert_eq!(summary.empty_runs, 1);
    assert_eq!(per["q_noresults"].ndcg_10, 0.0);
    // The run-only query is ignored.
    assert!(!per.contains_key("q_unjudged"));
    // Mean over pytrec_eval's per-query values of the same query set (+ the empty run's zeros).
    let pq = v["per_query"].as_object().unwrap();
    let with_rel: Vec<&Value> = pq
        .iter()
        .filter(|(q, _)| qrels[*q].values().any(|&r| r >= 1))
        .map(|(_, m)| m)
        .collect();
    let n = (with_rel.len() + 1) as f64;
    assert_eq!(summary.queries, with_rel.len() + 1);
    for (name, ours) in [
        ("ndcg_cut_10", summary.mean.ndcg_10),
        ("recall_100", summary.mean.recall_100),
        ("map", summary.mean.map),
        ("mrr_10", summary.mean.mrr_10),
    ] {
        let want: f64 = with_rel
            .iter()
            .map(|m| m[name].as_f64().unwrap())
            .sum::<f64>()
            / n;
        assert!(
            (ours - want).abs() < 1e-6,
            "{name}: ours {ours}, want {want}"
        );
    }
}

/// A document listed twice counts once, at its best rank: every metric stays within [0, 1] and
/// equals the run without the repeat.
#[test]
fn a_repeated_document_counts_once() {
    let judged: BTreeMap<String, i32> = [("d1".to_string(), 1)].into();
    let twice = vec![("d1".to_string(), 1.0), ("d1".to_string(), 0.5)];
    let once = vec![("d1".to_string(), 1.0)];
    let m = evaluate_query(&judged, &twice);
    assert_eq!(m, evaluate_query(&judged, &once));
    assert_eq!((m.ndcg_10, m.recall_100, m.map), (1.0, 1.0, 1.0));
}

#[test]
fn ties_break_by_doc_id_descending() {
    let judged: BTreeMap<String, i32> = [("a".to_string(), 1)].into();
    // Equal scores: trec_eval ranks "b" (larger id) first, so "a" is at rank 2.
    let run = vec![("a".to_string(), 1.0), ("b".to_string(), 1.0)];
    let m = evaluate_query(&judged, &run);
    assert!((m.mrr_10 - 0.5).abs() < 1e-12);
}

#[test]
fn the_pytrec_mean_is_pytrec_evals_own() {
    // BEIR's convention: pytrec_eval's mean over the judged queries it evaluated (q3 and q9,
    // without relevant documents, count 0; q_noresults, not in the run, is left out).
    let v = fixture();
    let (qrels, run) = qrels_run(&v);
    let (_, summary) = evaluate(&qrels, &run);
    let evaluated = v["evaluated_queries"].as_array().unwrap().len();
    assert_eq!(summary.pytrec_queries, evaluated);
    for (name, ours) in [
        ("ndcg_cut_10", summary.pytrec_mean.ndcg_10),
        ("recall_100", summary.pytrec_mean.recall_100),
        ("map", summary.pytrec_mean.map),
        ("mrr_10", summary.pytrec_mean.mrr_10),
    ] {
        let want = v["mean"][name].as_f64().unwrap();
        assert!(
            (ours - want).abs() < 1e-6,
            "{name}: ours {ours}, pytrec_eval {want}"
        );
    }
}
