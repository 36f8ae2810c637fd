//! The `.r3tok` layout and [`TokenCorpus`], its validated memory-mapped view.
//!
//! ```text
//! offset  size        field
//! 0       8           magic "R3TOK\0\0\0"
//! 8       4           version (u32) = 1
//! 12      4           flags (u32): bit 0 = packed; other bits zero
//! 16      8           tokenizer fingerprint (u64, FNV-1a 64 of tokenizer.json)
//! 24      4           vocab size (u32, added tokens included)
//! 28      4           max_len (u32, specials included; a document holds <= max_len - 2 tokens)
//! 32      8           n_docs (u64)
//! 40      8           n_tokens (u64)
//! 48      8           tokens checksum (u64)
//! 56      8           offsets checksum (u64)
//! 64      8           header checksum (u64, of bytes 0..64)
//! 72      4 n_tokens  token ids (u32), every document back to back
//! ..      0 or 4      zero padding to a multiple of 8
//! ..      8 (n+1)     document offsets (u64, in tokens): doc i = tokens[off[i]..off[i+1]]
//! ```
//!
//! All integers are little-endian. Checksums fold 64-bit words, starting from
//! `h = 0x243F6A8885A308D3`, with `h = rotl((h ^ w) * 0x9E3779B97F4A7C15, 29)`: the header's
//! eight words, every token id (as a u64), every offset.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{mix, MIX_SEED};
use crate::data::tokenizer::TextTokenizer;
use crate::error::{Error, Result};

/// The first 8 bytes of every `.r3tok` file.
pub const MAGIC: [u8; 8] = *b"R3TOK\0\0\0";
/// The format version this build reads and writes.
pub const VERSION: u32 = 1;
/// Bytes before the first token.
pub const HEADER_LEN: usize = 72;
/// Header flag: consecutive texts were packed into blocks of `max_len - 2` tokens.
pub const FLAG_PACKED: u32 = 1;

/// The fields of a `.r3tok` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub flags: u32,
    pub fingerprint: u64,
    pub vocab_size: u32,
    pub max_len: u32,
    pub n_docs: u64,
    pub n_tokens: u64,
    pub tokens_hash: u64,
    pub offsets_hash: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The checksum of the first 64 header bytes (eight little-endian words).
fn header_hash(b: &[u8]) -> u64 {
    (0..8).fold(MIX_SEED, |h, k| mix(h, u64_at(b, 8 * k)))
}

impl Header {
    /// The 72 header bytes, checksum included.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.fingerprint.to_le_bytes());
        b[24..28].copy_from_slice(&self.vocab_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.max_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.n_docs.to_le_bytes());
        b[40..48].copy_from_slice(&self.n_tokens.to_le_bytes());
        b[48..56].copy_from_slice(&self.tokens_hash.to_le_bytes());
        b[56..64].copy_from_slice(&self.offsets_hash.to_le_bytes());
        let h = header_hash(&b);
        b[64..72].copy_from_slice(&h.to_le_bytes());
        b
    }

    /// Parses and checks the header at the start of `b` (at least [`HEADER_LEN`] bytes).
    fn parse(path: &Path, b: &[u8]) -> Result<Header> {
        let bad = |msg: String| Error::format(path, msg);
        if b.len() < HEADER_LEN {
            return Err(bad(format!(
                "truncated .r3tok file: {} bytes, the header alone is {HEADER_LEN}",
                b.len()
            )));
        }
        if b[0..8] != MAGIC {
            return Err(bad("not a .r3tok file (bad magic)".into()));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(bad(format!(
                "unsupported .r3tok version {version} (this build reads version {VERSION})"
            )));
        }
        if u64_at(b, 64) != header_hash(b) {
            return Err(bad("corrupt .r3tok header (checksum mismatch)".into()));
        }
        let h = Header {
            flags: u32_at(b, 12),
            fingerprint: u64_at(b, 16),
            vocab_size: u32_at(b, 24),
            max_len: u32_at(b, 28),
            n_docs: u64_at(b, 32),
            n_tokens: u64_at(b, 40),
            tokens_hash: u64_at(b, 48),
            offsets_hash: u64_at(b, 56),
        };
        if h.flags & !FLAG_PACKED != 0 {
            return Err(bad(format!("unknown flags {:#x}", h.flags)));
        }
        if h.max_len < 3 {
            return Err(bad(format!("max_len {} is below 3", h.max_len)));
        }
        if h.vocab_size == 0 {
            return Err(bad("vocab size 0".into()));
        }
        Ok(h)
    }
}

/// Where the regions of a file with `n_tokens` tokens and `n_docs` documents lie:
/// `(end of the tokens, start of the offsets, file length)`, `None` on overflow.
pub(crate) fn layout(n_tokens: u64, n_docs: u64) -> Option<(u64, u64, u64)> {
    let tokens_end = n_tokens.checked_mul(4)?.checked_add(HEADER_LEN as u64)?;
    let offsets_start = tokens_end.checked_add(tokens_end % 8)?;
    let total = n_docs
        .checked_add(1)?
        .checked_mul(8)?
        .checked_add(offsets_start)?;
    Some((tokens_end, offsets_start, total))
}

/// A `.r3tok` file, memory-mapped and validated: documents of u32 token ids without specials.
///
/// [`TokenCorpus::open`] checks the whole structure (magic, version, header checksum, the file
/// length against the counts, the padding, every offset and its checksum, the per-document length
/// limits), so that every accessor afterwards is in bounds. The token ids themselves are checked
/// only by [`TokenCorpus::verify_tokens`] (one pass over all tokens).
pub struct TokenCorpus {
    path: PathBuf,
    map: memmap2::Mmap,
    header: Header,
    tokens_end: usize,
    offsets_start: usize,
}

impl std::fmt::Debug for TokenCorpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCorpus")
            .field("path", &self.path)
            .field("docs", &self.header.n_docs)
            .field("tokens", &self.header.n_tokens)
            .field("max_len", &self.header.max_len)
            .field("packed", &self.is_packed())
            .finish()
    }
}

/// For `X.partial` with `X.partial.offsets` or `X.partial.state` beside it (a `tokenize` run's
/// working files, see `writer.rs`; the state comes only at the first checkpoint): `X`, the
/// file that run will write.
fn unfinished_output(path: &Path) -> Option<std::path::PathBuf> {
    let name = path.file_name()?.to_str()?;
    let done = name.strip_suffix(".partial")?;
    let beside = |suffix: &str| path.with_file_name(format!("{name}{suffix}")).is_file();
    (!done.is_empty() && (beside(".offsets") || beside(".state")))
        .then(|| path.with_file_name(done))
}

impl TokenCorpus {
    /// Whether `path` is a token file by its name (`.r3tok`, any case) or its first bytes (the
    /// magic): what `retrom3 pretrain --data` opens with [`TokenCorpus::open`] rather than read as
    /// text. An unreadable file is not (reading it as text names the error).
    pub fn is_token_file(path: &Path) -> bool {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("r3tok"))
            || unfinished_output(path).is_some()
        {
            return true;
        }
        let mut head = [0u8; 8];
        std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .is_ok_and(|()| head == MAGIC)
    }

    /// Memory-maps and validates `path`. A truncated, corrupt or foreign file is an
    /// [`Error::Format`] naming it.
    pub fn open(path: impl AsRef<Path>) -> Result<TokenCorpus> {
        let path = path.as_ref().to_path_buf();
        let bad = |msg: String| Error::format(&path, msg);
        if cfg!(target_endian = "big") {
            return Err(bad(
                ".r3tok files are little-endian and memory-mapped; big-endian hosts are not supported"
                    .into(),
            ));
        }
        if let Some(done) = unfinished_output(&path) {
            return Err(bad(format!(
                "the unfinished output of an interrupted `retrom3 tokenize` (its working files \
                 are beside it): re-run the same tokenize command to finish it, then use {}",
                done.display()
            )));
        }
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < HEADER_LEN as u64 {
            // Also keeps zero-length files away from mmap (not mappable everywhere).
            return Err(bad(format!(
                "truncated .r3tok file: {len} bytes, the header alone is {HEADER_LEN}"
            )));
        }
        // SAFETY: the map is read-only. Soundness relies on nobody truncating or rewriting the
        // file while it is mapped (that could SIGBUS or change the ids under our validated view);
        // retrom3 never modifies a finished .r3tok in place: `tokenize` writes `<output>.partial`
        // and renames it over the destination, which leaves existing maps on the old inode.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let header = Header::parse(&path, &map)?;

        let (tokens_end, offsets_start, total) = layout(header.n_tokens, header.n_docs)
            .ok_or_else(|| {
                bad(format!(
                    "corrupt header: {} tokens and {} documents overflow a file size",
                    header.n_tokens, header.n_docs
                ))
            })?;
        if total != map.len() as u64 {
            return Err(bad(format!(
                "file is {} bytes but its header ({} tokens, {} documents) needs {total}{}",
                map.len(),
                header.n_tokens,
                header.n_docs,
                if (map.len() as u64) < total {
                    " (truncated)"
                } else {
                    ""
                }
            )));
        }
        // The length fits in memory, so every region bound fits in usize.
        let (tokens_end, offsets_start) = (tokens_end as usize, offsets_start as usize);
        if map[tokens_end..offsets_start].iter().any(|&b| b != 0) {
            return Err(bad("non-zero padding after the tokens".into()));
        }
        if bytemuck::try_cast_slice::<u8, u32>(&map[HEADER_LEN..tokens_end]).is_err()
            || bytemuck::try_cast_slice::<u8, u64>(&map[offsets_start..]).is_err()
        {
            return Err(bad(
                "the memory map is not aligned for u32/u64 access".into()
            ));
        }
        let corpus = TokenCorpus {
            path,
            map,
            header,
            tokens_end,
            offsets_start,
        };
        corpus.check_offsets()?;
        Ok(corpus)
    }

    /// Offsets: checksum, first 0, last n_tokens, every document 1..=max_len-2 tokens long, and in
    /// a packed file every block but the last exactly max_len-2 long.
    fn check_offsets(&self) -> Result<()> {
        let bad = |msg: String| Error::format(&self.path, msg);
        let off = self.offsets();
        let hash = off.iter().fold(MIX_SEED, |h, &o| mix(h, o));
        if hash != self.header.offsets_hash {
            return Err(bad("corrupt document offsets (checksum mismatch)".into()));
        }
        if off[0] != 0 {
            return Err(bad(format!("first document offset is {}, not 0", off[0])));
        }
        let last = off[off.len() - 1];
        if last != self.header.n_tokens {
            return Err(bad(format!(
                "last document offset is {last}, but the file holds {} tokens",
                self.header.n_tokens
            )));
        }
        let cap = u64::from(self.header.max_len) - 2;
        let n_docs = off.len() - 1;
        for (i, w) in off.windows(2).enumerate() {
            let (a, b) = (w[0], w[1]);
            if b <= a || b - a > cap {
                return Err(bad(format!(
                    "document {i} has offsets {a}..{b}: its length must be 1..={cap}"
                )));
            }
            if self.is_packed() && i + 1 < n_docs && b - a != cap {
                return Err(bad(format!(
                    "packed block {i} holds {} tokens; every block but the last holds {cap}",
                    b - a
                )));
            }
        }
        Ok(())
    }

    /// The file this corpus was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of documents (packed blocks when [`TokenCorpus::is_packed`]).
    pub fn len(&self) -> usize {
        self.header.n_docs as usize
    }

    /// Whether the corpus holds no document.
    pub fn is_empty(&self) -> bool {
        self.header.n_docs == 0
    }

    /// Total number of tokens over all documents.
    pub fn n_tokens(&self) -> u64 {
        self.header.n_tokens
    }

    /// The sequence length the file was made for, specials included: every document holds at most
    /// `max_len() - 2` tokens.
    pub fn max_len(&self) -> usize {
        self.header.max_len as usize
    }

    /// Whether consecutive texts were packed into blocks of `max_len() - 2` tokens.
    pub fn is_packed(&self) -> bool {
        self.header.flags & FLAG_PACKED != 0
    }

    /// The fingerprint of the tokenizer that made the file (see
    /// [`super::tokenizer_fingerprint`]).
    pub fn fingerprint(&self) -> u64 {
        self.header.fingerprint
    }

    /// The vocabulary size of that tokenizer (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.header.vocab_size as usize
    }

    /// All token ids, documents back to back.
    pub fn tokens(&self) -> &[u32] {
        // Alignment and length were checked in `open`; the host is little-endian.
        bytemuck::cast_slice(&self.map[HEADER_LEN..self.tokens_end])
    }

    /// The `len() + 1` document offsets, in tokens: document `i` is `tokens()[off[i]..off[i + 1]]`.
    pub fn offsets(&self) -> &[u64] {
        bytemuck::cast_slice(&self.map[self.offsets_start..])
    }

    /// The token ids of document `i` (content only: no `<s>`/`</s>`), or `None` past the end.
    pub fn get(&self, i: usize) -> Option<&[u32]> {
        let off = self.offsets();
        // `off` holds at least one entry; `i + 1` could overflow.
        if i >= off.len() - 1 {
            return None;
        }
        // Offsets were validated as increasing and ending at n_tokens in `open`.
        Some(&self.tokens()[off[i] as usize..off[i + 1] as usize])
    }

    /// The token ids of document `i` (content only: no `<s>`/`</s>`).
    ///
    /// # Panics
    /// If `i >= len()`, like slice indexing; use [`TokenCorpus::get`] for a checked access.
    pub fn doc(&self, i: usize) -> &[u32] {
        match self.get(i) {
            Some(d) => d,
            None => panic!(
                "document index {i} out of range for a corpus of {} documents",
                self.len()
            ),
        }
    }

    /// The number of tokens of document `i` (`None` past the end).
    pub fn doc_len(&self, i: usize) -> Option<usize> {
        self.get(i).map(<[u32]>::len)
    }

    /// The documents in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u32]> + '_ {
        let off = self.offsets();
        let tokens = self.tokens();
        off.windows(2)
            .map(move |w| &tokens[w[0] as usize..w[1] as usize])
    }

    /// Whether this file was written by `tok` (`tok_dir` names it in the errors): the tokenizer
    /// fingerprint, and the header's vocabulary (it bounds [`TokenCorpus::verify_tokens`]'
    /// id check: one edited upward would let ids past the model's table through).
    pub fn check_tokenizer(&self, tok: &TextTokenizer, tok_dir: &Path) -> Result<()> {
        let fp = super::tokenizer_fingerprint(tok)?;
        if self.fingerprint() != fp {
            return Err(Error::format(
                &self.path,
                format!(
                    "tokenized with another tokenizer (fingerprint {:016x}, {} has {fp:016x}): \
                     re-run `retrom3 tokenize`",
                    self.fingerprint(),
                    tok_dir.display()
                ),
            ));
        }
        if self.vocab_size() != tok.vocab_size() {
            return Err(Error::format(
                &self.path,
                format!(
                    "its header says {} token ids, the tokenizer {} has {}: re-run `retrom3 \
                     tokenize`",
                    self.vocab_size(),
                    tok_dir.display(),
                    tok.vocab_size()
                ),
            ));
        }
        Ok(())
    }

    /// One pass over every token: the tokens checksum must match the header and every id must be
    /// below the vocabulary size. Not part of [`TokenCorpus::open`] because it reads the whole
    /// file (seconds for gigabytes); a trainer calls it once before the first epoch.
    pub fn verify_tokens(&self) -> Result<()> {
        let vocab = self.header.vocab_size;
        let mut hash = MIX_SEED;
        for (i, &t) in self.tokens().iter().enumerate() {
            if t >= vocab {
                return Err(Error::format(
                    &self.path,
                    format!("token {i} has id {t}, outside the vocabulary of {vocab}"),
                ));
            }
            hash = mix(hash, u64::from(t));
        }
        if hash != self.header.tokens_hash {
            return Err(Error::format(
                &self.path,
                "corrupt token ids (checksum mismatch)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header whose vocabulary was edited (its checksum recomputed) no longer matches the
    /// tokenizer: refused by name, while the file as written passes.
    #[test]
    fn check_tokenizer_refuses_an_edited_header_vocabulary() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr");
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        let d = std::env::temp_dir().join(format!("retrom3-hdr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let (input, out) = (d.join("in.txt"), d.join("c.r3tok"));
        std::fs::write(&input, "hello world\nsecond text here\n").unwrap();
        let opts = crate::data::corpus::TokenizeOptions::default();
        crate::data::corpus::tokenize_corpus(&tok, &input, &out, &opts, &mut |_| {}).unwrap();
        TokenCorpus::open(&out)
            .unwrap()
            .check_tokenizer(&tok, &dir)
            .unwrap();
        let mut bytes = std::fs::read(&out).unwrap();
        let mut h = Header::parse(&out, &bytes).unwrap();
        h.vocab_size += 1000;
        bytes[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        std::fs::write(&out, &bytes).unwrap();
        let c = TokenCorpus::open(&out).unwrap();
        let e = c.check_tokenizer(&tok, &dir).unwrap_err().to_string();
        assert!(
            e.contains("c.r3tok") && e.contains("header says 2000 token ids"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
