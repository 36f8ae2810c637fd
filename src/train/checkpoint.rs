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
    /// Checksum of the run's metrics.jsonl up to this step (absent in older checkpoints): a
    /// resume keeps the rows of a log that matches it only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_checksum: Option<String>,
    /// The checkpoint's copy of the metrics log (`metrics.jsonl` beside trainer_state.json, read
    /// by [`TrainState::load`]): a resume restores the log from it.
    #[serde(skip)]
    pub log: Option<String>,
    /// Digests (`io::file_digest`, hex) of the other files in the checkpoint by name, recorded
    /// by [`TrainState::save`] (the state is written last) and checked by [`TrainState::load`]:
    /// a damaged model or optimizer file is refused by name, not trained on. Empty in older
    /// checkpoints (nothing checked).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub files: std::collections::BTreeMap<String, String>,
}

/// Whether `name` in a checkpoint directory is a file [`TrainState::save`] records: not the
/// state itself, not the metrics log and plot (the log has its own checksum), not a hidden
/// temporary file.
fn recorded(name: &str) -> bool {
    name != "trainer_state.json" && !name.starts_with("metrics.") && !name.starts_with('.')
}

impl TrainState {
    /// Read `dir/trainer_state.json`.
    pub fn load(dir: &Path) -> Result<TrainState> {
        let p = dir.join("trainer_state.json");
        let s = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let mut state: TrainState = serde_json::from_str(&s)
            .map_err(|e| Error::format(&p, format!("invalid trainer state: {e}")))?;
        for (name, want) in &state.files {
            let f = dir.join(name);
            if !recorded(name) || name.contains(['/', '\\']) {
                return Err(Error::format(
                    &p,
                    format!("lists a file {name:?} it cannot hold"),
                ));
            }
            let got = match crate::io::file_digest(&f) {
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::format(
                        &f,
                        "missing: the checkpoint's trainer_state.json lists it",
                    ))
                }
                r => format!("{:016x}", r?),
            };
            if &got != want {
                return Err(Error::format(
                    &f,
                    "damaged: its digest differs from the one trainer_state.json recorded when \
                     the checkpoint was written",
                ));
            }
        }
        // An unreadable copy is no copy (the log then comes from the output directory).
        state.log = std::fs::read_to_string(dir.join("metrics.jsonl")).ok();
        Ok(state)
    }

    /// Whether the checkpoint's copy of the metrics log is there but is not the log its state
    /// recorded (damaged): a resume then cannot restore the rows up to the checkpoint from it.
    pub fn log_copy_damaged(&self) -> bool {
        match (&self.log, &self.metrics_checksum) {
            (Some(text), Some(sum)) => !super::metrics::log_matches(text, self.step, sum),
            _ => false,
        }
    }

    /// Write `dir/trainer_state.json` (atomically), with the digests of the files already in
    /// `dir` ([`TrainState::files`]): call it once the checkpoint's other files are written.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut state = self.clone();
        state.files.clear();
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| recorded(n))
            .collect();
        names.sort();
        for n in names {
            let d = crate::io::file_digest(&dir.join(&n))?;
            state.files.insert(n, format!("{d:016x}"));
        }
        let s = serde_json::to_string_pretty(&state).map_err(|e| Error::invalid(e.to_string()))?;
        crate::io::write_atomic(&dir.join("trainer_state.json"), |w| {
            std::io::Write::write_all(w, s.as_bytes())
        })
    }
}

/// A checkpoint's copy of the run's metrics log (`dir/metrics.jsonl`), from which a resume
/// restores the log ([`TrainState::load`] reads it).
pub fn write_log_copy(dir: &Path, text: &str) -> Result<()> {
    crate::io::write_atomic(&dir.join("metrics.jsonl"), |w| {
        std::io::Write::write_all(w, text.as_bytes())
    })
}

/// Before a run at step `step` writes into `out`: a trainer_state.json there from a run that
/// went further (an earlier run into the same directory, or this one before it was resumed from
/// an earlier checkpoint) no longer vouches for the directory, whose metrics are cut back to
/// `step` and whose files this run rewrites: it is removed, so that `--resume out` is refused
/// until this run saves its own, instead of resuming over a gap in the metrics.
pub fn retire_later_state(out: &Path, step: u64) -> Result<()> {
    let p = out.join("trainer_state.json");
    if !p.is_file() {
        return Ok(());
    }
    // An unreadable one vouches for nothing either.
    if TrainState::load(out).map_or(true, |s| s.step != step) {
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// Clear what runs killed mid-save left in `out`: `.checkpoint-N.tmp-PID` / `.final.tmp-PID`
/// directories (partial copies; at a large model's size, gigabytes each) of processes no longer
/// running. A `.checkpoint-N.old-PID` means that run was killed between [`atomic_dir`]'s two
/// renames: its `.checkpoint-N.tmp-PID` is then complete (filled before the first rename) and
/// becomes checkpoint-N when that is missing (else the older `.old` copy does), the other copy
/// is removed. Only directories are touched, and only where `/proc` tells which processes run.
pub fn clear_dead_saves(out: &Path) -> Result<()> {
    if !Path::new("/proc/self").exists() {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    // (base, pid) -> (tmp, old) paths.
    let mut saves: std::collections::BTreeMap<(String, u32), [Option<PathBuf>; 2]> =
        Default::default();
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix('.') else {
            continue;
        };
        for (slot, sep) in [".tmp-", ".old-"].into_iter().enumerate() {
            let Some((base, pid)) = rest.rsplit_once(sep) else {
                continue;
            };
            let Ok(pid) = pid.parse::<u32>() else {
                continue;
            };
            let checkpoint = base
                .strip_prefix("checkpoint-")
                .is_some_and(|n| n.parse::<u64>().is_ok());
            if checkpoint || (base == "final" && slot == 0) {
                saves.entry((base.to_string(), pid)).or_default()[slot] = Some(e.path());
            }
        }
    }
    let remove = |p: &Path| std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e));
    for ((base, pid), [tmp, old]) in saves {
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue; // a live run's (or this one's) save in progress
        }
        let target = out.join(&base);
        let keep = match (&tmp, &old) {
            (Some(t), Some(_)) => Some(t),
            (None, Some(o)) => Some(o),
            _ => None,
        };
        for p in [&tmp, &old].into_iter().flatten() {
            if Some(p) == keep && !target.exists() {
                std::fs::rename(p, &target).map_err(|e| Error::io(p, e))?;
            } else {
                remove(p)?;
            }
        }
    }
    Ok(())
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
    if let Err(e) = std::fs::rename(&tmp, dir) {
        // Nothing of this call stays behind (a dangling symlink `dir` fails here): the new copy
        // goes, the old one comes back.
        let _ = std::fs::remove_dir_all(&tmp);
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        return Err(Error::io(dir, e));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    if let Ok(f) = std::fs::File::open(&parent) {
        let _ = f.sync_all();
    }
    Ok(())
}

/// Write a run's files into `dir`, which holds other things too (its checkpoint-N directories,
/// metrics) and may hold the files of the run being resumed: `fill` writes them into a fresh
/// temporary subdirectory first, so a failure there leaves `dir` as it was; then
/// trainer_state.json is removed, every other file renamed over its old copy, and the new
/// trainer_state.json renamed in last. A crash during those renames leaves no trainer state,
/// which `--resume` refuses, never old and new files mixed under a trainer state that vouches
/// for them. The files named in `stale` are removed from `dir` with the old trainer state (a
/// run's files that this one does not write and no loader may pair with its new ones).
pub fn replace_files(
    dir: &Path,
    stale: &[&str],
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(".final.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    const STATE: &str = "trainer_state.json";
    for name in std::iter::once(STATE).chain(stale.iter().copied()) {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(dir.join(name), e)),
        }
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
        names.push(entry.map_err(|e| Error::io(&tmp, e))?.file_name());
    }
    // trainer_state.json last.
    names.sort_by_key(|n| n == STATE);
    for name in names {
        let (from, to) = (tmp.join(&name), dir.join(&name));
        std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
    }
    std::fs::remove_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fill that fails leaves the directory's files as they were; one that succeeds replaces
    /// them, trainer state included, and leaves no temporary behind.
    #[test]
    fn a_later_trainer_state_is_retired() {
        let d = std::env::temp_dir().join(format!("retrom3-retire-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let state = |step| TrainState {
            step,
            total_steps: 300,
            batches_seen: step,
            seed: 1,
            args: serde_json::Value::Null,
            metrics_checksum: None,
            log: None,
            files: Default::default(),
        };
        state(300).save(&d).unwrap();
        // Resumed from the directory itself (same step): kept.
        retire_later_state(&d, 300).unwrap();
        assert!(d.join("trainer_state.json").is_file());
        // Resumed from checkpoint-100 into it, or a fresh run: removed.
        retire_later_state(&d, 100).unwrap();
        assert!(!d.join("trainer_state.json").exists());
        retire_later_state(&d, 0).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Saves of dead processes are cleared (an interrupted rename's complete checkpoint put
    /// back), a live process's are kept, other dot-files are not touched.
    #[test]
    fn saves_of_dead_runs_are_cleared() {
        let d = std::env::temp_dir().join(format!("retrom3-dead-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        // No process has a pid above the kernel's pid_max (at most 2^22).
        let dead = 1u32 << 23;
        let me = std::process::id();
        for n in [
            format!(".checkpoint-5.tmp-{dead}"),
            format!(".final.tmp-{dead}"),
            format!(".checkpoint-7.old-{dead}"),
            format!(".checkpoint-9.old-{dead}"),
            "checkpoint-9".to_string(),
            // Killed between the renames: the complete new copy wins over the old one.
            format!(".checkpoint-11.old-{dead}"),
            format!(".checkpoint-11.tmp-{dead}"),
            format!(".checkpoint-3.tmp-{me}"),
            format!(".notes.tmp-{dead}"),
        ] {
            std::fs::create_dir_all(d.join(&n)).unwrap();
            std::fs::write(d.join(&n).join("f"), &n).unwrap();
        }
        // A plain file of such a name is not ours to touch (nor an error).
        std::fs::write(d.join(format!(".checkpoint-4.tmp-{dead}")), "notes").unwrap();
        clear_dead_saves(&d).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        if Path::new("/proc/self").exists() {
            let mut want = vec![
                format!(".checkpoint-3.tmp-{me}"),
                format!(".checkpoint-4.tmp-{dead}"),
                format!(".notes.tmp-{dead}"),
                "checkpoint-11".to_string(),
                "checkpoint-7".to_string(),
                "checkpoint-9".to_string(),
            ];
            want.sort();
            assert_eq!(left, want);
            // The put-back checkpoint is the old one, whole.
            let f = std::fs::read_to_string(d.join("checkpoint-7/f")).unwrap();
            assert_eq!(f, format!(".checkpoint-7.old-{dead}"));
            assert_eq!(
                std::fs::read_to_string(d.join("checkpoint-9/f")).unwrap(),
                "checkpoint-9"
            );
            let f = std::fs::read_to_string(d.join("checkpoint-11/f")).unwrap();
            assert_eq!(f, format!(".checkpoint-11.tmp-{dead}"));
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn replace_files_is_all_or_nothing() {
        let dir = std::env::temp_dir().join(format!("r3-replace-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("checkpoint-3")).unwrap();
        std::fs::write(dir.join("model.safetensors"), "old").unwrap();
        std::fs::write(dir.join("trainer_state.json"), "old state").unwrap();
        std::fs::write(dir.join("sparse_linear.pt"), "old head").unwrap();
        let e = replace_files(&dir, &["sparse_linear.pt"], |t| {
            std::fs::write(t.join("model.safetensors"), "new").unwrap();
            Err(Error::invalid("tokenizer copy failed"))
        });
        assert!(e.is_err());
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
        assert_eq!(read("model.safetensors"), "old");
        assert_eq!(read("trainer_state.json"), "old state");
        assert_eq!(read("sparse_linear.pt"), "old head");
        replace_files(&dir, &["sparse_linear.pt"], |t| {
            std::fs::write(t.join("model.safetensors"), "new").unwrap();
            std::fs::write(t.join("trainer_state.json"), "new state").unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(read("model.safetensors"), "new");
        assert_eq!(read("trainer_state.json"), "new state");
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["checkpoint-3", "model.safetensors", "trainer_state.json"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
