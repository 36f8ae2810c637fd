//! Output files written atomically (temp file in the same directory, then rename), and the
//! progress bar.

use indicatif::{ProgressBar, ProgressStyle};
use retrom3::{Error, Result};
use serde_json::Value;
use std::io::Write;
use std::path::Path;

/// Write JSONL rows to `path` atomically (temp file + rename: no partial output on error).
pub fn write_jsonl(path: &Path, rows: impl Iterator<Item = Value>) -> Result<()> {
    retrom3::io::write_atomic(path, |w| {
        for row in rows {
            serde_json::to_writer(&mut *w, &row)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// Check an output file's path before the work that fills it (an index build, a mining pass):
/// not a directory, in a directory that exists. Other failures (permissions, a full disk) are
/// still reported when the file is written.
pub fn check_output_path(flag: &str, path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::invalid(format!(
            "{flag} {}: a directory, not a file",
            path.display()
        )));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::invalid(format!(
            "{flag} {}: the directory {} does not exist",
            path.display(),
            parent.display()
        )));
    }
    Ok(())
}

/// Check an output directory's path before the work that fills it: a directory, or a path that
/// `create_dir_all` can make (its nearest existing ancestor is a directory).
pub fn check_output_dir(flag: &str, path: &Path) -> Result<()> {
    let mut p = path;
    loop {
        if p.as_os_str().is_empty() || p.is_dir() {
            return Ok(());
        }
        if p.exists() {
            return Err(Error::invalid(if p == path {
                format!("{flag} {}: exists and is not a directory", path.display())
            } else {
                format!(
                    "{flag} {}: {} is not a directory",
                    path.display(),
                    p.display()
                )
            }));
        }
        match p.parent() {
            Some(q) => p = q,
            None => return Ok(()),
        }
    }
}

/// A progress bar on stderr, hidden for short inputs or when stderr is not a terminal.
pub fn progress(total: usize, what: &str) -> ProgressBar {
    if total < 64 {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    pb.set_message(what.to_string());
    pb
}
