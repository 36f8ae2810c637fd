//! Model directories in the Hugging Face / FlagEmbedding layout (SPEC §2):
//! `model.safetensors` or `pytorch_model.bin` (the backbone), `colbert_linear.pt` and
//! `sparse_linear.pt` (the M3 heads), and the tokenizer / sentence-transformers files.

use super::{read_safetensors, read_torch, write_safetensors, write_torch};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// Backbone files, in order of preference.
pub const BACKBONE_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];
/// FlagEmbedding's ColBERT head file.
pub const COLBERT_FILE: &str = "colbert_linear.pt";
/// FlagEmbedding's sparse (lexical weight) head file.
pub const SPARSE_FILE: &str = "sparse_linear.pt";
/// Key prefixes of task models wrapping the encoder (`XLMRobertaForMaskedLM` -> `roberta.`, ...).
const WRAPPER_PREFIXES: [&str; 3] = ["roberta.", "bert.", "model."];
/// Tokenizer and sentence-transformers files copied next to a written model when they exist.
pub const TOKENIZER_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
];

/// The two M3 heads: `colbert_linear` (hidden -> d) and `sparse_linear` (hidden -> 1), f32.
#[derive(Clone, Debug)]
pub struct M3Heads {
    /// `[d, hidden]` (PyTorch Linear layout: y = x Wᵀ + b).
    pub colbert_weight: Tensor,
    /// `[d]`.
    pub colbert_bias: Tensor,
    /// `[1, hidden]`.
    pub sparse_weight: Tensor,
    /// `[1]`.
    pub sparse_bias: Tensor,
}

/// Read the backbone of `dir`: `model.safetensors` if present, else `pytorch_model.bin`. A common
/// `roberta.` / `bert.` / `model.` prefix (a task model wrapping the encoder) is stripped from the
/// keys that carry it; other keys (`lm_head.*`, `pooler.*`, `embeddings.position_ids`, ...) are
/// kept as they are. Returns the tensors and the file they came from.
pub fn read_backbone(dir: &Path) -> Result<(BTreeMap<String, Tensor>, PathBuf)> {
    let Some(path) = BACKBONE_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
    else {
        return Err(Error::format(
            dir,
            format!(
                "no backbone weights: looked for {}",
                BACKBONE_FILES.join(" and ")
            ),
        ));
    };
    let tensors = if path.extension().is_some_and(|e| e == "safetensors") {
        read_safetensors(&path)?
    } else {
        read_torch(&path)?
    };
    let tensors = strip_wrapper_prefix(tensors, &path)?;
    Ok((tensors, path))
}

/// Strip the wrapper prefix whose keys hold the encoder (`<prefix>embeddings.*` or
/// `<prefix>encoder.*`), from every key that starts with it.
fn strip_wrapper_prefix(
    tensors: BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<BTreeMap<String, Tensor>> {
    let wraps = |p: &str| {
        tensors.keys().any(|k| {
            k.strip_prefix(p)
                .is_some_and(|r| r.starts_with("embeddings.") || r.starts_with("encoder."))
        })
    };
    let Some(prefix) = WRAPPER_PREFIXES.iter().find(|p| wraps(p)) else {
        return Ok(tensors);
    };
    let mut out = BTreeMap::new();
    for (k, t) in tensors {
        let key = k.strip_prefix(prefix).map(str::to_string).unwrap_or(k);
        if out.contains_key(&key) {
            return Err(Error::format(
                path,
                format!("key {key} appears both with and without the {prefix} prefix"),
            ));
        }
        out.insert(key, t);
    }
    Ok(out)
}

/// Read the M3 heads from `colbert_linear.pt` and `sparse_linear.pt` (keys `weight`, `bias`),
/// converted to f32 and shape-checked against `hidden`. `None` when neither file exists (the
/// caller initialises fresh heads, as FlagEmbedding does); an error naming the missing file when
/// only one exists (FlagEmbedding would silently re-initialise both).
pub fn read_heads(dir: &Path, hidden: usize) -> Result<Option<M3Heads>> {
    let colbert = dir.join(COLBERT_FILE);
    let sparse = dir.join(SPARSE_FILE);
    match (colbert.is_file(), sparse.is_file()) {
        (false, false) => return Ok(None),
        (true, false) => {
            return Err(Error::format(
                &sparse,
                format!("missing, but {COLBERT_FILE} exists: both heads are needed"),
            ))
        }
        (false, true) => {
            return Err(Error::format(
                &colbert,
                format!("missing, but {SPARSE_FILE} exists: both heads are needed"),
            ))
        }
        (true, true) => {}
    }
    let (colbert_weight, colbert_bias) = read_linear(&colbert)?;
    let (sparse_weight, sparse_bias) = read_linear(&sparse)?;
    let what = |p: &Path, k: &str| format!("{} {k}", p.display());
    // Any output dimension d >= 1 (bge-m3: d = hidden); d = 0 would give ColBERT vectors
    // without components.
    let d = match colbert_weight.dims() {
        &[d, h] if h == hidden && d > 0 => d,
        got => {
            return Err(Error::format(
                &colbert,
                format!(
                    "tensor weight has shape {got:?}, expected [d, {hidden}] (d >= 1 ColBERT \
                     dimensions by the model's hidden size {hidden})"
                ),
            ));
        }
    };
    colbert_bias.expect_dims(&what(&colbert, "bias"), &[d])?;
    sparse_weight.expect_dims(&what(&sparse, "weight"), &[1, hidden])?;
    sparse_bias.expect_dims(&what(&sparse, "bias"), &[1])?;
    Ok(Some(M3Heads {
        colbert_weight,
        colbert_bias,
        sparse_weight,
        sparse_bias,
    }))
}

/// `weight` and `bias` of a Linear layer's state dict, as f32 (every value finite).
fn read_linear(path: &Path) -> Result<(Tensor, Tensor)> {
    let mut sd = read_torch(path)?;
    let mut take = |name: &str| {
        let t = sd
            .remove(name)
            .map(|t| t.to_f32())
            .ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
            })?;
        t.ensure_finite(&format!("{}: tensor {name}", path.display()))?;
        Ok(t)
    };
    Ok((take("weight")?, take("bias")?))
}

/// Write the heads to `colbert_linear.pt` and `sparse_linear.pt` in f32 (each `{weight, bias}`),
/// creating `dir` if needed.
pub fn write_heads(dir: &Path, heads: &M3Heads) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let linear = |w: &Tensor, b: &Tensor| {
        BTreeMap::from([
            ("weight".to_string(), w.to_f32()),
            ("bias".to_string(), b.to_f32()),
        ])
    };
    write_torch(
        &dir.join(COLBERT_FILE),
        &linear(&heads.colbert_weight, &heads.colbert_bias),
    )?;
    write_torch(
        &dir.join(SPARSE_FILE),
        &linear(&heads.sparse_weight, &heads.sparse_bias),
    )
}

/// Write the backbone to `dir/model.safetensors` (metadata `{"format": "pt"}`), creating `dir` if
/// needed.
pub fn write_backbone(dir: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_safetensors(&dir.join(BACKBONE_FILES[0]), tensors, None)
}

/// Copy the tokenizer and sentence-transformers files of [`TOKENIZER_FILES`] that exist in
/// `src_dir` to `dst_dir`, plus the module folders listed in `modules.json` (e.g. an empty
/// `2_Normalize/`, with its `config.json` if any). Returns the relative paths copied.
pub fn copy_tokenizer_files(src_dir: &Path, dst_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut rels: Vec<PathBuf> = TOKENIZER_FILES.iter().map(PathBuf::from).collect();
    let modules = src_dir.join("modules.json");
    if modules.is_file() {
        for dir in module_dirs(&modules)? {
            if !src_dir.join(&dir).is_dir() {
                continue;
            }
            std::fs::create_dir_all(dst_dir.join(&dir))
                .map_err(|e| Error::io(dst_dir.join(&dir), e))?;
            rels.push(dir.join("config.json"));
        }
    }
    let mut copied = Vec::new();
    for rel in rels {
        let from = src_dir.join(&rel);
        if !from.is_file() || copied.contains(&rel) {
            continue;
        }
        let to = dst_dir.join(&rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        // Through a temporary file and a rename (a full disk leaves no truncated copy); an error
        // names the file being written, or the source when it cannot be read.
        let mut src = std::fs::File::open(&from).map_err(|e| Error::io(&from, e))?;
        super::write_atomic(&to, |w| std::io::copy(&mut src, w).map(|_| ()))?;
        copied.push(rel);
    }
    Ok(copied)
}

/// The module folders (`"path"` fields) of a sentence-transformers `modules.json`; only plain
/// relative paths are accepted (no `..`, no absolute paths).
fn module_dirs(modules: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(modules).map_err(|e| Error::io(modules, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(modules, format!("invalid JSON: {e}")))?;
    let list = json
        .as_array()
        .ok_or_else(|| Error::format(modules, "expected a JSON list of modules"))?;
    let mut dirs = Vec::new();
    for m in list {
        let Some(p) = m
            .get("path")
            .and_then(|p| p.as_str())
            .filter(|p| !p.is_empty())
        else {
            continue;
        };
        let p = PathBuf::from(p);
        if !p.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(Error::format(
                modules,
                format!("module path {} is not a plain relative path", p.display()),
            ));
        }
        dirs.push(p);
    }
    Ok(dirs)
}

/// The checkpoint tensors a faithful copy keeps although the encoder does not use them
/// (`pooler.*`: transformers' `BertModel` / `XLMRobertaModel` expect them and would initialise
/// them randomly, with a warning, if a saved directory lacked them). The trainers carry them
/// through unchanged, as PyTorch does for parameters outside the loss.
pub fn passthrough_tensors(
    map: &std::collections::BTreeMap<String, crate::tensor::Tensor>,
) -> std::collections::BTreeMap<String, crate::tensor::Tensor> {
    map.iter()
        .filter(|(k, _)| k.starts_with("pooler."))
        .map(|(k, v)| (k.clone(), v.to_f32()))
        .collect()
}
