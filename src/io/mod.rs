//! Checkpoint I/O: safetensors, PyTorch zip checkpoints (`pytorch_model.bin`, `*.pt`) and model
//! directories in the Hugging Face / FlagEmbedding layout, both ways.
//!
//! Reading never executes anything from a file: the PyTorch reader is a hand-written ZIP reader plus
//! a pickle VM that understands only the opcodes and the few globals a state dict uses
//! (see `docs/formats.md`). Every offset and length read from a file is bounds-checked, so a corrupt
//! or malicious file gives an [`Error::Format`], never a panic.
//!
//! Writing is atomic: a temporary file in the destination directory, `fsync`, then `rename`, so a
//! crash never leaves a half-written checkpoint under the final name.

pub mod model_dir;
pub mod pickle;
pub mod safetensors;
pub mod torch;
pub mod zip;

pub use model_dir::{
    copy_tokenizer_files, read_backbone, read_heads, write_backbone, write_heads, M3Heads,
};
pub use safetensors::{parse_safetensors, read_safetensors, write_safetensors};
pub use torch::{parse_torch, read_torch, write_torch};

use crate::error::{Error, Result};
use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::tensor::Storage;

/// A read-only view of a whole file: memory-mapped, or empty for a zero-length file (which
/// cannot be mapped on every platform).
pub(crate) enum FileBytes {
    Mapped(memmap2::Mmap),
    Empty,
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Empty => &[],
        }
    }
}

/// Memory-map `path` read-only.
pub(crate) fn map_file(path: &Path) -> Result<FileBytes> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok(FileBytes::Empty);
    }
    // SAFETY: the map is read-only and lives only for the duration of one read call; every tensor
    // is copied out before it is dropped. The usual mmap caveat applies: if another process
    // truncates or rewrites the file while we read it, the process may get SIGBUS or see mixed
    // data. Our own writers never modify a file in place (they rename a new file over it).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(FileBytes::Mapped(map))
}

/// The little-endian bytes of a storage, borrowed without a copy on little-endian targets.
pub(crate) fn storage_le_bytes(storage: &Storage) -> Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        Cow::Borrowed(match storage {
            Storage::F32(v) => bytemuck::cast_slice(v),
            Storage::F16(v) => bytemuck::cast_slice(v),
            Storage::BF16(v) => bytemuck::cast_slice(v),
            Storage::I64(v) => bytemuck::cast_slice(v),
        })
    }
    #[cfg(not(target_endian = "little"))]
    {
        Cow::Owned(storage.to_le_bytes())
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Write `path` atomically: `write` fills a temporary file in the same directory, which is then
/// flushed, `fsync`ed and renamed over `path`; the directory is `fsync`ed too (best effort).
/// On any error the temporary file is removed and `path` is left untouched.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> std::io::Result<()> {
        let file = File::options().write(true).create_new(true).open(&tmp)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        write(&mut out)?;
        out.flush()?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // Make the rename itself durable. Opening a directory is not supported everywhere: best effort.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
