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

/// The most texts one forward takes; a larger `batch_size` is cut to it (the attention kernels'
/// grid holds the batch in a dimension CUDA caps at 65,535).
pub const MAX_BATCH: usize = 65_535;

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
    /// MCLS for long inputs (SPEC §3.5, decision 10.7, our reading of the paper): a `<s>` is
    /// inserted before every `mcls_chunk` content tokens after the first chunk, and the dense
    /// vector is the mean of the last hidden states at every `<s>` (the first included), then
    /// normalised as usual (a \[CLS\]-pooled model's; a dense vector with mean pooling, the
    /// model's or the option's, is an error: a one-chunk text would not encode as without it).
    /// The inserted tokens take positions and count toward `max_length` (content is truncated
    /// to fit). Sparse and ColBERT outputs are computed on the same sequence, without the
    /// inserted `<s>`: lexical weights drop special ids anyway, and the ColBERT vectors of the
    /// inserted positions are removed, so a text has one vector per content token + `</s>` as
    /// without MCLS.
    pub mcls: bool,
    /// Content tokens per MCLS chunk (256 in the paper; smaller values are for tests).
    pub mcls_chunk: usize,
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
            mcls: false,
            mcls_chunk: 256,
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
    /// The batch size the encode ended with: smaller than requested when a batch ran out of
    /// device memory and was retried with 3/4 of its texts, and at most [`MAX_BATCH`].
    pub batch_size: usize,
}

/// Insert MCLS tokens into one tokenized text (`<s> c… </s>`): `cls` before content tokens
/// `chunk`, `2·chunk`, …; content is dropped from the end so that the result has at most
/// `max_length` tokens. A text of at most `chunk` content tokens is unchanged.
pub fn insert_mcls(seq: &[u32], cls: u32, chunk: usize, max_length: usize) -> Vec<u32> {
    if seq.len() < 2 || chunk == 0 {
        return seq.to_vec();
    }
    let (first, content, last) = (seq[0], &seq[1..seq.len() - 1], seq[seq.len() - 1]);
    let mut out = Vec::with_capacity(seq.len() + content.len() / chunk + 1);
    out.push(first);
    for (i, &t) in content.iter().enumerate() {
        let need = if i > 0 && i % chunk == 0 { 2 } else { 1 };
        if out.len() + need + 1 > max_length {
            break;
        }
        if need == 2 {
            out.push(cls);
        }
        out.push(t);
    }
    out.push(last);
    out
}

fn check_chunk(chunk: usize) -> Result<()> {
    if chunk == 0 {
        return Err(Error::invalid("MCLS chunk size must be >= 1"));
    }
    Ok(())
}

impl M3Model {
    /// Encoder forward with MCLS: dense = (normalised) mean of the hidden states at position 0
    /// and every position [`insert_mcls`] put a `cls` at (found by place, not by id: a literal
    /// `<s>` in the text is a token like any other); sparse as usual (special ids are dropped);
    /// ColBERT without the inserted `cls`.
    fn forward_mcls(
        &self,
        input: &EncoderInput,
        req: HeadRequest,
        cls: u32,
        chunk: usize,
    ) -> Result<crate::model::m3::HeadOutputs> {
        let mut tape = crate::autograd::Tape::no_grad();
        let hs = match &self.engine {
            // The encoder on the device; the MCLS heads on the host from its last hidden state.
            Some(engine) => {
                let e = engine.lock().unwrap_or_else(|p| p.into_inner());
                let h = self.encoder.config.hidden_size;
                let v = e.hidden(input)?;
                crate::autograd::Var::constant(crate::Tensor::from_vec(
                    v,
                    &[input.batch, input.len, h],
                )?)
            }
            None => {
                let p = self.encoder.params.bind(&mut tape);
                self.encoder.forward(&mut tape, &p, input, None)?
            }
        };
        let heads_req = HeadRequest {
            dense: false,
            ..req
        };
        let mut out = if req.sparse || req.colbert {
            self.heads_on_hidden(&mut tape, &hs, input, heads_req)?
        } else {
            crate::model::m3::HeadOutputs::default()
        };
        let (b, l) = (input.batch, input.len);
        let h = self.encoder.config.hidden_size;
        // The marker positions of each text: 0, then every (chunk + 1)-th before its `</s>` (a
        // chunk past the padded length is that length: no marker, no overflow).
        let step = chunk.min(l) + 1;
        let markers: Vec<Vec<usize>> = (0..b)
            .map(|bi| {
                let ids = &input.ids[bi * l..(bi + 1) * l];
                let len = input.mask[bi * l..(bi + 1) * l]
                    .iter()
                    .filter(|&&m| m != 0)
                    .count();
                let at: Vec<usize> = std::iter::once(0)
                    .chain((1..).map(|k| k * step).take_while(|&p| p + 1 < len))
                    .collect();
                match at.iter().find(|&&p| ids[p] != cls) {
                    Some(&p) => Err(Error::invalid(format!(
                        "MCLS: position {p} of text {bi} holds id {}, not the <s> id {cls}: \
                         the ids must come from insert_mcls with chunk {chunk}",
                        ids[p]
                    ))),
                    None => Ok(at),
                }
            })
            .collect::<Result<_>>()?;
        if req.colbert {
            // Vector j of a text is position j + 1: drop the inserted CLS positions.
            for (vecs, at) in out.colbert.iter_mut().zip(&markers) {
                let mut li = 0;
                vecs.retain(|_| {
                    li += 1;
                    at.binary_search(&li).is_err()
                });
            }
        }
        if req.dense {
            let v = hs.value().f32s()?;
            out.dense = markers
                .iter()
                .enumerate()
                .map(|(bi, at)| {
                    let mut acc = vec![0f64; h];
                    for &li in at {
                        let row = &v[(bi * l + li) * h..(bi * l + li + 1) * h];
                        acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x as f64);
                    }
                    let d: Vec<f32> = acc.iter().map(|&a| (a / at.len() as f64) as f32).collect();
                    if !req.normalize {
                        return d;
                    }
                    // The dense head's own normalisation: one chunk encodes as without MCLS.
                    let mut y = vec![0f32; h];
                    crate::device::cpu::normalize::l2_normalize_fwd(
                        &d,
                        h,
                        crate::model::m3::NORM_EPS,
                        &mut y,
                    );
                    y
                })
                .collect();
        }
        Ok(out)
    }

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
        let mut seqs = self.tokenizer.encode_batch(texts, max_length)?;
        if opts.mcls {
            let cls = self.mcls_id()?;
            check_chunk(opts.mcls_chunk)?;
            seqs = seqs
                .iter()
                .map(|s| insert_mcls(s, cls, opts.mcls_chunk, max_length))
                .collect();
        }
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

    /// The id of `<s>` / `[CLS]`: the first token of every tokenized text.
    fn mcls_id(&self) -> Result<u32> {
        let ids = self.tokenizer.encode("", 2)?;
        ids.first()
            .copied()
            .filter(|t| self.special_ids.contains(t))
            .ok_or_else(|| Error::invalid("MCLS: the tokenizer adds no leading CLS token"))
    }

    /// Encode already tokenized texts (ids with specials; with `opts.mcls`, the `<s>` already
    /// inserted, e.g. by [`insert_mcls`]).
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
        let mcls = if opts.mcls {
            check_chunk(opts.mcls_chunk)?;
            if opts.dense && opts.pooling.unwrap_or(self.pooling) == Pooling::Mean {
                return Err(Error::invalid(format!(
                    "MCLS pools the <s> states; {} dense vector is mean-pooled: encode it \
                     without MCLS",
                    if opts.pooling.is_some() {
                        "the requested (--pooling mean)".to_string()
                    } else {
                        format!("the model's ({})", self.dir.display())
                    }
                )));
            }
            Some(self.mcls_id()?)
        } else {
            None
        };
        // Tokenized texts start with <s> / [CLS] (the dense vector, and MCLS's chunk vectors, are
        // read there) and hold at most the model's positions.
        let cap = self.encoder.config.max_tokens();
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(Error::invalid(format!(
                    "sequence {i}: no token ids (a tokenized text holds at least its specials)"
                )));
            }
            if let Some(cls) = mcls.filter(|&c| s[0] != c) {
                return Err(Error::invalid(format!(
                    "sequence {i}: starts with id {}, not the <s> / [CLS] id {cls} that MCLS \
                     repeats (encode_ids takes tokenized texts, specials included)",
                    s[0]
                )));
            }
            if s.len() > cap {
                return Err(Error::invalid(format!(
                    "sequence {i}: {} tokens exceed the model's maximum of {cap}",
                    s.len()
                )));
            }
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
        // Out of device memory on a batch: retry it with 3/4 of the texts (FlagEmbedding's
        // back-off), down to one text; the smaller size is kept for the rest.
        // At most 65,535 texts a forward: the device kernels put the batch on a grid dimension
        // CUDA caps there (the CPU engine's outputs do not depend on the batch size).
        let (mut bs, mut pos) = (opts.batch_size.min(MAX_BATCH), 0);
        // A batch with a non-finite hidden state is re-run one text at a time, to name the input
        // text; (end of that batch, the batch size to return to).
        let mut one_by_one: Option<(usize, usize)> = None;
        while pos < n {
            if let Some((end, size)) = one_by_one.filter(|&(end, _)| pos >= end) {
                debug_assert!(pos == end);
                bs = size;
                one_by_one = None;
            }
            let chunk = &order[pos..(pos + bs).min(n)];
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| seqs[i].clone()).collect();
            let input = EncoderInput::pad(&batch, pad);
            let result = match mcls {
                None => self.forward_heads(&input, req),
                Some(cls) => self.forward_mcls(&input, req, cls, opts.mcls_chunk),
            };
            let out = match result {
                Err(Error::OutOfMemory { .. }) if chunk.len() > 1 => {
                    bs = (chunk.len() * 3 / 4).max(1);
                    continue;
                }
                Err(Error::NonFinite(_)) if chunk.len() > 1 => {
                    one_by_one = Some((pos + chunk.len(), bs));
                    bs = 1;
                    continue;
                }
                Err(Error::NonFinite(m)) => {
                    return Err(Error::NonFinite(format!(
                        "input text {}: {m}",
                        chunk[0] + 1
                    )));
                }
                r => r?,
            };
            pos += chunk.len();
            for (k, &i) in chunk.iter().enumerate() {
                let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
                let bad = if opts.dense && !finite(&out.dense[k]) {
                    Some("dense")
                } else if opts.sparse && !out.sparse[k].iter().all(|e| e.weight.is_finite()) {
                    Some("sparse")
                } else if opts.colbert && !out.colbert[k].iter().all(|v| finite(v)) {
                    Some("colbert")
                } else {
                    None
                };
                if let Some(head) = bad {
                    return Err(Error::NonFinite(format!(
                        "the {head} output of input text {}: the model's weights overflow or \
                         hold NaN",
                        i + 1
                    )));
                }
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
            // The back-off size (a batch re-run one text at a time to name a text is not one).
            batch_size: one_by_one.map_or(bs, |(_, size)| size),
            dense: opts.dense.then_some(dense),
            sparse: opts.sparse.then_some(sparse),
            colbert: opts.colbert.then_some(colbert),
        })
    }
}
