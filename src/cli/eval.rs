//! `retrom3 eval`: index a BEIR corpus in memory, run every requested mode over the split's
//! queries, and report nDCG@10, Recall@100, MRR@10 and MAP (trec_eval semantics).

use super::index::warn_empty_docs;
use super::output::progress;
use super::search::{at_least_one, parse_weights, trec_line};
use clap::Args;
use retrom3::retrieval::hybrid::{effective_candidates, encode_queries_for};
use retrom3::retrieval::metrics::{evaluate, Run, Summary};
use retrom3::retrieval::{beir, Index, IndexParts, Mode, SearchOptions};
use retrom3::{Device, Error, M3Model, Result};
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// BEIR directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.
    #[arg(long)]
    pub data: PathBuf,
    /// The qrels split.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Comma-separated modes: dense, sparse, colbert, dense+sparse, all, bm25.
    #[arg(long, default_value = "bm25,dense,sparse,colbert,dense+sparse,all")]
    pub modes: String,
    /// JSON results file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Retrieved documents per query (the depth of MAP and Recall).
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    pub depth: usize,
    /// Candidates from each of dense and sparse for the fused / re-rank modes (K, >= 1; default:
    /// the paper protocol, dense top-200 for colbert, top-1000 of each for dense+sparse and all).
    #[arg(long, value_parser = at_least_one)]
    pub candidates: Option<usize>,
    /// Fusion weights w_dense,w_sparse[,w_colbert].
    #[arg(long, default_value = "1,0.3,1")]
    pub weights: String,
    /// Also write one TREC run file per mode into this directory.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// cpu, cuda[:N], or emu (the CUDA kernels run on CPU threads: an `emu` build, for checks).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

fn parse_modes(s: &str) -> Result<Vec<Mode>> {
    let mut v: Vec<Mode> = Vec::new();
    for m in s.split(',').filter(|x| !x.trim().is_empty()) {
        let m: Mode = m.parse()?;
        if !v.contains(&m) {
            v.push(m);
        }
    }
    if v.is_empty() {
        return Err(Error::invalid("--modes: no mode given"));
    }
    Ok(v)
}

/// Refuse a split that cannot be evaluated (no relevant judgment, or no judged document in the
/// corpus) and warn about judged documents missing from the corpus.
fn check_judgments(a: &EvalArgs, data: &beir::BeirData) -> Result<()> {
    let qrels = a.data.join("qrels").join(format!("{}.tsv", a.split));
    if !data
        .qrels
        .values()
        .any(|judged| judged.values().any(|&r| r >= 1))
    {
        return Err(Error::format(
            &qrels,
            format!(
                "no query has a relevant judgment (score >= 1) among the {} judged queries: \
                 every query would be skipped, nothing to evaluate",
                data.qrels.len()
            ),
        ));
    }
    let (missing, judged) = beir::judged_docs_missing(&data.qrels, &data.corpus);
    if missing.len() == judged {
        return Err(Error::format(
            &qrels,
            format!(
                "none of its {judged} judged document ids is in {} (e.g. {:?}): wrong corpus \
                 or split?",
                a.data.join("corpus.jsonl").display(),
                &missing[..missing.len().min(3)]
            ),
        ));
    }
    if !missing.is_empty() {
        eprintln!(
            "retrom3: warning: {} of the {judged} judged document ids in {} are not in the \
             corpus (e.g. {:?}); they count as never retrieved",
            missing.len(),
            qrels.display(),
            &missing[..missing.len().min(3)]
        );
    }
    Ok(())
}

pub fn run(a: EvalArgs) -> Result<()> {
    if let Some(out) = &a.output {
        super::output::check_output_path("--output", out)?;
    }
    if let Some(d) = &a.run_dir {
        super::output::check_output_dir("--run-dir", d)?;
    }
    let modes = parse_modes(&a.modes)?;
    let weights = parse_weights(&a.weights, &modes)?;
    let data = beir::load(&a.data, &a.split)?;
    check_judgments(&a, &data)?;
    warn_empty_docs(&data.corpus);
    let model = M3Model::load(&a.model, a.device)?;
    let mut parts = IndexParts::default();
    for m in &modes {
        let p = m.parts();
        parts.dense |= p.dense;
        parts.sparse |= p.sparse;
        parts.colbert |= p.colbert;
        parts.bm25 |= p.bm25;
    }
    let pb = progress(data.corpus.len(), "index");
    let mut index = Index::build(&model, &data.corpus, parts, &mut |n| pb.inc(n as u64))?;
    if let Some(dev) = model.device_handle() {
        index.attach_device(dev)?;
    }
    pb.finish_and_clear();
    let texts: Vec<&str> = data.queries.iter().map(|q| q.text.as_str()).collect();
    let reps = encode_queries_for(&model, &texts, &modes)?;
    let opts = SearchOptions {
        k: a.depth,
        candidates: a.candidates.unwrap_or(0),
        weights,
    };
    if let Some(d) = &a.run_dir {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut results: Vec<(Mode, Summary)> = Vec::new();
    for &mode in &modes {
        let hits = index.search(&reps, mode, &opts)?;
        let mut run = Run::new();
        for (q, hs) in data.queries.iter().zip(&hits) {
            run.insert(
                q.id.clone(),
                hs.iter()
                    .map(|h| (index.doc_id(h.doc).to_string(), h.score as f64))
                    .collect(),
            );
        }
        if let Some(d) = &a.run_dir {
            let path = d.join(format!("{}.trec", mode.name().replace('+', "_")));
            retrom3::io::write_atomic(&path, |w| {
                for (q, hs) in data.queries.iter().zip(&hits) {
                    for (r, h) in hs.iter().enumerate() {
                        trec_line(w, &q.id, index.doc_id(h.doc), r + 1, h.score, mode)?;
                    }
                }
                Ok(())
            })?;
        }
        let (_, summary) = evaluate(&data.qrels, &run);
        results.push((mode, summary));
    }
    let s0 = &results[0].1;
    // The results file first: a closed stdout (`| head`) does not lose it.
    if let Some(out) = &a.output {
        let mut candidates = serde_json::Map::new();
        for m in [Mode::Colbert, Mode::DenseSparse, Mode::All] {
            if modes.contains(&m) {
                let k = effective_candidates(m, opts.candidates, opts.k).min(index.n_docs());
                candidates.insert(m.name().into(), json!(k));
            }
        }
        let mut by_mode = serde_json::Map::new();
        for (m, s) in &results {
            by_mode.insert(
                m.name().into(),
                serde_json::to_value(s).map_err(|e| Error::invalid(e.to_string()))?,
            );
        }
        let doc = json!({
            "data": a.data.display().to_string(),
            "split": a.split,
            "model": index.fingerprint.model,
            "fingerprint": format!("{:016x}", index.fingerprint.hash),
            "corpus_docs": index.n_docs(),
            "queries": s0.queries,
            "skipped_no_relevant": s0.skipped_no_relevant,
            "settings": {
                "depth": a.depth,
                // The depth each re-ranking mode ran with (at least --depth).
                "candidates": candidates,
                "weights": weights.map(short_f64),
                "bm25": {
                    "k1": short_f64(index.bm25_params.k1),
                    "b": short_f64(index.bm25_params.b),
                },
            },
            "modes": modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "results": by_mode,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| Error::invalid(e.to_string()))?;
        retrom3::io::write_atomic(out, |w| {
            std::io::Write::write_all(w, format!("{text}\n").as_bytes())
        })?;
    }
    outln!(
        "{:<14} {:>8} {:>10} {:>8} {:>8}",
        "mode",
        "nDCG@10",
        "Recall@100",
        "MRR@10",
        "MAP"
    );
    for (m, s) in &results {
        outln!(
            "{:<14} {:>8.4} {:>10.4} {:>8.4} {:>8.4}",
            m.name(),
            s.mean.ndcg_10,
            s.mean.recall_100,
            s.mean.mrr_10,
            s.mean.map
        );
    }
    outln!(
        "{} queries evaluated on split {:?} over {} documents; {} skipped (no relevant judgment)",
        s0.queries,
        a.split,
        index.n_docs(),
        s0.skipped_no_relevant
    );
    if s0.skipped_no_relevant > 0 || s0.empty_runs > 0 {
        // The other convention, to compare with BEIR's published numbers.
        for (m, s) in &results {
            outln!(
                "{:<14} nDCG@10 {:.4} over {} queries (BEIR / pytrec_eval mean: queries without a \
                 relevant judgment count 0, queries without hits are left out)",
                m.name(),
                s.pytrec_mean.ndcg_10,
                s.pytrec_queries
            );
        }
    }
    Ok(())
}

/// An f32 setting as the decimal it was written as (0.3, not 0.30000001192092896).
fn short_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}
