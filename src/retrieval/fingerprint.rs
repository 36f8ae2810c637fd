//! The model fingerprint stored in every index: an index is only valid for the model whose
//! vectors it holds.
//!
//! fingerprint = xxh64 over: config.json bytes, the tokenizer file bytes, the backbone weights
//! file's name and size, its digest (`io::file_digest`: the xxh64 of each MiB of it), and the
//! bytes of the two head files when present. Every weight byte counts: a checkpoint fine-tuned with some tensors frozen (the
//! embeddings, say; an unused pooler at the end of the file) has the same config, tokenizer,
//! size, first and last MiB as its base. The file is read once more after the model loaded it
//! (its pages are then usually cached).

use super::index_format::xxh64;
use crate::error::{Error, Result};
use crate::io::model_dir::{BACKBONE_FILES, COLBERT_FILE, SPARSE_FILE};
use crate::model::m3::M3Model;
use std::path::Path;

/// A model identity: the hash and a human-readable name (the model directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFingerprint {
    pub hash: u64,
    pub model: String,
}

impl std::fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (fingerprint {:016x})", self.model, self.hash)
    }
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

impl ModelFingerprint {
    /// Fingerprint of a loaded model (its directory and tokenizer file).
    /// The dense settings a sentence-transformers layout can change (`1_Pooling/config.json`,
    /// a `modules.json` without Normalize) are part of it when they are not bge-m3's (CLS,
    /// normalised): queries pooled otherwise than the indexed documents would rank garbage.
    /// With the defaults it is [`ModelFingerprint::of_files`]'s, as indexes built before
    /// carry.
    pub fn of_model(model: &M3Model) -> Result<ModelFingerprint> {
        let mut dense = match (model.pooling, model.normalize) {
            (crate::Pooling::Cls, true) => None,
            (p, n) => Some(format!("dense:{p:?}:normalize={n}")),
        };
        // Lower-cased texts are other tokens (sentence_bert_config.json's do_lower_case).
        if model.tokenizer.lowercases() {
            dense = Some(format!("{}:lowercase", dense.unwrap_or_default()));
        }
        Self::of_parts(&model.dir, model.tokenizer.path(), dense.as_deref())
    }

    /// Fingerprint of a model directory given its tokenizer file.
    pub fn of_files(dir: &Path, tokenizer: &Path) -> Result<ModelFingerprint> {
        Self::of_parts(dir, tokenizer, None)
    }

    fn of_parts(dir: &Path, tokenizer: &Path, dense: Option<&str>) -> Result<ModelFingerprint> {
        let mut buf: Vec<u8> = Vec::new();
        let mut part = |tag: &str, bytes: &[u8]| {
            buf.extend_from_slice(tag.as_bytes());
            buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            buf.extend_from_slice(&xxh64(bytes, 0).to_le_bytes());
        };
        part("config", &read_all(&dir.join("config.json"))?);
        part("tokenizer", &read_all(tokenizer)?);
        let weights = BACKBONE_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::format(dir, "no backbone weights to fingerprint"))?;
        let size = std::fs::metadata(&weights)
            .map_err(|e| Error::io(&weights, e))?
            .len();
        let digest = crate::io::file_digest(&weights)?;
        let name = weights
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        part(&format!("weights:{name}:{size}"), &digest.to_le_bytes());
        for h in [COLBERT_FILE, SPARSE_FILE] {
            let p = dir.join(h);
            if p.is_file() {
                part(h, &read_all(&p)?);
            }
        }
        if let Some(d) = dense {
            part(d, &[]);
        }
        Ok(ModelFingerprint {
            hash: xxh64(&buf, 0),
            model: dir.display().to_string(),
        })
    }
}
