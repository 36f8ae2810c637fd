//! Pre-tokenized pre-training corpora: the `.r3tok` file (`retrom3 tokenize` writes it, the
//! RetroMAE trainer memory-maps it).
//!
//! * [`mod@format`]: the on-disk layout and [`TokenCorpus`], the validated read-only view;
//! * `lines`: the streaming reader of the text input (JSONL `{"text": ...}` or plain lines);
//! * `sink`: the `.r3tok` file being built (tokens, side file of offsets, final header);
//! * [`writer`]: [`tokenize_corpus`], which streams a text file of any size through the tokenizer
//!   into a `.r3tok` file in constant memory, resumably.
//!
//! A document holds content tokens only: the trainer adds `<s>`/`</s>` (or `[CLS]`/`[SEP]`), so a
//! file made for `max_len` holds at most `max_len - 2` tokens per document. The byte layout is
//! documented in `docs/formats.md`.

pub mod format;
mod lines;
mod sink;
pub mod writer;

pub use format::TokenCorpus;
pub use writer::{tokenize_corpus, TokenizeOptions, TokenizeStats};

use crate::data::tokenizer::TextTokenizer;
use crate::error::{Error, Result};

/// The tokenizer fingerprint stored in a `.r3tok` header: the 64-bit FNV-1a hash of the bytes of
/// the tokenizer's `tokenizer.json`, followed by the bytes `\0do_lower_case` when the tokenizer
/// lower-cases its texts (sentence_bert_config.json; other tokens, so another corpus). A trainer
/// compares it with the file's [`TokenCorpus::fingerprint`] to refuse a corpus made with another
/// tokenizer.
pub fn tokenizer_fingerprint(tok: &TextTokenizer) -> Result<u64> {
    let mut bytes = std::fs::read(tok.path()).map_err(|e| Error::io(tok.path(), e))?;
    if tok.lowercases() {
        bytes.extend_from_slice(b"\0do_lower_case");
    }
    Ok(fnv1a64(&bytes))
}

/// FNV-1a, 64-bit (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = Fnv64::new();
    h.bytes(bytes);
    h.finish()
}

/// FNV-1a, 64-bit, fed piece by piece ([`fnv1a64`] of the concatenation).
pub(crate) struct Fnv64(u64);

impl Fnv64 {
    pub(crate) fn new() -> Fnv64 {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// A string with its length first, so that ("ab", "c") and ("a", "bc") differ.
    pub(crate) fn str(&mut self, s: &str) {
        self.bytes(&(s.len() as u64).to_le_bytes());
        self.bytes(s.as_bytes());
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

/// Reads the next `len` bytes of `r` in pieces of at most `chunk` bytes (a multiple of the word
/// size the caller walks), handing each to `f`; a failed read names `path`.
pub(crate) fn read_chunks(
    r: &mut impl std::io::Read,
    len: u64,
    chunk: usize,
    path: &std::path::Path,
    mut f: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; chunk];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk as u64) as usize;
        r.read_exact(&mut buf[..n])
            .map_err(|e| Error::io(path, e))?;
        f(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Start value of the word checksums ([`mix`]).
pub(crate) const MIX_SEED: u64 = 0x243F_6A88_85A3_08D3;

/// One step of the word checksum used for the header, the tokens and the offsets:
/// `h' = rotl((h ^ w) * 0x9E3779B97F4A7C15, 29)`. Each step is a bijection of `h` for a fixed `w`
/// (odd multiplier, rotation), so changing any single word always changes the final value.
#[inline]
pub(crate) fn mix(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
}

/// [`mix`] over a piece of an offsets file (little-endian u64 words; a piece holds whole words):
/// the new hash and the piece's last offset (`None` for an empty piece).
pub(crate) fn mix_offsets(mut h: u64, piece: &[u8]) -> (u64, Option<u64>) {
    let mut last = None;
    for w in piece.chunks_exact(8) {
        let o = u64::from_le_bytes(w.try_into().expect("chunks_exact(8)"));
        h = mix(h, o);
        last = Some(o);
    }
    (h, last)
}
