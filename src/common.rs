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
    /// A local folder in HF layout, or a hub id `org/name[@revision]`; for the LLM commands
    /// also a llama.cpp `.gguf` file.
    #[arg(long)]
    pub model: String,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu", value_parser = flags::device)]
    pub device: String,
    /// f32, f16 or bf16; defaults to the checkpoint's dtype. A GGUF checkpoint keeps its
    /// quantized weights unless this dequantizes them.
    #[arg(long, value_parser = flags::dtype)]
    pub dtype: Option<String>,
}

/// An LLM checkpoint (HF layout or GGUF) and where it runs.
#[derive(Args, Debug, Clone)]
pub struct LlmArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The GGUF file to load from the --model folder or hub repo (e.g.
    /// `model.Q4_1.gguf`).
    #[arg(long, value_name = "NAME")]
    pub gguf_file: Option<String>,
}

/// An opened LLM: its checkpoint, model, tokenizer and decoding defaults.
pub struct LoadedLlm {
    pub source: zoo_models::llm::LlmSource,
    pub model: zoo_models::llm::LlamaForCausalLM,
    pub tokenizer: zoo_datasets::tokenize::TextTokenizer,
    pub generation: zoo_models::generation::HfGenerationConfig,
    pub device: Device,
}

impl LlmArgs {
    pub fn load(&self) -> Result<LoadedLlm> {
        let device = self.model.device()?;
        let source =
            zoo_models::llm::LlmSource::open(&self.model.model, self.gguf_file.as_deref())?;
        let model = source.load_model(self.model.dtype()?, &device)?;
        let tokenizer = zoo_trainers::lm::llm_tokenizer(&source)?;
        let generation = source.generation_config()?;
        Ok(LoadedLlm {
            source,
            model,
            tokenizer,
            generation,
            device,
        })
    }
}

impl LoadedLlm {
    /// The tokens that end a generation: the generation config's eos, else the model's.
    pub fn eos(&self) -> Vec<u32> {
        self.generation
            .eos_token_id
            .as_ref()
            .map(|ids| ids.to_vec())
            .unwrap_or_else(|| self.model.config.eos_token_ids())
    }

    /// The rendered ids of a chat, by the checkpoint's chat template.
    pub fn chat_ids(&self, messages: &[zoo_datasets::chat::Message]) -> Result<Vec<u32>> {
        let template = self.tokenizer.chat_template()?.with_context(|| {
            format!(
                "{} has no chat template (tokenizer_config.json chat_template or GGUF \
                 tokenizer.chat_template)",
                self.source.describe()
            )
        })?;
        Ok(template.encode(&self.tokenizer, messages)?)
    }
}

/// `--image-size` for the vision commands.
#[derive(Args, Debug, Clone)]
pub struct ImageSizeArgs {
    /// Run the vision tower on N×N images instead of the checkpoint's size: the images are
    /// resized and cropped to N and the learned position embeddings interpolated bicubically
    /// (HF's `interpolate_pos_encoding=True`). N should be a multiple of the patch size.
    #[arg(long, value_name = "N", value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub image_size: Option<usize>,
}

impl ImageSizeArgs {
    /// Sets `processor` to the requested size, if any.
    pub fn apply(&self, processor: &mut zoo_datasets::preprocess::ImageProcessor) -> Result<()> {
        if let Some(n) = self.image_size {
            check_image_size(n)?;
            processor.config = processor.config.clone().with_image_size(n);
        }
        Ok(())
    }
}

/// Refuses an `--image-size` whose images could not be preprocessed
/// ([`zoo_datasets::preprocess::MAX_OUTPUT_PIXELS`]) or whose batch of pixels alone (16 images,
/// as the vision commands encode them) would not fit in memory.
pub fn check_image_size(n: usize) -> Result<()> {
    let max = zoo_datasets::preprocess::MAX_OUTPUT_PIXELS;
    if n.saturating_mul(n) > max {
        anyhow::bail!(
            "invalid value '{n}' for '--image-size': at most {} ({max} pixels)",
            max.isqrt()
        );
    }
    let bytes = 16.0 * 3.0 * (n as f64).powi(2) * 5.0;
    zoo_models::device::ensure_fits_in_memory(&format!("--image-size {n}"), bytes)
        .map_err(anyhow::Error::msg)
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
