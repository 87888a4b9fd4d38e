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
