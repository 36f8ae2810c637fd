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

/// `/dev/stdout`, `/dev/stderr`, `/dev/fd/N`, `/proc/self/fd/N`: a duplicate of that descriptor
/// of this process (an error when it is not open); `None` for any other path.
fn own_descriptor(path: &Path) -> Option<std::io::Result<File>> {
    let s = path.to_str()?;
    let n: i32 = match s {
        "/dev/stdout" => 1,
        "/dev/stderr" => 2,
        _ => s
            .strip_prefix("/dev/fd/")
            .or_else(|| s.strip_prefix("/proc/self/fd/"))?
            .parse()
            .ok()?,
    };
    #[cfg(unix)]
    {
        use std::os::fd::{AsFd, BorrowedFd};
        // Open? (`borrow_raw` needs an open descriptor.)
        if n < 0 || !Path::new(&format!("/proc/self/fd/{n}")).exists() {
            return Some(Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("descriptor {n} is not open"),
            )));
        }
        // SAFETY: descriptor n is open (checked just above); the borrow ends with this
        // expression, which duplicates it.
        let fd = unsafe { BorrowedFd::borrow_raw(n) };
        Some(fd.as_fd().try_clone_to_owned().map(File::from))
    }
    #[cfg(not(unix))]
    {
        let _ = n;
        None
    }
}

/// Write `path` atomically: `write` fills a temporary file in the same directory, which is then
/// flushed, `fsync`ed and renamed over `path`; the directory is `fsync`ed too (best effort).
/// On any error the temporary file is removed and `path` is left untouched.
///
/// A symbolic link is followed (the file it names is replaced, the link stays; that file may lie
/// in another directory). An existing path that is not a regular file (a FIFO, a device), and a
/// process's own descriptors (`/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`, whatever they lead
/// to), are written in place: a rename would replace the device or pipe by a plain file, or the
/// file behind a redirected stdout by another (the shell keeps writing to the old one).
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let descriptor = ["/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/self/fd/"]
        .iter()
        .any(|p| path.to_string_lossy().starts_with(p));
    // The kernel follows the links of the original path (those under /proc included).
    let special = std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir());
    let path = &if descriptor || special {
        path.to_path_buf()
    } else {
        resolve_links(path)?
    };
    if descriptor || special {
        // Appending: a redirected stdout reopened through /proc starts at offset 0, and must
        // neither overwrite what was printed before nor the file a `>>` appends to.
        let result = (|| -> std::io::Result<()> {
            // One of our own descriptors is written through itself (a copy of it shares the
            // file offset): a reopened file would keep its own offset, and the next write to the
            // redirected file (the shell's, a later command's) would overwrite ours.
            let file = match own_descriptor(path) {
                Some(fd) => fd?,
                None => File::options().append(true).open(path)?,
            };
            let mut out = BufWriter::with_capacity(1 << 20, file);
            write(&mut out)?;
            out.flush()
        })();
        return result.map_err(|e| Error::io(path, e));
    }
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
    // The temporary file lives in the directory: when it cannot be made there, say so (the
    // output file itself may well be writable).
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| {
            Error::io(
                &dir,
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create a temporary file for {} in this directory (outputs are \
                         written beside their final name, then renamed): {e}",
                        name.to_string_lossy()
                    ),
                ),
            )
        })?;
    let result = (|| -> std::io::Result<()> {
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
    remove_dead_temps(&dir, &name.to_string_lossy());
    Ok(())
}

/// A temporary file untouched this long may be a killed run's.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the temporary files of `name` in `dir` that a killed run left (`.NAME.tmp-PID-N`
/// whose process no longer exists, untouched for [`STALE_TEMP`]: it could not clean up).
/// Linux only (`/proc`); best effort.
fn remove_dead_temps(dir: &Path, name: &str) {
    if !cfg!(target_os = "linux") || !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let Some((pid, n)) = rest.split_once('-') else {
            continue;
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(pid) || !digits(n) || pid == std::process::id().to_string() {
            continue;
        }
        // Also untouched for an hour: a writer in another pid namespace (a container sharing
        // the directory) is not in our /proc, but its file is being written.
        let stale = entry.metadata().is_ok_and(|m| {
            m.is_file()
                && m.modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= STALE_TEMP)
        });
        if stale && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A digest of the file at `path`: xxh64 over the xxh64 of each MiB, in order (constant memory,
/// whatever the size). What a model fingerprint and a checkpoint's file list record.
pub fn file_digest(path: &Path) -> Result<u64> {
    use crate::retrieval::index_format::xxh64;
    use std::io::Read;
    const CHUNK: usize = 1 << 20;
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut chunk = vec![0u8; CHUNK];
    let mut hashes = Vec::new();
    loop {
        let mut n = 0;
        while n < CHUNK {
            match f.read(&mut chunk[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        if n == 0 {
            break;
        }
        hashes.extend_from_slice(&xxh64(&chunk[..n], 0).to_le_bytes());
        if n < CHUNK {
            break;
        }
    }
    Ok(xxh64(&hashes, 0))
}

/// `path` with its symbolic links followed (a link to a missing file gives that file's path);
/// other paths as they are. At most 40 links, as Linux's own limit.
fn resolve_links(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&p).map_err(|e| Error::io(&p, e))?;
                p = match p.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(Error::invalid(format!(
        "{}: too many levels of symbolic links",
        path.display()
    )))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("retrom3-io-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The temporary file a killed run left beside the output (no such process, untouched for
    /// an hour) goes at the next write; a live process's (pid 1, ours), a fresh one and other
    /// names stay.
    #[test]
    #[cfg(target_os = "linux")]
    fn write_atomic_removes_dead_runs_temporaries() {
        let d = dir("temps");
        let me = std::process::id();
        // Linux pids stay below 2^22.
        let dead = format!(".index.r3i.tmp-{}-0", 1u64 << 40);
        let kept = [
            format!(".index.r3i.tmp-{me}-77"),
            ".index.r3i.tmp-1-0".to_string(),
            ".other.r3i.tmp-1099511627776-0".to_string(),
            ".index.r3i.tmp-x-0".to_string(),
            // No such process here, but written a minute ago (another pid namespace?).
            format!(".index.r3i.tmp-{}-1", 1u64 << 40),
        ];
        let now = std::time::SystemTime::now();
        for f in kept.iter().chain([&dead]) {
            std::fs::write(d.join(f), "partial").unwrap();
            let age = if f.ends_with("-1") { 60 } else { 7200 };
            std::fs::File::options()
                .write(true)
                .open(d.join(f))
                .unwrap()
                .set_modified(now - std::time::Duration::from_secs(age))
                .unwrap();
        }
        write_atomic(&d.join("index.r3i"), |w| w.write_all(b"I")).unwrap();
        assert!(!d.join(&dead).exists());
        for f in &kept {
            assert!(d.join(f).exists(), "{f}");
        }
        assert_eq!(std::fs::read(d.join("index.r3i")).unwrap(), b"I");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn write_atomic_follows_links_and_writes_pipes_in_place() {
        let d = dir("links");
        // A link (relative, through a second link) to an existing file: the file is replaced,
        // the links stay links.
        std::fs::create_dir_all(d.join("real")).unwrap();
        std::fs::write(d.join("real/t.jsonl"), "OLD").unwrap();
        std::os::unix::fs::symlink("real/t.jsonl", d.join("a")).unwrap();
        std::os::unix::fs::symlink("a", d.join("b")).unwrap();
        write_atomic(&d.join("b"), |w| w.write_all(b"NEW")).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("real/t.jsonl")).unwrap(),
            "NEW"
        );
        for l in ["a", "b"] {
            let m = std::fs::symlink_metadata(d.join(l)).unwrap();
            assert!(m.file_type().is_symlink(), "{l}");
        }
        // A dangling link: its target is created.
        std::os::unix::fs::symlink("real/new.jsonl", d.join("c")).unwrap();
        write_atomic(&d.join("c"), |w| w.write_all(b"C")).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("real/new.jsonl")).unwrap(),
            "C"
        );
        // A link cycle is an error, not a hang.
        std::os::unix::fs::symlink("y", d.join("x")).unwrap();
        std::os::unix::fs::symlink("x", d.join("y")).unwrap();
        let e = write_atomic(&d.join("x"), |w| w.write_all(b"X")).unwrap_err();
        assert!(e.to_string().contains("symbolic links"), "{e}");
        // A FIFO is written in place: the reader gets the bytes, the FIFO stays a FIFO.
        let fifo = d.join("fifo");
        let st = std::process::Command::new("mkfifo").arg(&fifo).status();
        if st.is_ok_and(|s| s.success()) {
            let f2 = fifo.clone();
            let reader = std::thread::spawn(move || std::fs::read_to_string(f2).unwrap());
            write_atomic(&fifo, |w| w.write_all(b"through the pipe")).unwrap();
            // Checked before joining: a FIFO replaced by a file would leave the reader blocked.
            use std::os::unix::fs::FileTypeExt;
            assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
            assert_eq!(reader.join().unwrap(), "through the pipe");
        }
        // A descriptor path is written in place, appending (a stdout redirected to a file by
        // `>>` keeps what it holds).
        let log = d.join("log");
        std::fs::write(&log, "kept\n").unwrap();
        let f = std::fs::File::options().append(true).open(&log).unwrap();
        use std::os::fd::AsRawFd;
        let p = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        if p.exists() {
            write_atomic(&p, |w| w.write_all(b"new\n")).unwrap();
            assert_eq!(std::fs::read_to_string(&log).unwrap(), "kept\nnew\n");
        }
        drop(f);
        // Written through the descriptor itself, so that its offset moves: what the process
        // (a shell) writes to it next comes after ours, not over it.
        let shared = d.join("shared");
        let mut g = std::fs::File::create(&shared).unwrap();
        g.write_all(b"first\n").unwrap();
        let p = PathBuf::from(format!("/dev/fd/{}", g.as_raw_fd()));
        if p.exists() {
            write_atomic(&p, |w| w.write_all(b"ours\n")).unwrap();
            g.write_all(b"after\n").unwrap();
            assert_eq!(
                std::fs::read_to_string(&shared).unwrap(),
                "first\nours\nafter\n"
            );
            let e = write_atomic(Path::new("/dev/fd/987654"), |w| w.write_all(b"x"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("descriptor 987654 is not open"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
