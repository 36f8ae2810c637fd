//! `retrom3 bench encode`: encode throughput of a model directory on synthetic texts, printed as
//! one JSON line (what tools/compare_torch_encode.py reads to compare with PyTorch in one run).

use clap::{Args, Subcommand};
use retrom3::device::launch::KDType;
use retrom3::engine::{self, bench};
use retrom3::{Device, EncodeOptions, EncoderConfig, Error, M3Model, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Encode throughput (dense + sparse + ColBERT) of a model directory.
    Encode(BenchEncodeArgs),
    /// Kernel microbenchmarks on a device: attention (D = 64, S = 512..8192), GEMM, LayerNorm,
    /// cross-entropy, AdamW, against the card's peak and the measured copy bandwidth.
    Kernels(BenchKernelsArgs),
    /// Encoder throughput (inference and training forward + backward), one M3 training step and
    /// one RetroMAE training step of a random model on a device; defaults to bge-m3's size (24
    /// layers, hidden 1024, 16 heads, vocab 250002) at S = 512.
    Model(BenchModelArgs),
    /// Largest M3 training batch per device with and without sub-batching, per sequence length
    /// (the paper's Table 10): a random bge-m3-sized encoder with its gradients and AdamW state
    /// resident, B queries + B passages of S tokens, doubling then bisecting until out of memory.
    MaxBatch(BenchMaxBatchArgs),
}

/// The device and the size of the random encoder `bench model` / `bench max-batch` build
/// (bge-m3's by default: 24 layers, hidden 1024, 16 heads, vocab 250002, FFN 4 x hidden).
#[derive(Args, Debug)]
pub struct RandomModelArgs {
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    #[arg(long, default_value_t = 24)]
    pub layers: usize,
    #[arg(long, default_value_t = 1024)]
    pub hidden: usize,
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    #[arg(long, default_value_t = 250_002)]
    pub vocab: usize,
}

impl RandomModelArgs {
    /// The XLM-R config of this size with room for `max_tokens` tokens per text (checked before
    /// the device opens: a bad size costs no model upload).
    fn config(&self, max_tokens: usize) -> Result<EncoderConfig> {
        if self.vocab < bench::MIN_VOCAB {
            return Err(Error::invalid(format!(
                "--vocab {}: at least {} (ids 0-4 are special tokens; the synthetic texts draw \
                 from 5..vocab)",
                self.vocab,
                bench::MIN_VOCAB
            )));
        }
        let too_large = |what: String| Error::invalid(format!("{what}: too large"));
        let ffn = (self.hidden.checked_mul(4))
            .ok_or_else(|| too_large(format!("--hidden {}", self.hidden)))?;
        let positions = (max_tokens.checked_add(2))
            .ok_or_else(|| too_large(format!("{max_tokens} tokens per text")))?;
        EncoderConfig::new_xlmr(
            self.vocab,
            self.hidden,
            self.layers,
            self.heads,
            ffn,
            positions,
        )
    }
}

#[derive(Args, Debug)]
pub struct BenchMaxBatchArgs {
    #[command(flatten)]
    pub model: RandomModelArgs,
    /// Sequence lengths (tokens per text).
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,8192")]
    pub seq_lens: Vec<usize>,
    /// Sub-batch sizes to compare (0 = the whole batch in one encoder call).
    #[arg(long, value_delimiter = ',', default_value = "0,8")]
    pub sub_batch: Vec<usize>,
    /// Largest B tried.
    #[arg(long, default_value_t = 1024)]
    pub cap: usize,
    /// Seconds per (length, sub-batch) cell before the search stops with a lower bound.
    #[arg(long, default_value_t = 60.0)]
    pub budget_s: f64,
    /// Storage type: bf16 (default) or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchKernelsArgs {
    /// cuda, cuda:N or emu (the emulator only with --quick: it checks the code path, not speed).
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    /// Tiny shapes (CI smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Timed launches per op.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Only the attention rows (for a profiler run).
    #[arg(long)]
    pub attention_only: bool,
    /// Attention sequence lengths, comma-separated (each must divide the batch's 16,384 tokens,
    /// 256 with --quick; default 512,1024,2048,4096,8192).
    #[arg(long, value_delimiter = ',')]
    pub seq_lens: Option<Vec<usize>>,
    /// Also write one JSON object per op to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchModelArgs {
    #[command(flatten)]
    pub model: RandomModelArgs,
    /// Tokens per text.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Storage type: bf16 (default) or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Only these rows, comma-separated: encode, train, m3, retromae (default: all; e.g. one
    /// row under a profiler).
    #[arg(long, value_delimiter = ',')]
    pub rows: Vec<bench::ModelRow>,
    #[arg(long)]
    pub json: Option<PathBuf>,
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
        BenchCommand::Kernels(a) => kernels(a),
        BenchCommand::Model(a) => model(a),
        BenchCommand::MaxBatch(a) => max_batch(a),
    }
}

fn print_header() -> Result<()> {
    outln!(
        "{:<58} {:>12} {:>10} {:>10} {:>8} {:>12}",
        "op",
        "s/iter",
        "TFLOP/s",
        "GB/s",
        "of peak",
        "tokens/s"
    );
    Ok(())
}

/// One table row, flushed at once (a run stopped by a time limit keeps what it printed).
fn print_row(r: &bench::BenchRow) -> Result<()> {
    let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    outln!(
        "{:<58} {:>12.4e} {:>10} {:>10} {:>8} {:>12}",
        r.name,
        r.seconds_per_iter,
        opt(r.tflops, 1),
        opt(r.gbps, 0),
        r.of_peak
            .map_or("-".to_string(), |x| format!("{:.0}%", 100.0 * x)),
        opt(r.tokens_per_s, 0)
    );
    std::io::Write::flush(&mut std::io::stdout()).map_err(|e| retrom3::Error::io("<stdout>", e))
}

fn report(rows: &[bench::BenchRow], json: Option<&PathBuf>) -> Result<()> {
    // The JSON first: a closed stdout does not lose it.
    write_json(rows, json)?;
    print_header()?;
    rows.iter().try_for_each(print_row)
}

fn write_json(rows: &[bench::BenchRow], json: Option<&PathBuf>) -> Result<()> {
    if let Some(path) = json {
        let text: String = rows.iter().map(|r| format!("{}\n", r.to_json())).collect();
        retrom3::io::write_atomic(path, |w| std::io::Write::write_all(w, text.as_bytes()))?;
    }
    Ok(())
}

/// `flag value` must be at least 1.
fn positive(flag: &str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(Error::invalid(format!("{flag} 0: must be at least 1")));
    }
    Ok(())
}

/// A --json path, checked before the run (a run of minutes must not end on a missing directory).
fn check_json(json: Option<&PathBuf>) -> Result<()> {
    json.map_or(Ok(()), |p| super::output::check_output_path("--json", p))
}

fn kernels(a: BenchKernelsArgs) -> Result<()> {
    if a.device == Device::Emu && !a.quick {
        return Err(Error::invalid(
            "--device emu runs only with --quick (the emulator checks the code path, not speed; \
             the full-size shapes take hours there)",
        ));
    }
    positive("--iters", a.iters)?;
    if let Some(seqs) = &a.seq_lens {
        bench::check_attention_seq_lens(seqs, a.quick)?;
    }
    check_json(a.json.as_ref())?;
    let dev = engine::open(a.device)?;
    let card = dev.name();
    outln!("device: {card}");
    let cfg = bench::KernelBenchCfg {
        quick: a.quick,
        iters: a.iters,
        card: Some(card),
        attention_only: a.attention_only,
        seq_lens: a.seq_lens,
    };
    print_header()?;
    // A closed stdout stops the printing, not the run: the rows still reach --json.
    let mut printed = Ok(());
    let rows = bench::kernels_streaming(&*dev, &cfg, &mut |r| {
        if printed.is_ok() {
            printed = print_row(r);
        }
    })?;
    write_json(&rows, a.json.as_ref())?;
    printed
}

fn dtype(s: &str) -> Result<KDType> {
    match s {
        "bf16" => Ok(KDType::BF16),
        "f32" => Ok(KDType::F32),
        other => Err(retrom3::Error::invalid(format!(
            "--dtype {other}: expected bf16 or f32"
        ))),
    }
}

fn max_batch(a: BenchMaxBatchArgs) -> Result<()> {
    let dt = dtype(&a.dtype)?;
    if let Some(s) = a.seq_lens.iter().find(|&&s| s < 3) {
        return Err(Error::invalid(format!(
            "--seq-lens: {s} tokens; give lengths of at least 3 tokens"
        )));
    }
    positive("--cap", a.cap)?;
    if !(a.budget_s.is_finite() && a.budget_s > 0.0) {
        return Err(Error::invalid(format!(
            "--budget-s {}: must be a positive number of seconds",
            a.budget_s
        )));
    }
    check_json(a.json.as_ref())?;
    let longest = a.seq_lens.iter().copied().max().unwrap_or(0);
    let cfg = a.model.config(longest)?;
    let dev = engine::open(a.model.device)?;
    outln!("device: {}", dev.name());
    let rows = bench::max_batch_logged(
        &*dev,
        cfg,
        &a.seq_lens,
        &a.sub_batch,
        a.cap,
        a.budget_s,
        dt,
        &mut |l| eprintln!("  {l}"),
    )?;
    outln!(
        "{:>8} {:>10} {:>10} {:>7} {:>8}",
        "seq_len",
        "sub_batch",
        "max_batch",
        "probes",
        "seconds"
    );
    let mut json = String::new();
    for r in &rows {
        let b = format!("{}{}", if r.lower_bound { ">=" } else { "" }, r.max_batch);
        outln!(
            "{:>8} {:>10} {:>10} {:>7} {:>8.1}",
            r.seq_len,
            r.sub_batch,
            b,
            r.probes,
            r.seconds
        );
        json.push_str(&r.to_json().to_string());
        json.push('\n');
    }
    if let Some(p) = &a.json {
        retrom3::io::write_atomic(p, |w| std::io::Write::write_all(w, json.as_bytes()))?;
    }
    Ok(())
}

fn model(a: BenchModelArgs) -> Result<()> {
    let dt = dtype(&a.dtype)?;
    positive("--batch", a.batch)?;
    positive("--iters", a.iters)?;
    if a.seq < 3 {
        return Err(Error::invalid(format!(
            "--seq {}: at least 3 tokens (the RetroMAE row's decoder rebuilds the tokens between \
             the first and the last)",
            a.seq
        )));
    }
    check_json(a.json.as_ref())?;
    let cfg = a.model.config(a.seq)?;
    let dev = engine::open(a.model.device)?;
    outln!("device: {}", dev.name());
    let rows = bench::model(&*dev, cfg, a.batch, a.seq, a.iters, dt, &a.rows)?;
    report(&rows, a.json.as_ref())
}

fn encode(a: BenchEncodeArgs) -> Result<()> {
    let model = M3Model::load(&a.model, a.device)?;
    // Before the synthetic texts are built (a huge --max-length or --texts would overflow or
    // exhaust memory there).
    let max = model.encoder.config.max_tokens();
    if !(2..=max).contains(&a.max_length) {
        return Err(Error::invalid(format!(
            "--max-length {}: must be in 2..={max} (the model's positions)",
            a.max_length
        )));
    }
    if !(1..=1 << 20).contains(&a.texts) {
        return Err(Error::invalid(format!(
            "--texts {}: must be in 1..={}",
            a.texts,
            1 << 20
        )));
    }
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
    outln!(
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
