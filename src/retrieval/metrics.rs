//! Ranking metrics with trec_eval's semantics (checked against pytrec_eval in
//! tests/retrieval_metrics.rs):
//!
//! * a run is ranked by score descending, ties by document id descending (byte order), as
//!   trec_eval re-sorts every run (the ranks in a run file are ignored);
//! * a document is relevant when its judgment is >= 1; unjudged documents are non-relevant;
//! * nDCG@10 uses gain = relevance level (judgments <= 0 gain nothing) and discount log2(rank + 1);
//!   the ideal ranking sorts all judgments by level;
//! * Recall@100 = relevant in the top 100 / all relevant; MAP = mean over relevant documents of
//!   the precision at their rank (over the whole run); MRR@10 = 1 / rank of the first relevant
//!   document within the top 10, else 0 (trec_eval's recip_rank on the run cut at 10).
//!
//! Averages: queries with no relevant judgment are skipped and counted (trec_eval reports 0 for
//! them and pytrec_eval users usually average those zeros in; we leave them out of the mean and
//! say how many there were). A judged query missing from the run scores 0 (trec_eval's `-c`).
//! [`Summary::pytrec_mean`] is the other convention, the one BEIR's `EvaluateRetrieval` reports:
//! pytrec_eval's mean over the queries both judged and retrieved for, the zeros of queries without
//! a relevant judgment included, queries without a retrieved document left out.

use super::beir::Qrels;
use std::collections::BTreeMap;

/// A run: query id → retrieved (doc id, score); order does not matter.
pub type Run = BTreeMap<String, Vec<(String, f64)>>;

/// The four metrics of one query.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct QueryMetrics {
    #[serde(rename = "ndcg@10")]
    pub ndcg_10: f64,
    #[serde(rename = "recall@100")]
    pub recall_100: f64,
    #[serde(rename = "mrr@10")]
    pub mrr_10: f64,
    pub map: f64,
}

/// Means over the evaluated queries.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub mean: QueryMetrics,
    /// Queries averaged (at least one relevant judgment).
    pub queries: usize,
    /// Judged queries left out because none of their judgments is relevant.
    pub skipped_no_relevant: usize,
    /// Judged queries with relevant documents but no retrieved document (scored 0).
    pub empty_runs: usize,
    /// pytrec_eval's (and BEIR's) mean: over the judged queries with a non-empty run, those
    /// without a relevant judgment counting 0.
    pub pytrec_mean: QueryMetrics,
    /// Queries in [`Summary::pytrec_mean`].
    pub pytrec_queries: usize,
}

/// trec_eval's ranking of a run: score desc, then doc id desc.
pub fn trec_sort(run: &mut [(String, f64)]) {
    run.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
}

/// Metrics of one query. `run` need not be sorted; a document listed more than once counts once,
/// at its best rank (a run is a set of documents: pytrec_eval's run is a dict with one score per
/// document; counting repeats gave metrics above 1).
pub fn evaluate_query(judged: &BTreeMap<String, i32>, run: &[(String, f64)]) -> QueryMetrics {
    let num_rel = judged.values().filter(|&&r| r >= 1).count();
    if num_rel == 0 {
        return QueryMetrics::default();
    }
    let mut ranked = run.to_vec();
    trec_sort(&mut ranked);
    let mut seen = std::collections::HashSet::new();
    ranked.retain(|(doc, _)| seen.insert(doc.clone()));
    let mut dcg = 0f64;
    let mut found = 0usize;
    let mut ap = 0f64;
    let mut in100 = 0usize;
    let mut rr = 0f64;
    for (i, (doc, _)) in ranked.iter().enumerate() {
        let rel = judged.get(doc).copied().unwrap_or(0);
        if i < 10 && rel > 0 {
            dcg += rel as f64 / ((i + 2) as f64).log2();
        }
        if rel >= 1 {
            found += 1;
            ap += found as f64 / (i + 1) as f64;
            if i < 100 {
                in100 += 1;
            }
            if found == 1 && i < 10 {
                rr = 1.0 / (i + 1) as f64;
            }
        }
    }
    let mut ideal: Vec<i32> = judged.values().copied().filter(|&r| r > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(10)
        .enumerate()
        .map(|(i, &r)| r as f64 / ((i + 2) as f64).log2())
        .sum();
    QueryMetrics {
        ndcg_10: if idcg > 0.0 { dcg / idcg } else { 0.0 },
        recall_100: in100 as f64 / num_rel as f64,
        mrr_10: rr,
        map: ap / num_rel as f64,
    }
}

/// Per-query metrics and their means over the judged queries (see the module doc).
pub fn evaluate(qrels: &Qrels, run: &Run) -> (BTreeMap<String, QueryMetrics>, Summary) {
    let mut per = BTreeMap::new();
    let mut s = Summary::default();
    let mut pytrec: Vec<QueryMetrics> = Vec::new();
    for (qid, judged) in qrels {
        let r = run.get(qid).map(Vec::as_slice).unwrap_or(&[]);
        if !judged.values().any(|&r| r >= 1) {
            s.skipped_no_relevant += 1;
            if !r.is_empty() {
                pytrec.push(QueryMetrics::default());
            }
            continue;
        }
        if r.is_empty() {
            s.empty_runs += 1;
        }
        let m = evaluate_query(judged, r);
        if !r.is_empty() {
            pytrec.push(m);
        }
        per.insert(qid.clone(), m);
    }
    s.pytrec_queries = pytrec.len();
    if !pytrec.is_empty() {
        let n = pytrec.len() as f64;
        for m in &pytrec {
            s.pytrec_mean.ndcg_10 += m.ndcg_10 / n;
            s.pytrec_mean.recall_100 += m.recall_100 / n;
            s.pytrec_mean.mrr_10 += m.mrr_10 / n;
            s.pytrec_mean.map += m.map / n;
        }
    }
    s.queries = per.len();
    if s.queries > 0 {
        let n = s.queries as f64;
        for m in per.values() {
            s.mean.ndcg_10 += m.ndcg_10 / n;
            s.mean.recall_100 += m.recall_100 / n;
            s.mean.mrr_10 += m.mrr_10 / n;
            s.mean.map += m.map / n;
        }
    }
    (per, s)
}
