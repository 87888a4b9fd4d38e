//! Shared by the fuzz targets: a scratch folder of this process, where each input is written
//! as the file the parser under test reads (most of our loaders take paths, as the CLI does).

use std::path::{Path, PathBuf};

/// This process's scratch folder, made on first use.
pub fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zoo-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Writes `bytes` as `name` in the scratch folder and returns its path.
pub fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).expect("scratch file");
    path
}

/// A fresh model folder `name` in the scratch folder holding `files`.
pub fn folder(name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    for (file, bytes) in files {
        std::fs::write(dir.join(file), bytes).expect("scratch file");
    }
    dir
}

/// The path as a string for the loaders that take `--model` text.
pub fn spec(dir: &Path) -> String {
    dir.to_string_lossy().into_owned()
}
