//! `retrom3 bench encode`: encode throughput of a model directory on synthetic texts, printed as
//! one JSON line (what tools/compare_torch_encode.py reads to compare with PyTorch in one run).

use clap::{Args, Subcommand};
use retrom3::{Device, EncodeOptions, M3Model, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Encode throughput (dense + sparse + ColBERT) of a model directory.
    Encode(BenchEncodeArgs),
}

#[derive(Args, Debug)]
pub struct BenchEncodeArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Number of synthetic texts.
    #[arg(long, default_value_t = 128)]
    pub texts: usize,
    /// Tokens per text (specials included); texts are long enough to be truncated to it.
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Timed repetitions (after one warm-up batch); the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Only the dense head.
    #[arg(long)]
    pub dense_only: bool,
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// Deterministic multilingual filler text, long enough for any max length.
pub fn synthetic_texts(n: usize, words: usize) -> Vec<String> {
    const VOCAB: [&str; 16] = [
        "retrieval",
        "model",
        "dense",
        "sparse",
        "vector",
        "Berlin",
        "größe",
        "北京",
        "столица",
        "query",
        "passage",
        "index",
        "score",
        "lexical",
        "token",
        "embedding",
    ];
    (0..n)
        .map(|i| {
            (0..words)
                .map(|j| VOCAB[(i * 7 + j * 13 + j / 3) % VOCAB.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Encode(a) => encode(a),
    }
}

fn encode(a: BenchEncodeArgs) -> Result<()> {
    let model = M3Model::load(&a.model, a.device)?;
    let texts = synthetic_texts(a.texts, a.max_length * 2);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let opts = EncodeOptions {
        max_length: Some(a.max_length),
        batch_size: a.batch_size,
        ..if a.dense_only || model.heads.is_none() {
            EncodeOptions::default()
        } else {
            EncodeOptions::all()
        }
    };
    let tokens: usize = model
        .tokenizer
        .encode_batch(&refs, a.max_length)?
        .iter()
        .map(Vec::len)
        .sum();
    model.encode(&refs[..a.batch_size.min(refs.len())], &opts)?;
    let mut best = f64::INFINITY;
    for _ in 0..a.repeat.max(1) {
        let t = Instant::now();
        model.encode(&refs, &opts)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "engine": "retrom3",
            "device": a.device.to_string(),
            "texts": a.texts,
            "tokens": tokens,
            "max_length": a.max_length,
            "batch_size": a.batch_size,
            "heads": if opts.sparse { "dense+sparse+colbert" } else { "dense" },
            "seconds": best,
            "tokens_per_s": tokens as f64 / best,
        })
    );
    Ok(())
}
