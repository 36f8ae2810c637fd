//! [`tokenize_corpus`]: text corpus in, `.r3tok` out, streamed in constant memory and resumable.
//!
//! Three working files sit beside the output until it is complete:
//! * `<output>.partial`: the final file being built: a zeroed header, then the token ids appended
//!   batch after batch;
//! * `<output>.partial.offsets`: the document offsets (u64), appended as documents end;
//! * `<output>.partial.state`: a small JSON checkpoint (input position, line, counts, lengths of
//!   the two files, running checksum) rewritten atomically every `checkpoint_every` batches, after
//!   both data files are flushed and `fsync`ed.
//!
//! At the end the offsets are copied after the tokens, the header is written, the file is
//! `fsync`ed and renamed to `<output>`, and the side files are removed. A run that finds a state
//! file with the same job (input file, tokenizer, max_len, pack) truncates the data files to the
//! recorded lengths, seeks the input to the recorded byte and continues: the result is byte for
//! byte the file an uninterrupted run writes. The batch size may change between runs (each text
//! is tokenized on its own, so batching never changes the output).

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::format::{Header, FLAG_PACKED, HEADER_LEN};
use super::lines::{ReaderState, TextSource};
use super::sink::Sink;
use super::{tokenizer_fingerprint, MIX_SEED};
use crate::data::tokenizer::TextTokenizer;
use crate::error::{Error, Result};

/// How [`tokenize_corpus`] turns texts into documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Sequence length the corpus is made for, specials included: a document keeps at most
    /// `max_len - 2` content tokens (the trainer adds `<s>`/`</s>`). At least 3.
    pub max_len: usize,
    /// Concatenate consecutive texts and cut the token stream into blocks of exactly
    /// `max_len - 2` tokens (the last block may be shorter); long texts continue in the next
    /// block, no token is dropped. Without it each text is one document, truncated to
    /// `max_len - 2` tokens.
    pub pack: bool,
    /// Texts per tokenizer call (tokenized in parallel on the tokenizer's thread pool).
    pub batch: usize,
    /// Batches between two checkpoints of the resume state (each costs two `fsync`s).
    pub checkpoint_every: usize,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            max_len: 512,
            pack: false,
            batch: 1024,
            checkpoint_every: 16,
        }
    }
}

/// What [`tokenize_corpus`] read and wrote. After a resumed run the counts cover the whole input,
/// the interrupted run's part included.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizeStats {
    /// Input bytes consumed (the input's length once complete).
    pub input_bytes: u64,
    /// Input lines read (blank trailing JSONL lines included).
    pub lines: u64,
    /// Texts that gave at least one token.
    pub texts: u64,
    /// Texts skipped because they are empty, only whitespace, or give no token.
    pub skipped_empty: u64,
    /// Texts cut to `max_len - 2` tokens (not packed only).
    pub truncated: u64,
    /// Tokens removed by that truncation.
    pub dropped_tokens: u64,
    /// Documents written (blocks when packed).
    pub docs: u64,
    /// Tokens written.
    pub tokens: u64,
    /// The input byte at which this run resumed an interrupted one (`None`: started fresh).
    #[serde(skip)]
    pub resumed_at: Option<u64>,
}

/// What must be equal for a run to continue another one's partial files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Job {
    input: PathBuf,
    input_len: u64,
    input_mtime_ns: Option<u64>,
    fingerprint: u64,
    vocab_size: u32,
    max_len: u32,
    pack: bool,
}

const STATE_FORMAT: &str = "retrom3-tokenize-state-1";

/// The JSON checkpoint `<output>.partial.state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    format: String,
    job: Job,
    reader: ReaderState,
    stats: TokenizeStats,
    /// Length of `<output>.partial` (header placeholder + tokens) at the checkpoint.
    tokens_len: u64,
    /// Length of `<output>.partial.offsets` at the checkpoint.
    offsets_len: u64,
    /// Running checksum of the tokens written.
    tokens_hash: u64,
    /// Running checksum of the offsets written (absent in a state written before it).
    #[serde(default)]
    offsets_hash: Option<u64>,
}

/// Whether two paths name one existing file: by device and inode on Unix (a hard link or a
/// symlink to the input is the input), by canonical path elsewhere.
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    }
}

/// The three working files beside the output.
struct WorkFiles {
    partial: PathBuf,
    offsets: PathBuf,
    state: PathBuf,
}

impl WorkFiles {
    fn new(output: &Path) -> WorkFiles {
        let with = |suffix: &str| {
            let mut s = output.as_os_str().to_owned();
            s.push(suffix);
            PathBuf::from(s)
        };
        WorkFiles {
            partial: with(".partial"),
            offsets: with(".partial.offsets"),
            state: with(".partial.state"),
        }
    }

    fn delete_hint(&self) -> String {
        format!(
            "delete {}, {} and {} to start over",
            self.partial.display(),
            self.offsets.display(),
            self.state.display()
        )
    }
}

fn check_options(opts: &TokenizeOptions) -> Result<()> {
    if opts.max_len < 3 || opts.max_len > u32::MAX as usize {
        return Err(Error::invalid(format!(
            "max_len {} must be in 3..=2^32-1 (it counts <s> and </s>; a document needs a token)",
            opts.max_len
        )));
    }
    if opts.batch == 0 {
        return Err(Error::invalid("batch must be at least 1"));
    }
    if opts.checkpoint_every == 0 {
        return Err(Error::invalid("checkpoint_every must be at least 1"));
    }
    Ok(())
}

/// The job of this call, to compare with a saved state.
fn describe_job(tok: &TextTokenizer, input: &Path, opts: &TokenizeOptions) -> Result<Job> {
    let meta = std::fs::metadata(input).map_err(|e| Error::io(input, e))?;
    if !meta.is_file() {
        return Err(Error::invalid(format!(
            "{}: the input must be a file",
            input.display()
        )));
    }
    let input_mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64);
    let vocab_size = u32::try_from(tok.vocab_size()).map_err(|_| {
        Error::invalid(format!(
            "vocabulary of {} tokens does not fit u32 ids",
            tok.vocab_size()
        ))
    })?;
    Ok(Job {
        input: input.canonicalize().map_err(|e| Error::io(input, e))?,
        input_len: meta.len(),
        input_mtime_ns,
        fingerprint: tokenizer_fingerprint(tok)?,
        vocab_size,
        max_len: opts.max_len as u32,
        pack: opts.pack,
    })
}

/// Names the first field in which two jobs differ.
fn job_difference(saved: &Job, now: &Job) -> String {
    if saved.input != now.input {
        format!(
            "input (was {}, now {})",
            saved.input.display(),
            now.input.display()
        )
    } else if saved.input_len != now.input_len || saved.input_mtime_ns != now.input_mtime_ns {
        "input file (its size or modification time changed)".to_string()
    } else if saved.fingerprint != now.fingerprint || saved.vocab_size != now.vocab_size {
        "tokenizer (tokenizer.json differs)".to_string()
    } else if saved.max_len != now.max_len {
        format!("max_len (was {}, now {})", saved.max_len, now.max_len)
    } else {
        format!("pack (was {}, now {})", saved.pack, now.pack)
    }
}

fn open_rw(path: &Path, truncate: bool) -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Creates the working files for a fresh run.
fn start_fresh(work: &WorkFiles, cap: u64) -> Result<(Sink, ReaderState, TokenizeStats)> {
    let mut tokens = open_rw(&work.partial, true)?;
    tokens
        .write_all(&[0u8; HEADER_LEN])
        .map_err(|e| Error::io(&work.partial, e))?;
    let mut offsets = open_rw(&work.offsets, true)?;
    offsets
        .write_all(&0u64.to_le_bytes())
        .map_err(|e| Error::io(&work.offsets, e))?;
    let sink = Sink::new(
        (tokens, work.partial.clone()),
        (offsets, work.offsets.clone()),
        (0, 0, 0),
        (MIX_SEED, super::mix(MIX_SEED, 0)),
        cap,
    );
    Ok((sink, ReaderState::start(), TokenizeStats::default()))
}

/// Reopens the working files of an interrupted run at its last checkpoint.
fn resume(work: &WorkFiles, job: &Job, cap: u64) -> Result<(Sink, ReaderState, TokenizeStats)> {
    let broken = |msg: String| Error::format(&work.state, format!("{msg}; {}", work.delete_hint()));
    let bytes = std::fs::read(&work.state).map_err(|e| Error::io(&work.state, e))?;
    let state: State = serde_json::from_slice(&bytes)
        .map_err(|e| broken(format!("unreadable resume state ({e})")))?;
    if state.format != STATE_FORMAT {
        return Err(broken(format!(
            "resume state of another format ({:?})",
            state.format
        )));
    }
    if state.job != *job {
        return Err(Error::invalid(format!(
            "{}: partial files of an interrupted run with a different {} exist; rerun with the \
             same arguments to resume, or {}",
            work.state.display(),
            job_difference(&state.job, job),
            work.delete_hint()
        )));
    }
    // The input position must be a line start inside the input, after as many lines as the
    // state says were read (a position edited forward would silently drop the texts between;
    // one mid-line would blame the input for a broken character). One pass counting newlines.
    let (pos, line) = (state.reader.pos, state.reader.line);
    if pos > job.input_len {
        return Err(broken(format!(
            "input position {pos} is past the input's {} bytes",
            job.input_len
        )));
    }
    let mut input = File::open(&job.input).map_err(|e| Error::io(&job.input, e))?;
    let (mut newlines, mut last) = (0u64, b'\n');
    super::read_chunks(&mut input, pos, 1 << 20, &job.input, |piece| {
        newlines += piece.iter().filter(|&&b| b == b'\n').count() as u64;
        last = *piece.last().unwrap_or(&last);
        Ok(())
    })?;
    let at_end = pos == job.input_len;
    if !(last == b'\n' || at_end)
        || !(newlines == line || (at_end && last != b'\n' && newlines + 1 == line))
    {
        return Err(broken(format!(
            "input position {pos} is not the start of line {} of {}",
            line + 1,
            job.input.display()
        )));
    }
    // The counts implied by the recorded lengths.
    let n_tokens = (state.tokens_len.checked_sub(HEADER_LEN as u64))
        .filter(|n| n % 4 == 0)
        .map(|n| n / 4);
    let n_docs = (state.offsets_len.checked_sub(8))
        .filter(|n| n % 8 == 0)
        .map(|n| n / 8);
    let (Some(n_tokens), Some(n_docs)) = (n_tokens, n_docs) else {
        return Err(broken(
            "inconsistent file lengths in the resume state".into(),
        ));
    };
    if n_tokens != state.stats.tokens || n_docs != state.stats.docs {
        return Err(broken("inconsistent counts in the resume state".into()));
    }
    let mut tokens = open_rw(&work.partial, false)?;
    let mut offsets = open_rw(&work.offsets, false)?;
    for (file, path, want) in [
        (&mut tokens, &work.partial, state.tokens_len),
        (&mut offsets, &work.offsets, state.offsets_len),
    ] {
        let have = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if have < want {
            return Err(broken(format!(
                "{} is {have} bytes, shorter than the {want} bytes recorded",
                path.display()
            )));
        }
        // Drop whatever was written after the checkpoint.
        file.set_len(want)
            .and_then(|()| file.seek(SeekFrom::End(0)).map(drop))
            .map_err(|e| Error::io(path, e))?;
    }
    // The tokens up to the checkpoint must be the ones the checkpoint hashed: a partial file
    // changed since would otherwise be finished under a checksum it does not match (caught only
    // when a trainer verifies the corpus). One sequential read of what was written.
    tokens
        .seek(SeekFrom::Start(HEADER_LEN as u64))
        .map_err(|e| Error::io(&work.partial, e))?;
    let mut hash = MIX_SEED;
    super::read_chunks(&mut tokens, n_tokens * 4, 1 << 20, &work.partial, |piece| {
        for c in piece.chunks_exact(4) {
            hash = super::mix(
                hash,
                u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        Ok(())
    })?;
    if hash != state.tokens_hash {
        return Err(broken(format!(
            "{} changed since the checkpoint (token checksum mismatch)",
            work.partial.display()
        )));
    }
    tokens
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(&work.partial, e))?;
    // Every offset up to the checkpoint must be the ones it hashed (a changed one would shift
    // document boundaries under a final checksum computed afresh), the last where the recorded
    // counts put it. One read of 8 bytes a document.
    offsets
        .seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(&work.offsets, e))?;
    let (mut offsets_hash, mut last_offset) = (MIX_SEED, 0u64);
    super::read_chunks(
        &mut offsets,
        state.offsets_len,
        1 << 16,
        &work.offsets,
        |piece| {
            let (h, last) = super::mix_offsets(offsets_hash, piece);
            offsets_hash = h;
            last_offset = last.unwrap_or(last_offset);
            Ok(())
        },
    )?;
    if state.offsets_hash.is_some_and(|h| h != offsets_hash) {
        return Err(broken(format!(
            "{} changed since the checkpoint (offsets checksum mismatch)",
            work.offsets.display()
        )));
    }
    let expected_last = if job.pack {
        n_docs.checked_mul(cap)
    } else {
        Some(n_tokens)
    };
    if expected_last != Some(last_offset) || last_offset > n_tokens {
        return Err(broken(format!(
            "{} does not match the resume state",
            work.offsets.display()
        )));
    }
    let sink = Sink::new(
        (tokens, work.partial.clone()),
        (offsets, work.offsets.clone()),
        (n_tokens, n_docs, last_offset),
        (state.tokens_hash, offsets_hash),
        cap,
    );
    let mut stats = state.stats;
    stats.resumed_at = Some(state.reader.pos);
    Ok((sink, state.reader, stats))
}

/// Pre-tokenizes `input` (JSONL `{"text": ...}` lines or plain text, one text per line, detected
/// as in [`crate::data::jsonl::read_texts`]) into the `.r3tok` file `output`.
///
/// Each text is tokenized without special tokens and without truncation; texts that are empty,
/// only whitespace or give no token are skipped (counted). Without `opts.pack` each text becomes
/// one document truncated to `max_len - 2` tokens; with it the texts' tokens are concatenated in
/// order and cut into blocks of `max_len - 2` (the last one may be shorter).
///
/// Memory stays constant whatever the input size: one batch of texts and fixed buffers; tokens and
/// offsets go to disk as they are produced. Only a huge line adds its own size: it is held whole
/// (plus its ids, 4 bytes each) while tokenized in pieces (`TextTokenizer::content_ids`), about
/// 5 bytes per byte of the longest line. `progress` receives the input bytes consumed after
/// every batch (and once at the start, where a resumed run starts past 0).
///
/// Resumable: see the module docs. A bad input line is an [`Error::Input`] with its line number;
/// the partial files stay, and since fixing the input changes it they must then be deleted. A
/// state left by a run with another input, tokenizer, `max_len` or `pack` is an
/// [`Error::Invalid`] that names the files to delete.
pub fn tokenize_corpus(
    tok: &TextTokenizer,
    input: &Path,
    output: &Path,
    opts: &TokenizeOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<TokenizeStats> {
    check_options(opts)?;
    // The token file is memory-mapped by its readers and renamed into place: a FIFO, a device
    // or a directory at its name would be replaced (or fail at the very end).
    if let Ok(m) = std::fs::metadata(output) {
        if !m.is_file() {
            return Err(Error::invalid(format!(
                "{}: {} (the output is a memory-mapped token file)",
                output.display(),
                if m.is_dir() {
                    "is a directory"
                } else {
                    "exists and is not a regular file"
                }
            )));
        }
    }
    let job = describe_job(tok, input, opts)?;
    if same_file(output, input) {
        return Err(Error::invalid(format!(
            "{}: the output must differ from the input",
            output.display()
        )));
    }
    // Nor may the input be one of the output's working files (truncated and renamed into place).
    let work = WorkFiles::new(output);
    for f in [&work.partial, &work.offsets, &work.state] {
        if same_file(f, input) {
            return Err(Error::invalid(format!(
                "{}: the input is a working file of the output {} (give another --output)",
                input.display(),
                output.display()
            )));
        }
    }
    // Checked before the corpus is read (the final rename would fail only at the end).
    if output.is_dir() {
        return Err(Error::invalid(format!(
            "{}: the output is a directory; give a file path (e.g. corpus.r3tok)",
            output.display()
        )));
    }
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::io(
                output,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("the output's directory {} does not exist", parent.display()),
                ),
            ));
        }
    }
    let cap = opts.max_len as u64 - 2;
    let (mut sink, reader, mut stats) = if work.state.exists() {
        resume(&work, &job, cap)?
    } else {
        start_fresh(&work, cap)?
    };
    let mut source = TextSource::open(input, reader)?;
    progress(source.state().pos);

    let mut texts: Vec<String> = Vec::with_capacity(opts.batch);
    let mut since_checkpoint = 0usize;
    loop {
        texts.clear();
        while texts.len() < opts.batch {
            match source.next_text(&mut stats)? {
                Some(t) => texts.push(t),
                None => break,
            }
        }
        let at_end = texts.len() < opts.batch;
        if !texts.is_empty() {
            // Long texts piece by piece (`TextTokenizer::content_ids`: memory for one piece),
            // the rest as one batch.
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            for ids in tok.content_ids_batch(&refs)? {
                let ids = ids.as_slice();
                if ids.is_empty() {
                    stats.skipped_empty += 1;
                    continue;
                }
                stats.texts += 1;
                if opts.pack {
                    sink.push_packed(ids)?;
                } else {
                    let keep = ids.len().min(cap as usize);
                    if keep < ids.len() {
                        stats.truncated += 1;
                        stats.dropped_tokens += (ids.len() - keep) as u64;
                    }
                    sink.push_doc(&ids[..keep])?;
                }
            }
        }
        stats.input_bytes = source.state().pos;
        progress(stats.input_bytes);
        if at_end {
            break;
        }
        since_checkpoint += 1;
        if since_checkpoint >= opts.checkpoint_every {
            since_checkpoint = 0;
            sink.sync()?;
            stats.tokens = sink.n_tokens;
            stats.docs = sink.n_docs;
            let state = State {
                format: STATE_FORMAT.to_string(),
                job: job.clone(),
                reader: source.state().clone(),
                stats: stats.clone(),
                tokens_len: sink.tokens_len(),
                offsets_len: sink.offsets_len(),
                tokens_hash: sink.tokens_hash,
                offsets_hash: Some(sink.offsets_hash),
            };
            crate::io::write_atomic(&work.state, |w| {
                serde_json::to_writer_pretty(&mut *w, &state)?;
                w.write_all(b"\n")
            })?;
        }
    }

    let header = sink.finish(Header {
        flags: if opts.pack { FLAG_PACKED } else { 0 },
        fingerprint: job.fingerprint,
        vocab_size: job.vocab_size,
        max_len: job.max_len,
        n_docs: 0,
        n_tokens: 0,
        tokens_hash: 0,
        offsets_hash: 0,
    })?;
    stats.docs = header.n_docs;
    stats.tokens = header.n_tokens;
    // The state goes first: a crash before the rename then restarts from scratch instead of
    // resuming into a file that already holds its offsets and header.
    remove_if_exists(&work.state)?;
    std::fs::rename(&work.partial, output).map_err(|e| Error::io(output, e))?;
    remove_if_exists(&work.offsets)?;
    if let Some(dir) = output.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        // Make the rename durable; opening a directory is not supported everywhere.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(stats)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}
