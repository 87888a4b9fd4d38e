//! Checkpoints: `OUTPUT/checkpoint-STEP/` and `OUTPUT/final/`, each an HF-layout model folder
//! plus `optimizer.safetensors` and `trainer_state.json`. A checkpoint is written into a
//! temporary folder and renamed into place, so a crash never leaves a half-written one.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::optim::AdamW;
use crate::train::{Task, TrainConfig, TrainState};

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Input(format!("cannot {what} {}: {e}", path.display()))
}

/// Writes the model, optimizer state and trainer state into `dir` atomically.
pub fn save<T: Task>(
    dir: &Path,
    task: &T,
    optimizer: &AdamW,
    state: &TrainState,
    config: &TrainConfig,
) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io("remove", &tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io("create", &tmp, e))?;
    let written = (|| -> Result<()> {
        task.save_model(&tmp)?;
        zoo_models::weights::save_safetensors_atomic(
            &optimizer.state_tensors()?,
            &tmp.join(OPTIMIZER_FILE),
        )?;
        let json = serde_json::json!({ "state": state, "config": config });
        let path = tmp.join(STATE_FILE);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
        .map_err(|e| io("write", &path, e))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io("replace", dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io("rename into", dir, e))
}

/// The process id of a temporary name `.NAME.tmp-PID`, as [`save`] and
/// `save_safetensors_atomic` write them.
fn temporary_owner(name: &str) -> Option<u32> {
    let (stem, pid) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    if stem.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` is running. Where that cannot be told (no `/proc`), every process
/// counts as running, so a live run's folder is never taken.
fn process_is_running(pid: u32) -> bool {
    !Path::new("/proc/self").exists() || Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes the temporary checkpoint folders and files (`.NAME.tmp-PID`) in `output` whose
/// process is no longer running: what a run killed while saving leaves behind. Those of a
/// running process, this one included, are kept. Returns what was removed.
pub fn remove_stale_temporaries(output: &Path) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(output) else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temporary_owner(&name) else {
            continue;
        };
        if process_is_running(pid) {
            continue;
        }
        let path = entry.path();
        let result = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        result.map_err(|e| io("remove the stale temporary", &path, e))?;
        removed.push(path);
    }
    removed.sort();
    Ok(removed)
}

/// Reads `trainer_state.json` of a checkpoint.
pub fn load_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| io("read", &path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Input(format!("{} is not valid JSON: {e}", path.display())))?;
    serde_json::from_value(json["state"].clone()).map_err(|e| {
        Error::Input(format!(
            "{} has no valid trainer state: {e}",
            path.display()
        ))
    })
}

/// Restores the optimizer moments and step count of a checkpoint.
pub fn load_optimizer(
    dir: &Path,
    optimizer: &mut AdamW,
    device: &candle_core::Device,
) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    let tensors = candle_core::safetensors::load(&path, device)
        .map_err(|e| Error::Input(format!("cannot read {}: {e}", path.display())))?;
    optimizer.load_state(&tensors)?;
    Ok(())
}

/// `dir` itself when it is a checkpoint, else its newest `checkpoint-STEP` (or `final`).
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| io("read", dir, e))?;
    let newest = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            e.path()
                .join(STATE_FILE)
                .is_file()
                .then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s);
    match newest {
        Some((_, p)) => Ok(p),
        None => Err(Error::Input(format!(
            "{} holds no checkpoint (no {STATE_FILE})",
            dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_recognised_by_their_owner() {
        assert_eq!(temporary_owner(".checkpoint-4.tmp-123"), Some(123));
        assert_eq!(temporary_owner(".final.tmp-9"), Some(9));
        assert_eq!(temporary_owner(".model.safetensors.tmp-77"), Some(77));
        assert_eq!(temporary_owner("checkpoint-4"), None);
        assert_eq!(temporary_owner(".checkpoint-4.tmp-x"), None);
        assert_eq!(temporary_owner(".tmp-5"), None);
    }

    #[test]
    fn stale_temporaries_of_dead_processes_go_and_live_ones_stay() {
        let out = tempfile::tempdir().unwrap();
        // A child that has exited and been reaped: its pid is no longer running.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let live = std::process::id();
        let stale = out.path().join(format!(".checkpoint-2.tmp-{dead}"));
        let stale_file = out.path().join(format!(".metrics.jsonl.tmp-{dead}"));
        let running = out.path().join(format!(".checkpoint-4.tmp-{live}"));
        let kept = out.path().join("checkpoint-1");
        for dir in [&stale, &running, &kept] {
            std::fs::create_dir_all(dir.join("inner")).unwrap();
        }
        std::fs::write(&stale_file, b"x").unwrap();
        let removed = remove_stale_temporaries(out.path()).unwrap();
        if !process_is_running(dead) {
            assert_eq!(removed.len(), 2, "{removed:?}");
            assert!(!stale.exists() && !stale_file.exists());
        }
        assert!(running.exists(), "a live process's folder is kept");
        assert!(kept.exists());
        assert!(remove_stale_temporaries(&out.path().join("missing"))
            .unwrap()
            .is_empty());
    }
}
