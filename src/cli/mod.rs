//! Subcommand definitions (clap) and dispatch.

/// `println!` for a command's results: a closed or full stdout (`| head`, `| true`) is an error
/// naming `<stdout>` (exit 1), not a panic. The caller returns `Result`.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
            .map_err(|e| retrom3::Error::io("<stdout>", e))?
    }};
}

mod bench;
mod convert;
mod encode;
mod eval;
mod finetune;
mod index;
mod mine;
mod output;
mod pretrain;
mod quickstart;
mod search;
mod selftest;
mod tokenize;

use clap::{Parser, Subcommand};
use retrom3::Result;

/// retrom3: train and serve BGE-M3-style retrieval models.
#[derive(Parser, Debug)]
#[command(name = "retrom3", version, long_version = long_version(), about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Encode texts into dense / sparse / ColBERT outputs (JSONL in, JSONL out).
    Encode(encode::EncodeArgs),
    /// Score (query, passage) pairs with all three heads and their fusions.
    Score(encode::ScoreArgs),
    /// Rewrite a model directory as model.safetensors + config.json + .pt heads + tokenizer files.
    Convert(convert::ConvertArgs),
    /// RetroMAE pre-training (enhanced two-stream decoder).
    Pretrain(pretrain::PretrainArgs),
    /// Pre-tokenize a text corpus into a memory-mapped .r3tok file.
    Tokenize(tokenize::TokenizeArgs),
    /// M3 unified fine-tuning (dense + sparse + ColBERT, self-knowledge distillation).
    Finetune(finetune::FinetuneArgs),
    /// Hard-negative mining with the dense head (replaces each row's "neg").
    Mine(mine::MineArgs),
    /// Every kernel against the CPU reference on random inputs (cuda or emu).
    Selftest(selftest::SelftestArgs),
    /// Benchmarks (tables, and JSON lines to the --json file; `bench encode` prints JSON lines).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Encode a corpus (BEIR corpus.jsonl) into a retrieval index: dense, sparse, ColBERT, BM25.
    Index(index::IndexArgs),
    /// Search an index: dense, sparse, hybrid (dense+sparse), colbert re-rank, all, bm25.
    Search(search::SearchArgs),
    /// Evaluate retrieval modes on a BEIR directory (nDCG@10, Recall@100, MRR@10, MAP).
    Eval(eval::EvalArgs),
    /// Train and evaluate a small model on the bundled demo set, end to end (CPU, no download).
    Quickstart(quickstart::QuickstartArgs),
}

/// `retrom3 --version`: the crate version and the CUDA kernel build (`-V` prints the first line).
fn long_version() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{}\n{}",
            env!("CARGO_PKG_VERSION"),
            retrom3::device::kernel_build()
        )
    })
}

/// Run a parsed command line.
/// A resumed checkpoint whose copy of the metrics log is damaged: the rows up to its step are
/// restored from `--output`'s own log only if that is the run's, else the log restarts after
/// the checkpoint. Said, not silent.
fn warn_damaged_log_copy(dir: &std::path::Path, state: &retrom3::train::TrainState) {
    if state.log_copy_damaged() {
        eprintln!(
            "warning: {}: not the log trainer_state.json recorded (damaged?): rows 1-{} come \
             from --output's metrics.jsonl if it is this run's, else the log starts after them",
            dir.join("metrics.jsonl").display(),
            state.step
        );
    }
}

pub fn run(cli: Cli) -> Result<()> {
    // The environment's switches are checked before any work, whatever the command and device
    // (the attention backward reads this one only where it has a choice to make).
    retrom3::device::kernels::tc_backward()?;
    match cli.command {
        Command::Encode(a) => encode::encode(a),
        Command::Score(a) => encode::score(a),
        Command::Convert(a) => convert::convert(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Tokenize(a) => tokenize::tokenize(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Mine(a) => mine::run(a),
        Command::Selftest(a) => selftest::run(a),
        Command::Bench(c) => bench::run(c),
        Command::Index(a) => index::run(a),
        Command::Search(a) => search::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Quickstart(a) => quickstart::run(a),
    }
}
