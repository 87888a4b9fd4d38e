//! Flags and helpers shared by subcommands.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

/// Where the model comes from and where it runs.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local folder in HF layout, or a hub id `org/name[@revision]`.
    #[arg(long)]
    pub model: String,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16; defaults to the checkpoint's dtype.
    #[arg(long)]
    pub dtype: Option<String>,
}

impl ModelArgs {
    pub fn device(&self) -> Result<Device> {
        Ok(zoo_models::device::parse_device(&self.device)?)
    }

    pub fn dtype(&self) -> Result<Option<DType>> {
        Ok(self
            .dtype
            .as_deref()
            .map(zoo_models::device::parse_dtype)
            .transpose()?)
    }
}

/// A progress bar on stderr with rate and ETA; hidden when stderr is not a terminal.
pub fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Writes tensors as safetensors atomically: to a temporary file beside `path`, then renamed.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    zoo_models::weights::save_safetensors_atomic(tensors, path)
        .with_context(|| format!("cannot write {}", path.display()))
}
