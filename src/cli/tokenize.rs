//! `retrom3 tokenize`: pre-tokenize a text corpus (JSONL `{"text": ...}` or plain lines) into a
//! memory-mapped `.r3tok` file for RetroMAE pre-training. Resumable: rerunning the same command
//! after an interruption continues from the last checkpoint.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use retrom3::data::corpus::{tokenize_corpus, TokenizeOptions};
use retrom3::data::TextTokenizer;
use retrom3::Result;
use std::path::PathBuf;

/// clap value parser of `--batch`: 1..=65536 texts (more only costs memory).
fn batch_size(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=65536).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n}: must be in 1..=65536")),
        Err(e) => Err(format!("{e} (expected an integer in 1..=65536)")),
    }
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Tokenizer directory (holding tokenizer.json).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Input corpus: JSONL lines {"text": ...} or plain text, one text per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Output .r3tok file (built as <output>.partial, renamed when complete).
    #[arg(long)]
    pub output: PathBuf,
    /// Sequence length including <s> and </s>: a document keeps at most max-len - 2 tokens.
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Concatenate consecutive texts into blocks of max-len - 2 tokens (long texts continue in
    /// the next block) instead of one truncated document per text.
    #[arg(long)]
    pub pack: bool,
    /// Texts per tokenizer batch (1..=65536).
    #[arg(long, default_value_t = 1024, value_parser = batch_size)]
    pub batch: usize,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = TextTokenizer::from_dir(&a.tokenizer)?;
    let opts = TokenizeOptions {
        max_len: a.max_len,
        pack: a.pack,
        batch: a.batch,
        ..TokenizeOptions::default()
    };
    let total = std::fs::metadata(&a.input)
        .map_err(|e| retrom3::Error::io(&a.input, e))?
        .len();
    // Drawn on stderr only when it is a terminal (indicatif's default target).
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "tokenize [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    let result = tokenize_corpus(&tok, &a.input, &a.output, &opts, &mut |bytes| {
        pb.set_position(bytes)
    });
    pb.finish_and_clear();
    let s = result?;
    let shape = if a.pack {
        format!("packed in blocks of {} tokens", a.max_len - 2)
    } else {
        format!(
            "{} texts truncated to {} tokens, {} tokens dropped",
            s.truncated,
            a.max_len - 2,
            s.dropped_tokens
        )
    };
    let resumed = match s.resumed_at {
        Some(at) => format!("; resumed at input byte {at}"),
        None => String::new(),
    };
    eprintln!(
        "wrote {}: {} docs, {} tokens; {} lines, {} texts, {} empty skipped; {shape}{resumed}",
        a.output.display(),
        s.docs,
        s.tokens,
        s.lines,
        s.texts,
        s.skipped_empty,
    );
    if s.docs == 0 {
        eprintln!("retrom3: warning: {} holds no document", a.output.display());
    }
    Ok(())
}
