//! A dual encoder together with the tokenizer and image processor it was trained with: the
//! unit that zero-shot classification, retrieval evaluation and `zoo embed` work with.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use zoo_datasets::preprocess::ImageProcessor;
use zoo_datasets::tokenize::{Padding, TextTokenizer};
use zoo_models::contrastive::{
    l2_normalize, load_dual_encoder, DualEncoder, DualEncoderConfig, ScoreKind,
};
use zoo_models::hub::ModelRepo;

use crate::error::{Error, Result};

/// Texts are embedded in chunks of this many, bounding memory for large prompt ensembles.
const TEXT_CHUNK: usize = 256;
/// Images are decoded and embedded in chunks of this many.
pub const IMAGE_CHUNK: usize = 32;

/// Token ids for the text tower, and the mask when the model uses one.
pub struct TextInputs {
    pub input_ids: Tensor,
    pub attention_mask: Option<Tensor>,
}

/// A loaded dual encoder (CLIP, SigLIP, or a CLIP image tower with a BERT text tower) with its
/// preprocessing.
pub struct DualEncoderPipeline {
    pub model: DualEncoder,
    pub config: DualEncoderConfig,
    pub tokenizer: TextTokenizer,
    pub processor: ImageProcessor,
    pub device: Device,
    pub dtype: DType,
    /// Where the model came from, for messages.
    pub source: String,
}

impl DualEncoderPipeline {
    /// Loads model, `tokenizer.json` (+ `tokenizer_config.json`) and `preprocessor_config.json`
    /// from a folder or hub id.
    pub fn load(spec: &str, device: &Device, dtype: Option<DType>) -> Result<Self> {
        let repo = ModelRepo::open(spec)?;
        Self::from_repo(&repo, device, dtype)
    }

    pub fn from_repo(repo: &ModelRepo, device: &Device, dtype: Option<DType>) -> Result<Self> {
        let loaded = load_dual_encoder(repo, dtype, device)?;
        let tokenizer_json = repo.get("tokenizer.json")?;
        let tokenizer_config = repo.get_optional("tokenizer_config.json")?;
        let tokenizer = TextTokenizer::from_files(&tokenizer_json, tokenizer_config.as_deref())?;
        let processor = ImageProcessor::from_file(&repo.get("preprocessor_config.json")?)?;
        Ok(Self {
            model: loaded.model,
            config: loaded.config,
            tokenizer,
            processor,
            device: device.clone(),
            dtype: loaded.dtype,
            source: repo.describe(),
        })
    }

    pub fn score_kind(&self) -> ScoreKind {
        self.config.score_kind()
    }

    /// The token length texts are truncated (and, for SigLIP, padded) to: the tokenizer's
    /// `model_max_length`, capped by the text tower's position table.
    pub fn max_text_len(&self) -> usize {
        let model = self.config.max_text_len();
        self.tokenizer
            .model_max_length()
            .map_or(model, |t| t.min(model))
    }

    /// Tokenizes as HF's processor would for this model: CLIP and BERT pad to the longest text
    /// and pass the mask; SigLIP pads to the maximum length and passes none.
    pub fn tokenize(&self, texts: &[&str]) -> Result<TextInputs> {
        let max_len = self.max_text_len();
        let pad_max = self.config.pads_to_max_length();
        let padding = if pad_max {
            Padding::MaxLength
        } else {
            Padding::Longest
        };
        let batch = self.tokenizer.encode_batch(texts, padding, max_len)?;
        let (input_ids, attention_mask) = batch.to_tensors(&self.device)?;
        Ok(TextInputs {
            input_ids,
            attention_mask: (!pad_max).then_some(attention_mask),
        })
    }

    /// L2-normalised text embeddings `[M, D]` (f32) of already tokenized texts.
    pub fn embed_tokens(&self, inputs: &TextInputs) -> Result<Tensor> {
        let features = self
            .model
            .text_features(&inputs.input_ids, inputs.attention_mask.as_ref())?;
        Ok(l2_normalize(&features.to_dtype(DType::F32)?)?.detach())
    }

    /// L2-normalised text embeddings `[M, D]` (f32), computed in chunks.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Tensor> {
        if texts.is_empty() {
            return Err(Error::Input("no texts to embed".into()));
        }
        let chunks = texts
            .chunks(TEXT_CHUNK)
            .map(|chunk| self.embed_tokens(&self.tokenize(chunk)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&chunks, 0)?)
    }

    /// Decodes and preprocesses images into `[N, 3, H, W]` f32. Errors name the file.
    pub fn pixel_values<P: AsRef<Path>>(&self, paths: &[P]) -> Result<Tensor> {
        Ok(self.processor.load_batch(paths, &self.device)?)
    }

    /// L2-normalised image embeddings `[N, D]` (f32) of preprocessed pixels.
    pub fn embed_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let features = self
            .model
            .image_features(&pixel_values.to_dtype(self.dtype)?)?;
        // Detached: evaluation of a training model must not keep its graph alive.
        Ok(l2_normalize(&features.to_dtype(DType::F32)?)?.detach())
    }

    /// HF's `logits_per_image` `[N, M]` for normalised embeddings.
    pub fn logits_per_image(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        Ok(self
            .model
            .logits_per_image(image_embeds, text_embeds)?
            .to_dtype(DType::F32)?)
    }

    /// Probabilities from logits: softmax over texts (CLIP) or a sigmoid per pair (SigLIP).
    pub fn probabilities(&self, logits_per_image: &Tensor) -> Result<Tensor> {
        Ok(match self.score_kind() {
            ScoreKind::Softmax => {
                candle_nn::ops::softmax(logits_per_image, candle_core::D::Minus1)?
            }
            ScoreKind::Sigmoid => candle_nn::ops::sigmoid(logits_per_image)?,
        })
    }
}
