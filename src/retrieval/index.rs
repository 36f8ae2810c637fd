//! A retrieval index over one corpus: document ids plus any of the dense vectors, the learned
//! sparse inverted index, the BM25 inverted index and the ColBERT store, persisted as one
//! container file `INDEX_DIR/index.r3i` (format in `index_format`).

use super::beir::Doc;
use super::colbert::ColbertStore;
use super::dense::DenseIndex;
use super::fingerprint::ModelFingerprint;
use super::index_format::{write_container, Buf, Container, SectionData};
use super::sparse::{bm25_weights, Bm25Params, ImpactIndex, BM25_SECTIONS, SPARSE_SECTIONS};
use crate::error::{Error, Result};
use crate::infer::EncodeOptions;
use crate::model::m3::M3Model;
use half::f16;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The file inside an index directory.
pub const INDEX_FILE: &str = "index.r3i";
/// Documents encoded per step while indexing (bounds the memory held by ColBERT outputs).
const ENCODE_CHUNK: usize = 256;

/// Which parts an index holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexParts {
    pub dense: bool,
    pub sparse: bool,
    pub colbert: bool,
    pub bm25: bool,
}

impl IndexParts {
    /// Dense, sparse, ColBERT and BM25.
    pub fn all() -> IndexParts {
        IndexParts {
            dense: true,
            sparse: true,
            colbert: true,
            bm25: true,
        }
    }

    /// Whether every part of `need` is present.
    pub fn covers(&self, need: IndexParts) -> bool {
        (self.dense || !need.dense)
            && (self.sparse || !need.sparse)
            && (self.colbert || !need.colbert)
            && (self.bm25 || !need.bm25)
    }

    fn names(&self) -> String {
        let v: Vec<&str> = [
            (self.dense, "dense"),
            (self.sparse, "sparse"),
            (self.colbert, "colbert"),
            (self.bm25, "bm25"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }
}

/// The JSON `meta` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    format: String,
    model: String,
    fingerprint: String,
    n_docs: usize,
    parts: IndexParts,
    dense_dim: usize,
    colbert_dim: usize,
    sparse_scale: f32,
    bm25_scale: f32,
    bm25: Bm25Params,
    max_length: usize,
    vocab: usize,
    retrom3_version: String,
}

/// A built or loaded index.
#[derive(Debug)]
pub struct Index {
    doc_ids: Vec<String>,
    pub fingerprint: ModelFingerprint,
    pub dense: Option<DenseIndex>,
    pub sparse: Option<ImpactIndex>,
    pub colbert: Option<ColbertStore>,
    pub bm25: Option<ImpactIndex>,
    pub bm25_params: Bm25Params,
    /// Passage max length (tokens, specials included) used when encoding.
    pub max_length: usize,
    /// The dense vectors on a kernel device ([`Index::attach_device`]): dense top-k runs there.
    pub device_dense: Option<DeviceDense>,
}

/// A device and the dense vectors uploaded to it.
pub struct DeviceDense {
    pub dev: std::sync::Arc<crate::engine::Gpu>,
    pub index: crate::engine::dense::DeviceDenseIndex,
}

impl std::fmt::Debug for DeviceDense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceDense({} docs on {})",
            self.index.n_docs(),
            self.dev.device()
        )
    }
}

/// Token ids of `text` for BM25: the whole text (no truncation), special tokens removed.
pub fn bm25_tokens(model: &M3Model, text: &str) -> Result<Vec<u32>> {
    let ids = model.tokenizer.encode(text, usize::MAX / 2)?;
    Ok(ids
        .into_iter()
        .filter(|t| !model.special_ids.contains(t))
        .collect())
}

/// The document ids an index holds, as the corpus reader allows them (`beir::read_corpus`):
/// non-empty, without whitespace (a TREC run line could not carry them), unique.
fn check_doc_ids<'a>(ids: impl Iterator<Item = &'a str>) -> std::result::Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for (i, id) in ids.enumerate() {
        let why = if id.is_empty() {
            "is empty"
        } else if id.chars().any(char::is_whitespace) {
            "holds whitespace"
        } else if !seen.insert(id) {
            "repeats"
        } else {
            continue;
        };
        return Err(format!("document {i}: id {id:?} {why}"));
    }
    Ok(())
}

impl Index {
    /// Encode `corpus` with `model` and build the requested parts. `progress(n)` is called after
    /// every n documents.
    pub fn build(
        model: &M3Model,
        corpus: &[Doc],
        parts: IndexParts,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Index> {
        if corpus.is_empty() {
            return Err(Error::invalid("empty corpus: no documents to index"));
        }
        check_doc_ids(corpus.iter().map(|d| d.id.as_str())).map_err(Error::invalid)?;
        if parts == IndexParts::default() {
            return Err(Error::invalid("no index part requested"));
        }
        let fingerprint = ModelFingerprint::of_model(model)?;
        let vocab = model.encoder.config.vocab_size;
        let opts = EncodeOptions {
            dense: parts.dense,
            sparse: parts.sparse,
            colbert: parts.colbert,
            ..EncodeOptions::default()
        };
        let max_length = model.resolve_max_length(None)?;
        let mut dense_vecs: Vec<Vec<f32>> = Vec::new();
        let mut sparse_w: Vec<Vec<(u32, f32)>> = Vec::new();
        let mut col_off = vec![0u64];
        let mut col_vecs: Vec<f16> = Vec::new();
        let mut col_dim = 0usize;
        let mut bm25_docs: Vec<Vec<u32>> = Vec::new();
        for chunk in corpus.chunks(ENCODE_CHUNK) {
            let texts: Vec<&str> = chunk.iter().map(|d| d.text.as_str()).collect();
            if parts.dense || parts.sparse || parts.colbert {
                let out = model.encode(&texts, &opts)?;
                dense_vecs.extend(out.dense.unwrap_or_default());
                sparse_w.extend(out.sparse.unwrap_or_default());
                for doc in out.colbert.unwrap_or_default() {
                    for v in &doc {
                        col_dim = v.len();
                        col_vecs.extend(v.iter().map(|&x| f16::from_f32(x)));
                    }
                    col_off.push(col_off.last().copied().unwrap_or(0) + doc.len() as u64);
                }
            }
            if parts.bm25 {
                for t in &texts {
                    bm25_docs.push(bm25_tokens(model, t)?);
                }
            }
            progress(chunk.len());
        }
        let bm25_params = Bm25Params::default();
        Ok(Index {
            doc_ids: corpus.iter().map(|d| d.id.clone()).collect(),
            fingerprint,
            dense: parts
                .dense
                .then(|| DenseIndex::build(&dense_vecs))
                .transpose()?,
            sparse: parts
                .sparse
                .then(|| ImpactIndex::build(&sparse_w, vocab))
                .transpose()?,
            colbert: parts
                .colbert
                .then(|| ColbertStore::from_parts(col_dim, col_off, col_vecs))
                .transpose()?,
            bm25: parts
                .bm25
                .then(|| ImpactIndex::build(&bm25_weights(&bm25_docs, vocab, bm25_params), vocab))
                .transpose()?,
            bm25_params,
            max_length,
            device_dense: None,
        })
    }

    /// Number of documents.
    pub fn n_docs(&self) -> usize {
        self.doc_ids.len()
    }

    /// The corpus id of a document number (one of this index's hits; panics past
    /// [`Index::n_docs`], as slice indexing; [`Index::try_doc_id`] does not).
    pub fn doc_id(&self, doc: u32) -> &str {
        &self.doc_ids[doc as usize]
    }

    /// The corpus id of a document number, None past [`Index::n_docs`].
    pub fn try_doc_id(&self, doc: u32) -> Option<&str> {
        self.doc_ids.get(doc as usize).map(String::as_str)
    }

    /// Write `dir/index.r3i` (creating `dir`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let meta = Meta {
            format: "retrom3-index".into(),
            model: self.fingerprint.model.clone(),
            fingerprint: format!("{:016x}", self.fingerprint.hash),
            n_docs: self.n_docs(),
            parts: self.parts(),
            dense_dim: self.dense.as_ref().map_or(0, DenseIndex::dim),
            colbert_dim: self.colbert.as_ref().map_or(0, ColbertStore::dim),
            sparse_scale: self.sparse.as_ref().map_or(1.0, ImpactIndex::scale),
            bm25_scale: self.bm25.as_ref().map_or(1.0, ImpactIndex::scale),
            bm25: self.bm25_params,
            max_length: self.max_length,
            vocab: self
                .sparse
                .as_ref()
                .or(self.bm25.as_ref())
                .map_or(0, ImpactIndex::vocab),
            retrom3_version: env!("CARGO_PKG_VERSION").into(),
        };
        let meta_json =
            serde_json::to_vec_pretty(&meta).map_err(|e| Error::invalid(e.to_string()))?;
        let mut id_offsets = vec![0u64];
        let mut id_bytes = Vec::new();
        for id in &self.doc_ids {
            id_bytes.extend_from_slice(id.as_bytes());
            id_offsets.push(id_bytes.len() as u64);
        }
        let mut sections = vec![
            SectionData::bytes("meta", meta_json),
            SectionData::array("doc_ids.offsets", &id_offsets),
            SectionData::bytes("doc_ids.bytes", id_bytes),
        ];
        if let Some(d) = &self.dense {
            sections.extend(d.sections());
        }
        if let Some(s) = &self.sparse {
            sections.extend(s.sections(SPARSE_SECTIONS));
        }
        if let Some(c) = &self.colbert {
            sections.extend(c.sections());
        }
        if let Some(b) = &self.bm25 {
            sections.extend(b.sections(BM25_SECTIONS));
        }
        write_container(&dir.join(INDEX_FILE), self.fingerprint.hash, &sections)
    }

    /// Load `dir/index.r3i`, validate it fully, and (when `expect` is given) refuse it unless it
    /// was built with that model.
    pub fn load(dir: &Path, expect: Option<&ModelFingerprint>) -> Result<Index> {
        let path = dir.join(INDEX_FILE);
        if !path.is_file() {
            return Err(Error::format(
                &path,
                "no index here (build one with `retrom3 index`)",
            ));
        }
        let c = Container::open(&path)?;
        let meta: Meta = c.json("meta")?;
        let stored = ModelFingerprint {
            hash: c.fingerprint,
            model: meta.model.clone(),
        };
        if meta.format != "retrom3-index" || meta.fingerprint != format!("{:016x}", c.fingerprint) {
            return Err(c.err("meta", "does not match the header"));
        }
        if let Some(want) = expect {
            if want.hash != stored.hash {
                return Err(Error::invalid(format!(
                    "{}: index built with model {stored}, got {want}; rebuild the index with this model",
                    path.display()
                )));
            }
        }
        let n = meta.n_docs;
        let id_off: Buf<u64> = c.array("doc_ids.offsets")?;
        let id_bytes = c.bytes("doc_ids.bytes")?;
        if id_off.len() != n + 1
            || id_off[0] != 0
            || id_off[n] != id_bytes.len() as u64
            || id_off.windows(2).any(|w| w[0] > w[1])
        {
            return Err(c.err("doc_ids.offsets", "inconsistent with the document count"));
        }
        let doc_ids = id_off
            .windows(2)
            .map(|w| {
                std::str::from_utf8(&id_bytes[w[0] as usize..w[1] as usize])
                    .map(str::to_string)
                    .map_err(|_| c.err("doc_ids.bytes", "invalid UTF-8"))
            })
            .collect::<Result<Vec<_>>>()?;
        check_doc_ids(doc_ids.iter().map(String::as_str)).map_err(|m| c.err("doc_ids.bytes", m))?;
        let p = meta.parts;
        if p.dense != (meta.dense_dim > 0) || p.colbert != (meta.colbert_dim > 0) {
            return Err(c.err("meta", "parts and dimensions disagree"));
        }
        let dense = p
            .dense
            .then(|| DenseIndex::from_container(&c, n, meta.dense_dim))
            .transpose()?;
        let sparse = p
            .sparse
            .then(|| ImpactIndex::from_container(&c, SPARSE_SECTIONS, n, meta.sparse_scale))
            .transpose()?;
        let colbert = p
            .colbert
            .then(|| ColbertStore::from_container(&c, n, meta.colbert_dim))
            .transpose()?;
        let bm25 = p
            .bm25
            .then(|| ImpactIndex::from_container(&c, BM25_SECTIONS, n, meta.bm25_scale))
            .transpose()?;
        Ok(Index {
            doc_ids,
            fingerprint: stored,
            dense,
            sparse,
            colbert,
            bm25,
            bm25_params: meta.bm25,
            max_length: meta.max_length,
            device_dense: None,
        })
    }

    /// Upload the dense vectors to `dev`: dense retrieval (and the dense candidates of the
    /// re-rank and fused modes) then runs as a device GEMM + top-k kernel. Without a dense part
    /// this does nothing.
    pub fn attach_device(&mut self, dev: std::sync::Arc<crate::engine::Gpu>) -> Result<()> {
        if let Some(d) = &self.dense {
            let index = crate::engine::dense::DeviceDenseIndex::upload(&*dev, d)?;
            self.device_dense = Some(DeviceDense { dev, index });
        }
        Ok(())
    }

    /// The parts this index holds (the `Some` of its part fields).
    pub fn parts(&self) -> IndexParts {
        IndexParts {
            dense: self.dense.is_some(),
            sparse: self.sparse.is_some(),
            colbert: self.colbert.is_some(),
            bm25: self.bm25.is_some(),
        }
    }

    /// An error when the index lacks a part `need` asks for.
    pub fn require(&self, need: IndexParts, what: &str) -> Result<()> {
        if self.parts().covers(need) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "{what} needs index parts [{}], this index has [{}] (rebuild with the missing --dense/--sparse/--colbert)",
                need.names(),
                self.parts().names()
            )))
        }
    }
}
