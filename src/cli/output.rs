//! Output files written atomically (temp file in the same directory, then rename), and the
//! progress bar.

use indicatif::{ProgressBar, ProgressStyle};
use retrom3::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file that appears at its path only when `commit` succeeds.
pub struct AtomicWriter {
    tmp: PathBuf,
    path: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicWriter {
    pub fn create(path: &Path) -> Result<AtomicWriter> {
        let name = path.file_name().ok_or_else(|| {
            Error::invalid(format!("output path {} has no file name", path.display()))
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicWriter {
            tmp,
            path: path.to_path_buf(),
            out: Some(BufWriter::new(f)),
        })
    }

    pub fn write_line(&mut self, line: &str) -> Result<()> {
        let out = self.out.as_mut().expect("writer open until commit");
        out.write_all(line.as_bytes())
            .and_then(|_| out.write_all(b"\n"))
            .map_err(|e| Error::io(&self.tmp, e))
    }

    pub fn commit(mut self) -> Result<()> {
        let out = self.out.take().expect("writer open until commit");
        let f = out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))
    }
}

impl Drop for AtomicWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
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
