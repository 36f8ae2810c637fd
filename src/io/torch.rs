//! PyTorch checkpoints in the zip format (`torch.save` since torch 1.6): `pytorch_model.bin`,
//! FlagEmbedding's `colbert_linear.pt` / `sparse_linear.pt`.
//!
//! Layout: `<archive>/data.pkl` (the pickled state dict), `<archive>/data/<key>` (one record per
//! storage, raw little-endian elements, 64-byte aligned), `<archive>/byteorder` (`little`) and
//! `<archive>/version`. The top folder name varies with the torch version and the file name, so
//! the reader looks for the single `*/data.pkl`.

use super::pickle::{self, Object, PickleWriter, TensorRef, Value};
use super::zip::{ZipArchive, ZipWriter};
use super::{map_file, storage_le_bytes, write_atomic};
use crate::error::{Error, Result};
use crate::tensor::{DType, Storage, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Elements a tensor may have beyond its storage's (only possible with zero or overlapping
/// strides, i.e. expanded views); caps the memory a tiny malicious file can make us allocate.
const MAX_EXPANDED_NUMEL: u64 = 1 << 26;

/// The storage types we read, with their dtypes.
const STORAGE_TYPES: [(&str, DType); 4] = [
    ("torch.FloatStorage", DType::F32),
    ("torch.HalfStorage", DType::F16),
    ("torch.BFloat16Storage", DType::BF16),
    ("torch.LongStorage", DType::I64),
];

/// Read a state dict (a dict of name -> tensor) from a torch zip checkpoint.
pub fn read_torch(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = map_file(path)?;
    parse_torch(&bytes, path)
}

/// [`read_torch`] on bytes already in memory; `path` only names the file in errors.
pub fn parse_torch(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let fail = |msg: String| Error::format(path, msg);
    if !bytes.starts_with(b"PK\x03\x04") {
        // The legacy format (torch < 1.6, or _use_new_zipfile_serialization=False) is a sequence
        // of raw pickles starting with a pickled magic number.
        if bytes.first() == Some(&0x80) {
            return Err(fail(
                "legacy (non-zip) torch serialization is not supported; re-save it with a recent \
                 torch: torch.save(torch.load(f, weights_only=True), f)"
                    .into(),
            ));
        }
        return Err(fail(
            "not a torch zip checkpoint (no ZIP signature at the start)".into(),
        ));
    }
    let zip = ZipArchive::parse(bytes, path)?;
    let pkls: Vec<_> = zip
        .entries()
        .iter()
        .filter(|e| e.name.ends_with("/data.pkl") && e.name.matches('/').count() == 1)
        .collect();
    let pkl = match pkls[..] {
        [one] => one,
        [] => {
            let names: Vec<_> = zip
                .entries()
                .iter()
                .take(8)
                .map(|e| e.name.as_str())
                .collect();
            return Err(fail(format!(
                "no */data.pkl record; is this a torch checkpoint? (entries: {names:?})"
            )));
        }
        _ => return Err(fail("more than one */data.pkl record".into())),
    };
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    if let Some(e) = zip.find(&format!("{prefix}byteorder")) {
        let order = zip.data(e)?;
        if order.trim_ascii() != b"little" {
            return Err(fail(format!(
                "byteorder {:?} is not supported (little-endian only)",
                String::from_utf8_lossy(order)
            )));
        }
    }
    let program =
        pickle::unpickle(zip.data(pkl)?).map_err(|e| fail(format!("{}: {e}", pkl.name)))?;
    let pairs = match program.object(&program.root) {
        Some(Object::Dict(pairs)) => pairs,
        _ => {
            return Err(fail(
                "data.pkl does not hold a dict (a state dict was expected)".into(),
            ))
        }
    };

    let mut storages: HashMap<&str, &[u8]> = HashMap::new();
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        let Value::Str(name) = k else {
            return Err(fail("a state dict key is not a string".into()));
        };
        let Some(Object::Tensor(t)) = program.object(v) else {
            return Err(fail(format!("state dict entry {name} is not a tensor")));
        };
        let data = match storages.get(t.storage.key.as_str()) {
            Some(d) => *d,
            None => {
                let record = format!("{prefix}data/{}", t.storage.key);
                let entry = zip.find(&record).ok_or_else(|| {
                    fail(format!("tensor {name}: storage record {record} is missing"))
                })?;
                let d = zip.data(entry)?;
                storages.insert(&t.storage.key, d);
                d
            }
        };
        let tensor = materialize(t, data).map_err(|m| fail(format!("tensor {name}: {m}")))?;
        out.insert(name.to_string(), tensor);
    }
    Ok(out)
}

/// Build a contiguous tensor from a strided view of a storage record, checking every bound.
fn materialize(t: &TensorRef, data: &[u8]) -> std::result::Result<Tensor, String> {
    let s = &t.storage;
    let dtype = STORAGE_TYPES
        .iter()
        .find(|(n, _)| *n == s.storage_type)
        .map(|&(_, d)| d)
        .ok_or_else(|| {
            format!(
                "unsupported storage type {} (supported: FloatStorage, HalfStorage, \
                 BFloat16Storage, LongStorage)",
                s.storage_type
            )
        })?;
    let es = dtype.size() as u64;
    let record_len = data.len() as u64;
    if s.numel.checked_mul(es).is_none_or(|n| n > record_len) {
        return Err(format!(
            "storage {} declares {} {} elements but its record has {record_len} bytes",
            s.key, s.numel, dtype
        ));
    }
    let avail = s.numel;
    let numel = t
        .size
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or("element count overflows")?;
    let dims: Vec<usize> = t
        .size
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| "dimension too large".to_string()))
        .collect::<std::result::Result<_, _>>()?;
    if numel == 0 {
        return Tensor::new(
            Storage::from_le_bytes(dtype, &[]).map_err(|e| e.to_string())?,
            &dims,
        )
        .map_err(|e| e.to_string());
    }
    // Highest element the view touches: offset + sum((size_i - 1) * stride_i).
    t.size
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |acc, (&d, &st)| {
            acc.checked_add((d - 1).checked_mul(st)?)
        })
        .filter(|&l| l < avail)
        .ok_or_else(|| {
            format!(
                "view (offset {}, size {:?}, stride {:?}) reaches past its storage of {avail} \
                 elements",
                t.offset, t.size, t.stride
            )
        })?;
    if numel > avail && numel > MAX_EXPANDED_NUMEL {
        return Err(format!(
            "expanded view of {numel} elements over a storage of {avail} is too large"
        ));
    }
    let es = es as usize;
    let off = t.offset as usize; // < avail <= record_len
    let contiguous = {
        let mut expect = 1u64;
        let mut ok = true;
        for (&d, &st) in t.size.iter().zip(&t.stride).rev() {
            if d != 1 && st != expect {
                ok = false;
            }
            expect = expect.saturating_mul(d);
        }
        ok
    };
    let n = numel as usize;
    let storage = if contiguous {
        Storage::from_le_bytes(dtype, &data[off * es..(off + n) * es])
    } else {
        // Gather element by element with an odometer over the multi-index.
        // A size-1 dimension's stride is never applied (it may hold any value), so zero it; then
        // every intermediate `lin` stays below 2 * (last element) and cannot overflow.
        let stride: Vec<u64> = t
            .size
            .iter()
            .zip(&t.stride)
            .map(|(&d, &st)| if d == 1 { 0 } else { st })
            .collect();
        let mut bytes = Vec::with_capacity(n * es);
        let mut idx = vec![0u64; t.size.len()];
        let mut lin = t.offset;
        for _ in 0..n {
            let p = lin as usize * es;
            bytes.extend_from_slice(&data[p..p + es]);
            for ax in (0..idx.len()).rev() {
                idx[ax] += 1;
                lin += stride[ax];
                if idx[ax] < t.size[ax] {
                    break;
                }
                lin -= stride[ax] * t.size[ax];
                idx[ax] = 0;
            }
        }
        Storage::from_le_bytes(dtype, &bytes)
    }
    .map_err(|e| e.to_string())?;
    Tensor::new(storage, &dims).map_err(|e| e.to_string())
}

fn storage_type(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::I64 => "LongStorage",
    }
}

/// The `data.pkl` of a state dict: an `OrderedDict` of `_rebuild_tensor_v2` calls, tensor `i`
/// (in map order) on storage `data/<i>`, exactly as `torch.save(state_dict)` pickles it.
fn state_dict_pickle(tensors: &BTreeMap<String, Tensor>) -> Vec<u8> {
    let mut p = PickleWriter::new();
    p.global("collections", "OrderedDict");
    p.op(b')'); // EMPTY_TUPLE
    p.op(b'R'); // REDUCE
    if !tensors.is_empty() {
        p.mark();
        for (i, (name, t)) in tensors.iter().enumerate() {
            p.str(name);
            p.global("torch._utils", "_rebuild_tensor_v2");
            p.mark();
            // Persistent id: ('storage', torch.<Type>Storage, key, location, numel).
            p.mark();
            p.str("storage");
            p.global("torch", storage_type(t.dtype()));
            p.str(&i.to_string());
            p.str("cpu");
            p.int(t.numel() as u64);
            p.tuple();
            p.op(b'Q'); // BINPERSID
            p.int(0); // storage offset
            let size: Vec<u64> = t.dims().iter().map(|&d| d as u64).collect();
            let mut stride = vec![1u64; size.len()];
            for ax in (0..size.len().saturating_sub(1)).rev() {
                stride[ax] = stride[ax + 1] * size[ax + 1];
            }
            p.int_tuple(&size);
            p.int_tuple(&stride);
            p.op(0x89); // NEWFALSE: requires_grad
            p.global("collections", "OrderedDict"); // backward hooks: OrderedDict()
            p.op(b')');
            p.op(b'R');
            p.tuple();
            p.op(b'R');
        }
        p.op(b'u'); // SETITEMS
    }
    p.finish()
}

/// Write a state dict as a torch zip checkpoint that `torch.load(path, weights_only=True)` reads
/// (an `OrderedDict`, archive folder `archive/`, protocol-2 `data.pkl`, one `data/<i>` record per
/// tensor, `byteorder` = `little`, `version` = `3`), atomically.
pub fn write_torch(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let pkl = state_dict_pickle(tensors);
    write_atomic(path, |out| {
        let mut zip = ZipWriter::new(out);
        zip.add_stored("archive/data.pkl", &pkl)?;
        zip.add_stored("archive/byteorder", b"little")?;
        for (i, t) in tensors.values().enumerate() {
            zip.add_stored(&format!("archive/data/{i}"), &storage_le_bytes(t.storage()))?;
        }
        zip.add_stored("archive/version", b"3\n")?;
        zip.finish()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::pickle::StorageRef;

    fn view(offset: u64, size: &[u64], stride: &[u64]) -> TensorRef {
        TensorRef {
            storage: StorageRef {
                storage_type: "torch.FloatStorage".into(),
                key: "0".into(),
                location: "cpu".into(),
                numel: 6,
            },
            offset,
            size: size.to_vec(),
            stride: stride.to_vec(),
        }
    }

    fn data() -> Vec<u8> {
        (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    #[test]
    fn views_are_bounds_checked() {
        let d = data();
        let ok = |v: TensorRef| materialize(&v, &d).map(|t| t.f32s().unwrap().to_vec());
        assert_eq!(
            ok(view(0, &[2, 3], &[3, 1])).unwrap(),
            [0., 1., 2., 3., 4., 5.]
        );
        assert_eq!(
            ok(view(0, &[3, 2], &[1, 3])).unwrap(),
            [0., 3., 1., 4., 2., 5.]
        );
        // A size-1 dimension may carry any stride, even one that would overflow if applied.
        assert_eq!(ok(view(5, &[1, 1], &[u64::MAX, u64::MAX])).unwrap(), [5.]);
        assert_eq!(
            ok(view(2, &[2, 1, 2], &[2, u64::MAX, 1])).unwrap(),
            [2., 3., 4., 5.]
        );
        // Zero elements: no bounds to check, offset irrelevant.
        assert!(ok(view(99, &[0, 4], &[4, 1])).unwrap().is_empty());
        // Past the end, by offset, by stride, and by overflow.
        assert!(ok(view(1, &[2, 3], &[3, 1])).is_err());
        assert!(ok(view(0, &[2, 3], &[4, 1])).is_err());
        assert!(ok(view(0, &[2, 2], &[u64::MAX, 1])).is_err());
        assert!(ok(view(u64::MAX, &[1], &[1])).is_err());
        assert!(ok(view(0, &[u64::MAX, u64::MAX], &[0, 0])).is_err());
        // A large expanded view of a tiny storage is refused instead of allocated.
        assert!(ok(view(0, &[1 << 20, 1 << 20], &[0, 0]))
            .unwrap_err()
            .contains("expanded"));
        // The storage record must hold what the storage declares.
        let mut v = view(0, &[2], &[1]);
        v.storage.numel = 7;
        assert!(ok(v).unwrap_err().contains("declares"));
    }
}
