//! Where an LLM's weights come from: an HF checkpoint (a folder or hub repo of `config.json`
//! and safetensors) or a llama.cpp GGUF file (a path, or a file of a folder or hub repo named
//! by `--gguf-file`).

use std::path::Path;

use candle_core::{DType, Device};

use super::config::LlamaConfig;
use super::gguf::{is_gguf_path, GgufLlama};
use super::llama::LlamaForCausalLM;
use crate::error::{CandleContext, Result};
use crate::generation::HfGenerationConfig;
use crate::hub::ModelRepo;

/// An opened LLM checkpoint.
pub enum LlmSource {
    Hf {
        repo: ModelRepo,
        config: Box<LlamaConfig>,
    },
    Gguf(Box<GgufLlama>),
}

impl LlmSource {
    /// `--model SPEC [--gguf-file NAME]`: a `.gguf` path; a folder or hub repo and the GGUF
    /// file in it; or a folder or hub repo in HF layout.
    pub fn open(spec: &str, gguf_file: Option<&str>) -> Result<Self> {
        if let Some(name) = gguf_file {
            let repo = ModelRepo::open(spec)?;
            let path = repo.get(name)?;
            return Ok(Self::Gguf(Box::new(GgufLlama::open(&path)?)));
        }
        let path = Path::new(spec);
        if is_gguf_path(path) || path.is_file() {
            return Ok(Self::Gguf(Box::new(GgufLlama::open(path)?)));
        }
        let repo = ModelRepo::open(spec)?;
        let config = Box::new(LlamaConfig::from_file(&repo.get("config.json")?)?);
        Ok(Self::Hf { repo, config })
    }

    pub fn config(&self) -> &LlamaConfig {
        match self {
            Self::Hf { config, .. } => config,
            Self::Gguf(g) => &g.config,
        }
    }

    /// The HF repo, when the checkpoint is one.
    pub fn repo(&self) -> Option<&ModelRepo> {
        match self {
            Self::Hf { repo, .. } => Some(repo),
            Self::Gguf(_) => None,
        }
    }

    pub fn gguf(&self) -> Option<&GgufLlama> {
        match self {
            Self::Gguf(g) => Some(g),
            Self::Hf { .. } => None,
        }
    }

    /// The folder, hub id or file, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Hf { repo, .. } => repo.describe(),
            Self::Gguf(g) => g.path().display().to_string(),
        }
    }

    /// Decoding defaults: `generation_config.json` of an HF checkpoint, the metadata's eos and
    /// pad for a GGUF (which has no generation config).
    pub fn generation_config(&self) -> Result<HfGenerationConfig> {
        match self {
            Self::Hf { repo, .. } => match repo.get_optional("generation_config.json")? {
                Some(path) => HfGenerationConfig::from_file(&path),
                None => Ok(HfGenerationConfig::default()),
            },
            Self::Gguf(g) => Ok(HfGenerationConfig {
                eos_token_id: g.config.eos_token_id.clone(),
                pad_token_id: g.config.pad_token_id,
                ..Default::default()
            }),
        }
    }

    /// The model. A GGUF without `dtype` keeps its quantized projections (run by the quantized
    /// matmul, activations in f32); with `dtype` every tensor is dequantized to it.
    pub fn load_model(&self, dtype: Option<DType>, device: &Device) -> Result<LlamaForCausalLM> {
        match self {
            Self::Hf { repo, .. } => LlamaForCausalLM::load(repo, dtype, device),
            Self::Gguf(g) => {
                let dtype = dtype
                    .map(|d| crate::device::resolve_dtype(Some(d), None, device))
                    .transpose()?;
                let (dense, quantized) = g.weights(dtype, device)?;
                let vb =
                    candle_nn::VarBuilder::from_tensors(dense, dtype.unwrap_or(DType::F32), device);
                LlamaForCausalLM::load_weights(&g.config, vb, &quantized)
                    .context(|| format!("cannot build LlamaForCausalLM from {}", self.describe()))
            }
        }
    }
}
