//! zoo-models: the shared Candle layers and the model families of candle-zoo.
//!
//! - [`layers`]: attention, MLPs, norms, activations, ViT embeddings, pooling heads and
//!   positional encodings. Every model is composed from these, and all are differentiable.
//! - [`clip`], [`siglip`]: the dual encoders, with HF `config.json` types and HF tensor names.
//! - [`bert`]: the BERT encoder (Devlin et al. 2019), with cross-attention and a causal mode, and
//!   sentence-transformers' mean pooling; a text tower for CLIP-style models and BLIP.
//! - [`blip`]: BLIP's ViT and BERT text models: captioning (`BlipForConditionalGeneration`,
//!   KV-cached greedy, beam and nucleus decoding) and image-text matching
//!   (`BlipForImageTextRetrieval`).
//! - [`generation`]: model-agnostic decoding as HF `generate` does it: greedy, beam search,
//!   nucleus sampling, repetition penalty, min/max new tokens, stop tokens, driven by a
//!   [`generation::StepModel`].
//! - [`dual_bert`]: a CLIP image tower with a BERT text tower (HF `VisionTextDualEncoderModel`),
//!   mean-pooled as open_clip's HF text towers are.
//! - [`contrastive`]: CLIP, SigLIP and the BERT-tower model behind one
//!   [`contrastive::DualEncoder`], and loading.
//! - [`hub`], [`weights`]: finding checkpoint files (local folder or hub id) and reading
//!   memory-mapped, possibly sharded, safetensors.
//! - [`device`]: `--device` / `--dtype` parsing, and checking sizes against the machine's memory.
//! - [`gguf`]: llama.cpp's GGUF files, through candle's reader behind checks of what it trusts.
//!
//! Loading errors ([`Error`]) name the file and the problem.

pub mod bert;
pub mod blip;
pub mod clip;
pub mod contrastive;
pub mod device;
pub mod dual_bert;
pub mod error;
pub mod generation;
pub mod gguf;
pub mod hub;
pub mod layers;
pub mod llm;
pub mod siglip;
pub mod weights;

pub use error::{Error, Result};
