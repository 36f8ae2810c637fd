//! A minimal ZIP reader and writer for the PyTorch checkpoint container.
//!
//! `torch.save` writes an uncompressed ("stored", method 0) ZIP archive through miniz
//! (`PyTorchStreamWriter`): every record's data starts on a 64-byte boundary, reached by padding
//! the local header's extra field with a `FB` field full of `Z`s, and the archive always ends with
//! ZIP64 end records. This module reads exactly that subset (plus ZIP64 sizes/offsets in
//! central-directory extra fields) and writes the same layout.
//!
//! Reader rules: the central directory is the source of truth (torch's local headers carry zero
//! sizes and a data descriptor); every offset and length is bounds-checked against the buffer;
//! compressed or encrypted entries are refused with a clear error; each entry's CRC-32 is checked
//! when its data is requested.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EXTRA_ID: u16 = 0x0001;
const LOCAL_HEADER_LEN: usize = 30;
const CENTRAL_HEADER_LEN: usize = 46;
const EOCD_LEN: usize = 22;
/// torch aligns every record's data to this many bytes (`kFieldAlignment` in caffe2's
/// inline_container.cc), so that storages can be memory-mapped and cast in place.
pub const DATA_ALIGNMENT: u64 = 64;

/// One file of the archive, as described by its central-directory record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZipEntry {
    /// Full name inside the archive, e.g. `archive/data/0`.
    pub name: String,
    /// Compression method (0 = stored; anything else is refused when the data is read).
    pub method: u16,
    /// General-purpose flags (bit 0 = encrypted).
    pub flags: u16,
    /// CRC-32 of the uncompressed data.
    pub crc32: u32,
    /// Bytes stored in the archive.
    pub compressed_size: u64,
    /// Bytes after decompression.
    pub size: u64,
    /// Offset of the entry's local header from the start of the archive.
    pub local_header_offset: u64,
}

/// A parsed archive borrowing the archive bytes (usually a memory map).
pub struct ZipArchive<'a> {
    bytes: &'a [u8],
    path: PathBuf,
    entries: Vec<ZipEntry>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

impl<'a> ZipArchive<'a> {
    /// Parse the end records and the central directory of `bytes`; `path` only names the file in
    /// errors.
    pub fn parse(bytes: &'a [u8], path: &Path) -> Result<ZipArchive<'a>> {
        let err = |msg: String| Error::format(path, format!("zip: {msg}"));
        let eocd = find_eocd(bytes).ok_or_else(|| {
            err("no end-of-central-directory record (truncated file, or not a zip archive)".into())
        })?;
        let field16 = |o: usize| u16_at(bytes, eocd + o).unwrap_or(0);
        let mut entry_count = u64::from(field16(10));
        let mut cd_size = u64::from(u32_at(bytes, eocd + 12).unwrap_or(0));
        let mut cd_offset = u64::from(u32_at(bytes, eocd + 16).unwrap_or(0));
        let (disk, cd_disk) = (field16(4), field16(6));

        // A ZIP64 locator, when present, sits right before the classic record.
        let zip64 = eocd
            .checked_sub(20)
            .filter(|&loc| u32_at(bytes, loc) == Some(ZIP64_LOCATOR_SIG));
        if let Some(loc) = zip64 {
            let rec = u64_at(bytes, loc + 8)
                .and_then(|o| usize::try_from(o).ok())
                .ok_or_else(|| err("bad ZIP64 locator".into()))?;
            if u32_at(bytes, rec) != Some(ZIP64_EOCD_SIG) {
                return Err(err(format!("no ZIP64 end record at offset {rec}")));
            }
            let (Some(d), Some(cdd), Some(n), Some(sz), Some(off)) = (
                u32_at(bytes, rec + 16),
                u32_at(bytes, rec + 20),
                u64_at(bytes, rec + 32),
                u64_at(bytes, rec + 40),
                u64_at(bytes, rec + 48),
            ) else {
                return Err(err("truncated ZIP64 end record".into()));
            };
            if d != 0 || cdd != 0 {
                return Err(err("multi-disk archives are not supported".into()));
            }
            (entry_count, cd_size, cd_offset) = (n, sz, off);
        } else if disk != 0 || cd_disk != 0 {
            return Err(err("multi-disk archives are not supported".into()));
        }

        let cd_start = usize::try_from(cd_offset).ok();
        let cd_end = cd_start
            .zip(usize::try_from(cd_size).ok())
            .and_then(|(s, n)| s.checked_add(n));
        let (Some(cd_start), Some(cd_end)) = (cd_start, cd_end) else {
            return Err(err("central directory offset out of range".into()));
        };
        if cd_end > eocd {
            return Err(err(format!(
                "central directory [{cd_start}, {cd_end}) runs past the end records at {eocd}"
            )));
        }
        // Each record takes at least 46 bytes: reject impossible counts before allocating.
        if entry_count > cd_size / CENTRAL_HEADER_LEN as u64 {
            return Err(err(format!(
                "{entry_count} entries cannot fit in a {cd_size}-byte central directory"
            )));
        }
        let mut entries = Vec::with_capacity(entry_count as usize);
        let mut pos = cd_start;
        for i in 0..entry_count {
            let (entry, next) = parse_central(bytes, pos, cd_end)
                .map_err(|m| err(format!("central directory entry {i}: {m}")))?;
            entries.push(entry);
            pos = next;
        }
        Ok(ZipArchive {
            bytes,
            path: path.to_path_buf(),
            entries,
        })
    }

    /// All entries, in central-directory order.
    pub fn entries(&self) -> &[ZipEntry] {
        &self.entries
    }

    /// The entry called `name`, if any (the first one when a name repeats).
    pub fn find(&self, name: &str) -> Option<&ZipEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The stored bytes of `entry`, CRC-checked. Compressed and encrypted entries are refused.
    pub fn data(&self, entry: &ZipEntry) -> Result<&'a [u8]> {
        let err =
            |msg: String| Error::format(&self.path, format!("zip entry {}: {msg}", entry.name));
        if entry.flags & 1 != 0 {
            return Err(err("encrypted entries are not supported".into()));
        }
        if entry.method != 0 {
            return Err(err(format!(
                "compressed entries not supported (method {}); torch.save writes stored entries \
                 only, re-save the file with torch.save",
                entry.method
            )));
        }
        if entry.compressed_size != entry.size {
            return Err(err(format!(
                "stored entry with compressed size {} != size {}",
                entry.compressed_size, entry.size
            )));
        }
        let b = self.bytes;
        let off = usize::try_from(entry.local_header_offset)
            .map_err(|_| err("local header offset out of range".into()))?;
        if u32_at(b, off) != Some(LOCAL_SIG) {
            return Err(err(format!("no local header at offset {off}")));
        }
        let (Some(name_len), Some(extra_len)) = (u16_at(b, off + 26), u16_at(b, off + 28)) else {
            return Err(err("truncated local header".into()));
        };
        let start = off + LOCAL_HEADER_LEN + usize::from(name_len) + usize::from(extra_len);
        let data = usize::try_from(entry.size)
            .ok()
            .and_then(|n| b.get(start..start.checked_add(n)?))
            .ok_or_else(|| {
                err(format!(
                    "data [{start}, +{}) runs past the end of the file ({} bytes)",
                    entry.size,
                    b.len()
                ))
            })?;
        let crc = crc32(data);
        if crc != entry.crc32 {
            return Err(err(format!(
                "CRC-32 mismatch (stored {:08x}, computed {crc:08x}): the file is corrupt",
                entry.crc32
            )));
        }
        Ok(data)
    }
}

/// Position of the end-of-central-directory record: the last signature within the final
/// 22 + 65535 bytes (the record plus the longest possible comment).
fn find_eocd(b: &[u8]) -> Option<usize> {
    let last = b.len().checked_sub(EOCD_LEN)?;
    let first = last.saturating_sub(u16::MAX as usize);
    (first..=last)
        .rev()
        .find(|&p| u32_at(b, p) == Some(EOCD_SIG))
}

/// Parse one central-directory record at `pos` (which must end by `end`); returns the entry and
/// the position of the next record.
fn parse_central(
    b: &[u8],
    pos: usize,
    end: usize,
) -> std::result::Result<(ZipEntry, usize), String> {
    let head_end = pos.checked_add(CENTRAL_HEADER_LEN).filter(|&e| e <= end);
    let Some(head_end) = head_end else {
        return Err("truncated record".into());
    };
    let h = &b[pos..head_end];
    if u32_at(h, 0) != Some(CENTRAL_SIG) {
        return Err(format!("bad signature at offset {pos}"));
    }
    let f16 = |o: usize| u16_at(h, o).unwrap_or(0);
    let f32_ = |o: usize| u32_at(h, o).unwrap_or(0);
    let (name_len, extra_len, comment_len) = (
        usize::from(f16(28)),
        usize::from(f16(30)),
        usize::from(f16(32)),
    );
    let name_end = head_end + name_len;
    let extra_end = name_end + extra_len;
    let next = extra_end + comment_len;
    if next > end {
        return Err("name/extra/comment run past the central directory".into());
    }
    let name = std::str::from_utf8(&b[head_end..name_end])
        .map_err(|_| "entry name is not UTF-8".to_string())?
        .to_string();
    let mut size = u64::from(f32_(24));
    let mut compressed_size = u64::from(f32_(20));
    let mut local_header_offset = u64::from(f32_(42));
    // ZIP64 extended information: the 64-bit values follow, in this order, for each field whose
    // 32-bit slot holds 0xFFFFFFFF.
    let mut extra = &b[name_end..extra_end];
    while extra.len() >= 4 {
        let id = u16_at(extra, 0).unwrap_or(0);
        let len = usize::from(u16_at(extra, 2).unwrap_or(0));
        let Some(body) = extra.get(4..4 + len) else {
            return Err("extra field runs past its area".into());
        };
        if id == ZIP64_EXTRA_ID {
            let mut k = 0;
            for slot in [&mut size, &mut compressed_size, &mut local_header_offset] {
                if *slot == u64::from(u32::MAX) {
                    *slot = u64_at(body, k).ok_or("ZIP64 extra field too short")?;
                    k += 8;
                }
            }
        }
        extra = &extra[4 + len..];
    }
    let entry = ZipEntry {
        name,
        method: f16(10),
        flags: f16(8),
        crc32: f32_(16),
        compressed_size,
        size,
        local_header_offset,
    };
    Ok((entry, next))
}

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) lookup tables for slice-by-8.
const CRC_TABLES: [[u32; 256]; 8] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

/// CRC-32 of `data` as stored in ZIP headers.
pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

/// Continue a CRC-32 over more data (`crc32_update(crc32(a), b) == crc32(a ++ b)`).
/// Slice-by-8: eight table lookups per 8 input bytes instead of one per byte (~4x faster), which
/// matters for multi-GB checkpoints.
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) ^ c;
        let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &byte in chunks.remainder() {
        c = t[0][((c ^ u32::from(byte)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Central-directory information kept by the writer for each entry.
struct WrittenEntry {
    name: String,
    crc32: u32,
    size: u64,
    offset: u64,
}

/// Writes a stored-only ZIP archive in torch's layout: data aligned to [`DATA_ALIGNMENT`] via a
/// `FB` padding extra field, ZIP64 records when sizes or offsets need them, and ZIP64 end records
/// always (as miniz does for torch). Sizes and CRCs go in the local headers (no data descriptors),
/// which every reader, torch's miniz included, accepts.
pub struct ZipWriter<W: Write> {
    out: W,
    pos: u64,
    entries: Vec<WrittenEntry>,
}

impl<W: Write> ZipWriter<W> {
    /// Start an archive written to `out`.
    pub fn new(out: W) -> ZipWriter<W> {
        ZipWriter {
            out,
            pos: 0,
            entries: Vec::new(),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Append a stored entry called `name` holding `data`.
    pub fn add_stored(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let invalid =
            |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
        if name.len() > usize::from(u16::MAX) - 1024 {
            return Err(invalid("zip entry name too long"));
        }
        let size = data.len() as u64;
        let crc = crc32(data);
        let big = size >= u64::from(u32::MAX);
        let mut extra = Vec::new();
        if big {
            // In a local header the ZIP64 field holds both sizes.
            extra.extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
            extra.extend_from_slice(&16u16.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
        }
        // torch's getPadding(): pad with a "FB" field so that the data starts on a 64-byte
        // boundary; the 4-byte field header is always present, even for zero padding.
        let start = self.pos + (LOCAL_HEADER_LEN + name.len() + extra.len() + 4) as u64;
        let pad = ((DATA_ALIGNMENT - start % DATA_ALIGNMENT) % DATA_ALIGNMENT) as u16;
        extra.extend_from_slice(b"FB");
        extra.extend_from_slice(&pad.to_le_bytes());
        extra.resize(extra.len() + usize::from(pad), b'Z');

        let offset = self.pos;
        let size32 = if big { u32::MAX } else { size as u32 };
        let mut h = Vec::with_capacity(LOCAL_HEADER_LEN + name.len() + extra.len());
        h.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        h.extend_from_slice(&(if big { 45u16 } else { 20u16 }).to_le_bytes()); // version needed
        h.extend_from_slice(&0u16.to_le_bytes()); // flags
        h.extend_from_slice(&0u16.to_le_bytes()); // method: stored
        h.extend_from_slice(&0u32.to_le_bytes()); // time, date: zero, as torch (reproducible)
        h.extend_from_slice(&crc.to_le_bytes());
        h.extend_from_slice(&size32.to_le_bytes());
        h.extend_from_slice(&size32.to_le_bytes());
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&extra);
        self.put(&h)?;
        self.put(data)?;
        self.entries.push(WrittenEntry {
            name: name.to_string(),
            crc32: crc,
            size,
            offset,
        });
        Ok(())
    }

    /// Write the central directory and the end records; returns the underlying writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        let cd_offset = self.pos;
        let entries = std::mem::take(&mut self.entries);
        for e in &entries {
            let mut z64 = Vec::new();
            let size32 = if e.size >= u64::from(u32::MAX) {
                z64.extend_from_slice(&e.size.to_le_bytes());
                z64.extend_from_slice(&e.size.to_le_bytes());
                u32::MAX
            } else {
                e.size as u32
            };
            let off32 = if e.offset >= u64::from(u32::MAX) {
                z64.extend_from_slice(&e.offset.to_le_bytes());
                u32::MAX
            } else {
                e.offset as u32
            };
            let mut extra = Vec::new();
            if !z64.is_empty() {
                extra.extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
                extra.extend_from_slice(&(z64.len() as u16).to_le_bytes());
                extra.extend_from_slice(&z64);
            }
            let version: u16 = if z64.is_empty() { 20 } else { 45 };
            let mut h = Vec::with_capacity(CENTRAL_HEADER_LEN + e.name.len() + extra.len());
            h.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            h.extend_from_slice(&version.to_le_bytes()); // made by
            h.extend_from_slice(&version.to_le_bytes()); // needed
            h.extend_from_slice(&[0u8; 8]); // flags, method, time, date
            h.extend_from_slice(&e.crc32.to_le_bytes());
            h.extend_from_slice(&size32.to_le_bytes());
            h.extend_from_slice(&size32.to_le_bytes());
            h.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            h.extend_from_slice(&[0u8; 10]); // comment len, disk, internal + external attributes
            h.extend_from_slice(&off32.to_le_bytes());
            h.extend_from_slice(e.name.as_bytes());
            h.extend_from_slice(&extra);
            self.put(&h)?;
        }
        let cd_size = self.pos - cd_offset;
        let n = entries.len() as u64;

        let z64_offset = self.pos;
        let mut r = Vec::with_capacity(56 + 20 + EOCD_LEN);
        r.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
        r.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of this record
        r.extend_from_slice(&45u16.to_le_bytes());
        r.extend_from_slice(&45u16.to_le_bytes());
        r.extend_from_slice(&[0u8; 8]); // this disk, central-directory disk
        r.extend_from_slice(&n.to_le_bytes());
        r.extend_from_slice(&n.to_le_bytes());
        r.extend_from_slice(&cd_size.to_le_bytes());
        r.extend_from_slice(&cd_offset.to_le_bytes());
        r.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        r.extend_from_slice(&z64_offset.to_le_bytes());
        r.extend_from_slice(&1u32.to_le_bytes()); // total disks
        let n16 = u16::try_from(n).unwrap_or(u16::MAX);
        let clamp32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        r.extend_from_slice(&EOCD_SIG.to_le_bytes());
        r.extend_from_slice(&[0u8; 4]); // disks
        r.extend_from_slice(&n16.to_le_bytes());
        r.extend_from_slice(&n16.to_le_bytes());
        r.extend_from_slice(&clamp32(cd_size).to_le_bytes());
        r.extend_from_slice(&clamp32(cd_offset).to_le_bytes());
        r.extend_from_slice(&0u16.to_le_bytes()); // comment length
        self.put(&r)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(
            crc32_update(crc32(&data[..333]), &data[333..]),
            crc32(&data)
        );
        // Byte-at-a-time reference.
        let mut c = !0u32;
        for &b in &data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        assert_eq!(crc32(&data), !c);
    }

    #[test]
    fn write_then_read_is_aligned_and_exact() {
        let mut w = ZipWriter::new(Vec::new());
        w.add_stored("a/data.pkl", b"hello").unwrap();
        w.add_stored("a/data/0", &[1u8; 100]).unwrap();
        w.add_stored("a/empty", b"").unwrap();
        let bytes = w.finish().unwrap();
        let z = ZipArchive::parse(&bytes, Path::new("mem")).unwrap();
        assert_eq!(z.entries().len(), 3);
        for e in z.entries() {
            let d = z.data(e).unwrap();
            let start = d.as_ptr() as usize - bytes.as_ptr() as usize;
            assert_eq!(start % DATA_ALIGNMENT as usize, 0, "{} not aligned", e.name);
        }
        assert_eq!(z.data(z.find("a/data.pkl").unwrap()).unwrap(), b"hello");
        assert_eq!(z.data(z.find("a/data/0").unwrap()).unwrap(), &[1u8; 100]);
        assert!(z.data(z.find("a/empty").unwrap()).unwrap().is_empty());
    }

    #[test]
    fn deflated_entry_is_refused() {
        let mut w = ZipWriter::new(Vec::new());
        w.add_stored("x", b"abc").unwrap();
        let mut bytes = w.finish().unwrap();
        // Patch the method of the central record to 8 (deflate).
        let cd = (0..bytes.len())
            .find(|&p| u32_at(&bytes, p) == Some(CENTRAL_SIG))
            .unwrap();
        bytes[cd + 10] = 8;
        let z = ZipArchive::parse(&bytes, Path::new("mem")).unwrap();
        let e = z.data(&z.entries()[0]).unwrap_err().to_string();
        assert!(e.contains("compressed entries not supported"), "{e}");
    }

    #[test]
    fn garbage_is_an_error() {
        for b in [&b""[..], b"PK", b"not a zip at all, just some text"] {
            assert!(ZipArchive::parse(b, Path::new("mem")).is_err());
        }
    }
}
