//! Atomic checkpoint directories and the trainer state that makes a resume bit-identical.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a run stands: written as trainer_state.json in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer updates done.
    pub step: u64,
    /// Total updates planned.
    pub total_steps: u64,
    /// Micro-batches consumed from the data plan (the resume point).
    pub batches_seen: u64,
    /// The run's seed (data order, masks and dropout derive from it and the counters above).
    pub seed: u64,
    /// The command-line settings of the run, for the record and for resume checks.
    pub args: serde_json::Value,
}

impl TrainState {
    /// Read `dir/trainer_state.json`.
    pub fn load(dir: &Path) -> Result<TrainState> {
        let p = dir.join("trainer_state.json");
        let s = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&s)
            .map_err(|e| Error::format(&p, format!("invalid trainer state: {e}")))
    }

    /// Write `dir/trainer_state.json` (atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let s = serde_json::to_string_pretty(self).map_err(|e| Error::invalid(e.to_string()))?;
        crate::io::write_atomic(&dir.join("trainer_state.json"), |w| {
            std::io::Write::write_all(w, s.as_bytes())
        })
    }
}

/// Build a directory atomically: `fill` writes into a fresh temporary sibling, which then replaces
/// `dir` (the previous `dir`, if any, is moved aside first and removed only after the rename), so
/// a crash at any point leaves either the old or the new checkpoint complete, never a mix.
pub fn atomic_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a directory path", dir.display())))?
        .to_string_lossy()
        .to_string();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    if let Ok(f) = std::fs::File::open(&parent) {
        let _ = f.sync_all();
    }
    Ok(())
}
