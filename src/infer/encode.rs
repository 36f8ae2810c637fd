//! `M3Model::encode`: tokenize, sort by length (longest first), pad per batch, run the encoder and
//! the heads, restore the input order (FlagEmbedding's pipeline, SPEC §3.2).

use crate::error::{Error, Result};
use crate::model::config::Pooling;
use crate::model::encoder::EncoderInput;
use crate::model::m3::{HeadRequest, M3Model};

/// Lexical weights of one text: (token id, weight) sorted by id, weights > 0, special ids dropped.
pub type LexicalWeights = Vec<(u32, f32)>;

/// ColBERT vectors of one text: one normalised vector per real token after CLS (`</s>` included).
pub type ColbertVecs = Vec<Vec<f32>>;

/// What to compute and how.
#[derive(Clone, Debug)]
pub struct EncodeOptions {
    pub dense: bool,
    pub sparse: bool,
    pub colbert: bool,
    /// Max tokens per text, specials included (None: the model's default).
    pub max_length: Option<usize>,
    /// Texts per forward.
    pub batch_size: usize,
    /// Dense pooling (None: the model's default).
    pub pooling: Option<Pooling>,
    /// Normalise dense vectors (None: the model's default).
    pub normalize: Option<bool>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            dense: true,
            sparse: false,
            colbert: false,
            max_length: None,
            batch_size: 32,
            pooling: None,
            normalize: None,
        }
    }
}

impl EncodeOptions {
    /// Dense, sparse and ColBERT outputs with the model's defaults.
    pub fn all() -> Self {
        EncodeOptions {
            sparse: true,
            colbert: true,
            ..Default::default()
        }
    }
}

/// Outputs per text, in input order; a field is `Some` when it was requested.
#[derive(Clone, Debug, Default)]
pub struct EncodeOutput {
    pub dense: Option<Vec<Vec<f32>>>,
    pub sparse: Option<Vec<LexicalWeights>>,
    pub colbert: Option<Vec<ColbertVecs>>,
}

impl M3Model {
    /// Encode texts (see [`EncodeOptions`]). Empty texts are allowed (they become `<s></s>`, as
    /// in FlagEmbedding); texts longer than the max length are truncated.
    pub fn encode(&self, texts: &[&str], opts: &EncodeOptions) -> Result<EncodeOutput> {
        self.encode_with_progress(texts, opts, &mut |_| {})
    }

    /// [`M3Model::encode`] calling `progress(n)` after each batch of n texts.
    pub fn encode_with_progress(
        &self,
        texts: &[&str],
        opts: &EncodeOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<EncodeOutput> {
        let max_length = self.resolve_max_length(opts.max_length)?;
        let seqs = self.tokenizer.encode_batch(texts, max_length)?;
        self.encode_ids(seqs, opts, progress)
    }

    /// The max length to use: the option or the model default, checked against the model.
    pub fn resolve_max_length(&self, requested: Option<usize>) -> Result<usize> {
        let m = requested.unwrap_or(self.max_length);
        if m < 2 {
            return Err(Error::invalid(format!(
                "max_length {m}: it counts the 2 special tokens and must be >= 2"
            )));
        }
        let cap = self.encoder.config.max_tokens();
        if m > cap {
            return Err(Error::invalid(format!(
                "max_length {m} exceeds the model's maximum of {cap} tokens"
            )));
        }
        Ok(m)
    }

    /// Encode already tokenized texts (ids with specials).
    pub fn encode_ids(
        &self,
        seqs: Vec<Vec<u32>>,
        opts: &EncodeOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<EncodeOutput> {
        if opts.batch_size == 0 {
            return Err(Error::invalid("batch_size must be >= 1"));
        }
        if opts.sparse || opts.colbert {
            self.require_heads("sparse/colbert output")?;
        }
        let req = HeadRequest {
            dense: opts.dense,
            sparse: opts.sparse,
            colbert: opts.colbert,
            pooling: opts.pooling.unwrap_or(self.pooling),
            normalize: opts.normalize.unwrap_or(self.normalize),
        };
        let pad = self.encoder.config.pad_token_id;
        let n = seqs.len();
        // Longest first (stable), so each batch pads little and the first batch is the largest.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| seqs[b].len().cmp(&seqs[a].len()));
        let mut dense = vec![Vec::new(); if opts.dense { n } else { 0 }];
        let mut sparse = vec![Vec::new(); if opts.sparse { n } else { 0 }];
        let mut colbert = vec![Vec::new(); if opts.colbert { n } else { 0 }];
        for chunk in order.chunks(opts.batch_size) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| seqs[i].clone()).collect();
            let input = EncoderInput::pad(&batch, pad);
            let out = self.forward_heads(&input, req)?;
            for (k, &i) in chunk.iter().enumerate() {
                if opts.dense {
                    dense[i] = out.dense[k].clone();
                }
                if opts.sparse {
                    sparse[i] = out.sparse[k].iter().map(|e| (e.id, e.weight)).collect();
                }
                if opts.colbert {
                    colbert[i] = out.colbert[k].clone();
                }
            }
            progress(chunk.len());
        }
        Ok(EncodeOutput {
            dense: opts.dense.then_some(dense),
            sparse: opts.sparse.then_some(sparse),
            colbert: opts.colbert.then_some(colbert),
        })
    }
}
