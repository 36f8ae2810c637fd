//! [`TextTokenizer`]: a Hugging Face `tokenizer.json` (XLM-R SentencePiece, BERT WordPiece, ...)
//! with our own per-call truncation.
//!
//! The padding and truncation stored in the file are disabled on load (a sentence-transformers
//! tokenizer.json may carry e.g. a fixed 128 padding, SPEC §11.8). Each call then truncates exactly
//! like transformers' `tokenizer(text, truncation=True, max_length=m)`: `max_length` counts the
//! special tokens of the post-processor (`<s> … </s>`, `[CLS] … [SEP]`), the first
//! `max_length - 2` content tokens are kept, pairs use "longest_first". Added tokens written
//! literally in the text (`"<mask>"`, `"<s>"`) are matched as in the HF fast tokenizer.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{
    truncate_encodings, Encoding, PostProcessor, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::error::{Error, Result};

/// The SentencePiece word-start marker.
const METASPACE: char = '\u{2581}';

/// How token positions are grouped into words (for whole-word masking, SPEC §10.1).
#[derive(Debug, Clone, PartialEq, Eq)]
enum WordScheme {
    /// SentencePiece: a token starting with this marker starts a word.
    WordStart(char),
    /// WordPiece-style: a token starting with this prefix ("##") continues the previous word.
    Continuation(String),
    /// Anything else: the pre-tokenizer's split index (the crate's `word_ids`).
    PreTokenizer,
}

/// Whether a text cut at a single space between two words tokenizes as its two parts, one after
/// the other (the space dropped): the pre-tokenizer drops spaces (BERT, whitespace splitters) or
/// turns the space into the next word's "▁" that it also puts before a text's first word
/// (Metaspace splitting with prepend scheme `always` / `first`, XLM-R).
fn joins_at_spaces(p: &tokenizers::PreTokenizerWrapper) -> bool {
    use tokenizers::pre_tokenizers::metaspace::PrependScheme;
    use tokenizers::PreTokenizerWrapper as P;
    match p {
        P::BertPreTokenizer(_) | P::Whitespace(_) | P::WhitespaceSplit(_) => true,
        P::Metaspace(m) => m.get_split() && m.get_prepend_scheme() != PrependScheme::Never,
        _ => false,
    }
}

/// Whether the pre-tokenizer ends every word at an ASCII space (a piece never crosses one).
fn splits_at_spaces(p: &tokenizers::PreTokenizerWrapper) -> bool {
    use tokenizers::PreTokenizerWrapper as P;
    match p {
        P::BertPreTokenizer(_) | P::Whitespace(_) | P::WhitespaceSplit(_) => true,
        P::Metaspace(m) => m.get_split(),
        P::ByteLevel(b) => b.use_regex,
        P::Sequence(s) => s.as_ref().iter().any(splits_at_spaces),
        _ => false,
    }
}

/// Texts longer than this (bytes) are tokenized from a prefix first
/// (`TextTokenizer::encode_content`).
pub const PREFIX_BYTES: usize = 1 << 16;

/// [`TextTokenizer::content_ids`] cuts a run of this many bytes without a single space between
/// two letters or digits at a character boundary (the tokenizer's state for one piece is ~150
/// bytes per input byte: a 16 MB line of CJK text took 2.4 GB). The ids next to such a cut may
/// differ from the whole run's (a SentencePiece word split in two); elsewhere they are the
/// whole text's.
pub const FORCED_CUT_BYTES: usize = 1 << 20;

/// A loaded `tokenizer.json` with truncation applied per call and padding left to the batcher.
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    /// Ids of the added tokens (`<s>`, `<mask>`, ...): each is a word of its own.
    added_ids: HashSet<u32>,
    words: WordScheme,
    cls: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    mask: Option<u32>,
    /// Lower-case every text first (sentence-transformers' `do_lower_case`).
    lowercase: bool,
}

impl fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("words", &self.words)
            .field("cls", &self.cls)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("unk", &self.unk)
            .field("mask", &self.mask)
            .field("lowercase", &self.lowercase)
            .finish()
    }
}

fn metaspace_of(pre: Option<&PreTokenizerWrapper>) -> Option<char> {
    match pre? {
        PreTokenizerWrapper::Metaspace(m) => Some(m.get_replacement()),
        PreTokenizerWrapper::Sequence(seq) => {
            seq.as_ref().iter().find_map(|p| metaspace_of(Some(p)))
        }
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`, lower-casing every text first when the directory's
    /// sentence_bert_config.json says `"do_lower_case": true` (as sentence-transformers does
    /// before its tokenizer).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut t = Self::from_file(dir.join("tokenizer.json"))?;
        t.lowercase = crate::model::config::read_do_lower_case(dir)?;
        Ok(t)
    }

    /// Whether every text is lower-cased before tokenizing ([`TextTokenizer::from_dir`]).
    pub fn lowercases(&self) -> bool {
        self.lowercase
    }

    /// The text the tokenizer sees.
    fn prep<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        if self.lowercase {
            std::borrow::Cow::Owned(text.to_lowercase())
        } else {
            std::borrow::Cow::Borrowed(text)
        }
    }

    /// Loads a `tokenizer.json` file and disables its built-in padding and truncation.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Err(e) = std::fs::metadata(&path) {
            return Err(Error::io(&path, e));
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        // Check the JSON syntax first: the tokenizers crate panics (instead of returning an error)
        // on some malformed files, e.g. a truncated decoder section.
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            return Err(Error::Tokenizer(format!(
                "{}: invalid JSON: {e}",
                path.display()
            )));
        }
        // Structurally valid JSON with wrong field types can still reach a panic inside the crate:
        // contain it and report it as a load error naming the file.
        let parsed = std::panic::catch_unwind(|| Tokenizer::from_bytes(&bytes));
        let mut tokenizer = match parsed {
            Ok(r) => r.map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?,
            Err(_) => {
                return Err(Error::Tokenizer(format!(
                    "{}: malformed tokenizer definition (the tokenizers crate rejected it)",
                    path.display()
                )))
            }
        };
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        tokenizer.with_padding(None);

        let added_ids = tokenizer
            .get_added_vocabulary()
            .get_added_tokens_decoder()
            .keys()
            .copied()
            .collect();
        let metaspace = metaspace_of(tokenizer.get_pre_tokenizer());
        let words = match tokenizer.get_model() {
            ModelWrapper::WordPiece(wp) => {
                WordScheme::Continuation(wp.continuing_subword_prefix.clone())
            }
            ModelWrapper::Unigram(_) => WordScheme::WordStart(metaspace.unwrap_or(METASPACE)),
            ModelWrapper::BPE(bpe) => match (&bpe.continuing_subword_prefix, metaspace) {
                (Some(prefix), _) if !prefix.is_empty() => WordScheme::Continuation(prefix.clone()),
                (_, Some(c)) => WordScheme::WordStart(c),
                _ => WordScheme::PreTokenizer,
            },
            ModelWrapper::WordLevel(_) => WordScheme::PreTokenizer,
        };

        // RoBERTa / SentencePiece names first when the file has them, BERT names otherwise.
        let roberta_style =
            tokenizer.token_to_id("<s>").is_some() && tokenizer.token_to_id("</s>").is_some();
        let lookup = |sp: &str, bert: &str| {
            let (first, second) = if roberta_style {
                (sp, bert)
            } else {
                (bert, sp)
            };
            tokenizer
                .token_to_id(first)
                .or_else(|| tokenizer.token_to_id(second))
        };
        let cls = lookup("<s>", "[CLS]");
        let eos = lookup("</s>", "[SEP]");
        let pad = lookup("<pad>", "[PAD]");
        let unk = lookup("<unk>", "[UNK]");
        let mask = lookup("<mask>", "[MASK]");

        let mut t = TextTokenizer {
            tokenizer,
            path,
            added_ids,
            words,
            cls,
            eos,
            pad,
            unk,
            mask,
            lowercase: false,
        };
        // The sentence token and the separator are the ones the post-processor puts around a
        // text when it puts special tokens there (a vocabulary may also hold "<s>" as a word
        // piece of its own, and a BERT tokenizer's [CLS] must win then); else, by name.
        if let Some((first, last)) = t.wrapping_ids()? {
            t.cls = Some(first);
            t.eos = Some(last);
        }
        Ok(t)
    }

    /// The special tokens the post-processor puts before and after every text, if it does.
    fn wrapping_ids(&self) -> Result<Option<(u32, u32)>> {
        let ids = self.encode("", self.n_added(false).max(2))?;
        Ok(match ids[..] {
            [first, .., last]
                if self.added_ids.contains(&first) && self.added_ids.contains(&last) =>
            {
                Some((first, last))
            }
            _ => None,
        })
    }

    /// An encoder model reads position 0 as the sentence slot and ends a text with its
    /// separator: a post-processor that does not add `<s> … </s>` / `[CLS] … [SEP]`
    /// (`"post_processor": null`, or a template without them) would silently make the first word
    /// the dense vector and drop it from the sparse and ColBERT outputs. Checked by the model
    /// loader and the fine-tuning trainer (`tokenize` and `pretrain` add the specials
    /// themselves).
    pub fn check_wraps_texts(&self) -> Result<()> {
        if self.wrapping_ids()?.is_some() {
            return Ok(());
        }
        let ids = self.encode("", self.n_added(false).max(2))?;
        Err(Error::format(
            &self.path,
            format!(
                "post_processor must add a special token before and after every text (<s> ... \
                 </s> or [CLS] ... [SEP]), but an empty text gives the ids {ids:?}"
            ),
        ))
    }

    fn tok_err(&self, e: impl fmt::Display) -> Error {
        Error::Tokenizer(format!("{}: {e}", self.path.display()))
    }

    /// Run `f`, turning a panic inside the tokenizers crate (it panics instead of erroring on
    /// some inconsistent definitions, e.g. a post-processor naming a missing special token) into
    /// an error naming the file.
    fn guard<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
            Err(self.tok_err("the tokenizer definition is inconsistent (the tokenizers crate panicked while encoding)"))
        })
    }

    /// Number of special tokens the post-processor adds around one text (or a pair).
    fn n_added(&self, pair: bool) -> usize {
        self.tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(pair))
    }

    /// Truncates the content encodings (no specials yet) to fit `max_length` once the
    /// post-processor's specials are added, then adds them. Same arithmetic as the crate's own
    /// `post_process` with truncation set, which is what transformers calls.
    fn finish(&self, a: Encoding, b: Option<Encoding>, max_length: usize) -> Result<Encoding> {
        let n_added = self.n_added(b.is_some());
        let min = n_added.max(2);
        if max_length < min {
            return Err(Error::invalid(format!(
                "max_length {max_length} is too small: it counts the special tokens and must be at least {min}"
            )));
        }
        let params = TruncationParams {
            direction: TruncationDirection::Right,
            max_length: max_length - n_added,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        };
        let (mut a, mut b) = truncate_encodings(a, b, &params).map_err(|e| self.tok_err(e))?;
        // The cut-off tail is kept as "overflowing" encodings; we never use it.
        drop(a.take_overflowing());
        if let Some(b) = b.as_mut() {
            drop(b.take_overflowing());
        }
        self.tokenizer
            .post_process(a, b, true)
            .map_err(|e| self.tok_err(e))
    }

    /// Ids of one text with the post-processor's specials (`<s> … </s>` / `[CLS] … [SEP]`),
    /// truncated to `max_length` tokens specials included (the first `max_length - 2` content
    /// tokens are kept). `max_length < 2` is an [`Error::Invalid`]. An empty text gives only the
    /// specials.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Vec<u32>> {
        let text = self.prep(text);
        self.guard(|| {
            let content = self.encode_content(&text, max_length)?;
            Ok(self.finish(content, None, max_length)?.get_ids().to_vec())
        })
    }

    /// The content tokens (no specials) of `text`, at least as many as `max_length` keeps. A text
    /// of over [`PREFIX_BYTES`] is first tokenized from a prefix that ends at a word end (just
    /// before an ASCII space): BERT's and XLM-R's pre-tokenizers split words at spaces, so the
    /// prefix's tokens are the whole text's first tokens. The prefix grows 4x until it gives
    /// more tokens than `max_length`, or is the text. Memory then follows `max_length`, not the
    /// text (a 60 MB line took 12 GB of tokenizer state), except for a text without a space
    /// late enough (CJK): it is tokenized whole, since a SentencePiece word's first pieces can
    /// depend on where the word ends (~150 bytes of tokenizer state per byte).
    fn encode_content(&self, text: &str, max_length: usize) -> Result<Encoding> {
        let mut cut = PREFIX_BYTES.max(max_length.saturating_mul(64));
        // Only where words end at spaces (BERT, XLM-R, byte-level BPE, whitespace splitters):
        // a model whose pieces may cross a space tokenizes the whole text.
        if !self
            .tokenizer
            .get_pre_tokenizer()
            .is_some_and(splits_at_spaces)
        {
            cut = usize::MAX;
        }
        while cut < text.len() {
            let mut end = cut;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            if let Some(space) = text[..end].rfind(' ') {
                let prefix = text[..space].trim_end_matches(' ');
                let enc = self
                    .tokenizer
                    .encode_fast(prefix, false)
                    .map_err(|e| self.tok_err(e))?;
                if enc.len() > max_length + 8 {
                    return Ok(enc);
                }
            }
            // No space late enough (a run of CJK text): no exact cut, the prefix grows. A
            // SentencePiece word's first pieces can depend on where the word ends, so a prefix
            // cut inside it may start differently (the text is tokenized whole, as HF does).
            cut = cut.saturating_mul(4);
        }
        self.tokenizer
            .encode_fast(text, false)
            .map_err(|e| self.tok_err(e))
    }

    /// All content ids (no specials, no truncation) of `text`, as `inner().encode_fast(text,
    /// false)` gives them. A text of over [`PREFIX_BYTES`] is tokenized in pieces of about that
    /// size, cut at a single space between two words, where the tokenizer allows it
    /// (`joins_at_spaces`: the pieces' ids, one after the other, are the whole text's), so a huge
    /// line takes memory for one piece at a time, not the whole line (`retrom3 tokenize`). A run
    /// of [`FORCED_CUT_BYTES`] without such a space is cut at a character boundary instead (the
    /// one place where the ids may differ from the whole text's, next to the cut).
    pub fn content_ids(&self, text: &str) -> Result<Vec<u32>> {
        let text = &*self.prep(text);
        let pieces = self
            .tokenizer
            .get_pre_tokenizer()
            .is_some_and(joins_at_spaces)
            && text.len() > PREFIX_BYTES;
        if !pieces {
            let enc = self.guard(|| {
                self.tokenizer
                    .encode_fast(text, false)
                    .map_err(|e| self.tok_err(e))
            })?;
            return Ok(enc.get_ids().to_vec());
        }
        let b = text.as_bytes();
        let mut ids = Vec::new();
        let mut start = 0;
        while start < text.len() {
            // The first single space between two letters or digits (any script) after
            // PREFIX_BYTES more bytes (no normalisation rule spans such a boundary); failing one
            // within FORCED_CUT_BYTES (a run of CJK text, a giant token), the character boundary
            // there.
            let mut end = text.len();
            let mut skip = 0;
            let mut i = start + PREFIX_BYTES;
            let force_at = start + FORCED_CUT_BYTES;
            let word_char = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
            while i + 1 < b.len() {
                if b[i] == b' '
                    && word_char(text[..i].chars().next_back())
                    && word_char(text[i + 1..].chars().next())
                {
                    (end, skip) = (i, 1);
                    break;
                }
                if i >= force_at && text.is_char_boundary(i) {
                    end = i;
                    break;
                }
                i += 1;
            }
            let piece = &text[start..end];
            let enc = self.guard(|| {
                self.tokenizer
                    .encode_fast(piece, false)
                    .map_err(|e| self.tok_err(e))
            })?;
            ids.extend_from_slice(enc.get_ids());
            start = end + skip;
        }
        Ok(ids)
    }

    /// [`TextTokenizer::content_ids`] of every text, in order (short texts as one batch on the
    /// crate's thread pool): what `retrom3 tokenize` stores.
    pub fn content_ids_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let long = |t: &str| t.len() > PREFIX_BYTES;
        let prepped: Vec<std::borrow::Cow<str>> = texts
            .iter()
            .map(|t| if long(t) { (*t).into() } else { self.prep(t) })
            .collect();
        let short: Vec<&str> = prepped.iter().map(|t| &**t).filter(|t| !long(t)).collect();
        let mut encodings = self
            .guard(|| {
                self.tokenizer
                    .encode_batch_fast(short, false)
                    .map_err(|e| self.tok_err(e))
            })?
            .into_iter();
        prepped
            .iter()
            .map(|t| {
                if long(t) {
                    self.content_ids(t)
                } else {
                    let enc = encodings.next().expect("one encoding per short text");
                    Ok(enc.get_ids().to_vec())
                }
            })
            .collect()
    }

    /// The content encodings (no specials) of prepared texts, each with at least the first `n`
    /// tokens: long texts one by one from a prefix (`encode_content`), the rest as one batch on
    /// the crate's thread pool. Run inside [`TextTokenizer::guard`].
    fn content_encodings(&self, texts: &[&str], n: usize) -> Result<Vec<Encoding>> {
        let long = |t: &str| t.len() > PREFIX_BYTES;
        let short: Vec<&str> = texts.iter().copied().filter(|t| !long(t)).collect();
        let mut encodings = self
            .tokenizer
            .encode_batch_fast(short, false)
            .map_err(|e| self.tok_err(e))?
            .into_iter();
        texts
            .iter()
            .map(|t| {
                if long(t) {
                    self.encode_content(t, n)
                } else {
                    Ok(encodings.next().expect("one encoding per short text"))
                }
            })
            .collect()
    }

    /// The first `n` content ids (no specials) of every text, in order: what
    /// [`TextTokenizer::content_ids`] gives, cut to `n`, as an unpacked `retrom3 tokenize`
    /// stores it. A text of over [`PREFIX_BYTES`] is tokenized from a prefix.
    pub fn content_prefix_batch(&self, texts: &[&str], n: usize) -> Result<Vec<Vec<u32>>> {
        let prepped: Vec<std::borrow::Cow<str>> = texts.iter().map(|t| self.prep(t)).collect();
        let texts: Vec<&str> = prepped.iter().map(|t| &**t).collect();
        self.guard(|| {
            Ok(self
                .content_encodings(&texts, n)?
                .iter()
                .map(|e| e.get_ids()[..e.len().min(n)].to_vec())
                .collect())
        })
    }

    /// [`TextTokenizer::encode`] of every text, in order (tokenized on the crate's thread pool).
    pub fn encode_batch(&self, texts: &[&str], max_length: usize) -> Result<Vec<Vec<u32>>> {
        let min = self.n_added(false).max(2);
        if max_length < min {
            // Checked up front so that an empty batch and a full one fail alike.
            return Err(Error::invalid(format!(
                "max_length {max_length} is too small: it counts the special tokens and must be at least {min}"
            )));
        }
        let prepped: Vec<std::borrow::Cow<str>> = texts.iter().map(|t| self.prep(t)).collect();
        let texts: Vec<&str> = prepped.iter().map(|t| &**t).collect();
        self.guard(|| {
            self.content_encodings(&texts, max_length)?
                .into_iter()
                .map(|c| Ok(self.finish(c, None, max_length)?.get_ids().to_vec()))
                .collect()
        })
    }

    /// The ids the post-processor adds around one text and around a pair (`<s>`, `</s>`, ...),
    /// as a model's embedding table must hold them.
    pub fn post_processor_ids(&self) -> Result<Vec<u32>> {
        let room = self.n_added(true).max(self.n_added(false)).max(2);
        let mut ids = self.encode("", room)?;
        ids.extend(self.encode_pair("", "", room)?);
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Ids of a text pair (`<s> A </s></s> B </s>` / `[CLS] A [SEP] B [SEP]`), truncated to
    /// `max_length` tokens specials included with HF's "longest_first" strategy (tokens are removed
    /// from the longer side; when both are too long each keeps half of the room, the first
    /// text the smaller half). `max_length` below the number of specials is an [`Error::Invalid`].
    pub fn encode_pair(&self, a: &str, b: &str, max_length: usize) -> Result<Vec<u32>> {
        let (a, b) = (self.prep(a), self.prep(b));
        let (a, b) = (&*a, &*b);
        self.guard(|| {
            let ea = self
                .tokenizer
                .encode_fast(a, false)
                .map_err(|e| self.tok_err(e))?;
            let eb = self
                .tokenizer
                .encode_fast(b, false)
                .map_err(|e| self.tok_err(e))?;
            Ok(self.finish(ea, Some(eb), max_length)?.get_ids().to_vec())
        })
    }

    /// [`TextTokenizer::encode`] plus the word index of every token (`None` for the specials the
    /// post-processor adds), numbered 0, 1, 2, … in order.
    ///
    /// Words: for SentencePiece a token starting with "▁" starts a word; for WordPiece a token
    /// starting with "##" continues the previous one; an added token written in the text (`<mask>`)
    /// is a word of its own; other models use the pre-tokenizer's splits.
    pub fn encode_with_words(
        &self,
        text: &str,
        max_length: usize,
    ) -> Result<(Vec<u32>, Vec<Option<u32>>)> {
        let text = &*self.prep(text);
        self.guard(|| {
            let content = self
                .tokenizer
                .encode(text, false)
                .map_err(|e| self.tok_err(e))?;
            let enc = self.finish(content, None, max_length)?;
            let words = self.word_indices(&enc);
            Ok((enc.get_ids().to_vec(), words))
        })
    }

    fn word_indices(&self, enc: &Encoding) -> Vec<Option<u32>> {
        let ids = enc.get_ids();
        let tokens = enc.get_tokens();
        let special = enc.get_special_tokens_mask();
        let crate_words = enc.get_word_ids();
        let mut out = Vec::with_capacity(ids.len());
        let mut next = 0u32;
        // (crate word id, was an added token) of the previous content token, None after a special.
        let mut prev: Option<(Option<u32>, bool)> = None;
        for (i, id) in ids.iter().enumerate() {
            if special.get(i).copied().unwrap_or(0) == 1 {
                out.push(None);
                prev = None;
                continue;
            }
            let added = self.added_ids.contains(id);
            let token = tokens.get(i).map(String::as_str).unwrap_or("");
            let crate_word = crate_words.get(i).copied().flatten();
            let starts = match prev {
                None => true,
                Some((_, prev_added)) if prev_added || added => true,
                Some((prev_word, _)) => match &self.words {
                    WordScheme::WordStart(c) => token.starts_with(*c),
                    WordScheme::Continuation(prefix) => !token.starts_with(prefix.as_str()),
                    WordScheme::PreTokenizer => crate_word.is_none() || crate_word != prev_word,
                },
            };
            if starts {
                next += 1;
            }
            out.push(Some(next - 1));
            prev = Some((crate_word, added));
        }
        out
    }

    /// Whether vocabulary token `token` starts a word, by this tokenizer's own word scheme (its
    /// model, not a guess from the vocabulary): SentencePiece / Unigram pieces by their "▁",
    /// WordPiece ones by not carrying the continuation prefix ("##"). `None` where words come
    /// from the pre-tokenizer's split of a text (e.g. byte-level BPE, WordLevel): a token alone
    /// does not say.
    pub fn token_starts_word(&self, token: &str) -> Option<bool> {
        match &self.words {
            WordScheme::WordStart(c) => Some(token.starts_with(*c)),
            WordScheme::Continuation(prefix) => Some(!token.starts_with(prefix.as_str())),
            WordScheme::PreTokenizer => None,
        }
    }

    /// The sentence-start / classification token (`<s>` or `[CLS]`).
    pub fn cls_id(&self) -> Option<u32> {
        self.cls
    }

    /// The padding token (`<pad>` or `[PAD]`).
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// The end / separator token (`</s>` or `[SEP]`).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The unknown token (`<unk>` or `[UNK]`).
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    /// The mask token (`<mask>` or `[MASK]`).
    pub fn mask_id(&self) -> Option<u32> {
        self.mask
    }

    /// The ids the sparse head drops (SPEC §3.1): cls, eos, pad and unk, those that exist, sorted,
    /// without duplicates.
    pub fn special_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = [self.cls, self.eos, self.pad, self.unk]
            .into_iter()
            .flatten()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Vocabulary size including added tokens (Python's `len(tokenizer)`; 250002 for bge-m3).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The token string of `id` (`None` when out of range).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The id of a token string, added tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying `tokenizers` tokenizer (padding and truncation disabled).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}
