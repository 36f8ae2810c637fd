//! The BEIR data layout: `corpus.jsonl` (`{"_id", "title", "text"}`), `queries.jsonl`
//! (`{"_id", "text"}`) and `qrels/<split>.tsv` (header `query-id corpus-id score`).
//!
//! As BEIR does, a document's text is `title + " " + text` when the title is non-empty. Corpus
//! lines with only `{"text"}` are accepted too; their id is the 1-based line number. Ids may be
//! JSON strings or numbers (some BEIR sets use numbers).

use crate::data::jsonl::read_jsonl;
use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// One corpus document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doc {
    pub id: String,
    pub text: String,
}

/// Graded judgments: query id → (doc id → relevance).
pub type Qrels = BTreeMap<String, BTreeMap<String, i32>>;

fn input(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Input {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

fn id_field(
    path: &Path,
    line: usize,
    obj: &serde_json::Map<String, Value>,
) -> Result<Option<String>> {
    match obj.get("_id") {
        None => Ok(None),
        Some(Value::String(s)) if s.chars().any(char::is_whitespace) => Err(input(
            path,
            line,
            format!(
                "id {s:?} contains whitespace: a TREC run or qrels line (whitespace-separated) \
                 cannot carry it"
            ),
        )),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(input(
            path,
            line,
            "field \"_id\": expected a non-empty string or a number",
        )),
    }
}

fn str_field(
    path: &Path,
    line: usize,
    obj: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(input(
            path,
            line,
            format!("field \"{key}\": expected a string"),
        )),
    }
}

fn objects(path: &Path) -> Result<Vec<serde_json::Map<String, Value>>> {
    let rows: Vec<Value> = read_jsonl(path)?;
    rows.into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Object(o) => Ok(o),
            _ => Err(input(path, i + 1, "expected a JSON object")),
        })
        .collect()
}

fn check_unique<'a>(path: &Path, ids: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut seen = HashSet::new();
    for (i, id) in ids.enumerate() {
        if !seen.insert(id) {
            return Err(input(path, i + 1, format!("duplicate id {id:?}")));
        }
    }
    Ok(())
}

/// Read a corpus. An empty corpus is an error (there is nothing to index).
pub fn read_corpus(path: &Path) -> Result<Vec<Doc>> {
    let rows = objects(path)?;
    if rows.is_empty() {
        return Err(Error::format(path, "empty corpus: no documents to index"));
    }
    let docs = rows
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let line = i + 1;
            let id = id_field(path, line, o)?.unwrap_or_else(|| line.to_string());
            let text = str_field(path, line, o, "text")?
                .ok_or_else(|| input(path, line, "field \"text\": missing or null"))?;
            let title = str_field(path, line, o, "title")?.unwrap_or_default();
            let text = if title.is_empty() {
                text
            } else {
                format!("{title} {text}")
            };
            // A blank document is an empty one (the special tokens only): whitespace would
            // otherwise become a "▁" piece with postings of its own.
            let text = if text.trim().is_empty() {
                String::new()
            } else {
                text
            };
            Ok(Doc { id, text })
        })
        .collect::<Result<Vec<_>>>()?;
    check_unique(path, docs.iter().map(|d| d.id.as_str()))?;
    Ok(docs)
}

/// Read queries (`{"_id", "text"}`; without `_id` the line number is the id). An empty or
/// whitespace-only query text is an error (there is nothing to search with), as in `encode`.
pub fn read_queries(path: &Path) -> Result<Vec<Doc>> {
    read_queries_kept(path, |_| true)
}

/// [`read_queries`], keeping only the queries whose id `keep` accepts (BEIR's judged ones): an
/// empty text is an error only there. The ids must still be unique in the whole file.
pub fn read_queries_kept(path: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<Doc>> {
    let rows = objects(path)?;
    let mut ids = Vec::with_capacity(rows.len());
    let mut qs = Vec::new();
    for (i, o) in rows.iter().enumerate() {
        let line = i + 1;
        let id = id_field(path, line, o)?.unwrap_or_else(|| line.to_string());
        if keep(&id) {
            let text = str_field(path, line, o, "text")?
                .ok_or_else(|| input(path, line, "field \"text\": missing or null"))?;
            if text.trim().is_empty() {
                return Err(input(
                    path,
                    line,
                    format!("query {id:?}: empty text (nothing to search with)"),
                ));
            }
            qs.push(Doc {
                id: id.clone(),
                text,
            });
        }
        ids.push(id);
    }
    check_unique(path, ids.iter().map(String::as_str))?;
    if qs.is_empty() && rows.is_empty() {
        return Err(Error::format(path, "no query in the file"));
    }
    Ok(qs)
}

/// Read a qrels TSV (`query-id<TAB>corpus-id<TAB>score`; a first line starting with `query-id`
/// is the header). Also accepts the 4-column TREC form `qid 0 docid rel` (whitespace separated).
pub fn read_qrels(path: &Path) -> Result<Qrels> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::format(path, "qrels file not found"),
        _ => Error::io(path, e),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        input(path, line, "invalid UTF-8")
    })?;
    // A byte-order mark would hide the header (BEIR skips the first line whatever it holds).
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut q = Qrels::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || (i == 0 && line.starts_with("query-id")) {
            continue;
        }
        let f: Vec<&str> = if line.contains('\t') {
            // Empty fields after the last value (a trailing tab) are not columns.
            let mut f: Vec<&str> = line.split('\t').map(str::trim).collect();
            while f.len() > 3 && f.last() == Some(&"") {
                f.pop();
            }
            f
        } else {
            line.split_whitespace().collect()
        };
        let (qid, did, rel) = match f.len() {
            3 => (f[0], f[1], f[2]),
            4 => (f[0], f[2], f[3]),
            n => {
                return Err(input(
                    path,
                    i + 1,
                    format!("expected 3 columns (query-id corpus-id score), got {n}"),
                ))
            }
        };
        // An integer label (pytrec_eval's); "1.0" is accepted as 1, "1.5", NaN, inf or a value
        // past i32 are refused rather than cut.
        let rel: i32 = rel
            .parse::<i32>()
            .ok()
            .or_else(|| {
                rel.parse::<f64>()
                    .ok()
                    .filter(|x| x.fract() == 0.0 && x.abs() <= i32::MAX as f64)
                    .map(|x| x as i32)
            })
            .ok_or_else(|| {
                input(
                    path,
                    i + 1,
                    format!("score {rel:?} is not an integer relevance label"),
                )
            })?;
        q.entry(qid.to_string())
            .or_default()
            .insert(did.to_string(), rel);
    }
    if q.is_empty() {
        return Err(Error::format(path, "no judgments"));
    }
    Ok(q)
}

/// The ids of the documents with no text (empty or whitespace-only title and text). They are
/// indexed anyway (as the special tokens only; real BEIR corpora hold a few), and the command
/// line warns about them.
pub fn empty_docs(corpus: &[Doc]) -> Vec<&str> {
    corpus
        .iter()
        .filter(|d| d.text.trim().is_empty())
        .map(|d| d.id.as_str())
        .collect()
}

/// The distinct judged document ids of `qrels` that are not in `corpus` (sorted), and the number
/// of distinct judged document ids.
pub fn judged_docs_missing<'a>(qrels: &'a Qrels, corpus: &[Doc]) -> (Vec<&'a str>, usize) {
    let have: HashSet<&str> = corpus.iter().map(|d| d.id.as_str()).collect();
    let judged: std::collections::BTreeSet<&str> = qrels
        .values()
        .flat_map(|j| j.keys().map(String::as_str))
        .collect();
    let n = judged.len();
    let missing = judged.into_iter().filter(|d| !have.contains(d)).collect();
    (missing, n)
}

/// A BEIR directory with one split loaded.
#[derive(Clone, Debug)]
pub struct BeirData {
    pub corpus: Vec<Doc>,
    /// The queries that have judgments in the split (BEIR drops the others), in file order.
    pub queries: Vec<Doc>,
    pub qrels: Qrels,
}

/// Load `dir/corpus.jsonl`, `dir/queries.jsonl` and `dir/qrels/<split>.tsv`.
pub fn load(dir: &Path, split: &str) -> Result<BeirData> {
    let qrels_path: PathBuf = dir.join("qrels").join(format!("{split}.tsv"));
    if !qrels_path.is_file() {
        let have: Vec<String> = std::fs::read_dir(dir.join("qrels"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_suffix(".tsv")
                            .map(String::from)
                    })
                    .collect()
            })
            .unwrap_or_default();
        return Err(Error::format(
            &qrels_path,
            format!(
                "missing qrels for split {split:?} (available: {})",
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            ),
        ));
    }
    let qrels = read_qrels(&qrels_path)?;
    let corpus = read_corpus(&dir.join("corpus.jsonl"))?;
    let queries_path = dir.join("queries.jsonl");
    let queries: Vec<Doc> = read_queries_kept(&queries_path, |id| qrels.contains_key(id))?;
    // Every judged query must have its text (BEIR's loader fails with a KeyError): one left out
    // would be scored 0 in every metric, or dropped, without a word.
    if queries.len() < qrels.len() {
        let have: HashSet<&str> = queries.iter().map(|q| q.id.as_str()).collect();
        let mut missing: Vec<&str> = qrels
            .keys()
            .map(String::as_str)
            .filter(|q| !have.contains(q))
            .collect();
        missing.sort_unstable();
        let n = missing.len();
        missing.truncate(5);
        return Err(Error::format(
            &qrels_path,
            format!(
                "{n} judged quer{} not in {}: {}{}",
                if n == 1 { "y is" } else { "ies are" },
                queries_path.display(),
                missing.join(", "),
                if n > 5 { ", ..." } else { "" }
            ),
        ));
    }
    if queries.is_empty() {
        return Err(Error::format(
            &qrels_path,
            "no query of queries.jsonl has judgments in this split",
        ));
    }
    Ok(BeirData {
        corpus,
        queries,
        qrels,
    })
}
