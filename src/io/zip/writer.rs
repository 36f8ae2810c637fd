//! Writing stored entries in torch's layout.

use super::{
    crc32, CENTRAL_HEADER_LEN, CENTRAL_SIG, DATA_ALIGNMENT, EOCD_LEN, EOCD_SIG, LOCAL_HEADER_LEN,
    LOCAL_SIG, ZIP64_EOCD_SIG, ZIP64_EXTRA_ID, ZIP64_LOCATOR_SIG,
};
use std::io::Write;

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
