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

mod crc32;
mod reader;
mod writer;

pub use crc32::{crc32, crc32_update};
pub use reader::{ZipArchive, ZipEntry};
pub use writer::ZipWriter;

pub(crate) const LOCAL_SIG: u32 = 0x0403_4b50;
pub(crate) const CENTRAL_SIG: u32 = 0x0201_4b50;
pub(crate) const EOCD_SIG: u32 = 0x0605_4b50;
pub(crate) const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
pub(crate) const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
pub(crate) const ZIP64_EXTRA_ID: u16 = 0x0001;
pub(crate) const LOCAL_HEADER_LEN: usize = 30;
pub(crate) const CENTRAL_HEADER_LEN: usize = 46;
pub(crate) const EOCD_LEN: usize = 22;
/// torch aligns every record's data to this many bytes (`kFieldAlignment` in caffe2's
/// inline_container.cc), so that storages can be memory-mapped and cast in place.
pub const DATA_ALIGNMENT: u64 = 64;

pub(crate) fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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

    /// One stored entry whose sizes and offset live only in ZIP64 extra fields, and end records
    /// whose classic fields are all 0xFFFF / 0xFFFFFFFF, as a >4 GiB archive would have them.
    fn zip64_archive(data: &[u8]) -> Vec<u8> {
        let name = b"z/data/0";
        let n = data.len() as u64;
        let mut b = Vec::new();
        b.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        b.extend_from_slice(&[45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&crc32(data).to_le_bytes());
        b.extend_from_slice(&[0xff; 8]);
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(&20u16.to_le_bytes());
        b.extend_from_slice(name);
        b.extend_from_slice(&[1, 0, 16, 0]);
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(data);
        let cd = b.len() as u64;
        b.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
        b.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&crc32(data).to_le_bytes());
        b.extend_from_slice(&[0xff; 8]);
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(&28u16.to_le_bytes());
        b.extend_from_slice(&[0; 10]);
        b.extend_from_slice(&[0xff; 4]);
        b.extend_from_slice(name);
        b.extend_from_slice(&[1, 0, 24, 0]);
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        let cd_size = b.len() as u64 - cd;
        let z64 = b.len() as u64;
        b.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
        b.extend_from_slice(&44u64.to_le_bytes());
        b.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&cd_size.to_le_bytes());
        b.extend_from_slice(&cd.to_le_bytes());
        b.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&z64.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&EOCD_SIG.to_le_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        b.extend_from_slice(&[0xff; 8]);
        b.extend_from_slice(&[0, 0]);
        b
    }

    #[test]
    fn zip64_extra_fields_and_end_records() {
        let bytes = zip64_archive(b"0123456789");
        let z = ZipArchive::parse(&bytes, Path::new("mem")).unwrap();
        let e = &z.entries()[0];
        assert_eq!(
            (e.name.as_str(), e.size, e.local_header_offset),
            ("z/data/0", 10, 0)
        );
        assert_eq!(z.data(e).unwrap(), b"0123456789");
        // Every truncation fails cleanly.
        for n in 0..bytes.len() {
            let _ = ZipArchive::parse(&bytes[..n], Path::new("mem"))
                .and_then(|z| z.entries().iter().try_for_each(|e| z.data(e).map(|_| ())));
        }
    }

    #[test]
    fn garbage_is_an_error() {
        for b in [&b""[..], b"PK", b"not a zip at all, just some text"] {
            assert!(ZipArchive::parse(b, Path::new("mem")).is_err());
        }
    }
}
