//! safetensors files (`model.safetensors`): an 8-byte little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets}, "__metadata__": {..}}` padded with spaces to 8 bytes, then
//! the raw little-endian tensor data.
//!
//! Reading memory-maps the file and lets the `safetensors` crate validate the header (offsets,
//! sizes, overlaps); writing is our own (the format is that small) so that it streams from the
//! tensors without a second in-memory copy and goes through [`write_atomic`].

use super::{map_file, storage_le_bytes, write_atomic};
use crate::error::{Error, Result};
use crate::tensor::{DType, Storage, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Read every tensor of a safetensors file (F32, F16, BF16 and I64; any other dtype is an error
/// naming the tensor).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = map_file(path)?;
    parse_safetensors(&bytes, path)
}

/// [`read_safetensors`] on bytes already in memory; `path` only names the file in errors.
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(path, format!("invalid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::I64 => DType::I64,
            other => {
                return Err(Error::format(
                    path,
                    format!(
                    "tensor {name}: unsupported dtype {other:?} (supported: F32, F16, BF16, I64)"
                ),
                ))
            }
        };
        let storage = Storage::from_le_bytes(dtype, view.data())
            .map_err(|e| Error::format(path, format!("tensor {name}: {e}")))?;
        let tensor = Tensor::new(storage, view.shape())
            .map_err(|e| Error::format(path, format!("tensor {name}: {e}")))?;
        out.insert(name.to_string(), tensor);
    }
    Ok(out)
}

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
    }
}

/// Write `tensors` as a safetensors file, atomically. `metadata` goes to `__metadata__`; a
/// `"format": "pt"` entry is added when absent (transformers refuses other or missing formats
/// once metadata is present), and `None` writes just `{"format": "pt"}`.
///
/// Tensors are laid out by decreasing element size, then by name (as the `safetensors` crate
/// does), so every tensor's data is aligned to its element size.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    if tensors.contains_key("__metadata__") {
        return Err(Error::invalid(
            "a tensor may not be called __metadata__ in safetensors",
        ));
    }
    let mut meta: BTreeMap<String, String> = metadata.cloned().unwrap_or_default();
    meta.entry("format".into()).or_insert_with(|| "pt".into());

    let mut order: Vec<(&String, &Tensor)> = tensors.iter().collect();
    order.sort_by(|a, b| {
        b.1.dtype()
            .size()
            .cmp(&a.1.dtype().size())
            .then(a.0.cmp(b.0))
    });

    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(meta));
    let mut offset = 0usize;
    for (name, t) in &order {
        let n = t.numel() * t.dtype().size();
        header.insert(
            (*name).clone(),
            serde_json::json!({
                "dtype": st_dtype(t.dtype()),
                "shape": t.dims(),
                "data_offsets": [offset, offset + n],
            }),
        );
        offset += n;
    }
    let mut header = serde_json::to_vec(&header)
        .map_err(|e| Error::invalid(format!("safetensors header: {e}")))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    write_atomic(path, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for (_, t) in &order {
            out.write_all(&storage_le_bytes(t.storage()))?;
        }
        Ok(())
    })
}
