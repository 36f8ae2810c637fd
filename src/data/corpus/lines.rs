//! The streaming text source of `tokenize`: the texts of a JSONL `{"text": ...}` or plain-text file,
//! one line at a time, with a byte position that can be saved and seeked back to.
//!
//! Same line and format rules as [`crate::data::jsonl::read_texts`] (and the same error messages):
//! `\n` ends a line, a `\r` before it is dropped, a UTF-8 BOM at the start of the file is skipped;
//! the file is JSONL when its first non-blank line starts with `{`, plain text otherwise; in JSONL,
//! blank lines are allowed only at the end of the file. Unlike `read_texts`, texts that are empty
//! or only whitespace are not returned: they are counted in `skipped_empty`.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::writer::TokenizeStats;
use crate::error::{Error, Result};

/// How the lines of the file are read (decided by the first non-blank line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Mode {
    Undecided,
    Jsonl,
    Plain,
}

/// Everything needed to continue reading after line `line`, at byte `pos`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ReaderState {
    /// Bytes of the input consumed (the start of the next line).
    pub pos: u64,
    /// Lines consumed (1-based number of the last line read).
    pub line: u64,
    pub mode: Mode,
    /// The first of the blank lines read since the last non-blank one (JSONL, or before the mode
    /// is known): an error if more data follows in JSONL.
    pub first_blank: Option<u64>,
    /// Blank lines read while the mode is undecided (empty texts if the file turns out plain).
    pub undecided_blanks: u64,
}

impl ReaderState {
    pub fn start() -> ReaderState {
        ReaderState {
            pos: 0,
            line: 0,
            mode: Mode::Undecided,
            first_blank: None,
            undecided_blanks: 0,
        }
    }
}

pub(super) struct TextSource {
    path: PathBuf,
    reader: BufReader<File>,
    buf: Vec<u8>,
    state: ReaderState,
}

fn input_err(path: &Path, line: u64, msg: impl Into<String>) -> Error {
    jsonl::input_err(path, line as usize, msg)
}

fn blank_inside_jsonl(path: &Path, line: u64) -> Error {
    input_err(
        path,
        line,
        "blank line inside JSONL (blank lines are allowed only at the end of the file)",
    )
}

use super::super::jsonl::{self, is_blank};

fn utf8<'a>(path: &Path, line: u64, bytes: &'a [u8]) -> Result<&'a str> {
    jsonl::utf8(path, line as usize, bytes)
}

/// The `"text"` string of one JSONL line.
fn text_field(path: &Path, line: u64, s: &str) -> Result<String> {
    jsonl::text_field(path, line as usize, s)
}

/// A line buffer grown past this (bytes) is dropped after its line rather than kept.
const KEEP_BUFFER: usize = 1 << 20;

impl TextSource {
    /// The line in `self.buf` as the text (the buffer moves into it: a huge plain-text line is
    /// held once, not copied).
    fn take_line(&mut self, line: u64) -> Result<String> {
        utf8(&self.path, line, &self.buf)?;
        String::from_utf8(std::mem::take(&mut self.buf))
            .map_err(|_| Error::invalid(format!("{}:{line}: invalid UTF-8", self.path.display())))
    }

    /// Opens `path` and continues from `state` (a fresh [`ReaderState::start`] or a saved one).
    pub fn open(path: &Path, state: ReaderState) -> Result<TextSource> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        file.seek(SeekFrom::Start(state.pos))
            .map_err(|e| Error::io(path, e))?;
        Ok(TextSource {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 16, file),
            buf: Vec::new(),
            state,
        })
    }

    /// The reader position to save in a checkpoint.
    pub fn state(&self) -> &ReaderState {
        &self.state
    }

    /// Reads the next line into `self.buf` without its terminator (BOM removed on line 1);
    /// `false` at end of file.
    fn read_line(&mut self) -> Result<bool> {
        self.buf.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| Error::io(&self.path, e))?;
        if n == 0 {
            return Ok(false);
        }
        let first = self.state.pos == 0;
        self.state.pos += n as u64;
        self.state.line += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        }
        if first && self.buf.starts_with(b"\xEF\xBB\xBF") {
            self.buf.drain(..3);
        }
        Ok(true)
    }

    /// The next non-empty text, or `None` at end of file. Counts every line read in
    /// `stats.lines` and every empty or whitespace-only text in `stats.skipped_empty`.
    pub fn next_text(&mut self, stats: &mut TokenizeStats) -> Result<Option<String>> {
        loop {
            if !self.read_line()? {
                if self.state.mode == Mode::Undecided {
                    // Only blank lines: a plain text file of empty texts.
                    stats.skipped_empty += std::mem::take(&mut self.state.undecided_blanks);
                    self.state.first_blank = None;
                }
                return Ok(None);
            }
            stats.lines += 1;
            let line = self.state.line;
            let bytes = &self.buf[..];
            let text = match self.state.mode {
                Mode::Undecided | Mode::Jsonl if is_blank(bytes) => {
                    self.state.first_blank.get_or_insert(line);
                    if self.state.mode == Mode::Undecided {
                        self.state.undecided_blanks += 1;
                    }
                    continue;
                }
                Mode::Undecided => {
                    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
                    if first == Some(&b'{') {
                        if let Some(blank) = self.state.first_blank {
                            return Err(blank_inside_jsonl(&self.path, blank));
                        }
                        self.state.mode = Mode::Jsonl;
                        text_field(&self.path, line, utf8(&self.path, line, bytes)?)?
                    } else {
                        self.state.mode = Mode::Plain;
                        self.state.first_blank = None;
                        stats.skipped_empty += std::mem::take(&mut self.state.undecided_blanks);
                        self.take_line(line)?
                    }
                }
                Mode::Jsonl => {
                    if let Some(blank) = self.state.first_blank {
                        return Err(blank_inside_jsonl(&self.path, blank));
                    }
                    text_field(&self.path, line, utf8(&self.path, line, bytes)?)?
                }
                Mode::Plain => self.take_line(line)?,
            };
            if self.buf.capacity() > KEEP_BUFFER {
                // A huge JSONL line: its buffer is not kept for the rest of the run.
                self.buf = Vec::new();
            }
            if text.trim().is_empty() {
                stats.skipped_empty += 1;
                continue;
            }
            return Ok(Some(text));
        }
    }
}
