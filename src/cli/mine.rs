//! `retrom3 mine`: hard-negative mining with the dense head (SPEC §4.8, FlagEmbedding's
//! hn_mine.py): the negatives of every training row are replaced by texts sampled from ranks
//! [start, end) of an exact dense retrieval over the candidate pool.

use super::output::write_jsonl;
use clap::Args;
use retrom3::data::jsonl::{read_jsonl, read_texts};
use retrom3::train::m3::{mine_hard_negatives, pool_from_rows, MineConfig};
use retrom3::{Device, Error, M3Model, Result};
use serde_json::Value;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct MineArgs {
    /// Model directory (its dense head does the retrieval).
    #[arg(long)]
    pub model: PathBuf,
    /// Training JSONL (FlagEmbedding format: query, pos, neg, ...).
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSONL: the same rows with "neg" replaced (and "neg_scores" dropped).
    #[arg(long)]
    pub output: PathBuf,
    /// Ranks to sample negatives from, start-end (end exclusive).
    #[arg(long, default_value = "10-210")]
    pub range: String,
    /// Negatives per query.
    #[arg(long, default_value_t = 15)]
    pub negatives: usize,
    /// Candidate pool: JSONL of {"text": ...} (or one text per line). Default: every pos and neg
    /// text of the input, de-duplicated.
    #[arg(long)]
    pub candidate_pool: Option<PathBuf>,
    /// Max tokens per text, specials included (default: 512, or the model's maximum if lower).
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// cpu, cuda[:N], or emu (the CUDA kernels run on CPU threads: an `emu` build, for checks).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

fn parse_range(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::invalid(format!("--range {s:?}: expected START-END, e.g. 10-210"));
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a >= b {
        return Err(bad());
    }
    Ok((a, b))
}

pub fn run(a: MineArgs) -> Result<()> {
    super::output::check_output_path("--output", &a.output)?;
    let range = parse_range(&a.range)?;
    let mut rows: Vec<Value> = read_jsonl(&a.input)?;
    let pool = match &a.candidate_pool {
        Some(p) => read_texts(p)?,
        None => pool_from_rows(&rows),
    };
    let model = M3Model::load(&a.model, a.device)?;
    let cfg = MineConfig {
        range,
        negatives: a.negatives,
        seed: a.seed,
        max_length: a
            .max_length
            .unwrap_or_else(|| 512.min(model.encoder.config.max_tokens())),
        batch_size: a.batch_size,
        source: Some(a.input.clone()),
    };
    let stats = mine_hard_negatives(&model, &mut rows, &pool, &cfg)?;
    write_jsonl(&a.output, rows.into_iter())?;
    if stats.blank_pool > 0 {
        eprintln!(
            "warning: {} blank texts of the candidate pool left out",
            stats.blank_pool
        );
    }
    if stats.short_rows > 0 {
        eprintln!(
            "warning: {} of {} rows got fewer than --negatives {} negatives ({} got none: \
             finetune refuses those unless --group-size 1); the pool holds too few other texts",
            stats.short_rows, stats.queries, a.negatives, stats.rows_without_negatives
        );
    }
    eprintln!(
        "mined {} queries over {} candidates: {} negatives from ranks {}-{}, {} random top-ups; written to {}",
        stats.queries,
        stats.corpus,
        stats.mined,
        range.0,
        range.1,
        stats.random,
        a.output.display()
    );
    Ok(())
}
