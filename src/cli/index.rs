//! `retrom3 index`: encode a corpus and write a retrieval index directory.

use super::output::progress;
use clap::Args;
use retrom3::retrieval::{beir, Index, IndexParts};
use retrom3::{Device, M3Model, Result};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct IndexArgs {
    /// Model directory (with the M3 heads for --sparse / --colbert).
    #[arg(long)]
    pub model: PathBuf,
    /// corpus.jsonl in BEIR form {"_id", "title", "text"} (or {"text"}: the line number is the id).
    #[arg(long)]
    pub corpus: PathBuf,
    /// Output index directory (index.r3i is written inside).
    #[arg(long)]
    pub output: PathBuf,
    /// Store dense vectors (with none of --dense/--sparse/--colbert: all three).
    #[arg(long)]
    pub dense: bool,
    /// Store the learned sparse inverted index.
    #[arg(long)]
    pub sparse: bool,
    /// Store ColBERT vectors (f16) for re-ranking.
    #[arg(long)]
    pub colbert: bool,
    /// cpu, cuda[:N], or emu (the CUDA kernels run on CPU threads: an `emu` build, for checks).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// One warning on stderr for the documents with no text (empty title and text): they are
/// indexed as the special tokens only (real BEIR corpora hold a few), not refused.
pub fn warn_empty_docs(corpus: &[beir::Doc]) {
    let empty = beir::empty_docs(corpus);
    if empty.is_empty() {
        return;
    }
    const SHOWN: usize = 5;
    eprintln!(
        "retrom3: warning: {} document{} with empty title and text (indexed anyway, encoded as \
         the special tokens only): {:?}{}",
        empty.len(),
        if empty.len() == 1 { "" } else { "s" },
        &empty[..empty.len().min(SHOWN)],
        if empty.len() > SHOWN { " …" } else { "" }
    );
}

pub fn run(a: IndexArgs) -> Result<()> {
    super::output::check_output_dir("--output", &a.output)?;
    if a.colbert && !a.dense {
        // ColBERT re-ranks the dense top-K: alone it is a part no mode can use.
        return Err(retrom3::Error::invalid(
            "--colbert needs --dense (the colbert mode re-ranks the dense candidates)",
        ));
    }
    let corpus = beir::read_corpus(&a.corpus)?;
    warn_empty_docs(&corpus);
    let none = !(a.dense || a.sparse || a.colbert);
    let parts = IndexParts {
        dense: a.dense || none,
        sparse: a.sparse || none,
        colbert: a.colbert || none,
        // BM25 needs only the tokenizer: always stored, as the baseline.
        bm25: true,
    };
    let model = M3Model::load(&a.model, a.device)?;
    let pb = progress(corpus.len(), "index");
    let index = Index::build(&model, &corpus, parts, &mut |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    index.save(&a.output)?;
    let mut what = Vec::new();
    if let Some(d) = &index.dense {
        what.push(format!("dense {}-d", d.dim()));
    }
    if let Some(s) = &index.sparse {
        what.push(format!("sparse {} postings", s.n_postings()));
    }
    if let Some(c) = &index.colbert {
        what.push(format!("colbert {}-d f16", c.dim()));
    }
    if let Some(b) = &index.bm25 {
        what.push(format!("bm25 {} postings", b.n_postings()));
    }
    outln!(
        "indexed {} documents ({}) into {}",
        index.n_docs(),
        what.join(", "),
        a.output
            .join(retrom3::retrieval::index::INDEX_FILE)
            .display()
    );
    Ok(())
}
