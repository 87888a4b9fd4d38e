//! Dual encoders (CLIP, SigLIP, and a CLIP image tower with a BERT text tower) behind one type:
//! load by `model_type`, embed images and texts, score pairs as HF's `forward` does.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use crate::clip::{ClipConfig, ClipModel};
use crate::dual_bert::{VisionTextDualEncoderConfig, VisionTextDualEncoderModel};
use crate::error::{CandleContext, Error, Result};
use crate::hub::{read_json, ModelRepo};
use crate::siglip::{SiglipConfig, SiglipModel};
use crate::weights::SafetensorsWeights;

/// How image-text scores become probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreKind {
    /// CLIP (and the BERT-tower dual encoder): a softmax over the candidate texts.
    Softmax,
    /// SigLIP: an independent sigmoid per image-text pair.
    Sigmoid,
}

/// A dual encoder checkpoint's `config.json`, told apart by `model_type`.
#[derive(Debug, Clone)]
pub enum DualEncoderConfig {
    Clip(ClipConfig),
    Siglip(SiglipConfig),
    /// `vision-text-dual-encoder`: a CLIP image tower and a BERT text tower.
    VisionText(VisionTextDualEncoderConfig),
}

const SUPPORTED: &str = "clip, siglip, vision-text-dual-encoder";
const VISION_TEXT: &str = "vision-text-dual-encoder";

#[derive(Deserialize)]
struct ModelTypeOnly {
    model_type: Option<String>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl DualEncoderConfig {
    /// Reads `config.json`, dispatching on its `model_type`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let head: ModelTypeOnly = read_json(path, "model config")?;
        match head.model_type.as_deref() {
            Some("clip") => Ok(Self::Clip(read_json(path, "CLIP config")?)),
            Some("siglip") => Ok(Self::Siglip(read_json(path, "SigLIP config")?)),
            Some(VISION_TEXT) => Ok(Self::VisionText(VisionTextDualEncoderConfig::from_file(
                path,
            )?)),
            other => Err(Error::UnknownModelType {
                path: path.to_path_buf(),
                model_type: other.unwrap_or("(missing)").to_string(),
                supported: SUPPORTED,
            }),
        }
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Clip(_) => "clip",
            Self::Siglip(_) => "siglip",
            Self::VisionText(_) => VISION_TEXT,
        }
    }

    /// The square input size of the image tower.
    pub fn image_size(&self) -> usize {
        match self {
            Self::Clip(c) => c.vision_config.image_size,
            Self::Siglip(c) => c.vision_config.image_size,
            Self::VisionText(c) => c.vision_config.image_size,
        }
    }

    /// The side of the image tower's square patches.
    pub fn patch_size(&self) -> usize {
        match self {
            Self::Clip(c) => c.vision_config.patch_size,
            Self::Siglip(c) => c.vision_config.patch_size,
            Self::VisionText(c) => c.vision_config.patch_size,
        }
    }

    /// The longest token sequence the text tower takes.
    pub fn max_text_len(&self) -> usize {
        match self {
            Self::Clip(c) => c.text_config.max_position_embeddings,
            Self::Siglip(c) => c.text_config.max_position_embeddings,
            Self::VisionText(c) => c.text_config.max_position_embeddings,
        }
    }

    /// SigLIP was trained on text padded to its maximum length, without an attention mask; CLIP
    /// and BERT pad to the longest text in the batch and mask the padding.
    pub fn pads_to_max_length(&self) -> bool {
        matches!(self, Self::Siglip(_))
    }

    pub fn score_kind(&self) -> ScoreKind {
        match self {
            Self::Clip(_) | Self::VisionText(_) => ScoreKind::Softmax,
            Self::Siglip(_) => ScoreKind::Sigmoid,
        }
    }
}

/// Reads the checkpoint's stored dtype (`torch_dtype`, or `dtype` in newer configs) from
/// `config.json`, if it names one Candle has.
pub fn config_dtype(path: &Path) -> Result<Option<DType>> {
    let head: ModelTypeOnly = read_json(path, "model config")?;
    Ok(match head.dtype.or(head.torch_dtype).as_deref() {
        Some("float32") => Some(DType::F32),
        Some("float16") => Some(DType::F16),
        Some("bfloat16") => Some(DType::BF16),
        _ => None,
    })
}

/// A loaded dual encoder.
#[derive(Debug, Clone)]
pub enum DualEncoder {
    Clip(ClipModel),
    Siglip(SiglipModel),
    VisionText(VisionTextDualEncoderModel),
}

/// Image and text embeddings (L2-normalised) and HF's `logits_per_image`.
#[derive(Debug, Clone)]
pub struct DualEncoderOutput {
    pub image_embeds: Tensor,
    pub text_embeds: Tensor,
    pub logits_per_image: Tensor,
}

impl DualEncoder {
    pub fn new(config: &DualEncoderConfig, vb: candle_nn::VarBuilder) -> candle_core::Result<Self> {
        Ok(match config {
            DualEncoderConfig::Clip(c) => Self::Clip(ClipModel::new(c, vb)?),
            DualEncoderConfig::Siglip(c) => Self::Siglip(SiglipModel::new(c, vb)?),
            DualEncoderConfig::VisionText(c) => {
                Self::VisionText(VisionTextDualEncoderModel::new(c, vb)?)
            }
        })
    }

    /// Projected, unnormalised image features `[B, P]` (`get_image_features`).
    pub fn image_features(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Clip(m) => m.get_image_features(pixel_values),
            Self::Siglip(m) => m.get_image_features(pixel_values),
            Self::VisionText(m) => m.get_image_features(pixel_values),
        }
    }

    /// Projected, unnormalised text features `[B, P]` (`get_text_features`).
    pub fn text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Self::Clip(m) => m.get_text_features(input_ids, attention_mask),
            Self::Siglip(m) => m.get_text_features(input_ids, attention_mask),
            Self::VisionText(m) => m.get_text_features(input_ids, attention_mask),
        }
    }

    /// `exp(logit_scale) · img · txtᵀ (+ logit_bias)` for L2-normalised embeddings, as HF's
    /// `forward` computes `logits_per_image`.
    pub fn logits_per_image(
        &self,
        image_embeds: &Tensor,
        text_embeds: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let dtype = image_embeds.dtype();
        let sims = image_embeds.matmul(&text_embeds.t()?)?;
        let (scale, bias) = match self {
            Self::Clip(m) => (m.logit_scale(), None),
            Self::Siglip(m) => (m.logit_scale(), Some(m.logit_bias())),
            Self::VisionText(m) => (m.logit_scale(), None),
        };
        let logits = sims.broadcast_mul(&scale.to_dtype(dtype)?.exp()?)?;
        match bias {
            Some(b) => logits.broadcast_add(&b.to_dtype(dtype)?),
            None => Ok(logits),
        }
    }

    /// HF `forward`: normalised embeddings and `logits_per_image` `[N_images, N_texts]`.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<DualEncoderOutput> {
        let image_embeds = l2_normalize(&self.image_features(pixel_values)?)?;
        let text_embeds = l2_normalize(&self.text_features(input_ids, attention_mask)?)?;
        let logits_per_image = self.logits_per_image(&image_embeds, &text_embeds)?;
        Ok(DualEncoderOutput {
            image_embeds,
            text_embeds,
            logits_per_image,
        })
    }
}

/// `x / ‖x‖₂` over the last dimension.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// A dual encoder with the paths of its companion files.
pub struct LoadedDualEncoder {
    pub model: DualEncoder,
    pub config: DualEncoderConfig,
    pub dtype: DType,
    pub config_path: PathBuf,
}

/// Loads a dual encoder checkpoint from `repo` in `dtype` (default: the checkpoint's own, or
/// f32 where the device cannot compute in it) on `device`.
pub fn load_dual_encoder(
    repo: &ModelRepo,
    dtype: Option<DType>,
    device: &Device,
) -> Result<LoadedDualEncoder> {
    let config_path = repo.get("config.json")?;
    let config = DualEncoderConfig::from_file(&config_path)?;
    let dtype = crate::device::resolve_dtype(dtype, config_dtype(&config_path)?, device)?;
    let files = repo.weight_files()?;
    let weights = SafetensorsWeights::open(&files)?;
    let vb = weights.into_var_builder(dtype, device);
    let model = DualEncoder::new(&config, vb).context(|| {
        format!(
            "cannot build the {} model from {}",
            config.model_type(),
            repo.describe()
        )
    })?;
    Ok(LoadedDualEncoder {
        model,
        config,
        dtype,
        config_path,
    })
}

impl DualEncoderConfig {
    /// The HF `config.json` for this model, loadable by `CLIPModel` / `SiglipModel` /
    /// `VisionTextDualEncoderModel` (which ignores `text_pooling`; see [`crate::dual_bert`]).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (v, kind, arch, text, vision) = match self {
            Self::Clip(c) => (
                serde_json::to_value(c),
                "clip",
                "CLIPModel",
                "clip_text_model",
                "clip_vision_model",
            ),
            Self::Siglip(c) => (
                serde_json::to_value(c),
                "siglip",
                "SiglipModel",
                "siglip_text_model",
                "siglip_vision_model",
            ),
            Self::VisionText(c) => (
                serde_json::to_value(c),
                VISION_TEXT,
                "VisionTextDualEncoderModel",
                "bert",
                "clip_vision_model",
            ),
        };
        let mut v = v.unwrap_or_default();
        v["model_type"] = kind.into();
        v["architectures"] = serde_json::json!([arch]);
        v["torch_dtype"] = "float32".into();
        v["text_config"]["model_type"] = text.into();
        v["vision_config"]["model_type"] = vision.into();
        v
    }

    /// Sets the image tower's input size (position tables grow or shrink accordingly).
    pub fn set_image_size(&mut self, size: usize) {
        match self {
            Self::Clip(c) => c.vision_config.image_size = size,
            Self::Siglip(c) => c.vision_config.image_size = size,
            Self::VisionText(c) => c.vision_config.image_size = size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<DualEncoderConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        DualEncoderConfig::from_file(&path)
    }

    #[test]
    fn missing_fields_take_hf_defaults() {
        // openai/clip-vit-base-patch32 spells out little more than this.
        let DualEncoderConfig::Clip(c) = parse(
            r#"{"model_type": "clip", "text_config": {"eos_token_id": 2}, "vision_config": {}}"#,
        )
        .unwrap() else {
            panic!("not CLIP")
        };
        assert_eq!(c.projection_dim, 512);
        assert_eq!(
            (
                c.text_config.hidden_size,
                c.text_config.max_position_embeddings
            ),
            (512, 77)
        );
        assert_eq!(
            (c.vision_config.hidden_size, c.vision_config.patch_size),
            (768, 32)
        );
        assert_eq!(
            c.vision_config.hidden_act,
            crate::layers::Activation::QuickGelu
        );
        assert!((c.logit_scale_init_value - 2.6592).abs() < 1e-9);

        let DualEncoderConfig::Siglip(s) = parse(r#"{"model_type": "siglip"}"#).unwrap() else {
            panic!("not SigLIP")
        };
        assert_eq!(s.text_config.max_position_embeddings, 64);
        assert_eq!(s.text_config.vocab_size, 32000);
        assert_eq!(s.vision_config.patch_size, 16);
        assert!(s.vision_config.vision_use_head);
        assert!((s.vision_config.layer_norm_eps - 1e-6).abs() < 1e-12);
    }

    #[test]
    fn bad_configs_name_the_file_and_the_field() {
        let err = parse(r#"{"model_type": "clip", "text_config": {"hidden_act": "swishy"}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("swishy"),
            "{err}"
        );
        let err = parse(r#"{"model_type": "blip_2"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown model_type `blip_2`"), "{err}");
    }
}
