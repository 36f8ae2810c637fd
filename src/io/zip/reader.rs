//! Reading: end records (classic and ZIP64), central directory, stored entries, CRC check.

use super::{
    crc32, u16_at, u32_at, u64_at, CENTRAL_HEADER_LEN, CENTRAL_SIG, EOCD_LEN, EOCD_SIG,
    LOCAL_HEADER_LEN, LOCAL_SIG, ZIP64_EOCD_SIG, ZIP64_EXTRA_ID, ZIP64_LOCATOR_SIG,
};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

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
