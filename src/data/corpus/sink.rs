//! The `.r3tok` file being built: token ids appended to `<output>.partial` (after a zeroed
//! header), document offsets to the side file `<output>.partial.offsets`; `finish` appends the
//! offsets after the tokens and writes the header.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::PathBuf;

use super::format::{Header, HEADER_LEN};
use super::{mix, read_chunks, MIX_SEED};
use crate::error::{Error, Result};

/// The output being built: tokens into `<output>.partial`, offsets into the side file.
pub(super) struct Sink {
    tokens: BufWriter<File>,
    offsets: BufWriter<File>,
    tokens_path: PathBuf,
    offsets_path: PathBuf,
    pub n_tokens: u64,
    pub n_docs: u64,
    /// Offset (in tokens) of the end of the last complete document.
    last_offset: u64,
    pub tokens_hash: u64,
    /// Running checksum of the offsets written (the leading 0 included).
    pub offsets_hash: u64,
    /// Content tokens per document: max_len - 2.
    cap: u64,
    scratch: Vec<u8>,
}

impl Sink {
    /// Continues `tokens` (`<output>.partial`) and `offsets` (the side file), both positioned at
    /// their end, holding `(n_tokens, n_docs, last_offset)` so far and the running
    /// `(tokens_hash, offsets_hash)`.
    pub fn new(
        tokens: (File, PathBuf),
        offsets: (File, PathBuf),
        (n_tokens, n_docs, last_offset): (u64, u64, u64),
        (tokens_hash, offsets_hash): (u64, u64),
        cap: u64,
    ) -> Sink {
        Sink {
            tokens: BufWriter::with_capacity(1 << 20, tokens.0),
            offsets: BufWriter::with_capacity(1 << 16, offsets.0),
            tokens_path: tokens.1,
            offsets_path: offsets.1,
            n_tokens,
            n_docs,
            last_offset,
            tokens_hash,
            offsets_hash,
            cap,
            scratch: Vec::new(),
        }
    }

    fn write_tokens(&mut self, ids: &[u32]) -> Result<()> {
        self.scratch.clear();
        for &t in ids {
            self.scratch.extend_from_slice(&t.to_le_bytes());
            self.tokens_hash = mix(self.tokens_hash, u64::from(t));
        }
        self.tokens
            .write_all(&self.scratch)
            .map_err(|e| Error::io(&self.tokens_path, e))?;
        self.n_tokens += ids.len() as u64;
        Ok(())
    }

    fn end_doc(&mut self) -> Result<()> {
        self.offsets
            .write_all(&self.n_tokens.to_le_bytes())
            .map_err(|e| Error::io(&self.offsets_path, e))?;
        self.offsets_hash = mix(self.offsets_hash, self.n_tokens);
        self.n_docs += 1;
        self.last_offset = self.n_tokens;
        Ok(())
    }

    /// One document (already truncated).
    pub fn push_doc(&mut self, ids: &[u32]) -> Result<()> {
        self.write_tokens(ids)?;
        self.end_doc()
    }

    /// Appends to the token stream, closing a block every `cap` tokens.
    pub fn push_packed(&mut self, mut ids: &[u32]) -> Result<()> {
        while !ids.is_empty() {
            let room = (self.cap - (self.n_tokens - self.last_offset)) as usize;
            let (now, rest) = ids.split_at(room.min(ids.len()));
            self.write_tokens(now)?;
            if self.n_tokens - self.last_offset == self.cap {
                self.end_doc()?;
            }
            ids = rest;
        }
        Ok(())
    }

    /// Flushes both files and makes their content durable.
    pub fn sync(&mut self) -> Result<()> {
        self.tokens
            .flush()
            .and_then(|()| self.tokens.get_ref().sync_data())
            .map_err(|e| Error::io(&self.tokens_path, e))?;
        self.offsets
            .flush()
            .and_then(|()| self.offsets.get_ref().sync_data())
            .map_err(|e| Error::io(&self.offsets_path, e))
    }

    pub fn tokens_len(&self) -> u64 {
        HEADER_LEN as u64 + 4 * self.n_tokens
    }

    pub fn offsets_len(&self) -> u64 {
        8 * (self.n_docs + 1)
    }

    /// Closes the last (short) packed block, pads, appends the offsets, writes the header and
    /// `fsync`s `<output>.partial`. Returns the header as written (counts and checksums filled in).
    pub fn finish(mut self, mut header: Header) -> Result<Header> {
        if self.n_tokens > self.last_offset {
            self.end_doc()?;
        }
        let tokens_err = |e| Error::io(&self.tokens_path, e);
        if self.n_tokens % 2 == 1 {
            self.tokens.write_all(&[0u8; 4]).map_err(tokens_err)?;
        }
        self.offsets
            .flush()
            .map_err(|e| Error::io(&self.offsets_path, e))?;
        let mut offsets = self
            .offsets
            .into_inner()
            .map_err(|e| Error::io(&self.offsets_path, e.into_error()))?;
        offsets
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(&self.offsets_path, e))?;
        // Exactly n_docs + 1 offsets were written; read them back in chunks.
        let mut offsets_hash = MIX_SEED;
        let tokens = &mut self.tokens;
        let n_offsets = 8 * (self.n_docs + 1);
        read_chunks(
            &mut offsets,
            n_offsets,
            1 << 16,
            &self.offsets_path,
            |piece| {
                offsets_hash = super::mix_offsets(offsets_hash, piece).0;
                tokens.write_all(piece).map_err(tokens_err)
            },
        )?;
        header.n_docs = self.n_docs;
        header.n_tokens = self.n_tokens;
        header.tokens_hash = self.tokens_hash;
        header.offsets_hash = offsets_hash;
        self.tokens.flush().map_err(tokens_err)?;
        let mut file = self
            .tokens
            .into_inner()
            .map_err(|e| Error::io(&self.tokens_path, e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header.to_bytes()))
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(&self.tokens_path, e))?;
        Ok(header)
    }
}
