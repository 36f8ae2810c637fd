//! M3 fine-tuning data (SPEC §4.1-4.2, §5.1-5.2): FlagEmbedding's training JSONL as is, validated
//! with file and line in every error; the per-file settings of FlagEmbedding's same-dataset mode
//! (first-row `batch_size`, `train_group_size`, `type`); the merging of small files of one
//! directory; the per-query passage sampling (one positive, G−1 negatives with the repeat rule for
//! short lists, sorted by teacher score when scores exist); length buckets and the epoch plan.

use super::jsonl::{input_err, read_jsonl};
use super::rng::Rng;
use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The largest group (1 positive + negatives per query) a file or `--group-size` may ask for:
/// FlagEmbedding's are 2-16; a larger one is a typo that would allocate without bound.
pub const MAX_GROUP_SIZE: usize = 4096;

/// One training line (FlagEmbedding's format, SPEC §4.1).
///
/// Required: `query` (non-empty string), `pos` and `neg` (non-empty lists of strings). Optional:
/// `pos_scores` / `neg_scores` (numbers aligned with `pos` / `neg`; teacher scores, used only when
/// both are present), `prompt`, `type`, `batch_size`, `train_group_size`. Other fields are
/// ignored, as FlagEmbedding ignores extra columns. `null` counts as absent for every optional
/// field.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TrainExample {
    pub query: String,
    pub pos: Vec<String>,
    #[serde(default)]
    pub neg: Vec<String>,
    #[serde(default)]
    pub pos_scores: Option<Vec<f32>>,
    #[serde(default)]
    pub neg_scores: Option<Vec<f32>>,
    /// Per-sample query instruction: the query becomes `prompt + query` (FlagEmbedding's
    /// `query_instruction_format` default `"{}{}"`). In FlagEmbedding's same-dataset mode (which
    /// is how retrom3 always batches) the row's prompt replaces `query_instruction_for_retrieval`;
    /// retrom3 has no global instruction, so without a prompt the query is used as is (FlagEmbedding
    /// would prefix the literal text "None", SPEC §4.3 pitfall, not replicated).
    #[serde(default)]
    pub prompt: Option<String>,
    /// The `type` field. In the reference it exists only in the new code's same-dataset dataset
    /// (\[ABS\] `AbsEmbedderSameDatasetTrainDataset`; the paper-era BGE-M3 code ignores it); it is
    /// read from a batch's first row and must be the same for every row of a batch:
    /// * `only_1neg`: group size 2 (one positive, one negative);
    /// * `symmetric_class`: group size min(len(neg) + 1, G), len(neg) of the batch's first row;
    /// * `symmetric_sts`, `symmetric_clustering`: the query instruction is also put before every
    ///   passage;
    /// * any value containing `symmetric`: the file's per-device batch is halved (unless the file
    ///   sets `batch_size`);
    /// * anything else: accepted, no effect.
    ///
    /// retrom3 does the same (see [`TrainDataset::batch_size`], [`TrainDataset::group_size`],
    /// [`sample_group`]), with the "first row of the batch" taken from the global batch so that all
    /// ranks agree, and requires the same `type` (or none) on every row of a file, since any two
    /// rows of a file may share a batch.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Per-file setting (first row): the per-device batch size of this file.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Per-file setting (first row): the group size of this file (ignored when `type` is set,
    /// as in FlagEmbedding).
    #[serde(default)]
    pub train_group_size: Option<usize>,
    /// The row's 1-based line in its file (0 for a row built in code): a check that needs the
    /// run's group size (an empty `neg`) names it.
    #[serde(skip)]
    pub line: usize,
}

impl TrainExample {
    /// A row with the required fields only.
    pub fn new(query: impl Into<String>, pos: Vec<String>, neg: Vec<String>) -> TrainExample {
        TrainExample {
            query: query.into(),
            pos,
            neg,
            pos_scores: None,
            neg_scores: None,
            prompt: None,
            kind: None,
            batch_size: None,
            train_group_size: None,
            line: 0,
        }
    }

    /// The invariants [`read_train_file`] checks, for rows built in code: a non-blank query, at
    /// least one positive, no blank text, one finite teacher score per text, positive counts.
    /// The message names the field as the file reader's do.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.query.trim().is_empty() {
            return Err("field \"query\": empty text".into());
        }
        if self.pos.is_empty() {
            return Err("field \"pos\": empty list, needs at least one positive".into());
        }
        for (k, list) in [("pos", &self.pos), ("neg", &self.neg)] {
            if let Some(i) = list.iter().position(|t| t.trim().is_empty()) {
                return Err(format!("field \"{k}\": element {} is an empty text", i + 1));
            }
        }
        for (k, scores, of, n) in [
            ("pos_scores", &self.pos_scores, "pos", self.pos.len()),
            ("neg_scores", &self.neg_scores, "neg", self.neg.len()),
        ] {
            let Some(s) = scores else { continue };
            if s.len() != n {
                return Err(format!(
                    "field \"{k}\": {} scores for {n} texts in \"{of}\" (one score per text)",
                    s.len()
                ));
            }
            if let Some(i) = s.iter().position(|x| !x.is_finite()) {
                return Err(format!("field \"{k}\": element {} is not finite", i + 1));
            }
        }
        for (k, v) in [
            ("batch_size", self.batch_size),
            ("train_group_size", self.train_group_size),
        ] {
            if v == Some(0) {
                return Err(format!("field \"{k}\": expected a positive integer, got 0"));
            }
        }
        if let Some(g) = self.train_group_size.filter(|&g| g > MAX_GROUP_SIZE) {
            return Err(format!(
                "field \"train_group_size\": {g} is above {MAX_GROUP_SIZE} passages per query"
            ));
        }
        Ok(())
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Field-checked conversion of one parsed line; `Err(msg)` names the field.
fn parse_row(obj: &Map<String, Value>) -> std::result::Result<TrainExample, String> {
    let present = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let string = |k: &str| -> std::result::Result<Option<String>, String> {
        match present(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(format!(
                "field \"{k}\": expected a string, got {}",
                json_kind(v)
            )),
        }
    };
    let texts = |k: &str, what: &str| -> std::result::Result<Vec<String>, String> {
        let v = present(k)
            .ok_or_else(|| format!("field \"{k}\": missing (a list of at least one {what})"))?;
        let Value::Array(a) = v else {
            return Err(format!(
                "field \"{k}\": expected a list of strings, got {}",
                json_kind(v)
            ));
        };
        // An empty `neg` is valid with a group size of 1 (in-batch pairs); the trainer refuses
        // it, naming the line, when the group needs negatives.
        if a.is_empty() && k != "neg" {
            return Err(format!(
                "field \"{k}\": empty list, needs at least one {what}"
            ));
        }
        a.iter()
            .enumerate()
            .map(|(i, t)| match t {
                Value::String(s) if s.trim().is_empty() => {
                    Err(format!("field \"{k}\": element {} is an empty text", i + 1))
                }
                Value::String(s) => Ok(s.clone()),
                v => Err(format!(
                    "field \"{k}\": element {} is {}, expected a string",
                    i + 1,
                    json_kind(v)
                )),
            })
            .collect()
    };
    let scores = |k: &str, n: usize, of: &str| -> std::result::Result<Option<Vec<f32>>, String> {
        let Some(v) = present(k) else { return Ok(None) };
        let Value::Array(a) = v else {
            return Err(format!(
                "field \"{k}\": expected a list of numbers, got {}",
                json_kind(v)
            ));
        };
        let s = a
            .iter()
            .enumerate()
            .map(|(i, x)| match x.as_f64() {
                Some(f) if (f as f32).is_finite() => Ok(f as f32),
                Some(_) => Err(format!(
                    "field \"{k}\": element {} is not a finite f32",
                    i + 1
                )),
                None => Err(format!(
                    "field \"{k}\": element {} is {}, expected a number",
                    i + 1,
                    json_kind(x)
                )),
            })
            .collect::<std::result::Result<Vec<f32>, String>>()?;
        if s.len() != n {
            return Err(format!(
                "field \"{k}\": {} scores for {n} texts in \"{of}\" (one score per text)",
                s.len()
            ));
        }
        Ok(Some(s))
    };
    let count = |k: &str| -> std::result::Result<Option<usize>, String> {
        match present(k) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Ok(Some(n as usize)),
                _ => Err(format!(
                    "field \"{k}\": expected a positive integer, got {}",
                    if v.is_number() {
                        v.to_string()
                    } else {
                        json_kind(v).to_string()
                    }
                )),
            },
        }
    };
    let query = match present("query") {
        None => return Err("field \"query\": missing (a string)".into()),
        Some(_) => string("query")?.unwrap_or_default(),
    };
    if query.trim().is_empty() {
        return Err("field \"query\": empty text".into());
    }
    let pos = texts("pos", "positive")?;
    let neg = texts("neg", "negative")?;
    Ok(TrainExample {
        pos_scores: scores("pos_scores", pos.len(), "pos")?,
        neg_scores: scores("neg_scores", neg.len(), "neg")?,
        query,
        pos,
        neg,
        prompt: string("prompt")?,
        kind: string("type")?,
        batch_size: count("batch_size")?,
        train_group_size: count("train_group_size")?,
        line: 0,
    })
}

/// Read and validate a training file (SPEC §4.1). Every error names the file and the 1-based
/// line: invalid JSON, a line that is not an object, a missing or mistyped field (`query`
/// string; `pos`, `neg` lists of strings; `pos_scores`, `neg_scores` lists of numbers;
/// `prompt`, `type` strings; `batch_size`, `train_group_size` positive integers), an empty
/// query, an empty `pos` (an empty `neg` is checked by the trainer against the group size), a score list whose length differs from its text list, a
/// non-finite score, and a per-file setting (`type`, `batch_size`, `train_group_size`) that
/// differs from the first row's. A file without any row is an error too.
pub fn read_train_file(path: &Path) -> Result<Vec<TrainExample>> {
    let rows: Vec<Value> = read_jsonl(path)?;
    let mut out: Vec<TrainExample> = Vec::with_capacity(rows.len());
    for (i, v) in rows.iter().enumerate() {
        let line = i + 1;
        let Value::Object(obj) = v else {
            return Err(input_err(
                path,
                line,
                format!("expected a JSON object, got {}", json_kind(v)),
            ));
        };
        let mut r = parse_row(obj).map_err(|m| input_err(path, line, m))?;
        r.line = line;
        if let Some(first) = out.first() {
            let same = |field: &str, a: String, b: String| {
                if a == b {
                    Ok(())
                } else {
                    Err(input_err(
                        path,
                        line,
                        format!(
                            "field \"{field}\": {b} differs from the first row's {a}; it is a per-file \
                             setting (FlagEmbedding reads it from the first row, and any two rows of a \
                             file may share a batch)"
                        ),
                    ))
                }
            };
            let show = |o: Option<String>| o.map_or("(absent)".to_string(), |s| format!("{s:?}"));
            same("type", show(first.kind.clone()), show(r.kind.clone()))?;
            let num = |o: Option<usize>| o.map_or("(absent)".to_string(), |n| n.to_string());
            same("batch_size", num(first.batch_size), num(r.batch_size))?;
            same(
                "train_group_size",
                num(first.train_group_size),
                num(r.train_group_size),
            )?;
        }
        out.push(r);
    }
    if out.is_empty() {
        return Err(input_err(path, 0, "no training example"));
    }
    Ok(out)
}

/// One sampled group: the query and its G passages (positive first).
#[derive(Clone, Debug, PartialEq)]
pub struct SampledGroup {
    pub query: String,
    pub passages: Vec<String>,
    /// Teacher scores aligned with `passages` (both score lists present).
    pub teacher: Option<Vec<f32>>,
}

/// The `type` values whose passages get the query instruction too ([ABS]).
fn instructs_passages(kind: Option<&str>) -> bool {
    matches!(kind, Some("symmetric_sts" | "symmetric_clustering"))
}

/// SPEC §4.2's augmentation (FlagEmbedding's `_shuffle_text`): with probability `ratio`, a
/// text of over 100 characters is cut into consecutive pieces of ⌊len/3⌋ + 1 characters, shown
/// in random order, joined by one space. Draws from `rng` only for such a text.
pub fn shuffle_text(text: &str, ratio: f64, rng: &mut Rng) -> String {
    let chars: Vec<char> = text.chars().collect();
    if ratio <= 0.0 || chars.len() <= 100 || rng.uniform() >= ratio {
        return text.to_string();
    }
    let mut pieces: Vec<String> = chars
        .chunks(chars.len() / 3 + 1)
        .map(|c| c.iter().collect())
        .collect();
    rng.shuffle(&mut pieces);
    pieces.join(" ")
}

/// SPEC §4.2: a uniform positive; G−1 distinct negatives, or with repetition from the list
/// repeated ceil((G−1)/n) times when there are fewer; negatives re-sorted by teacher score
/// (descending) when scores exist (the research code's order, decision §10.5). The row's
/// `prompt` goes before the query, and for `type` `symmetric_sts` / `symmetric_clustering` before
/// every passage as well (\[ABS\]).
pub fn sample_group(ex: &TrainExample, group: usize, rng: &mut Rng) -> SampledGroup {
    sample_group_shuffled(ex, group, 0.0, rng)
}

/// [`sample_group`] with SPEC §4.2's augmentation: the positive (only it, before any
/// instruction is put in front) goes through [`shuffle_text`] with `shuffle_ratio`.
pub fn sample_group_shuffled(
    ex: &TrainExample,
    group: usize,
    shuffle_ratio: f64,
    rng: &mut Rng,
) -> SampledGroup {
    let pi = rng.below(ex.pos.len());
    let pos = if shuffle_ratio > 0.0 {
        shuffle_text(&ex.pos[pi], shuffle_ratio, rng)
    } else {
        ex.pos[pi].clone()
    };
    let want = group.saturating_sub(1);
    let n = ex.neg.len();
    // No negatives (the trainer allows it only when the group needs none).
    let want = if n == 0 { 0 } else { want };
    let mut pool: Vec<usize> = if n >= want {
        (0..n).collect()
    } else {
        (0..want.div_ceil(n)).flat_map(|_| 0..n).collect()
    };
    // Sample `want` without replacement: a partial Fisher-Yates.
    for i in 0..want.min(pool.len()) {
        let j = i + rng.below(pool.len() - i);
        pool.swap(i, j);
    }
    let mut negs: Vec<usize> = pool[..want.min(pool.len())].to_vec();
    let teacher_all = match (&ex.pos_scores, &ex.neg_scores) {
        (Some(p), Some(ns)) => Some((p[pi], ns)),
        _ => None,
    };
    if let Some((_, ns)) = teacher_all {
        negs.sort_by(|&a, &b| ns[b].total_cmp(&ns[a]));
    }
    let instruct = |t: &str| match &ex.prompt {
        Some(p) => format!("{p}{t}"),
        None => t.to_string(),
    };
    let query = instruct(&ex.query);
    let mut passages = vec![pos];
    passages.extend(negs.iter().map(|&i| ex.neg[i].clone()));
    if instructs_passages(ex.kind.as_deref()) {
        passages = passages.iter().map(|p| instruct(p)).collect();
    }
    let teacher = teacher_all.map(|(p, ns)| {
        std::iter::once(p)
            .chain(negs.iter().map(|&i| ns[i]))
            .collect()
    });
    SampledGroup {
        query,
        passages,
        teacher,
    }
}

/// The suffix of a file stem or directory name that marks "no in-batch negatives" (SPEC §4.1).
pub const NO_IN_BATCH_SUFFIX: &str = "no_in_batch_neg";

/// The per-file settings of FlagEmbedding's same-dataset mode, read from a file's first row
/// (SPEC §4.1; [`read_train_file`] checks that the other rows agree).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileSettings {
    /// `batch_size`: the file's per-device batch size, replacing the configured (bucket) size.
    pub batch_size: Option<usize>,
    /// `train_group_size`: the file's group size (ignored when `kind` is set, as in \[ABS\]).
    pub train_group_size: Option<usize>,
    /// `type` (see [`TrainExample::kind`]).
    pub kind: Option<String>,
}

impl FileSettings {
    /// The settings of a file whose first row is `first`.
    pub fn of(first: Option<&TrainExample>) -> FileSettings {
        first.map_or_else(FileSettings::default, |r| FileSettings {
            batch_size: r.batch_size,
            train_group_size: r.train_group_size,
            kind: r.kind.clone(),
        })
    }

    /// \[ABS\] `_get_file_batch_size`: the file's `batch_size` if given, else half the configured
    /// size (at least 1) for a `symmetric*` type, else the configured size.
    pub fn batch_size(&self, configured: usize) -> usize {
        match (self.batch_size, &self.kind) {
            (Some(b), _) => b,
            (None, Some(k)) if k.contains("symmetric") => (configured / 2).max(1),
            _ => configured,
        }
    }
}

/// One training dataset: a file, or the small files of one directory merged (SPEC §5.2). Batches
/// never mix datasets.
#[derive(Clone, Debug)]
pub struct TrainDataset {
    /// The file, or the directory of merged files.
    pub source: PathBuf,
    pub examples: Vec<TrainExample>,
    /// The file's stem, or the directory it was listed from, ends with `no_in_batch_neg`.
    pub no_in_batch: bool,
    /// The file(s) read, each with its settings: one for a file, one per merged file otherwise
    /// (merged files share `type` and `train_group_size`; their `batch_size` may differ).
    pub files: Vec<(PathBuf, FileSettings)>,
}

impl TrainDataset {
    /// A dataset of one file's rows (settings from the first row).
    pub fn from_file(source: PathBuf, examples: Vec<TrainExample>, no_in_batch: bool) -> Self {
        let settings = FileSettings::of(examples.first());
        TrainDataset {
            files: vec![(source.clone(), settings)],
            source,
            examples,
            no_in_batch,
        }
    }

    /// The per-device batch size given the configured (bucket) size: [`FileSettings::batch_size`]
    /// of the file, or the smallest over merged files (\[ABS\], [RES-M3]: "batch size = min of
    /// theirs").
    pub fn batch_size(&self, configured: usize) -> usize {
        self.files
            .iter()
            .map(|(_, s)| s.batch_size(configured))
            .min()
            .unwrap_or(configured)
    }

    /// \[ABS\] `_get_train_group_size` for a batch of this dataset (`batch`: the dataset indices
    /// of the global batch; its first row decides `symmetric_class`): `type` `only_1neg` → 2,
    /// `symmetric_class` → min(len(neg) + 1, G), any other `type` → G; without `type`, the file's
    /// `train_group_size` or G.
    pub fn group_size(&self, batch: &[usize], configured: usize) -> usize {
        let s = self.files.first().map(|f| &f.1);
        match s.and_then(|s| s.kind.as_deref()) {
            Some("only_1neg") => 2,
            Some("symmetric_class") => batch
                .first()
                .and_then(|&i| self.examples.get(i))
                .map_or(configured, |e| (e.neg.len() + 1).min(configured)),
            Some(_) => configured,
            None => s.and_then(|s| s.train_group_size).unwrap_or(configured),
        }
    }
}

fn ends_no_in_batch(name: Option<&std::ffi::OsStr>) -> bool {
    name.and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(NO_IN_BATCH_SUFFIX))
}

/// Merging of small files (SPEC §5.2, FlagEmbedding's `small_threshold` / `drop_threshold`,
/// both 0 by default = never merge, never drop).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeRule {
    /// Files of one directory with fewer examples are concatenated into one dataset.
    pub small_threshold: usize,
    /// A merged dataset with fewer examples is dropped.
    pub drop_threshold: usize,
}

/// What [`read_train_paths_with`] read.
#[derive(Clone, Debug)]
pub struct TrainFiles {
    pub datasets: Vec<TrainDataset>,
    /// Files of merged groups dropped by `drop_threshold`.
    pub dropped: Vec<PathBuf>,
}

/// Read `--train` paths without merging: [`read_train_paths_with`] and the default [`MergeRule`].
pub fn read_train_paths(paths: &[PathBuf]) -> Result<Vec<TrainDataset>> {
    Ok(read_train_paths_with(paths, MergeRule::default())?.datasets)
}

/// Read `--train` paths: each file is a dataset; a directory contributes each of its .json/.jsonl
/// files (sorted by name) as a dataset. A file whose stem ends with `no_in_batch_neg`, or any
/// file of a directory whose name ends with it, is in no-in-batch mode.
///
/// Merging (SPEC §5.2): the files of one directory with fewer than `rule.small_threshold`
/// examples are concatenated into one dataset per (no-in-batch flag, `type`,
/// `train_group_size`) — FlagEmbedding merges all of them into one and then fails at a batch that
/// mixes types; retrom3 keeps such files apart instead — whose per-device batch size is the
/// smallest of theirs; a merged dataset with fewer than `rule.drop_threshold` examples is dropped
/// (listed in [`TrainFiles::dropped`]). A file named directly is never merged nor dropped
/// (FlagEmbedding silently skips a directly named file below `small_threshold`; retrom3 trains on
/// it as its own dataset).
///
/// A dataset in no-in-batch mode with a group size of 1 (`train_group_size: 1`) is an error: its
/// loss would be identically 0.
pub fn read_train_paths_with(paths: &[PathBuf], rule: MergeRule) -> Result<TrainFiles> {
    let mut out = TrainFiles {
        datasets: Vec::new(),
        dropped: Vec::new(),
    };
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "jsonl" || x == "json"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::io(
                    p,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no .json/.jsonl file in the directory",
                    ),
                ));
            }
            let dir_flag = ends_no_in_batch(p.file_name());
            // Small files grouped by (no-in-batch, type, train_group_size), in name order.
            type Key = (bool, Option<String>, Option<usize>);
            let mut small: Vec<(Key, TrainDataset)> = Vec::new();
            for f in files {
                let flag = dir_flag || ends_no_in_batch(f.file_stem());
                let ds = TrainDataset::from_file(f.clone(), read_train_file(&f)?, flag);
                if ds.examples.len() >= rule.small_threshold {
                    out.datasets.push(ds);
                    continue;
                }
                let s = &ds.files[0].1;
                let key = (flag, s.kind.clone(), s.train_group_size);
                match small.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, m)) => {
                        m.examples.extend(ds.examples);
                        m.files.extend(ds.files);
                    }
                    None => small.push((
                        key,
                        TrainDataset {
                            source: p.clone(),
                            ..ds
                        },
                    )),
                }
            }
            for (_, m) in small {
                if m.examples.len() >= rule.drop_threshold {
                    out.datasets.push(m);
                } else {
                    out.dropped.extend(m.files.into_iter().map(|(f, _)| f));
                }
            }
        } else {
            out.datasets.push(TrainDataset::from_file(
                p.clone(),
                read_train_file(p)?,
                ends_no_in_batch(p.file_stem()),
            ));
        }
    }
    for d in &out.datasets {
        if d.no_in_batch && d.files[0].1.kind.is_none() && d.files[0].1.train_group_size == Some(1)
        {
            return Err(Error::Input {
                path: d.files[0].0.clone(),
                line: 1,
                msg: "field \"train_group_size\": 1 in no-in-batch mode leaves one passage per \
                      query (the loss would be identically 0)"
                    .into(),
            });
        }
    }
    Ok(out)
}
/// Length buckets (SPEC §5.1) and their per-device batch sizes (SPEC §5.2).
#[derive(Clone, Debug, PartialEq)]
pub struct BucketSpec {
    /// Increasing lower bounds of buckets 1..: bucket k holds lengths in
    /// [boundaries[k-1], boundaries\[k\]), bucket 0 lengths below boundaries\[0\]. Empty = one bucket.
    pub boundaries: Vec<usize>,
    /// One batch size per bucket (`boundaries.len() + 1` values).
    pub batch_sizes: Vec<usize>,
}

impl BucketSpec {
    /// One bucket of `batch_size`.
    pub fn single(batch_size: usize) -> BucketSpec {
        BucketSpec {
            boundaries: Vec::new(),
            batch_sizes: vec![batch_size],
        }
    }

    /// From the CLI lists: boundaries (strictly increasing, > 0) and either one batch size per
    /// bucket or none (then every bucket uses `default_batch`).
    pub fn new(
        boundaries: Vec<usize>,
        batch_sizes: Option<Vec<usize>>,
        default_batch: usize,
    ) -> Result<BucketSpec> {
        if boundaries.first() == Some(&0) || boundaries.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid(format!(
                "--length-buckets {boundaries:?}: boundaries must be > 0 and strictly increasing"
            )));
        }
        let n = boundaries.len() + 1;
        let batch_sizes = batch_sizes.unwrap_or_else(|| vec![default_batch; n]);
        if batch_sizes.len() != n || batch_sizes.contains(&0) {
            return Err(Error::invalid(format!(
                "--bucket-batch-sizes {batch_sizes:?}: need {n} values >= 1 (one per bucket of {} boundaries)",
                boundaries.len()
            )));
        }
        Ok(BucketSpec {
            boundaries,
            batch_sizes,
        })
    }

    /// The bucket of an example whose longest text has `len` tokens.
    pub fn bucket_of(&self, len: usize) -> usize {
        self.boundaries.partition_point(|&b| b <= len)
    }
}

/// The longest text of an example (query, positives, negatives) under `len_of`.
pub fn example_max_len(
    ex: &TrainExample,
    len_of: &mut dyn FnMut(&str) -> Result<usize>,
) -> Result<usize> {
    let mut m = len_of(&ex.query)?;
    for t in ex.pos.iter().chain(&ex.neg) {
        m = m.max(len_of(t)?);
    }
    Ok(m)
}

/// A (dataset, length bucket) pair with its examples: the unit of the batch plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanUnit {
    pub dataset: usize,
    pub bucket: usize,
    /// Indices into the dataset's examples.
    pub examples: Vec<usize>,
    /// Per-device batch size.
    pub batch_size: usize,
    pub no_in_batch: bool,
}

/// Split datasets into (dataset, bucket) units; `lengths[d][i]` is example i's longest text
/// (ignored, may be empty, when the spec has one bucket). Empty units are dropped. A unit's batch
/// size is the bucket's, unless the dataset's files set their own ([`TrainDataset::batch_size`]:
/// first-row `batch_size`, halved for `symmetric*` types).
pub fn plan_units(
    datasets: &[TrainDataset],
    lengths: &[Vec<usize>],
    spec: &BucketSpec,
) -> Vec<PlanUnit> {
    let mut units = Vec::new();
    for (d, ds) in datasets.iter().enumerate() {
        let mut by: Vec<Vec<usize>> = vec![Vec::new(); spec.batch_sizes.len()];
        let lens = lengths.get(d).map_or(&[][..], Vec::as_slice);
        for i in 0..ds.examples.len() {
            let b = lens
                .get(i)
                .filter(|_| !spec.boundaries.is_empty())
                .map_or(0, |&l| spec.bucket_of(l));
            by[b].push(i);
        }
        for (bucket, examples) in by.into_iter().enumerate() {
            if !examples.is_empty() {
                units.push(PlanUnit {
                    dataset: d,
                    bucket,
                    examples,
                    batch_size: ds.batch_size(spec.batch_sizes[bucket]),
                    no_in_batch: ds.no_in_batch,
                });
            }
        }
    }
    units
}

/// One global batch of the plan: `per_device × world` examples of one unit.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedBatch {
    pub unit: usize,
    pub dataset: usize,
    /// Dataset example indices, rank r's slice is [r·bs, (r+1)·bs).
    pub examples: Vec<usize>,
    pub per_device: usize,
    pub no_in_batch: bool,
}

impl PlannedBatch {
    /// The examples of `rank`.
    pub fn rank_slice(&self, rank: usize) -> &[usize] {
        &self.examples[rank * self.per_device..(rank + 1) * self.per_device]
    }
}

/// Global batches per epoch (the same for every epoch): Σ over units ⌊n / (bs·W)⌋.
pub fn batches_per_epoch(units: &[PlanUnit], world: usize) -> usize {
    units
        .iter()
        .map(|u| u.examples.len() / (u.batch_size * world.max(1)))
        .sum()
}

/// The batch plan of `epoch` (SPEC §5.2): one RNG seeded by (seed, epoch), the same on every rank,
/// shuffles the unit order, then each unit's examples, cuts them into global batches of
/// per-device size × `world`, drops the incomplete tail (the new code's rule), and shuffles the
/// list of batches. Every rank thus trains on the same dataset and length bucket at each step.
pub fn epoch_plan(units: &[PlanUnit], seed: u64, epoch: u64, world: usize) -> Vec<PlannedBatch> {
    let world = world.max(1);
    let mut rng = Rng::new(seed, 0x5A3E_0000 + epoch);
    let mut order: Vec<usize> = (0..units.len()).collect();
    rng.shuffle(&mut order);
    let mut batches = Vec::new();
    for u in order {
        let unit = &units[u];
        let mut idx = unit.examples.clone();
        rng.shuffle(&mut idx);
        let global = unit.batch_size * world;
        for chunk in idx.chunks_exact(global) {
            batches.push(PlannedBatch {
                unit: u,
                dataset: unit.dataset,
                examples: chunk.to_vec(),
                per_device: unit.batch_size,
                no_in_batch: unit.no_in_batch,
            });
        }
    }
    rng.shuffle(&mut batches);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n_neg: usize, scores: bool) -> TrainExample {
        TrainExample {
            pos_scores: scores.then(|| vec![0.9, 0.8]),
            neg_scores: scores.then(|| (0..n_neg).map(|i| i as f32 / 10.0).collect()),
            ..TrainExample::new(
                "q",
                vec!["p0".into(), "p1".into()],
                (0..n_neg).map(|i| format!("n{i}")).collect(),
            )
        }
    }

    #[test]
    fn distinct_negatives_when_enough_and_repeats_when_short() {
        let mut rng = Rng::new(1, 0);
        for _ in 0..50 {
            let g = sample_group(&ex(10, false), 8, &mut rng);
            assert_eq!(g.passages.len(), 8);
            assert!(g.passages[0].starts_with('p'));
            let mut n: Vec<&String> = g.passages[1..].iter().collect();
            n.sort();
            n.dedup();
            assert_eq!(n.len(), 7, "distinct negatives");
            let g = sample_group(&ex(3, false), 8, &mut rng);
            assert_eq!(g.passages.len(), 8);
            // 3 negatives repeated ceil(7/3) = 3 times: each appears at most 3 times.
            for k in 0..3 {
                let c = g.passages.iter().filter(|p| **p == format!("n{k}")).count();
                assert!(c <= 3);
            }
        }
    }

    #[test]
    fn buckets_and_plan() {
        let spec = BucketSpec::new(vec![500, 1000, 2000], Some(vec![4, 3, 2, 1]), 8).unwrap();
        assert_eq!(
            [0, 499, 500, 999, 1000, 5000].map(|l| spec.bucket_of(l)),
            [0, 0, 1, 1, 2, 3]
        );
        assert!(BucketSpec::new(vec![500, 500], None, 8).is_err());
        assert!(BucketSpec::new(vec![500], Some(vec![1]), 8).is_err());
        let ds = |n: usize, nib: bool| {
            TrainDataset::from_file(
                PathBuf::from("x"),
                (0..n).map(|_| ex(3, false)).collect(),
                nib,
            )
        };
        let data = [ds(23, false), ds(9, true)];
        let lengths = vec![
            (0..23).map(|i| [10, 600, 1500][i % 3]).collect::<Vec<_>>(),
            vec![3000; 9],
        ];
        let units = plan_units(&data, &lengths, &spec);
        assert_eq!(units.len(), 4);
        // 8 / 4 + 8 / 3 + 7 / 2 for dataset 0, 9 / 1 for dataset 1 (world 1).
        assert_eq!(batches_per_epoch(&units, 1), 2 + 2 + 3 + 9);
        let a = epoch_plan(&units, 7, 0, 1);
        assert_eq!(a, epoch_plan(&units, 7, 0, 1), "same seed, same plan");
        assert_ne!(a, epoch_plan(&units, 7, 1, 1), "each epoch reshuffles");
        assert_eq!(a.len(), 16);
        for b in &a {
            let u = &units[b.unit];
            assert_eq!(b.examples.len(), u.batch_size);
            assert!(b.examples.iter().all(|i| u.examples.contains(i)));
            assert_eq!(b.no_in_batch, b.dataset == 1);
        }
        // World 2: global batches of 2·bs, rank slices disjoint.
        let w = epoch_plan(&units, 7, 0, 2);
        assert_eq!(w.len(), batches_per_epoch(&units, 2));
        for b in &w {
            let (r0, r1) = (b.rank_slice(0), b.rank_slice(1));
            assert_eq!(r0.len(), b.per_device);
            assert!(r0.iter().all(|i| !r1.contains(i)));
        }
    }

    #[test]
    fn negatives_sorted_by_teacher_score() {
        let mut rng = Rng::new(2, 0);
        let g = sample_group(&ex(10, true), 5, &mut rng);
        let t = g.teacher.unwrap();
        assert_eq!(t.len(), 5);
        assert!(t[1..].windows(2).all(|w| w[0] >= w[1]), "{t:?}");
    }

    #[test]
    fn shuffle_text_cuts_long_positives_into_three_pieces() {
        let mut rng = Rng::new(5, 0);
        let short = "x".repeat(100);
        let mut probe = rng.clone();
        assert_eq!(
            shuffle_text(&short, 1.0, &mut rng),
            short,
            "100 characters stay"
        );
        assert_eq!(
            probe.next_u64(),
            rng.next_u64(),
            "a short text draws nothing"
        );
        // 101 characters (multi-byte ones count once) -> pieces of 34, 34, 33.
        let long: String = (0..101)
            .map(|i| char::from_u32(0x4E00 + i).unwrap())
            .collect();
        let chars: Vec<char> = long.chars().collect();
        let pieces: Vec<String> = chars.chunks(34).map(|c| c.iter().collect()).collect();
        let mut seen = std::collections::HashSet::new();
        for seed in 0..40 {
            let out = shuffle_text(&long, 1.0, &mut Rng::new(seed, 1));
            let got: Vec<&str> = out.split(' ').collect();
            assert_eq!(got.len(), 3, "{out}");
            let mut sorted = got.clone();
            sorted.sort();
            let mut want: Vec<&str> = pieces.iter().map(String::as_str).collect();
            want.sort();
            assert_eq!(sorted, want);
            seen.insert(out);
        }
        assert!(seen.len() > 3, "several orders: {}", seen.len());
        assert_eq!(shuffle_text(&long, 0.0, &mut rng), long);
    }
}
