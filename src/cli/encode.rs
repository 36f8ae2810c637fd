//! `retrom3 encode` and `retrom3 score`.

use super::output::{progress, write_jsonl};
use clap::Args;
use retrom3::data::jsonl::{read_pairs, read_texts};
use retrom3::retrieval::hybrid::check_weights;
use retrom3::retrieval::Mode;
use retrom3::{Device, EncodeOptions, Error, M3Model, Pooling, Result, ScoreOptions};
use serde_json::{json, Map, Value};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EncodeArgs {
    /// Model directory (Hugging Face / FlagEmbedding layout).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL with one {"text": ...} per line, or a plain text file with one text per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSONL, one object per input line, in input order.
    #[arg(long)]
    pub output: PathBuf,
    /// Emit the dense vector (the default when no output is chosen).
    #[arg(long)]
    pub dense: bool,
    /// Emit the lexical weights {"<token id>": weight}.
    #[arg(long)]
    pub sparse: bool,
    /// Emit the ColBERT vectors.
    #[arg(long)]
    pub colbert: bool,
    /// Max tokens per text, specials included (default: the model dir's, else 512).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Dense pooling (default: the model dir's, else cls).
    #[arg(long)]
    pub pooling: Option<Pooling>,
    /// Do not L2-normalise dense vectors.
    #[arg(long)]
    pub no_normalize: bool,
    /// MCLS for long texts: a <s> every --mcls-chunk content tokens, dense = mean of their
    /// hidden states (SPEC 3.5; for [CLS]-pooled models: with mean pooling, the model's or
    /// --pooling mean, a dense output is an error).
    #[arg(long)]
    pub mcls: bool,
    /// Content tokens per MCLS chunk.
    #[arg(long, default_value_t = 256, requires = "mcls")]
    pub mcls_chunk: usize,
    /// cpu, cuda[:N], or emu (the CUDA kernels run on CPU threads: an `emu` build, for checks).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Model directory with the M3 heads (colbert_linear.pt, sparse_linear.pt).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL with one {"query": ..., "passage": ...} per line.
    #[arg(long)]
    pub pairs: PathBuf,
    /// Output JSONL with dense, sparse, colbert, sparse+dense, colbert+sparse+dense per pair.
    #[arg(long)]
    pub output: PathBuf,
    /// Fusion weights w_dense,w_sparse,w_colbert.
    #[arg(long, default_value = "1,1,1")]
    pub weights: String,
    /// Max query tokens, specials included (default: 512, lowered to the model's max length).
    #[arg(long)]
    pub max_query_length: Option<usize>,
    /// Max passage tokens, specials included (default: 512, lowered to the model's max length).
    #[arg(long)]
    pub max_passage_length: Option<usize>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// cpu, cuda[:N], or emu (the CUDA kernels run on CPU threads: an `emu` build, for checks).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

pub fn encode(a: EncodeArgs) -> Result<()> {
    super::output::check_output_path("--output", &a.output)?;
    let texts = read_texts(&a.input)?;
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return Err(Error::Input {
            path: a.input.clone(),
            line: i + 1,
            msg: "empty text (nothing to encode)".into(),
        });
    }
    let model = M3Model::load(&a.model, a.device)?;
    let dense = a.dense || !(a.sparse || a.colbert);
    let opts = EncodeOptions {
        dense,
        sparse: a.sparse,
        colbert: a.colbert,
        max_length: a.max_length,
        batch_size: a.batch_size,
        pooling: a.pooling,
        normalize: a.no_normalize.then_some(false),
        mcls: a.mcls,
        mcls_chunk: a.mcls_chunk,
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let pb = progress(refs.len(), "encode");
    let out = model.encode_with_progress(&refs, &opts, &mut |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    if out.batch_size < a.batch_size.min(retrom3::infer::MAX_BATCH) {
        eprintln!(
            "note: out of device memory at --batch-size {}: batches of {} texts were used",
            a.batch_size, out.batch_size
        );
    }
    let rows = (0..texts.len()).map(|i| {
        let mut obj = Map::new();
        if let Some(d) = &out.dense {
            obj.insert("dense".into(), json!(d[i]));
        }
        if let Some(s) = &out.sparse {
            let m: Map<String, Value> = s[i]
                .iter()
                .map(|(id, w)| (id.to_string(), json!(w)))
                .collect();
            obj.insert("sparse".into(), Value::Object(m));
        }
        if let Some(c) = &out.colbert {
            obj.insert("colbert".into(), json!(c[i]));
        }
        Value::Object(obj)
    });
    write_jsonl(&a.output, rows)
}

fn parse_weights(s: &str) -> Result<[f32; 3]> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| {
            Error::invalid(format!(
                "--weights {s:?}: expected three numbers like 0.4,0.2,0.4"
            ))
        })?;
    let w = <[f32; 3]>::try_from(v)
        .map_err(|_| Error::invalid(format!("--weights {s:?}: expected exactly three numbers")))?;
    // The same rules as search / eval; score's two fusions are dense+sparse and all.
    check_weights(w, &[Mode::DenseSparse, Mode::All])
        .map_err(|m| Error::invalid(format!("--weights {s:?}: {m}")))?;
    Ok(w)
}

pub fn score(a: ScoreArgs) -> Result<()> {
    super::output::check_output_path("--output", &a.output)?;
    let weights = parse_weights(&a.weights)?;
    let pairs = read_pairs(&a.pairs)?;
    for (i, p) in pairs.iter().enumerate() {
        for (field, text) in [("query", &p.query), ("passage", &p.passage)] {
            if text.trim().is_empty() {
                return Err(Error::Input {
                    path: a.pairs.clone(),
                    line: i + 1,
                    msg: format!("field \"{field}\": empty text (nothing to score)"),
                });
            }
        }
    }
    let model = M3Model::load(&a.model, a.device)?;
    // As encode: the default (None) never exceeds the model's max length (an explicit value above
    // the model's maximum is an error, as encode's --max-length).
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|p| (p.query.as_str(), p.passage.as_str()))
        .collect();
    let opts = ScoreOptions {
        max_query_length: a.max_query_length,
        max_passage_length: a.max_passage_length,
        weights,
        batch_size: a.batch_size,
    };
    let pb = progress(2 * refs.len(), "score");
    let scores = model.compute_score_unchecked(&refs, &opts, &mut |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    if let Some(i) = scores.iter().position(|s| s.non_finite().is_some()) {
        return Err(Error::Input {
            path: a.pairs.clone(),
            line: i + 1,
            msg: format!(
                "a score is not finite ({:?}) with --weights {}",
                scores[i], a.weights
            ),
        });
    }
    let rows = scores.into_iter().map(|s| {
        json!({
            "dense": s.dense,
            "sparse": s.sparse,
            "colbert": s.colbert,
            "sparse+dense": s.sparse_dense,
            "colbert+sparse+dense": s.colbert_sparse_dense,
        })
    });
    write_jsonl(&a.output, rows)
}
