//! Line-oriented input files: JSONL (one JSON object per line) and plain text (one text per line).
//!
//! Readers stream the file as raw bytes, one line at a time, so a bad line is reported with its
//! 1-based number ([`Error::Input`]) instead of failing the whole read with one I/O error:
//! invalid UTF-8, invalid JSON, a missing or mistyped field.
//!
//! Line rules shared by every reader:
//! * lines end at `\n`; a `\r` just before it is removed (CRLF files); a final newline at end of
//!   file does not start another line; a UTF-8 byte-order mark at the start of the file is skipped;
//! * in JSONL, blank lines (only ASCII whitespace) are allowed only at the end of the file; a blank
//!   line followed by more data is an error naming the blank line.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// One `{"query": ..., "passage": ...}` line of a pair file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryPassage {
    /// The query text.
    pub query: String,
    /// The passage text.
    pub passage: String,
}

pub(crate) fn input_err(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Input {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

/// Calls `f(line_number, bytes)` for every line of `path`, without the line terminator.
fn each_line(path: &Path, mut f: impl FnMut(usize, &[u8]) -> Result<()>) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut buf = Vec::new();
    let mut line = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        let mut bytes: &[u8] = &buf;
        if let Some(rest) = bytes.strip_suffix(b"\n") {
            bytes = rest.strip_suffix(b"\r").unwrap_or(rest);
        }
        if line == 1 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        f(line, bytes)?;
    }
}

pub(crate) fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

pub(crate) fn utf8<'a>(path: &Path, line: usize, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        input_err(
            path,
            line,
            format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1),
        )
    })
}

/// serde_json's message without its "at line 1 column N" suffix (always line 1 here: we parse a
/// single line), with the column put first.
fn json_msg(e: &serde_json::Error) -> String {
    let mut msg = e.to_string();
    if let Some(at) = msg.rfind(" at line ") {
        msg.truncate(at);
    }
    format!("column {}: {msg}", e.column())
}

/// Enforces "blank lines only at the end" for JSONL: remembers the first blank line of the current
/// run and reports it when data follows.
#[derive(Default)]
struct TrailingBlanks {
    pending: Option<usize>,
}

impl TrailingBlanks {
    /// Returns `Ok(true)` when the line is blank (skip it), an error when a non-blank line follows
    /// blank ones.
    fn skip(&mut self, path: &Path, line: usize, bytes: &[u8]) -> Result<bool> {
        if is_blank(bytes) {
            self.pending.get_or_insert(line);
            return Ok(true);
        }
        match self.pending {
            Some(blank) => Err(input_err(
                path,
                blank,
                "blank line inside JSONL (blank lines are allowed only at the end of the file)",
            )),
            None => Ok(false),
        }
    }
}

/// The `"text"` string of one JSONL line (shared with the streaming corpus reader).
pub(crate) fn text_field(path: &Path, line: usize, s: &str) -> Result<String> {
    let [text] = string_fields(path, line, s, ["text"])?;
    Ok(text)
}

/// The string fields `keys` of one JSONL line, which must be an object (other fields ignored).
/// Errors name the line and the field that is missing or not a string.
fn string_fields<const N: usize>(
    path: &Path,
    line: usize,
    s: &str,
    keys: [&str; N],
) -> Result<[String; N]> {
    let value: Value = serde_json::from_str(s)
        .map_err(|e| input_err(path, line, format!("invalid JSON, {}", json_msg(&e))))?;
    let Value::Object(mut obj) = value else {
        let names: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
        return Err(input_err(
            path,
            line,
            format!(
                "expected a JSON object with {} field{}",
                names.join(" and "),
                if N == 1 { "" } else { "s" }
            ),
        ));
    };
    let mut out: [String; N] = std::array::from_fn(|_| String::new());
    for (k, slot) in keys.iter().zip(&mut out) {
        *slot = match obj.remove(*k) {
            Some(Value::String(t)) => t,
            None => return Err(input_err(path, line, format!("field \"{k}\": missing"))),
            Some(other) => {
                return Err(input_err(
                    path,
                    line,
                    format!(
                        "field \"{k}\": expected a string, got {}",
                        json_kind(&other)
                    ),
                ))
            }
        };
    }
    Ok(out)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads the texts of `path`, a JSONL file of `{"text": "..."}` objects or a plain text file with
/// one text per line.
///
/// The format is decided per file: JSONL when the first non-blank line starts (after leading
/// whitespace) with `{`, plain text otherwise. In plain-text mode every line is a text, an empty
/// line being an empty text (the newline ending the last line does not add one). In JSONL mode the
/// other fields of each object are ignored. Errors name the line: invalid UTF-8, invalid JSON, a
/// missing or non-string `"text"`, a blank line before more JSONL data.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    #[derive(PartialEq)]
    enum Mode {
        Undecided,
        Jsonl,
        Plain,
    }
    let mut mode = Mode::Undecided;
    let mut texts = Vec::new();
    // Blank lines seen before the mode is known: texts in plain mode, an error in JSONL.
    let mut leading_blanks: Vec<(usize, String)> = Vec::new();
    let mut blanks = TrailingBlanks::default();

    each_line(path, |line, bytes| {
        if mode == Mode::Undecided {
            if is_blank(bytes) {
                // ASCII whitespace only, hence valid UTF-8.
                leading_blanks.push((line, String::from_utf8_lossy(bytes).into_owned()));
                return Ok(());
            }
            let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
            if first == Some(&b'{') {
                if let Some((blank, _)) = leading_blanks.first() {
                    return Err(input_err(
                        path,
                        *blank,
                        "blank line inside JSONL (blank lines are allowed only at the end of the file)",
                    ));
                }
                mode = Mode::Jsonl;
            } else {
                mode = Mode::Plain;
                texts.extend(leading_blanks.drain(..).map(|(_, t)| t));
            }
        }
        match mode {
            Mode::Jsonl => {
                if !blanks.skip(path, line, bytes)? {
                    let s = utf8(path, line, bytes)?;
                    texts.push(text_field(path, line, s)?);
                }
            }
            _ => texts.push(utf8(path, line, bytes)?.to_string()),
        }
        Ok(())
    })?;
    if mode == Mode::Undecided {
        // Only blank lines: a plain text file of (whitespace-only) texts.
        texts.extend(leading_blanks.into_iter().map(|(_, t)| t));
    }
    Ok(texts)
}

/// Reads a JSONL file of `T` records, one JSON value per line.
///
/// Errors name the line and carry serde's message (which names a missing or mistyped field);
/// blank lines are allowed only at the end of the file.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    read_lines_as(path, |line, s| {
        serde_json::from_str(s).map_err(|e| input_err(path, line, json_msg(&e)))
    })
}

/// Reads a JSONL file of `{"query": ..., "passage": ...}` pairs (other fields are ignored).
/// Errors name the line and the field (a missing or non-string `query` / `passage`), or say that
/// the line is not a JSON object.
pub fn read_pairs(path: &Path) -> Result<Vec<QueryPassage>> {
    read_lines_as(path, |line, s| {
        let [query, passage] = string_fields(path, line, s, ["query", "passage"])?;
        Ok(QueryPassage { query, passage })
    })
}

/// One record per non-blank line (`parse` gets its 1-based number and UTF-8 text); blank lines
/// are allowed only at the end of the file.
fn read_lines_as<T>(
    path: &Path,
    mut parse: impl FnMut(usize, &str) -> Result<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let mut blanks = TrailingBlanks::default();
    each_line(path, |line, bytes| {
        if blanks.skip(path, line, bytes)? {
            return Ok(());
        }
        out.push(parse(line, utf8(path, line, bytes)?)?);
        Ok(())
    })?;
    Ok(out)
}
