//! The retrom3 index container: one versioned binary format for every index file.
//!
//! Layout (all integers little-endian; see docs/retrieval.md):
//!
//! ```text
//! offset 0   magic        8 bytes  b"R3INDEX\0"
//!        8   version      u32      (FORMAT_VERSION)
//!       12   n_sections   u32      (<= MAX_SECTIONS)
//!       16   fingerprint  u64      model fingerprint (see `ModelFingerprint`)
//!       24   file_len     u64      total file size in bytes (detects truncation first)
//!       32   table_hash   u64      xxh64 of bytes [0, 32) ++ [40, 64) ++ the section table
//!       40   reserved     24 bytes (zero)
//!       64   section table: n_sections entries of 64 bytes:
//!              name [u8; 32] (ASCII, NUL padded) | offset u64 | len u64 | hash u64 (xxh64 of
//!              the section bytes) | elem_size u32 | reserved u32
//!            section data, each section starting at a multiple of 64 bytes.
//! ```
//!
//! [`Container::open`] memory-maps the file and validates all of it (header, table, bounds,
//! alignment, every section's checksum) before anything reads a section, so a truncated or corrupt
//! file is an [`Error::Format`] naming the file and the section, never a panic. Typed sections are
//! borrowed from the map without a copy ([`Buf`]).

use crate::error::{Error, Result};
use crate::io::{map_file, FileBytes};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The 8 bytes every index file starts with.
pub const MAGIC: [u8; 8] = *b"R3INDEX\0";
/// The format version this build writes and reads.
/// Version 2: the model fingerprint covers every byte of the weights (version 1 sampled them),
/// so a version-1 index is refused as such rather than as another model's.
pub const FORMAT_VERSION: u32 = 2;
/// A sanity cap on the section count (a corrupt count must not make us read a huge table).
pub const MAX_SECTIONS: usize = 64;
const HEADER_LEN: usize = 64;
const ENTRY_LEN: usize = 64;
const NAME_LEN: usize = 32;
const ALIGN: usize = 64;

// ---------------------------------------------------------------------------------------------
// xxh64 (Yann Collet's XXH64, seed 0): fast enough to checksum every section on each load
// (several GB/s, where byte-at-a-time FNV-1a manages about one).

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn rd64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}
fn rd32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}
fn xx_round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}
fn xx_merge(acc: u64, val: u64) -> u64 {
    (acc ^ xx_round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 of `data` with `seed`.
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let len = data.len();
    let mut rest = data;
    let mut h = if len >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        while rest.len() >= 32 {
            for (i, lane) in v.iter_mut().enumerate() {
                *lane = xx_round(*lane, rd64(&rest[8 * i..]));
            }
            rest = &rest[32..];
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            h = xx_merge(h, lane);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(len as u64);
    while rest.len() >= 8 {
        h ^= xx_round(0, rd64(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        h ^= (rd32(rest) as u64).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= (b as u64).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

// ---------------------------------------------------------------------------------------------

/// A typed array: owned (just built) or borrowed from a memory-mapped index file.
#[derive(Clone)]
pub struct Buf<T: bytemuck::Pod>(BufRepr<T>);

#[derive(Clone)]
enum BufRepr<T: bytemuck::Pod> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<FileBytes>,
        offset: usize,
        len: usize,
    },
}

impl<T: bytemuck::Pod> std::ops::Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.0 {
            BufRepr::Owned(v) => v,
            // Offset, length and alignment were checked when the Buf was made (`Container::array`).
            BufRepr::Mapped { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + *len * std::mem::size_of::<T>()])
            }
        }
    }
}

impl<T: bytemuck::Pod> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Self {
        Buf(BufRepr::Owned(v))
    }
}

impl<T: bytemuck::Pod + std::fmt::Debug> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf[{}]", self.len())
    }
}

/// One section to write: a name and its bytes, with the element size of the typed array it holds
/// (1 for raw bytes / JSON).
pub struct SectionData<'a> {
    pub name: &'static str,
    pub bytes: std::borrow::Cow<'a, [u8]>,
    pub elem_size: u32,
}

impl<'a> SectionData<'a> {
    /// A typed array section (little-endian on every supported target).
    pub fn array<T: bytemuck::Pod>(name: &'static str, data: &'a [T]) -> Self {
        SectionData {
            name,
            bytes: std::borrow::Cow::Borrowed(bytemuck::cast_slice(data)),
            elem_size: std::mem::size_of::<T>() as u32,
        }
    }

    /// A raw byte section (JSON metadata, concatenated strings).
    pub fn bytes(name: &'static str, data: Vec<u8>) -> Self {
        SectionData {
            name,
            bytes: std::borrow::Cow::Owned(data),
            elem_size: 1,
        }
    }
}

fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// Write an index file atomically (temp file + rename).
pub fn write_container(path: &Path, fingerprint: u64, sections: &[SectionData<'_>]) -> Result<()> {
    if sections.len() > MAX_SECTIONS {
        return Err(Error::invalid(format!(
            "{} sections (max {MAX_SECTIONS})",
            sections.len()
        )));
    }
    let table_end = HEADER_LEN + ENTRY_LEN * sections.len();
    let mut offsets = Vec::with_capacity(sections.len());
    let mut pos = align_up(table_end);
    for s in sections {
        if s.name.len() > NAME_LEN || !s.name.is_ascii() {
            return Err(Error::invalid(format!("section name {:?}", s.name)));
        }
        offsets.push(pos);
        pos = align_up(pos + s.bytes.len());
    }
    let file_len = pos;
    let mut head = vec![0u8; table_end];
    head[..8].copy_from_slice(&MAGIC);
    head[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    head[12..16].copy_from_slice(&(sections.len() as u32).to_le_bytes());
    head[16..24].copy_from_slice(&fingerprint.to_le_bytes());
    head[24..32].copy_from_slice(&(file_len as u64).to_le_bytes());
    for (i, (s, &off)) in sections.iter().zip(&offsets).enumerate() {
        let e = &mut head[HEADER_LEN + i * ENTRY_LEN..HEADER_LEN + (i + 1) * ENTRY_LEN];
        e[..s.name.len()].copy_from_slice(s.name.as_bytes());
        e[32..40].copy_from_slice(&(off as u64).to_le_bytes());
        e[40..48].copy_from_slice(&(s.bytes.len() as u64).to_le_bytes());
        e[48..56].copy_from_slice(&xxh64(&s.bytes, 0).to_le_bytes());
        e[56..60].copy_from_slice(&s.elem_size.to_le_bytes());
    }
    let th = table_hash(&head);
    head[32..40].copy_from_slice(&th.to_le_bytes());
    crate::io::write_atomic(path, |w| {
        use std::io::Write;
        w.write_all(&head)?;
        let mut written = head.len();
        for (s, &off) in sections.iter().zip(&offsets) {
            w.write_all(&vec![0u8; off - written])?;
            w.write_all(&s.bytes)?;
            written = off + s.bytes.len();
        }
        w.write_all(&vec![0u8; file_len - written])
    })
}

/// Hash of the header (without the hash field) and the table.
fn table_hash(head: &[u8]) -> u64 {
    let mut buf = Vec::with_capacity(head.len());
    buf.extend_from_slice(&head[..32]);
    buf.extend_from_slice(&head[40..]);
    xxh64(&buf, 0)
}

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    offset: usize,
    len: usize,
    elem_size: usize,
}

/// A validated, memory-mapped index file.
pub struct Container {
    path: PathBuf,
    map: Arc<FileBytes>,
    entries: Vec<Entry>,
    /// The model fingerprint stored in the header.
    pub fingerprint: u64,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("path", &self.path)
            .field("sections", &self.entries)
            .finish()
    }
}

impl Container {
    /// Map `path` and validate the header, the table and every section checksum.
    pub fn open(path: &Path) -> Result<Container> {
        let map = map_file(path)?;
        let bad = |msg: String| Error::format(path, msg);
        let b: &[u8] = &map;
        if b.len() < HEADER_LEN {
            return Err(bad(format!(
                "header: truncated ({} bytes, a retrom3 index header is {HEADER_LEN})",
                b.len()
            )));
        }
        if b[..8] != MAGIC {
            return Err(bad("header: not a retrom3 index file (bad magic)".into()));
        }
        let version = rd32(&b[8..]);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "header: index format version {version}, this build reads version {FORMAT_VERSION} (rebuild the index)"
            )));
        }
        let n = rd32(&b[12..]) as usize;
        if n > MAX_SECTIONS {
            return Err(bad(format!("header: {n} sections (max {MAX_SECTIONS})")));
        }
        let file_len = rd64(&b[24..]);
        if file_len != b.len() as u64 {
            return Err(bad(format!(
                "header: file is {} bytes but the header says {file_len} (truncated or extended)",
                b.len()
            )));
        }
        let table_end = HEADER_LEN + n * ENTRY_LEN;
        if table_end > b.len() {
            return Err(bad("section table: truncated".into()));
        }
        if table_hash(&b[..table_end]) != rd64(&b[32..]) {
            return Err(bad(
                "header/section table: checksum mismatch (corrupt file)".into(),
            ));
        }
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            let e = &b[HEADER_LEN + i * ENTRY_LEN..HEADER_LEN + (i + 1) * ENTRY_LEN];
            let raw = &e[..NAME_LEN];
            let end = raw.iter().position(|&c| c == 0).unwrap_or(NAME_LEN);
            let name = std::str::from_utf8(&raw[..end])
                .ok()
                .filter(|s| s.is_ascii() && !s.is_empty())
                .ok_or_else(|| bad(format!("section table entry {i}: bad name")))?
                .to_string();
            let offset = rd64(&e[32..]);
            let len = rd64(&e[40..]);
            let hash = rd64(&e[48..]);
            let elem_size = rd32(&e[56..]) as usize;
            let end = offset.checked_add(len).filter(|&x| x <= file_len);
            if end.is_none()
                || (offset as usize) < table_end
                || !(offset as usize).is_multiple_of(ALIGN)
                || !matches!(elem_size, 1 | 2 | 4 | 8)
                || !(len as usize).is_multiple_of(elem_size)
            {
                return Err(bad(format!(
                    "section {name}: bad extent (offset {offset}, {len} bytes, element size {elem_size})"
                )));
            }
            let (offset, len) = (offset as usize, len as usize);
            if entries.iter().any(|x: &Entry| x.name == name) {
                return Err(bad(format!("section {name}: appears twice")));
            }
            if xxh64(&b[offset..offset + len], 0) != hash {
                return Err(bad(format!(
                    "section {name}: checksum mismatch (corrupt file)"
                )));
            }
            entries.push(Entry {
                name,
                offset,
                len,
                elem_size,
            });
        }
        let fingerprint = rd64(&b[16..]);
        Ok(Container {
            path: path.to_path_buf(),
            map: Arc::new(map),
            entries,
            fingerprint,
        })
    }

    /// The file this container was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::format(&self.path, format!("section {name}: missing")))
    }

    /// The raw bytes of a section.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.map[e.offset..e.offset + e.len])
    }

    /// A typed section, borrowed from the map (element size and alignment checked).
    pub fn array<T: bytemuck::Pod>(&self, name: &str) -> Result<Buf<T>> {
        let e = self.entry(name)?;
        let size = std::mem::size_of::<T>();
        if e.elem_size != size {
            return Err(Error::format(
                &self.path,
                format!(
                    "section {name}: element size {}, expected {size}",
                    e.elem_size
                ),
            ));
        }
        // The map is page-aligned and sections start at multiples of 64 bytes.
        if !(self.map.as_ptr() as usize + e.offset).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(Error::format(
                &self.path,
                format!("section {name}: misaligned"),
            ));
        }
        Ok(Buf(BufRepr::Mapped {
            map: self.map.clone(),
            offset: e.offset,
            len: e.len / size,
        }))
    }

    /// A JSON section parsed into `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T> {
        serde_json::from_slice(self.bytes(name)?)
            .map_err(|e| Error::format(&self.path, format!("section {name}: {e}")))
    }

    /// A format error naming this file and `section`.
    pub fn err(&self, section: &str, msg: impl std::fmt::Display) -> Error {
        Error::format(&self.path, format!("section {section}: {msg}"))
    }
}
