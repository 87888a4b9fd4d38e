//! Flags and helpers shared by subcommands.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::flags;

/// Where the model comes from and where it runs.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local folder in HF layout, or a hub id `org/name[@revision]`.
    #[arg(long)]
    pub model: String,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu", value_parser = flags::device)]
    pub device: String,
    /// f32, f16 or bf16; defaults to the checkpoint's dtype.
    #[arg(long, value_parser = flags::dtype)]
    pub dtype: Option<String>,
}

/// `--image-size` for the vision commands.
#[derive(Args, Debug, Clone)]
pub struct ImageSizeArgs {
    /// Run the vision tower on N×N images instead of the checkpoint's size: the images are
    /// resized and cropped to N and the learned position embeddings interpolated bicubically
    /// (HF's `interpolate_pos_encoding=True`). N should be a multiple of the patch size.
    #[arg(long, value_name = "N", value_parser = flags::count::<usize>)]
    pub image_size: Option<usize>,
}

impl ImageSizeArgs {
    /// Sets `processor` to the requested size, if any.
    pub fn apply(&self, processor: &mut zoo_datasets::preprocess::ImageProcessor) -> Result<()> {
        if let Some(n) = self.image_size {
            if n == 0 {
                anyhow::bail!("--image-size must be at least 1");
            }
            processor.config = processor.config.clone().with_image_size(n);
        }
        Ok(())
    }
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
