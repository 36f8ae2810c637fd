//! `retrom3 pretrain`: RetroMAE pre-training (SPEC §6) from a model directory or a fresh config.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use retrom3::data::corpus::TokenCorpus;
use retrom3::data::masking::{MaskingConfig, MaskingVocab};
use retrom3::data::TextTokenizer;
use retrom3::model::encoder::Encoder;
use retrom3::model::retromae::RetroMae;
use retrom3::train::optim::{adamw_hyper, AdamW};
use retrom3::train::retromae::{pretrain_on, DocSource, PretrainConfig};
use retrom3::train::{clip_option as clip, TrainState};
use retrom3::{Device, EncoderConfig, Error, Result};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// Start from this model directory (encoder weights; LM head/decoder if present).
    #[arg(long, conflicts_with = "config")]
    pub model: Option<PathBuf>,
    /// Start from fresh weights with this config.json.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory with tokenizer.json.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Corpus: a .r3tok file from `retrom3 tokenize`, or JSONL {"text": ...} / plain text lines.
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory: metrics.jsonl/.svg, checkpoint-<step>/, and the final model files.
    #[arg(long)]
    pub output: PathBuf,
    /// cpu, cuda[:N], or emu (the CUDA kernels run on CPU threads: an `emu` build, for checks).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    #[arg(long)]
    pub epochs: Option<u64>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per text, specials included.
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f32,
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Encoder mask ratio.
    #[arg(long, default_value_t = 0.3, allow_negative_numbers = true)]
    pub enc_mask: f64,
    /// Decoder mask ratio.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub dec_mask: f64,
    /// Seed of every random draw (default 42; a resumed run keeps its own).
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Continue from a checkpoint directory written by this command.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Reproduce the reference code's masking (HF whole-word masking on the token strings: token
    /// level for XLM-R, "##" words for WordPiece; specials drawn, then dropped from the encoder
    /// mask and left maskable in the decoder's; 512 cap; materialised decoder masks).
    #[arg(long)]
    pub reference_compat: bool,
    /// Max gradient norm (0 disables clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
}

/// `--seed` when not given.
const DEFAULT_SEED: u64 = 42;

/// The corpus: a memory-mapped .r3tok file (checked against this tokenizer), or a text file
/// tokenized in memory (fine for small corpora).
fn load_docs(a: &PretrainArgs, tok: &TextTokenizer) -> Result<Box<dyn DocSource>> {
    if TokenCorpus::is_token_file(&a.data) {
        let corpus = TokenCorpus::open(&a.data)?;
        corpus.check_tokenizer(tok, &a.tokenizer)?;
        corpus.verify_tokens()?;
        // A corpus packed into longer blocks than this run takes would lose every block's tail
        // (an unpacked one only loses the tails of its longer texts, as a text file does).
        if corpus.is_packed() && corpus.max_len() > a.max_len {
            return Err(Error::format(
                &a.data,
                format!(
                    "packed with --max-len {} (blocks of {} tokens); --max-len {} would cut \
                     every block: pass --max-len {} or re-run `retrom3 tokenize --pack \
                     --max-len {}`",
                    corpus.max_len(),
                    corpus.max_len().saturating_sub(2),
                    a.max_len,
                    corpus.max_len(),
                    a.max_len
                ),
            ));
        }
        return Ok(Box::new(corpus));
    }
    Ok(Box::new(load_text_docs(a, tok)?))
}

fn load_text_docs(a: &PretrainArgs, tok: &TextTokenizer) -> Result<Vec<Vec<u32>>> {
    let texts = retrom3::data::read_texts(&a.data)?;
    let refs: Vec<&str> = texts
        .iter()
        .filter(|t| !t.trim().is_empty())
        .map(String::as_str)
        .collect();
    // The content ids only, as `retrom3 tokenize` stores them (the trainer adds the specials):
    // whatever the tokenizer's post-processor adds, or fails to add, around a text.
    let ids = tok.content_prefix_batch(&refs, a.max_len.saturating_sub(2))?;
    Ok(ids.into_iter().filter(|d| !d.is_empty()).collect())
}

/// The run's settings from the flags (`seed`: the resumed run's).
fn pretrain_config(a: &PretrainArgs, seed: u64) -> PretrainConfig {
    PretrainConfig {
        steps: a.steps,
        epochs: a.epochs,
        batch_size: a.batch_size,
        max_len: a.max_len,
        lr: a.lr,
        warmup_ratio: a.warmup_ratio,
        weight_decay: a.weight_decay,
        grad_accum: a.grad_accum,
        masking: MaskingConfig {
            p_enc: a.enc_mask,
            p_dec: a.dec_mask,
            reference_compat: a.reference_compat,
        },
        seed,
        save_every: a.save_every,
        max_grad_norm: clip(a.max_grad_norm),
        dropout: true,
    }
}

pub fn run(a: PretrainArgs) -> Result<()> {
    a.device.ensure_available()?;
    for (name, p) in [("--enc-mask", a.enc_mask), ("--dec-mask", a.dec_mask)] {
        if !(p > 0.0 && p < 1.0) {
            return Err(Error::invalid(format!("{name} {p}: must be in (0, 1)")));
        }
    }
    if let Some(m) = &a.model {
        if let (Ok(o), Ok(m)) = (a.output.canonicalize(), m.canonicalize()) {
            if o == m {
                return Err(Error::invalid(format!(
                    "--output {}: the same directory as --model (the run would overwrite its \
                     base model); write to another directory",
                    a.output.display()
                )));
            }
        }
    }
    let seed = a.seed.unwrap_or(DEFAULT_SEED);
    let tok = TextTokenizer::from_dir(&a.tokenizer)?;
    let vocab = MaskingVocab::from_tokenizer(&tok)?;
    if let Some(r) = &a.resume {
        retrom3::train::check_resume_dir(r)?;
        match (&a.model, &a.config) {
            (Some(m), _) => retrom3::train::check_resume_model(r, &m.join("config.json"))?,
            (None, Some(c)) => retrom3::train::check_resume_model(r, c)?,
            (None, None) => {}
        }
    }
    let (mut model, resume) = match (&a.resume, &a.model, &a.config) {
        (Some(dir), _, _) => {
            let cfg = EncoderConfig::from_file(dir.join("config.json"))?;
            let (map, path) = retrom3::io::read_backbone(dir)?;
            let enc = Encoder::from_tensors(cfg, &map, &path)?;
            let heads = RetroMae::read_heads(dir, &enc.config)?;
            let mut model = RetroMae::new(enc, &heads, a.dec_mask as f32, seed)?;
            model.extra_tensors = retrom3::io::model_dir::passthrough_tensors(&map);
            let state = TrainState::load(dir)?;
            super::warn_damaged_log_copy(dir, &state);
            let mut opt = AdamW::new(
                model.params.specs(),
                adamw_hyper(a.lr, a.weight_decay),
                clip(a.max_grad_norm),
            );
            opt.load_dir(dir, model.params.specs(), state.step)?;
            (model, Some((state, opt)))
        }
        (None, Some(dir), _) => {
            let cfg = EncoderConfig::from_file(dir.join("config.json"))?;
            let (map, path) = retrom3::io::read_backbone(dir)?;
            let enc = Encoder::from_tensors(cfg, &map, &path)?;
            // A previous pretrain run's output keeps its LM head and decoder beside the
            // encoder: continue from them (a Hugging Face model's own LM head, if any, is in
            // `map`; otherwise they start fresh).
            let saved;
            let heads = if dir.join("retromae_heads.safetensors").is_file() {
                saved = RetroMae::read_heads(dir, &enc.config)?;
                &saved
            } else {
                &map
            };
            let mut model = RetroMae::new(enc, heads, a.dec_mask as f32, seed)?;
            model.extra_tensors = retrom3::io::model_dir::passthrough_tensors(&map);
            (model, None)
        }
        (None, None, Some(cfg)) => {
            let cfg = EncoderConfig::from_file(cfg)?;
            let enc = Encoder::init_random(cfg, seed)?;
            (
                RetroMae::new(enc, &Default::default(), a.dec_mask as f32, seed)?,
                None,
            )
        }
        (None, None, None) => {
            return Err(Error::invalid(
                "give --model DIR, --config config.json or --resume DIR",
            ))
        }
    };
    if vocab.vocab_size > model.config.vocab_size {
        return Err(Error::Config {
            field: "vocab_size".into(),
            msg: format!(
                "tokenizer has {} tokens, the model's embedding table {}",
                vocab.vocab_size, model.config.vocab_size
            ),
        });
    }
    if !(3..=model.config.max_tokens()).contains(&a.max_len) {
        return Err(Error::invalid(format!(
            "--max-len {}: must be in 3..={} (specials included; the model's positions)",
            a.max_len,
            model.config.max_tokens()
        )));
    }
    if let Some((state, _)) = &resume {
        if let Some(s) = a.seed.filter(|&s| s != state.seed) {
            return Err(Error::invalid(format!(
                "--seed {s} differs from the resumed run's {} (a resumed run keeps its seed: \
                 drop --seed)",
                state.seed
            )));
        }
    }
    let docs = load_docs(&a, &tok)?;
    if docs.is_empty() {
        return Err(Error::format(
            &a.data,
            "no document with a content token (empty corpus, or every text empty)",
        ));
    }
    if docs.len() < a.batch_size {
        return Err(Error::format(
            &a.data,
            format!(
                "{} documents are fewer than one batch of {} (--batch-size)",
                docs.len(),
                a.batch_size
            ),
        ));
    }
    let cfg = pretrain_config(&a, resume.as_ref().map_or(seed, |(s, _)| s.seed));
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("pretrain [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let report = pretrain_on(
        a.device,
        &mut model,
        docs.as_ref(),
        &vocab,
        &cfg,
        &a.tokenizer,
        &a.output,
        resume,
        &mut |step, total, le, ld, tps| {
            pb.set_length(total);
            pb.set_position(step);
            pb.set_message(format!("enc {le:.4} dec {ld:.4} {tps:.0} tok/s"));
        },
    )?;
    pb.finish_and_clear();
    let unmasked = report.losses.iter().filter(|l| l.1 == 0.0).count();
    if unmasked > 0 {
        eprintln!(
            "warning: {unmasked} of {} steps had no encoder-masked token (enc loss 0): the texts \
             are too short for whole-word masking at --enc-mask {} (a word longer than \
             round(L * p) tokens is never masked); pack short texts with `retrom3 tokenize \
             --pack` or raise --enc-mask",
            report.losses.len(),
            a.enc_mask
        );
    }
    match report.losses.last() {
        Some(&(step, le, ld)) => eprintln!(
            "step {step}: enc loss {le:.4}, dec loss {ld:.4}; model written to {}",
            a.output.display()
        ),
        None => eprintln!(
            "nothing to train: the checkpoint is at the run's last step ({}); model written to {}",
            report.steps,
            a.output.display()
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        a: PretrainArgs,
    }

    /// The library's `PretrainConfig::default()` is what the command runs with no flags (a
    /// drift fails here).
    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let base = ["x", "--tokenizer", "t", "--data", "d", "--output", "o"];
        let w = Wrap::try_parse_from(base).unwrap();
        assert_eq!(
            pretrain_config(&w.a, w.a.seed.unwrap_or(DEFAULT_SEED)),
            PretrainConfig::default()
        );
        let w = Wrap::try_parse_from(base.iter().copied().chain([
            "--enc-mask",
            "0.15",
            "--reference-compat",
            "--max-grad-norm",
            "0",
        ]))
        .unwrap();
        let c = pretrain_config(&w.a, 9);
        assert_eq!(c.masking.p_enc, 0.15);
        assert!(c.masking.reference_compat);
        assert_eq!((c.max_grad_norm, c.seed), (None, 9));
    }
}
