//! `retrom3 quickstart`: the whole pipeline on the bundled demo set (data/demo, Apache HTTP
//! Server manual, see data/demo/README.md), on CPU, with no download:
//!
//! 1. train a small SentencePiece-style Unigram tokenizer (tokenizers crate, in process) on the
//!    pre-training text and the corpus;
//! 2. create a small XLM-R config and random weights (the "untrained" model);
//! 3. RetroMAE pre-training on `pretrain.txt`;
//! 4. M3 unified fine-tuning with self-distillation on `train.jsonl`;
//! 5. index the corpus and evaluate the test split in every mode, for the untrained and the
//!    fine-tuned model, plus BM25 over the same tokenizer;
//! 6. write results.json, both loss curves (SVG) and summary.md into the output directory.
//!
//! Sizes are chosen so that the full run takes a few minutes on 2 cores (release build);
//! [`QuickstartSize::Small`] is the CI size (seconds).

use crate::data::m3_data::read_train_file;
use crate::data::masking::{MaskingConfig, MaskingVocab};
use crate::data::TextTokenizer;
use crate::error::{Error, Result};
use crate::model::encoder::Encoder;
use crate::model::m3_train::{fresh_heads, KdLoss, M3LossConfig, M3Student};
use crate::model::retromae::RetroMae;
use crate::retrieval::beir::{self, BeirData};
use crate::retrieval::hybrid::encode_queries_for;
use crate::retrieval::metrics::{evaluate, Run, Summary};
use crate::retrieval::{Index, IndexParts, Mode, SearchOptions};
use crate::train::m3::{finetune_on, FinetuneConfig, M3TrainData};
use crate::train::retromae::{pretrain_on, PretrainConfig};
use crate::{Device, EncoderConfig, M3Model};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How big a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuickstartSize {
    /// The README's run: a few minutes on 2 CPU cores.
    Full,
    /// CI: tiny model, few steps, a corpus subset (seconds, also in a debug build).
    Small,
    /// `--device cuda`: larger model and more steps.
    Large,
}

/// Every size-dependent setting of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QuickstartSettings {
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    /// Tokens per text, specials included (the model's position table is sized to it).
    pub max_len: usize,
    pub query_max_len: usize,
    pub pretrain_steps: u64,
    pub pretrain_batch: usize,
    pub pretrain_lr: f32,
    pub finetune_steps: u64,
    pub finetune_batch: usize,
    pub group_size: usize,
    pub finetune_lr: f32,
    pub temperature: f32,
    /// Lines of pretrain.txt used (0: all).
    pub pretrain_lines: usize,
    /// Training examples used (0: all).
    pub train_examples: usize,
    /// Corpus documents indexed (0: all); the judged test documents are always kept.
    pub corpus_docs: usize,
    /// Test queries evaluated (0: all).
    pub test_queries: usize,
    pub seed: u64,
}

impl QuickstartSettings {
    /// The settings of a size.
    pub fn of(size: QuickstartSize) -> QuickstartSettings {
        let full = QuickstartSettings {
            vocab_size: 4000,
            hidden: 64,
            layers: 2,
            heads: 4,
            intermediate: 256,
            max_len: 128,
            query_max_len: 48,
            pretrain_steps: 400,
            pretrain_batch: 16,
            pretrain_lr: 1e-3,
            finetune_steps: 600,
            finetune_batch: 8,
            group_size: 4,
            finetune_lr: 1e-3,
            temperature: 0.05,
            pretrain_lines: 0,
            train_examples: 0,
            corpus_docs: 0,
            test_queries: 0,
            seed: 42,
        };
        match size {
            QuickstartSize::Full => full,
            QuickstartSize::Small => QuickstartSettings {
                vocab_size: 1000,
                hidden: 32,
                layers: 1,
                heads: 2,
                intermediate: 64,
                max_len: 64,
                query_max_len: 32,
                pretrain_steps: 40,
                pretrain_batch: 8,
                finetune_steps: 400,
                finetune_batch: 8,
                pretrain_lines: 400,
                corpus_docs: 300,
                test_queries: 100,
                ..full
            },
            QuickstartSize::Large => QuickstartSettings {
                vocab_size: 8000,
                hidden: 256,
                layers: 4,
                heads: 4,
                intermediate: 1024,
                max_len: 256,
                pretrain_steps: 1000,
                pretrain_batch: 32,
                pretrain_lr: 5e-4,
                finetune_steps: 1500,
                finetune_batch: 16,
                group_size: 8,
                finetune_lr: 1e-4,
                ..full
            },
        }
    }
}

/// One model's results: mode → metrics.
pub type ModeResults = Vec<(Mode, Summary)>;

/// What a run produced.
#[derive(Debug)]
pub struct QuickstartReport {
    pub untrained: ModeResults,
    pub finetuned: ModeResults,
    pub bm25: Summary,
    pub seconds: f64,
    pub output: PathBuf,
}

impl QuickstartReport {
    /// nDCG@10 of a mode for the fine-tuned (true) or the untrained model.
    pub fn ndcg(&self, finetuned: bool, mode: Mode) -> Option<f64> {
        let r = if finetuned {
            &self.finetuned
        } else {
            &self.untrained
        };
        r.iter()
            .find(|(m, _)| *m == mode)
            .map(|(_, s)| s.mean.ndcg_10)
    }
}

/// The neural modes of the table (BM25 is reported once).
pub const MODEL_MODES: [Mode; 5] = [
    Mode::Dense,
    Mode::Sparse,
    Mode::Colbert,
    Mode::DenseSparse,
    Mode::All,
];

/// The demo data directory: `data/demo` under the working directory, else under the crate root.
pub fn default_data_dir() -> PathBuf {
    let here = PathBuf::from("data/demo");
    if here.join("corpus.jsonl").is_file() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo")
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    crate::io::write_atomic(path, |w| std::io::Write::write_all(w, text.as_bytes()))
}

/// Train an XLM-R-style tokenizer (NFKC, Metaspace "▁", Unigram LM; `<s>`=0, `<pad>`=1,
/// `</s>`=2, `<unk>`=3, `<mask>` last; `<s> A </s>` template) on `texts` and write
/// `dir/tokenizer.json`. The crate is built without `esaxx_fast`, so the Unigram trainer uses its
/// pure-Rust suffix array.
///
/// Reproducible: the same texts give the same file, byte for byte. The crate's own
/// `Tokenizer::train` is not (SPEC 11.9): it counts words in a randomly seeded hash map, runs the
/// EM steps on its thread pool (float sums in a varying order) and gives the characters it adds
/// at the end their ids and scores in hash order. Here the words are counted in sorted order,
/// the trainer runs in a pool of one thread (the same sums on any machine), and the vocabulary
/// is put in a canonical order afterwards (`canonical_unigram`).
pub fn train_tokenizer(texts: &[String], vocab_size: usize, dir: &Path) -> Result<()> {
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::models::unigram::{Unigram, UnigramTrainer};
    use tokenizers::models::ModelWrapper;
    use tokenizers::normalizers::{unicode::NFKC, NormalizerWrapper};
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::processors::PostProcessorWrapper;
    use tokenizers::{
        AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType,
        PreTokenizedString, PreTokenizer, TokenizerImpl,
    };
    let terr = |e: tokenizers::Error| Error::invalid(format!("tokenizer training: {e}"));
    let specials: Vec<AddedToken> = ["<s>", "<pad>", "</s>", "<unk>"]
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let trainer = UnigramTrainer::builder()
        .vocab_size(vocab_size as u32 - 1) // + <mask>
        .special_tokens(specials.clone())
        .unk_token(Some("<unk>".into()))
        .show_progress(false)
        .build()
        .map_err(|e| Error::invalid(format!("tokenizer trainer: {e}")))?;
    let meta = Metaspace::new('\u{2581}', PrependScheme::Always, true);
    let post = TemplateProcessing::builder()
        .try_single("<s> $A </s>")
        .and_then(|b| b.try_pair("<s> $A </s> </s> $B </s>"))
        .map_err(|e| Error::invalid(format!("tokenizer template: {e}")))?
        .special_tokens(vec![("<s>", 0), ("</s>", 2)])
        .build()
        .map_err(|e| Error::invalid(format!("tokenizer template: {e}")))?;

    // The words, as `Tokenizer::train` feeds them (normalised, then pre-tokenized; no added
    // tokens exist yet), counted in sorted order.
    let mut counts: std::collections::BTreeMap<String, u32> = Default::default();
    for text in texts {
        let mut normalized = NormalizedString::from(text.as_str());
        NFKC.normalize(&mut normalized).map_err(terr)?;
        let mut pre = PreTokenizedString::from(normalized);
        meta.pre_tokenize(&mut pre).map_err(terr)?;
        for (word, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            let n = counts.entry(word.to_owned()).or_insert(0);
            *n = n.saturating_add(1);
        }
    }
    let sentences: Vec<(String, u32)> = counts.into_iter().collect();
    let mut model = Unigram::default();
    // In a pool of one thread: the trainer cuts the words into `current_num_threads()` chunks
    // and sums their EM statistics chunk by chunk, so the sums' grouping (the last bits of the
    // scores) would follow the machine's core count, and on a pool of several threads, work
    // stealing. One chunk, summed in one order, on every machine.
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| Error::invalid(format!("tokenizer training: a thread pool: {e}")))?;
    one.install(|| trainer.do_train(sentences, &mut model))
        .map_err(terr)?;
    let model = canonical_unigram(&model, specials.len())?;

    let mut tok: TokenizerImpl<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(ModelWrapper::Unigram(model));
    tok.with_normalizer(Some(NormalizerWrapper::NFKC(NFKC)))
        .map_err(terr)?;
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(meta.clone())));
    tok.with_post_processor(Some(PostProcessorWrapper::Template(post)));
    tok.with_decoder(Some(DecoderWrapper::Metaspace(meta)));
    tok.add_special_tokens(specials).map_err(terr)?;
    tok.add_special_tokens([AddedToken::from("<mask>".to_string(), true)])
        .map_err(terr)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = tok.to_string(true).map_err(terr)?;
    write_text(&dir.join("tokenizer.json"), &json)
}

/// `model` (as the Unigram trainer leaves it: `n_special` special tokens first, then the pieces
/// by descending score) with its pieces in a canonical order. The trainer adds the characters
/// that its EM model lacks in hash-set order, with the scores `min + 0`, `min + 1e-4`,
/// `min + 2e-4`, ... in that order, and sorts by score with a stable sort (equal scores stay
/// in hash order). Here those characters get the same scores in character order, and equal
/// scores are ordered by piece, so the ids follow from the pieces and their scores alone.
fn canonical_unigram(
    model: &tokenizers::models::unigram::Unigram,
    n_special: usize,
) -> Result<tokenizers::models::unigram::Unigram> {
    let vocab: Vec<(String, f64)> = model.iter().cloned().collect();
    let (specials, pieces) = vocab.split_at(n_special.min(vocab.len()));
    let mut pieces = pieces.to_vec();
    let min = pieces.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    // The trainer's series: its penalty is summed in f64 steps of 1e-4 from 0.
    let single = |p: &(String, f64)| p.0.chars().count() == 1;
    let n_single = pieces.iter().filter(|p| single(p)).count();
    let mut series = std::collections::HashSet::with_capacity(n_single);
    let mut penalty = 0.0f64;
    for _ in 0..n_single {
        series.insert((min + penalty).to_bits());
        penalty += 0.0001;
    }
    let added: Vec<usize> = (0..pieces.len())
        .filter(|&i| single(&pieces[i]) && series.contains(&pieces[i].1.to_bits()))
        .collect();
    let mut scores: Vec<f64> = added.iter().map(|&i| pieces[i].1).collect();
    scores.sort_by(f64::total_cmp);
    let mut chars: Vec<String> = added.iter().map(|&i| pieces[i].0.clone()).collect();
    chars.sort();
    for (&i, (c, s)) in added.iter().zip(chars.into_iter().zip(scores)) {
        pieces[i] = (c, s);
    }
    pieces.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let unk = specials.iter().position(|p| p.0 == "<unk>");
    let all: Vec<(String, f64)> = specials.iter().cloned().chain(pieces).collect();
    tokenizers::models::unigram::Unigram::from(all, unk, model.byte_fallback())
        .map_err(|e| Error::invalid(format!("tokenizer training: {e}")))
}

/// Index `data.corpus` with `model` and evaluate `modes` on `data`'s queries.
pub fn evaluate_modes(model: &M3Model, data: &BeirData, modes: &[Mode]) -> Result<ModeResults> {
    let mut parts = IndexParts::default();
    for m in modes {
        let p = m.parts();
        parts.dense |= p.dense;
        parts.sparse |= p.sparse;
        parts.colbert |= p.colbert;
        parts.bm25 |= p.bm25;
    }
    let mut index = Index::build(model, &data.corpus, parts, &mut |_| {})?;
    if let Some(dev) = model.device_handle() {
        index.attach_device(dev)?;
    }
    let texts: Vec<&str> = data.queries.iter().map(|q| q.text.as_str()).collect();
    let reps = encode_queries_for(model, &texts, modes)?;
    let opts = SearchOptions {
        k: 100,
        ..SearchOptions::default()
    };
    let mut out = Vec::new();
    for &mode in modes {
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
        out.push((mode, evaluate(&data.qrels, &run).1));
    }
    Ok(out)
}

/// The test split, cut to the settings' corpus / query budget (judged documents always kept).
fn test_data(data_dir: &Path, s: &QuickstartSettings) -> Result<BeirData> {
    let mut data = beir::load(data_dir, "test")?;
    if s.test_queries > 0 && data.queries.len() > s.test_queries {
        data.queries.truncate(s.test_queries);
        let keep: std::collections::HashSet<&str> =
            data.queries.iter().map(|q| q.id.as_str()).collect();
        data.qrels.retain(|q, _| keep.contains(q.as_str()));
    }
    if s.corpus_docs > 0 && data.corpus.len() > s.corpus_docs {
        let judged: std::collections::HashSet<String> = data
            .qrels
            .values()
            .flat_map(|m| m.keys().cloned())
            .collect();
        let mut others = 0usize;
        let budget = s.corpus_docs.saturating_sub(judged.len());
        data.corpus.retain(|d| {
            judged.contains(&d.id) || {
                others += 1;
                others <= budget
            }
        });
    }
    Ok(data)
}

fn write_model_dir(
    dir: &Path,
    enc: &Encoder,
    heads: &crate::io::M3Heads,
    tok_dir: &Path,
) -> Result<()> {
    crate::io::write_backbone(dir, &enc.params.to_map())?;
    crate::io::write_heads(dir, heads)?;
    let cfg = serde_json::to_string_pretty(&enc.config.to_hf_json())
        .map_err(|e| Error::invalid(e.to_string()))?;
    write_text(&dir.join("config.json"), &cfg)?;
    crate::io::copy_tokenizer_files(tok_dir, dir)?;
    Ok(())
}

fn load_model(dir: &Path, device: Device, max_len: usize) -> Result<M3Model> {
    let mut m = M3Model::load(dir, device)?;
    m.max_length = max_len.min(m.encoder.config.max_tokens());
    Ok(m)
}

fn summary_json(r: &ModeResults) -> serde_json::Value {
    serde_json::Value::Object(
        r.iter()
            .map(|(m, s)| {
                (
                    m.name().to_string(),
                    serde_json::to_value(s).unwrap_or_default(),
                )
            })
            .collect(),
    )
}

/// The results table (one row per model × mode).
pub fn table(report: &QuickstartReport) -> String {
    let mut t = format!(
        "| {:<10} | {:<13} | {:>7} | {:>10} | {:>6} | {:>6} |\n|{}|{}|{}|{}|{}|{}|\n",
        "model",
        "mode",
        "nDCG@10",
        "Recall@100",
        "MRR@10",
        "MAP",
        "-".repeat(12),
        "-".repeat(15),
        "-".repeat(9),
        "-".repeat(12),
        "-".repeat(8),
        "-".repeat(8)
    );
    let mut row = |model: &str, mode: &str, s: &Summary| {
        t.push_str(&format!(
            "| {:<10} | {:<13} | {:>7.4} | {:>10.4} | {:>6.4} | {:>6.4} |\n",
            model, mode, s.mean.ndcg_10, s.mean.recall_100, s.mean.mrr_10, s.mean.map
        ));
    };
    row("-", "bm25", &report.bm25);
    for (m, s) in &report.untrained {
        row("untrained", m.name(), s);
    }
    for (m, s) in &report.finetuned {
        row("fine-tuned", m.name(), s);
    }
    t
}

/// Run the quickstart at one of the preset sizes; `log` receives one line per stage.
pub fn run(
    size: QuickstartSize,
    device: Device,
    data_dir: &Path,
    out: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<QuickstartReport> {
    run_with_settings(
        QuickstartSettings::of(size),
        size,
        device,
        data_dir,
        out,
        log,
    )
}

/// [`run`] with explicit settings (`size` only labels the report).
pub fn run_with_settings(
    s: QuickstartSettings,
    size: QuickstartSize,
    device: Device,
    data_dir: &Path,
    out: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<QuickstartReport> {
    device.ensure_available()?;
    let t_all = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut timings = serde_json::Map::new();
    let mut stage = |name: &str, t: Instant, log: &mut dyn FnMut(&str)| {
        let secs = t.elapsed().as_secs_f64();
        timings.insert(name.into(), json!(secs));
        log(&format!("{name}: {secs:.1} s"));
    };

    // 1. Tokenizer, trained on the pre-training text + the corpus (no query, no qrels).
    let t = Instant::now();
    let mut lines: Vec<String> = crate::data::read_texts(&data_dir.join("pretrain.txt"))?
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    if s.pretrain_lines > 0 {
        lines.truncate(s.pretrain_lines);
    }
    let corpus = beir::read_corpus(&data_dir.join("corpus.jsonl"))?;
    // The fine-tuning rows are read (and checked) now, not after pre-training.
    let mut examples = read_train_file(&data_dir.join("train.jsonl"))?;
    if s.train_examples > 0 {
        examples.truncate(s.train_examples);
    }
    // Too little data is the data directory's fault: named by file, before the trainers' checks.
    let too_few = |file: &str, have: usize, what: &str, batch: usize| -> Result<()> {
        if have < batch {
            return Err(Error::format(
                data_dir.join(file),
                format!("{have} {what}, fewer than one {batch}-row batch"),
            ));
        }
        Ok(())
    };
    too_few(
        "train.jsonl",
        examples.len(),
        "training examples",
        s.finetune_batch,
    )?;
    // So is the test split (queries, qrels, the evaluated corpus).
    let data = test_data(data_dir, &s)?;
    let mut tok_texts = lines.clone();
    let n_corpus = if s.corpus_docs > 0 {
        s.corpus_docs
    } else {
        corpus.len()
    };
    tok_texts.extend(corpus.iter().take(n_corpus).map(|d| d.text.clone()));
    let tok_dir = out.join("tokenizer");
    train_tokenizer(&tok_texts, s.vocab_size, &tok_dir)?;
    let tok = TextTokenizer::from_dir(&tok_dir)?;
    stage("tokenizer", t, log);

    // 2. Config and random init: the "untrained" model is exactly where training starts.
    let vocab = tok.vocab_size();
    let cfg = EncoderConfig::new_xlmr(
        vocab,
        s.hidden,
        s.layers,
        s.heads,
        s.intermediate,
        s.max_len + 2,
    )?;
    let enc0 = Encoder::init_random(cfg.clone(), s.seed)?;
    let heads0 = fresh_heads(s.hidden, s.seed)?;
    let untrained_dir = out.join("untrained");
    write_model_dir(&untrained_dir, &enc0, &heads0, &tok_dir)?;

    // 3. RetroMAE pre-training.
    let t = Instant::now();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let docs: Vec<Vec<u32>> = tok
        .encode_batch(&refs, s.max_len)?
        .into_iter()
        .map(|d| d[1..d.len().saturating_sub(1)].to_vec())
        .filter(|d| !d.is_empty())
        .collect();
    too_few(
        "pretrain.txt",
        docs.len(),
        "non-empty lines",
        s.pretrain_batch,
    )?;
    let mvocab = MaskingVocab::from_tokenizer(&tok)?;
    let mut mae = RetroMae::new(enc0.clone(), &Default::default(), 0.5, s.seed)?;
    let pcfg = PretrainConfig {
        steps: Some(s.pretrain_steps),
        epochs: None,
        batch_size: s.pretrain_batch,
        max_len: s.max_len,
        lr: s.pretrain_lr,
        warmup_ratio: 0.1,
        weight_decay: 0.01,
        grad_accum: 1,
        masking: MaskingConfig {
            p_enc: 0.3,
            p_dec: 0.5,
            reference_compat: false,
        },
        seed: s.seed,
        save_every: None,
        max_grad_norm: Some(1.0),
        dropout: true,
    };
    let pre_dir = out.join("pretrain");
    let _ = std::fs::remove_file(pre_dir.join("metrics.jsonl"));
    let pre = pretrain_on(
        device,
        &mut mae,
        &docs,
        &mvocab,
        &pcfg,
        &tok_dir,
        &pre_dir,
        None,
        &mut |step, total, le, ld, tps| {
            if step % (total / 10).max(1) == 0 || step == total {
                log(&format!(
                    "pretrain step {step}/{total}: enc {le:.3} dec {ld:.3}, {tps:.0} tokens/s"
                ));
            }
        },
    )?;
    stage("pretrain", t, log);

    // 4. M3 fine-tuning (unified + self-distillation) from the pre-trained encoder.
    let t = Instant::now();
    let mut student = M3Student::new(mae.encoder()?, &heads0)?;
    let fcfg = FinetuneConfig {
        steps: Some(s.finetune_steps),
        epochs: None,
        batch_size: s.finetune_batch,
        sub_batch: 0,
        group_size: s.group_size,
        query_max_len: s.query_max_len,
        passage_max_len: s.max_len,
        loss: M3LossConfig {
            temperature: s.temperature,
            unified: true,
            self_distill: true,
            kd: KdLoss::M3KdLoss,
        },
        self_distill_start_step: 0,
        knowledge_distillation: true,
        shuffle_ratio: 0.0,
        lr: s.finetune_lr,
        warmup_ratio: 0.1,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        seed: s.seed,
        save_every: None,
        fix_encoder: false,
        fix_position_embedding: false,
        dropout: true,
        negatives_cross_device: true,
    };
    let ft_dir = out.join("finetune");
    let _ = std::fs::remove_file(ft_dir.join("metrics.jsonl"));
    let train = M3TrainData::single(examples, s.finetune_batch);
    let ft = finetune_on(
        device,
        &mut student,
        &train,
        &tok,
        &fcfg,
        &tok_dir,
        &ft_dir,
        None,
        &mut |step, total, loss| {
            if step % (total / 10).max(1) == 0 || step == total {
                log(&format!("finetune step {step}/{total}: loss {loss:.4}"));
            }
        },
    )?;
    stage("finetune", t, log);

    // 5. Evaluation on the held-out test split.
    let t = Instant::now();
    let m0 = load_model(&untrained_dir, device, s.max_len)?;
    let untrained = evaluate_modes(&m0, &data, &MODEL_MODES)?;
    let m1 = load_model(&ft_dir, device, s.max_len)?;
    let mut modes = vec![Mode::Bm25];
    modes.extend(MODEL_MODES);
    let mut finetuned = evaluate_modes(&m1, &data, &modes)?;
    let bm25 = finetuned.remove(0).1;
    stage("evaluate", t, log);

    let report = QuickstartReport {
        untrained,
        finetuned,
        bm25,
        seconds: t_all.elapsed().as_secs_f64(),
        output: out.to_path_buf(),
    };
    write_report(
        &report,
        &s,
        size,
        device,
        data_dir,
        &data,
        &pre.losses,
        &ft,
        timings,
    )?;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn write_report(
    r: &QuickstartReport,
    s: &QuickstartSettings,
    size: QuickstartSize,
    device: Device,
    data_dir: &Path,
    data: &BeirData,
    pre_losses: &[(u64, f32, f32)],
    ft_losses: &[crate::train::m3::StepLosses],
    timings: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let out = &r.output;
    for (from, to) in [
        ("pretrain/metrics.svg", "pretrain_metrics.svg"),
        ("finetune/metrics.svg", "finetune_metrics.svg"),
    ] {
        std::fs::copy(out.join(from), out.join(to)).map_err(|e| Error::io(out.join(from), e))?;
    }
    let doc = json!({
        "size": format!("{size:?}").to_lowercase(),
        "device": device.to_string(),
        "data": data_dir.display().to_string(),
        "split": "test",
        "queries": r.bm25.queries,
        "corpus_docs": data.corpus.len(),
        "settings": s,
        "seconds": r.seconds,
        "stage_seconds": timings,
        "pretrain_loss": {"first": pre_losses.first().map(|l| l.1 + l.2), "last": pre_losses.last().map(|l| l.1 + l.2)},
        "finetune_loss": {"first": ft_losses.first().map(|l| l.1), "last": ft_losses.last().map(|l| l.1)},
        "results": {
            "bm25": serde_json::to_value(&r.bm25).unwrap_or_default(),
            "untrained": summary_json(&r.untrained),
            "finetuned": summary_json(&r.finetuned),
        },
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| Error::invalid(e.to_string()))?;
    write_text(&out.join("results.json"), &text)?;
    write_text(&out.join("summary.md"), &summary_md(r, s, data))
}

fn summary_md(r: &QuickstartReport, s: &QuickstartSettings, data: &BeirData) -> String {
    let best = r
        .finetuned
        .iter()
        .max_by(|a, b| a.1.mean.ndcg_10.total_cmp(&b.1.mean.ndcg_10));
    let hyb = |ft| r.ndcg(ft, Mode::DenseSparse).unwrap_or(0.0);
    let mut verdict = format!(
        "Fine-tuned dense+sparse nDCG@10 {:.4} vs untrained {:.4}: {}.\n",
        hyb(true),
        hyb(false),
        if hyb(true) > hyb(false) {
            "training helped"
        } else {
            "training did NOT help at this size"
        }
    );
    if let Some((m, b)) = best {
        verdict.push_str(&format!(
            "Best fine-tuned mode: {} at {:.4}; BM25 (same tokenizer): {:.4}. {}\n",
            m.name(),
            b.mean.ndcg_10,
            r.bm25.mean.ndcg_10,
            if b.mean.ndcg_10 > r.bm25.mean.ndcg_10 {
                "The small model beats BM25 here."
            } else {
                "BM25 still wins: a model this small, trained for minutes on ~1,300 pairs, does not \
                 beat a lexical baseline (BGE-M3 itself is 568M parameters trained on >1B pairs)."
            }
        ));
    }
    format!(
        "# retrom3 quickstart\n\n\
         Data: data/demo (Apache HTTP Server 2.4 manual, Apache-2.0; queries are the manual's \
         one-line directive descriptions, passages the directive bodies; en, fr, de, ja, ko, tr, es). \
         Test split: {} queries over {} documents; no test query or test passage was used in training.\n\n\
         Model: XLM-R encoder, hidden {}, {} layers, {} heads, vocab {} (Unigram tokenizer trained here), \
         max {} tokens; RetroMAE {} steps, then M3 unified fine-tuning with self-distillation {} steps \
         (batch {}, group {}). Run time {:.0} s.\n\n\
         {}\n{}\n\
         Loss curves: pretrain_metrics.svg, finetune_metrics.svg. Numbers: results.json.\n",
        r.bm25.queries,
        data.corpus.len(),
        s.hidden,
        s.layers,
        s.heads,
        s.vocab_size,
        s.max_len,
        s.pretrain_steps,
        s.finetune_steps,
        s.finetune_batch,
        s.group_size,
        r.seconds,
        table(r),
        verdict
    )
}
