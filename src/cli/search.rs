//! `retrom3 search`: query an index (one query on the command line, or a queries file to a TREC
//! run file).

use clap::Args;
use retrom3::retrieval::hybrid::{check_weights, encode_queries};
use retrom3::retrieval::{beir, Hit, Index, Mode, ModelFingerprint, SearchOptions};
use retrom3::{Device, Error, M3Model, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// Model directory (must be the one the index was built with).
    #[arg(long)]
    pub model: PathBuf,
    /// Index directory written by `retrom3 index`.
    #[arg(long)]
    pub index: PathBuf,
    /// One query text.
    #[arg(long, conflicts_with = "queries")]
    pub query: Option<String>,
    /// queries.jsonl ({"_id", "text"}); results go to --run (TREC format) or stdout.
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// TREC run file to write (`qid Q0 docid rank score retrom3-<mode>`).
    #[arg(long, requires = "queries")]
    pub run: Option<PathBuf>,
    /// dense | sparse | hybrid (= dense+sparse) | colbert | all | bm25 (default: all when the
    /// index has every part, else hybrid, dense, sparse or bm25).
    #[arg(long)]
    pub mode: Option<Mode>,
    /// Hits per query (>= 1).
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    pub k: usize,
    /// Fusion weights w_dense,w_sparse[,w_colbert].
    #[arg(long, default_value = "1,0.3,1")]
    pub weights: String,
    /// Candidates from each of dense and sparse for hybrid / all / colbert (K, >= 1; default: the
    /// paper protocol, dense top-200 for colbert, top-1000 of each for dense+sparse and all).
    #[arg(long, value_parser = at_least_one)]
    pub candidates: Option<usize>,
    /// cpu, cuda[:N], or emu (the CUDA kernels run on CPU threads: an `emu` build, for checks).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// clap value parser of a count that must be >= 1 (a usage error otherwise).
pub fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be >= 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e} (expected an integer >= 1)")),
    }
}

/// Parse "w_d,w_s" or "w_d,w_s,w_c" (w_c defaults to 1) and check them for `modes`
/// ([`check_weights`], shared with `score`).
pub fn parse_weights(s: &str, modes: &[Mode]) -> Result<[f32; 3]> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::invalid(format!("--weights {s:?}: expected numbers like 1,0.3,1")))?;
    let w = match v.as_slice() {
        [d, s] => [*d, *s, 1.0],
        [d, s, c] => [*d, *s, *c],
        _ => {
            return Err(Error::invalid(format!(
                "--weights {s:?}: expected 2 or 3 numbers"
            )))
        }
    };
    check_weights(w, modes).map_err(|m| Error::invalid(format!("--weights {s:?}: {m}")))?;
    Ok(w)
}

/// One TREC run field (query or document id): whitespace would split it into other columns.
fn trec_field<'a>(what: &str, id: &'a str) -> std::io::Result<&'a str> {
    if id.is_empty() || id.chars().any(char::is_whitespace) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{what} id {id:?} is empty or contains whitespace: a TREC run cannot carry it"),
        ));
    }
    Ok(id)
}

/// One TREC run line.
pub fn trec_line(
    out: &mut impl Write,
    qid: &str,
    doc: &str,
    rank: usize,
    score: f32,
    mode: Mode,
) -> std::io::Result<()> {
    let (qid, doc) = (trec_field("query", qid)?, trec_field("document", doc)?);
    writeln!(out, "{qid} Q0 {doc} {rank} {score} retrom3-{}", mode.name())
}

pub fn run(a: SearchArgs) -> Result<()> {
    let weights = parse_weights(&a.weights, a.mode.as_slice())?;
    if a.query.is_none() && a.queries.is_none() {
        return Err(Error::invalid(
            "give --query TEXT or --queries queries.jsonl",
        ));
    }
    // (clap's `requires` on --run does not fire when the conflicting --query is given.)
    if a.run.is_some() && a.queries.is_none() {
        return Err(Error::invalid(
            "--run writes the run of a --queries file; a single --query prints its hits",
        ));
    }
    if let Some(run) = &a.run {
        super::output::check_output_path("--run", run)?;
    }
    if a.query.as_deref().is_some_and(|q| q.trim().is_empty()) {
        return Err(Error::invalid(
            "--query: empty text (nothing to search with)",
        ));
    }
    let queries: Vec<beir::Doc> = match (&a.query, &a.queries) {
        (Some(q), _) => vec![beir::Doc {
            id: "query".into(),
            text: q.clone(),
        }],
        (None, Some(p)) => beir::read_queries(p)?,
        (None, None) => unreachable!("checked above"),
    };
    let model = M3Model::load(&a.model, a.device)?;
    let fp = ModelFingerprint::of_model(&model)?;
    let mut index = Index::load(&a.index, Some(&fp))?;
    if let Some(dev) = model.device_handle() {
        index.attach_device(dev)?;
    }
    let mode = a.mode.unwrap_or({
        let p = index.parts();
        if p.dense && p.sparse && p.colbert {
            Mode::All
        } else if p.dense && p.sparse {
            Mode::DenseSparse
        } else if p.dense {
            Mode::Dense
        } else if p.sparse || !p.bm25 {
            Mode::Sparse
        } else {
            // An index of ColBERT vectors (which need dense candidates) and BM25.
            Mode::Bm25
        }
    });
    index.require(mode.parts(), &format!("mode {mode}"))?;
    if a.mode.is_none() {
        // The default mode is known only now; check the weights for it too.
        parse_weights(&a.weights, &[mode])?;
    }
    let opts = SearchOptions {
        k: a.k,
        candidates: a.candidates.unwrap_or(0),
        weights,
    };
    let texts: Vec<&str> = queries.iter().map(|q| q.text.as_str()).collect();
    let reps = encode_queries(&model, &texts, mode)?;
    let hits: Vec<Vec<Hit>> = index.search(&reps, mode, &opts)?;
    if a.query.is_some() {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let write = |out: &mut std::io::StdoutLock<'_>| -> std::io::Result<()> {
            writeln!(out, "rank\tdoc_id\tscore ({mode})")?;
            for (r, h) in hits[0].iter().enumerate() {
                writeln!(out, "{}\t{}\t{:.6}", r + 1, index.doc_id(h.doc), h.score)?;
            }
            Ok(())
        };
        return write(&mut out).map_err(|e| Error::io("<stdout>", e));
    }
    let write_run = |out: &mut dyn Write| -> std::io::Result<()> {
        let mut out = out;
        for (q, hs) in queries.iter().zip(&hits) {
            for (r, h) in hs.iter().enumerate() {
                trec_line(&mut out, &q.id, index.doc_id(h.doc), r + 1, h.score, mode)?;
            }
        }
        Ok(())
    };
    match &a.run {
        Some(path) => {
            retrom3::io::write_atomic(path, |w| write_run(w))?;
            eprintln!(
                "wrote {} queries × top-{} ({mode}) to {}",
                queries.len(),
                a.k,
                path.display()
            );
            Ok(())
        }
        None => write_run(&mut std::io::stdout().lock()).map_err(|e| Error::io("<stdout>", e)),
    }
}
