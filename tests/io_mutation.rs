//! Mutation testing of the readers on stable Rust (no cargo-fuzz): valid safetensors / .bin / .pt
//! files, written by our writers and by real torch (tests/fixtures, when present), are truncated
//! at every length and have bytes flipped, thousands of cases from a fixed-seed xorshift RNG.
//! Every case must give `Ok` or `Err`; a panic (an out-of-bounds index included: safe Rust turns
//! every out-of-bounds read into one) is caught with `catch_unwind` and fails the test with the
//! case that caused it.

use half::{bf16, f16};
use retrom3::io::pickle::{unpickle, PickleWriter};
use retrom3::io::zip::{ZipArchive, ZipWriter};
use retrom3::io::{self};
use retrom3::{Storage, Tensor};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// xorshift64*: deterministic across platforms and runs.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    SafeTensors,
    Torch,
}

/// One valid file to mutate.
struct Base {
    name: String,
    kind: Kind,
    bytes: Vec<u8>,
}

/// Parse with the reader of `kind`; `Ok(true)` on a successful load.
fn parse(kind: Kind, bytes: &[u8]) -> bool {
    let p = Path::new("mutated");
    match kind {
        Kind::SafeTensors => io::parse_safetensors(bytes, p).is_ok(),
        Kind::Torch => io::parse_torch(bytes, p).is_ok(),
    }
}

/// Counts of one mutation run; panics are collected with their case description.
#[derive(Default)]
struct Tally {
    ok: usize,
    err: usize,
    panics: Vec<String>,
}

impl Tally {
    fn case(&mut self, what: impl FnOnce() -> String, f: impl FnOnce() -> bool) {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(true) => self.ok += 1,
            Ok(false) => self.err += 1,
            Err(_) => self.panics.push(what()),
        }
    }

    fn finish(self, label: &str) {
        eprintln!(
            "{label}: {} cases, {} loaded, {} refused, {} panics",
            self.ok + self.err + self.panics.len(),
            self.ok,
            self.err,
            self.panics.len()
        );
        assert!(
            self.panics.is_empty(),
            "{label}: {} panics; first cases: {:#?}",
            self.panics.len(),
            &self.panics[..self.panics.len().min(5)]
        );
    }
}

fn sample_tensors() -> BTreeMap<String, Tensor> {
    let f: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    BTreeMap::from([
        (
            "w.f32".into(),
            Tensor::from_vec(f.clone(), &[2, 3, 4]).unwrap(),
        ),
        (
            "w.f16".into(),
            Tensor::new(
                Storage::F16(f[..6].iter().map(|&x| f16::from_f32(x)).collect()),
                &[6],
            )
            .unwrap(),
        ),
        (
            "w.bf16".into(),
            Tensor::new(
                Storage::BF16(f[..4].iter().map(|&x| bf16::from_f32(x)).collect()),
                &[2, 2],
            )
            .unwrap(),
        ),
        (
            "ids".into(),
            Tensor::new(Storage::I64(vec![0, 1, 2]), &[1, 3]).unwrap(),
        ),
        ("scalar".into(), Tensor::scalar(1.5)),
        ("empty".into(), Tensor::zeros(&[0, 3])),
    ])
}

/// A strided checkpoint (transposed view + offset view of one shared storage).
fn strided_pt() -> Vec<u8> {
    let mut p = PickleWriter::new();
    p.global("collections", "OrderedDict");
    p.op(b')');
    p.op(b'R');
    p.mark();
    for (name, offset, size, stride) in
        [("t", 0u64, [3u64, 2], [1u64, 3]), ("r", 3, [1, 3], [3, 1])]
    {
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.mark();
        p.mark();
        p.str("storage");
        p.global("torch", "FloatStorage");
        p.str("0");
        p.str("cpu");
        p.int(6);
        p.tuple();
        p.op(b'Q');
        p.int(offset);
        p.int_tuple(&size);
        p.int_tuple(&stride);
        p.op(0x89);
        p.global("collections", "OrderedDict");
        p.op(b')');
        p.op(b'R');
        p.tuple();
        p.op(b'R');
    }
    p.op(b'u');
    let mut z = ZipWriter::new(Vec::new());
    z.add_stored("s/data.pkl", &p.finish()).unwrap();
    z.add_stored("s/byteorder", b"little").unwrap();
    let raw: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    z.add_stored("s/data/0", &raw).unwrap();
    z.finish().unwrap()
}

/// Our own files (always) and the committed torch-written fixtures (when present).
fn bases() -> Vec<Base> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("io_mutation");
    std::fs::create_dir_all(&dir).unwrap();
    let tensors = sample_tensors();
    let st = dir.join("ours.safetensors");
    io::write_safetensors(&st, &tensors, None).unwrap();
    let pt = dir.join("ours.pt");
    io::write_torch(&pt, &tensors).unwrap();
    let mut out = vec![
        Base {
            name: "ours.safetensors".into(),
            kind: Kind::SafeTensors,
            bytes: std::fs::read(&st).unwrap(),
        },
        Base {
            name: "ours.pt".into(),
            kind: Kind::Torch,
            bytes: std::fs::read(&pt).unwrap(),
        },
        Base {
            name: "strided.pt".into(),
            kind: Kind::Torch,
            bytes: strided_pt(),
        },
    ];
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let wanted: [(&str, Kind); 5] = [
        ("tiny-xlmr/model.safetensors", Kind::SafeTensors),
        ("tiny-xlmr/colbert_linear.pt", Kind::Torch),
        ("tiny-xlmr/sparse_linear.pt", Kind::Torch),
        ("tiny-bge-m3-layout/pytorch_model.bin", Kind::Torch),
        ("tiny-bge-m3-layout/colbert_linear.pt", Kind::Torch),
    ];
    for (rel, kind) in wanted {
        let p: PathBuf = fx.join(rel);
        match std::fs::read(&p) {
            Ok(bytes) => out.push(Base {
                name: rel.into(),
                kind,
                bytes,
            }),
            Err(_) => eprintln!("skipping fixture {} (absent)", p.display()),
        }
    }
    for b in &out {
        assert!(parse(b.kind, &b.bytes), "base file {} must load", b.name);
    }
    out
}

/// Truncation lengths: all of them for files up to 16 KiB; otherwise the first and last 4 KiB
/// (headers, pickle, central directory) and 1,000 random lengths in between.
fn truncation_lengths(len: usize, rng: &mut Rng) -> Vec<usize> {
    if len <= 16 << 10 {
        return (0..len).collect();
    }
    let mut v: Vec<usize> = (0..4096).chain(len - 4096..len).collect();
    v.extend((0..1000).map(|_| 4096 + rng.below(len - 8192)));
    v
}

#[test]
fn truncation_at_every_length() {
    let mut rng = Rng::new(1);
    let mut tally = Tally::default();
    for b in bases() {
        for n in truncation_lengths(b.bytes.len(), &mut rng) {
            let cut = &b.bytes[..n];
            tally.case(
                || format!("{} truncated to {n} bytes", b.name),
                || parse(b.kind, cut),
            );
        }
    }
    assert_eq!(tally.ok, 0, "a truncated file must not load");
    tally.finish("truncation");
}

/// Apply 1-4 random byte changes to a copy of `bytes`, half of them inside `hot` (the parts a
/// parser reads: headers, pickle, central directory). Returns the copy and a description.
fn flip(bytes: &[u8], hot: &[std::ops::Range<usize>], rng: &mut Rng) -> (Vec<u8>, String) {
    let mut m = bytes.to_vec();
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let r = &hot[rng.below(hot.len())];
        let pos = if rng.below(2) == 0 && !r.is_empty() {
            r.start + rng.below(r.len())
        } else {
            rng.below(m.len())
        };
        let val = match rng.below(4) {
            0 => m[pos] ^ (1 << rng.below(8)),
            1 => [0x00, 0xff, 0x7f, 0x80][rng.below(4)],
            _ => rng.next() as u8,
        };
        what.push(format!("[{pos}]={val:#04x}"));
        m[pos] = val;
    }
    (m, what.join(" "))
}

/// Byte ranges a parser reads before it reaches bulk data.
fn hot_ranges(b: &Base) -> Vec<std::ops::Range<usize>> {
    let len = b.bytes.len();
    let tail = len.saturating_sub(2048)..len;
    match b.kind {
        Kind::SafeTensors => {
            let n = u64::from_le_bytes(b.bytes[..8].try_into().unwrap()) as usize;
            vec![0..(8 + n).min(len), tail]
        }
        Kind::Torch => vec![0..len.min(4096), tail],
    }
}

#[test]
fn random_byte_flips() {
    let mut rng = Rng::new(2);
    let mut tally = Tally::default();
    for b in bases() {
        let hot = hot_ranges(&b);
        for i in 0..10_000 {
            let (m, what) = flip(&b.bytes, &hot, &mut rng);
            tally.case(
                || format!("{} case {i}: {what}", b.name),
                || parse(b.kind, &m),
            );
        }
    }
    tally.finish("byte flips");
}

/// Mutate `data.pkl` itself and re-zip with correct CRCs, so that the mutation reaches the pickle
/// VM and the tensor materialisation (strides, offsets, storage bounds) instead of the CRC check.
#[test]
fn pickle_mutations_behind_valid_crcs() {
    let mut rng = Rng::new(3);
    let mut tally = Tally::default();
    for b in bases().into_iter().filter(|b| b.kind == Kind::Torch) {
        let zip = ZipArchive::parse(&b.bytes, Path::new(&b.name)).unwrap();
        let entries: Vec<(String, Vec<u8>)> = zip
            .entries()
            .iter()
            .map(|e| (e.name.clone(), zip.data(e).unwrap().to_vec()))
            .collect();
        let pkl_idx = entries
            .iter()
            .position(|(n, _)| n.ends_with("/data.pkl"))
            .unwrap();
        let pkl = &entries[pkl_idx].1;
        let rezip = |new_pkl: &[u8]| {
            let mut z = ZipWriter::new(Vec::new());
            for (i, (name, data)) in entries.iter().enumerate() {
                let d = if i == pkl_idx {
                    new_pkl
                } else {
                    data.as_slice()
                };
                z.add_stored(name, d).unwrap();
            }
            z.finish().unwrap()
        };
        let whole = 0..pkl.len();
        let cases = if pkl.len() > 2000 { 5000 } else { 8000 };
        for i in 0..cases {
            let (m, what) = match rng.below(4) {
                0 => {
                    let n = rng.below(pkl.len());
                    (pkl[..n].to_vec(), format!("truncated to {n}"))
                }
                1 => {
                    // Duplicate or drop a random span: shifts opcodes against their arguments.
                    let (a, l) = (rng.below(pkl.len()), 1 + rng.below(8));
                    let l = l.min(pkl.len() - a);
                    let mut m = pkl[..a].to_vec();
                    if rng.below(2) == 0 {
                        m.extend_from_slice(&pkl[a..a + l]);
                        m.extend_from_slice(&pkl[a..]);
                    } else {
                        m.extend_from_slice(&pkl[a + l..]);
                    }
                    (m, format!("span {a}+{l} duplicated or dropped"))
                }
                _ => flip(pkl, std::slice::from_ref(&whole), &mut rng),
            };
            let label = || format!("{} data.pkl case {i}: {what}", b.name);
            // The VM alone, then the whole reader on a re-zipped archive.
            tally.case(label, || unpickle(&m).is_ok());
            let z = rezip(&m);
            tally.case(label, || parse(Kind::Torch, &z));
        }
    }
    tally.finish("data.pkl mutations");
}

/// The memory-mapped path: truncated copies on disk, read through read_torch / read_safetensors.
#[test]
fn truncated_files_on_disk() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("io_mutation_disk");
    std::fs::create_dir_all(&dir).unwrap();
    let mut tally = Tally::default();
    for b in bases() {
        let len = b.bytes.len();
        for n in [
            0,
            1,
            7,
            8,
            9,
            63,
            64,
            len / 3,
            len / 2,
            len - 23,
            len - 22,
            len - 1,
        ] {
            let p = dir.join("cut");
            std::fs::write(&p, &b.bytes[..n]).unwrap();
            tally.case(
                || format!("{} truncated to {n} on disk", b.name),
                || match b.kind {
                    Kind::SafeTensors => io::read_safetensors(&p).is_ok(),
                    Kind::Torch => io::read_torch(&p).is_ok(),
                },
            );
        }
    }
    assert_eq!(tally.ok, 0);
    tally.finish("on-disk truncation");
}
