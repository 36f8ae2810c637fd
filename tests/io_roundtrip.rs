//! Write -> read roundtrips for safetensors, torch zip checkpoints and model directories, the
//! committed fixtures (written by real torch), and the error paths a user can hit.

use half::{bf16, f16};
use retrom3::io::pickle::PickleWriter;
use retrom3::io::zip::ZipWriter;
use retrom3::io::{self, M3Heads};
use retrom3::{DType, Error, Storage, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A fresh, empty scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("io_roundtrip-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Deterministic values of every dtype and a spread of shapes (scalars, empty, rank 1..5).
fn sample_tensors() -> BTreeMap<String, Tensor> {
    let shapes: [&[usize]; 7] = [
        &[],
        &[0],
        &[5],
        &[3, 4],
        &[2, 0, 3],
        &[2, 3, 4],
        &[1, 2, 1, 3, 2],
    ];
    let mut m = BTreeMap::new();
    for (si, dims) in shapes.iter().enumerate() {
        let n: usize = dims.iter().product();
        let f: Vec<f32> = (0..n)
            .map(|i| (i as f32 - 7.25) * 0.37 + si as f32)
            .collect();
        let storages = [
            Storage::F32(f.clone()),
            Storage::F16(f.iter().map(|&x| f16::from_f32(x)).collect()),
            Storage::BF16(f.iter().map(|&x| bf16::from_f32(x)).collect()),
            Storage::I64((0..n).map(|i| i as i64 * 1_000_000_007 - 3).collect()),
        ];
        for s in storages {
            let name = format!("t{si}.{}", s.dtype());
            m.insert(name, Tensor::new(s, dims).unwrap());
        }
    }
    m
}

fn assert_same(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in a {
        let u = &b[k];
        assert_eq!(t.dims(), u.dims(), "{k} dims");
        assert_eq!(t.storage(), u.storage(), "{k} data");
    }
}

#[test]
fn safetensors_roundtrip_every_dtype() {
    let dir = scratch("st");
    let path = dir.join("model.safetensors");
    let tensors = sample_tensors();
    io::write_safetensors(&path, &tensors, None).unwrap();
    assert_same(&tensors, &io::read_safetensors(&path).unwrap());
    // The header carries {"format": "pt"} (transformers checks it).
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    // Caller metadata is kept and "format" added.
    let extra = BTreeMap::from([("step".to_string(), "7".to_string())]);
    io::write_safetensors(&path, &tensors, Some(&extra)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(
        (meta["step"].as_str(), meta["format"].as_str()),
        ("7", "pt")
    );
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["model.safetensors"]);
}

#[test]
fn torch_roundtrip_every_dtype() {
    let dir = scratch("pt");
    let path = dir.join("state.pt");
    let tensors = sample_tensors();
    io::write_torch(&path, &tensors).unwrap();
    assert_same(&tensors, &io::read_torch(&path).unwrap());
    // An empty state dict is valid too.
    io::write_torch(&path, &BTreeMap::new()).unwrap();
    assert!(io::read_torch(&path).unwrap().is_empty());
}

#[test]
fn torch_roundtrip_large_dims_use_wider_int_opcodes() {
    let dir = scratch("wide");
    let path = dir.join("wide.pt");
    // 70_000 > u16::MAX exercises BININT; 300 exercises BININT2.
    let m = BTreeMap::from([
        ("a".to_string(), Tensor::zeros(&[70_000])),
        ("b".to_string(), Tensor::zeros(&[300, 2])),
    ]);
    io::write_torch(&path, &m).unwrap();
    assert_same(&m, &io::read_torch(&path).unwrap());
}

/// A hand-built checkpoint with a transposed view, a storage offset, a shared storage and an
/// expanded (stride 0) view, as torch writes them for non-contiguous tensors.
fn strided_checkpoint() -> Vec<u8> {
    let storage: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let mut p = PickleWriter::new();
    p.global("collections", "OrderedDict");
    p.op(b')');
    p.op(b'R');
    p.mark();
    let views: [(&str, u64, &[u64], &[u64]); 4] = [
        ("t", 0, &[4, 3], &[1, 4]),   // transpose of a [3, 4]
        ("row", 4, &[4], &[1]),       // row 1, offset 4
        ("col", 1, &[3], &[4]),       // column 1
        ("exp", 2, &[2, 3], &[0, 1]), // expand of [3] from offset 2
    ];
    for (name, offset, size, stride) in views {
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.mark();
        p.mark();
        p.str("storage");
        p.global("torch", "FloatStorage");
        p.str("0");
        p.str("cpu");
        p.int(12);
        p.tuple();
        p.op(b'Q');
        p.int(offset);
        p.int_tuple(size);
        p.int_tuple(stride);
        p.op(0x89);
        p.global("collections", "OrderedDict");
        p.op(b')');
        p.op(b'R');
        p.tuple();
        p.op(b'R');
    }
    p.op(b'u');
    let pkl = p.finish();
    let mut z = ZipWriter::new(Vec::new());
    z.add_stored("weird_name/data.pkl", &pkl).unwrap();
    z.add_stored("weird_name/byteorder", b"little").unwrap();
    let raw: Vec<u8> = storage.iter().flat_map(|x| x.to_le_bytes()).collect();
    z.add_stored("weird_name/data/0", &raw).unwrap();
    z.add_stored("weird_name/version", b"3\n").unwrap();
    z.finish().unwrap()
}

#[test]
fn torch_reads_strided_views_of_shared_storage() {
    let m = io::parse_torch(&strided_checkpoint(), Path::new("strided.pt")).unwrap();
    let get = |k: &str| (m[k].dims().to_vec(), m[k].f32s().unwrap().to_vec());
    let t = get("t");
    assert_eq!(t.0, vec![4, 3]);
    assert_eq!(t.1, vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]);
    assert_eq!(get("row"), (vec![4], vec![4., 5., 6., 7.]));
    assert_eq!(get("col"), (vec![3], vec![1., 5., 9.]));
    assert_eq!(get("exp"), (vec![2, 3], vec![2., 3., 4., 2., 3., 4.]));
}

#[test]
fn fixtures_written_by_torch_load() {
    let xlmr = fixtures().join("tiny-xlmr");
    let layout = fixtures().join("tiny-bge-m3-layout");
    if !xlmr.join("model.safetensors").is_file() || !layout.join("pytorch_model.bin").is_file() {
        eprintln!("skipping: tests/fixtures/tiny-xlmr or tiny-bge-m3-layout is absent");
        return;
    }
    let (st, st_path) = io::read_backbone(&xlmr).unwrap();
    assert!(st_path.ends_with("model.safetensors"));
    let (bin, bin_path) = io::read_backbone(&layout).unwrap();
    assert!(bin_path.ends_with("pytorch_model.bin"));
    // The .bin holds the same weights plus pooler and the position_ids buffer (i64).
    for (k, t) in &st {
        assert_eq!(t.storage(), bin[k].storage(), "{k}");
        assert_eq!(t.dims(), bin[k].dims(), "{k}");
    }
    assert_eq!(bin["embeddings.position_ids"].dtype(), DType::I64);
    let hidden = st["embeddings.LayerNorm.weight"].dims()[0];
    // f32 heads (tiny-xlmr) and f16 heads (tiny-bge-m3-layout, like BAAI/bge-m3) both load as f32.
    for d in [&xlmr, &layout] {
        let h = io::read_heads(d, hidden)
            .unwrap()
            .expect("both heads exist");
        assert_eq!(h.colbert_weight.dims()[1], hidden);
        assert_eq!(h.sparse_weight.dims(), &[1, hidden]);
        assert_eq!(h.colbert_bias.dtype(), DType::F32);
    }
    assert_eq!(
        io::read_torch(&layout.join("colbert_linear.pt")).unwrap()["weight"].dtype(),
        DType::F16
    );
}

#[test]
fn model_dir_roundtrip_with_prefix_heads_and_tokenizer() {
    let src = scratch("dir-src");
    let dst = scratch("dir-dst");
    // A task model checkpoint: `roberta.`-prefixed encoder keys plus an LM head.
    let mut sd = BTreeMap::new();
    sd.insert(
        "roberta.embeddings.word_embeddings.weight".to_string(),
        Tensor::zeros(&[10, 4]),
    );
    sd.insert(
        "roberta.encoder.layer.0.output.dense.bias".to_string(),
        Tensor::zeros(&[4]),
    );
    sd.insert("lm_head.bias".to_string(), Tensor::zeros(&[10]));
    io::write_torch(&src.join("pytorch_model.bin"), &sd).unwrap();
    let (bb, path) = io::read_backbone(&src).unwrap();
    assert!(path.ends_with("pytorch_model.bin"));
    let keys: Vec<_> = bb.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.output.dense.bias",
            "lm_head.bias"
        ]
    );
    // model.safetensors wins over pytorch_model.bin.
    io::write_backbone(&src, &bb).unwrap();
    assert!(io::read_backbone(&src)
        .unwrap()
        .1
        .ends_with("model.safetensors"));

    assert!(io::read_heads(&src, 4).unwrap().is_none());
    let heads = M3Heads {
        colbert_weight: Tensor::from_vec((0..12).map(|i| i as f32).collect(), &[3, 4]).unwrap(),
        colbert_bias: Tensor::from_vec(vec![1., 2., 3.], &[3]).unwrap(),
        sparse_weight: Tensor::from_vec(vec![0.5; 4], &[1, 4])
            .unwrap()
            .to_dtype(DType::F16),
        sparse_bias: Tensor::from_vec(vec![-1.0], &[1]).unwrap(),
    };
    io::write_heads(&dst, &heads).unwrap();
    let back = io::read_heads(&dst, 4).unwrap().unwrap();
    assert_eq!(
        back.colbert_weight.f32s().unwrap(),
        heads.colbert_weight.f32s().unwrap()
    );
    assert_eq!(back.sparse_weight.f32s().unwrap(), &[0.5; 4]);
    // Wrong hidden size: a shape error naming the file.
    let e = io::read_heads(&dst, 5).unwrap_err().to_string();
    assert!(e.contains("colbert_linear.pt"), "{e}");
    // Only one head file: an error naming the missing one.
    std::fs::remove_file(dst.join("sparse_linear.pt")).unwrap();
    let e = io::read_heads(&dst, 4).unwrap_err().to_string();
    assert!(
        e.contains("sparse_linear.pt") && e.contains("missing"),
        "{e}"
    );

    // Tokenizer and sentence-transformers files, module folders included.
    for f in [
        "tokenizer.json",
        "vocab.txt",
        "1_Pooling/config.json",
        "unrelated.txt",
    ] {
        let p = src.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, f).unwrap();
    }
    std::fs::create_dir_all(src.join("2_Normalize")).unwrap();
    std::fs::write(
        src.join("modules.json"),
        r#"[{"idx":0,"path":""},{"idx":1,"path":"1_Pooling"},{"idx":2,"path":"2_Normalize"}]"#,
    )
    .unwrap();
    let copied = io::copy_tokenizer_files(&src, &dst).unwrap();
    assert_eq!(copied.len(), 4, "{copied:?}");
    assert_eq!(
        std::fs::read_to_string(dst.join("1_Pooling/config.json")).unwrap(),
        "1_Pooling/config.json"
    );
    assert!(dst.join("2_Normalize").is_dir());
    assert!(!dst.join("unrelated.txt").exists());
}

#[test]
fn clear_errors() {
    let dir = scratch("errors");
    // No backbone: the error lists what was looked for.
    let e = io::read_backbone(&dir).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("pytorch_model.bin"),
        "{e}"
    );
    // Missing file: an I/O error naming it.
    let missing = dir.join("nope.pt");
    assert!(matches!(io::read_torch(&missing), Err(Error::Io { path, .. }) if path == missing));
    // Legacy torch format (a raw pickle).
    let e = io::parse_torch(
        b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
        Path::new("old.bin"),
    );
    assert!(e.unwrap_err().to_string().contains("legacy"));
    // Empty files.
    std::fs::write(dir.join("empty.safetensors"), b"").unwrap();
    assert!(io::read_safetensors(&dir.join("empty.safetensors")).is_err());
    std::fs::write(dir.join("empty.pt"), b"").unwrap();
    assert!(io::read_torch(&dir.join("empty.pt")).is_err());
    // An unsupported safetensors dtype names the tensor and the dtype.
    let data = [0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![2], &data).unwrap();
    let bytes = safetensors::tensor::serialize([("w.f64", view)], None).unwrap();
    let e = io::parse_safetensors(&bytes, Path::new("x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("w.f64") && e.contains("F64"), "{e}");
    // A byte changed inside data.pkl is caught by the entry's CRC-32.
    let mut pt = Vec::new();
    let m = BTreeMap::from([("w".to_string(), Tensor::zeros(&[2]))]);
    io::write_torch(&dir.join("w.pt"), &m).unwrap();
    pt.extend(std::fs::read(dir.join("w.pt")).unwrap());
    let pos = pt.windows(12).position(|w| w == b"FloatStorage").unwrap();
    pt[pos..pos + 12].copy_from_slice(b"IntxStorage\n"); // same length; CRC now wrong
    let e = io::parse_torch(&pt, Path::new("w.pt"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("CRC"), "{e}");
}

#[test]
fn unsupported_storage_type_is_named() {
    let mut p = PickleWriter::new();
    p.global("collections", "OrderedDict");
    p.op(b')');
    p.op(b'R');
    p.str("w");
    p.global("torch._utils", "_rebuild_tensor_v2");
    p.mark();
    p.mark();
    p.str("storage");
    p.global("torch", "DoubleStorage");
    p.str("0");
    p.str("cpu");
    p.int(2);
    p.tuple();
    p.op(b'Q');
    p.int(0);
    p.int_tuple(&[2]);
    p.int_tuple(&[1]);
    p.op(0x89);
    p.op(b'N');
    p.tuple();
    p.op(b'R');
    p.op(b's');
    let mut z = ZipWriter::new(Vec::new());
    z.add_stored("a/data.pkl", &p.finish()).unwrap();
    z.add_stored("a/data/0", &[0u8; 16]).unwrap();
    let bytes = z.finish().unwrap();
    let e = io::parse_torch(&bytes, Path::new("d.pt"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor w") && e.contains("torch.DoubleStorage"),
        "{e}"
    );
}

/// Re-write the torch-made fixtures with our writers into target/tmp/io_export/<name>/ (or
/// $RETROM3_IO_EXPORT_DIR/<name>/) for tools/check_roundtrip.py, and check the result in Rust.
#[test]
fn export_fixture_model_dirs() {
    let root = std::env::var_os("RETROM3_IO_EXPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("io_export"));
    for name in ["tiny-bge-m3-layout", "tiny-xlmr"] {
        let src = fixtures().join(name);
        if !src.join("config.json").is_file() {
            eprintln!("skipping export of {name}: fixture absent");
            continue;
        }
        let dst = root.join(name);
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir_all(&dst).unwrap();
        let (backbone, _) = io::read_backbone(&src).unwrap();
        let hidden = backbone["embeddings.LayerNorm.weight"].dims()[0];
        let heads = io::read_heads(&src, hidden).unwrap().unwrap();
        io::write_backbone(&dst, &backbone).unwrap();
        io::write_heads(&dst, &heads).unwrap();
        io::copy_tokenizer_files(&src, &dst).unwrap();
        // config.json belongs to the model writer; copied here so transformers can load the dir.
        std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();

        let (again, _) = io::read_backbone(&dst).unwrap();
        assert_same(&backbone, &again);
        let h = io::read_heads(&dst, hidden).unwrap().unwrap();
        assert_eq!(h.colbert_weight.storage(), heads.colbert_weight.storage());
        assert_eq!(h.sparse_bias.storage(), heads.sparse_bias.storage());
        eprintln!("exported {} -> {}", src.display(), dst.display());
    }
}
