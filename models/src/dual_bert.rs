//! A CLIP image tower with a BERT text tower, in HF `VisionTextDualEncoderModel`'s layout: the
//! model open_clip builds when its text tower is an HF encoder (`hf_model_name`), for example a
//! LiT-style run (Zhai et al. 2022) that locks a pretrained sentence encoder and learns the
//! image tower and the projections. It scores pairs as CLIP does (`exp(logit_scale) · cos`).
//!
//! Module paths are HF's tensor names:
//! - `vision_model.vision_model.*`: HF wraps the image tower in a `CLIPVisionModel`, whose own
//!   `vision_model` is the `CLIPVisionTransformer`;
//! - `text_model.*`: a `BertModel` (with `pooler.dense` only when the pooler is used, see below);
//! - `visual_projection`, `text_projection`: linear maps without bias into the shared space
//!   (open_clip's `proj_type="linear"`);
//! - `logit_scale`.
//!
//! **Deviation from HF, by design.** HF's `get_text_features` projects BERT's `pooler_output`,
//! `tanh(dense(h_[CLS]))`, a head trained for next-sentence prediction. open_clip's HF towers
//! (`MeanPooler`) and sentence-transformers instead average the token states over the attention
//! mask, which is what sentence encoders such as all-MiniLM-L6-v2 were trained to produce. The
//! extra `config.json` field `text_pooling` chooses: `"mean"` (what `zoo` writes for the models
//! it builds) or `"pooler"` (alias `"cls"`). A config without the field is HF's own, so it gets
//! the pooler and gives HF's numbers. transformers keeps unknown config fields but ignores this
//! one: it loads a mean-pooled checkpoint with a freshly initialised pooler (it warns about
//! `text_model.pooler.dense`), so its text embeddings of such a checkpoint differ from `zoo`'s;
//! the image embeddings agree.

use std::path::Path;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::bert::{mean_pool, BertConfig, BertModel};
use crate::clip::{ClipVisionConfig, ClipVisionTransformer};
use crate::hub::read_json;
use crate::layers::Linear;

/// How the text tower turns token states into one vector before `text_projection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BertTextPooling {
    /// The mean of the token states over the attention mask ([`mean_pool`]), as open_clip's
    /// `MeanPooler` and sentence-transformers compute it.
    Mean,
    /// BERT's `pooler_output` (`tanh(dense(h_[CLS]))`), as HF's `VisionTextDualEncoderModel`
    /// computes it; the default, since a config without `text_pooling` comes from HF.
    #[default]
    #[serde(alias = "cls")]
    Pooler,
}

/// HF `VisionTextDualEncoderConfig` with a CLIP vision config and a BERT text config, plus
/// [`text_pooling`](Self::text_pooling) (see the module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionTextDualEncoderConfig {
    pub vision_config: ClipVisionConfig,
    pub text_config: BertConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
    pub text_pooling: BertTextPooling,
}

impl Default for VisionTextDualEncoderConfig {
    fn default() -> Self {
        Self {
            vision_config: ClipVisionConfig::default(),
            text_config: BertConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
            text_pooling: BertTextPooling::default(),
        }
    }
}

const WHAT: &str = "vision-text dual encoder config";

#[derive(Deserialize)]
struct Towers {
    vision_config: Option<TowerType>,
    text_config: Option<TowerType>,
}

#[derive(Deserialize)]
struct TowerType {
    model_type: Option<String>,
}

impl VisionTextDualEncoderConfig {
    /// Reads a `config.json` with `model_type: "vision-text-dual-encoder"`, checking that its
    /// towers are kinds this model has: `clip_vision_model` and `bert`. HF demands both sub-configs
    /// and their `model_type`s, so a missing one is an error here too.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let towers: Towers = read_json(path, WHAT)?;
        let check = |section: &str, tower: Option<TowerType>, want: &str| {
            let found = tower.map(|t| t.model_type);
            let message = match found {
                Some(Some(t)) if t == want => return Ok(()),
                Some(Some(t)) => format!(
                    "{section}.model_type is `{t}`; only `{want}` is supported in a \
                     vision-text dual encoder"
                ),
                Some(None) => format!("{section} has no model_type (expected `{want}`)"),
                None => format!("{section} is missing (a `{want}` config is expected)"),
            };
            Err(crate::Error::Invalid {
                path: path.to_path_buf(),
                what: WHAT,
                message,
            })
        };
        check("vision_config", towers.vision_config, "clip_vision_model")?;
        check("text_config", towers.text_config, "bert")?;
        read_json(path, WHAT)
    }
}

/// HF `VisionTextDualEncoderModel` over a CLIP image tower and a BERT text tower.
#[derive(Debug, Clone)]
pub struct VisionTextDualEncoderModel {
    pub vision_model: ClipVisionTransformer,
    pub text_model: BertModel,
    visual_projection: Linear,
    text_projection: Linear,
    /// Scalar log temperature; logits are scaled by `exp(logit_scale)`.
    logit_scale: Tensor,
    pub config: VisionTextDualEncoderConfig,
}

impl VisionTextDualEncoderModel {
    pub fn new(cfg: &VisionTextDualEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let (v, t) = (&cfg.vision_config, &cfg.text_config);
        let with_pooler = cfg.text_pooling == BertTextPooling::Pooler;
        Ok(Self {
            vision_model: ClipVisionTransformer::new(v, vb.pp("vision_model").pp("vision_model"))?,
            text_model: BertModel::new(t, vb.pp("text_model"), with_pooler)?,
            visual_projection: Linear::new(
                v.hidden_size,
                cfg.projection_dim,
                false,
                vb.pp("visual_projection"),
            )?,
            text_projection: Linear::new(
                t.hidden_size,
                cfg.projection_dim,
                false,
                vb.pp("text_projection"),
            )?,
            logit_scale: vb.get((), "logit_scale")?,
            config: cfg.clone(),
        })
    }

    /// `get_image_features`: projected, unnormalised image embeddings `[B, P]`.
    pub fn get_image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.visual_projection
            .forward(&self.vision_model.pooled_output(pixel_values)?)
    }

    /// The sentence vector `[B, D]` before `text_projection`, pooled per `text_pooling`.
    /// Segment ids are all 0 (BERT's default for a single sentence); without an
    /// `attention_mask` every token counts.
    pub fn text_pooled_output(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden = self
            .text_model
            .forward(input_ids, None, attention_mask, None, None)?;
        match self.config.text_pooling {
            BertTextPooling::Mean => match attention_mask {
                Some(mask) => mean_pool(&hidden, mask),
                None => hidden.mean(1),
            },
            BertTextPooling::Pooler => match self.text_model.pooler() {
                Some(pooler) => pooler.forward(&hidden),
                None => candle_core::bail!("text_pooling is `pooler` but no pooler was built"),
            },
        }
    }

    /// `text_projection` of a pooled sentence vector: `[B, D]` to `[B, P]`.
    pub fn project_text(&self, pooled: &Tensor) -> Result<Tensor> {
        self.text_projection.forward(pooled)
    }

    /// `get_text_features`: projected, unnormalised text embeddings `[B, P]`.
    pub fn get_text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.project_text(&self.text_pooled_output(input_ids, attention_mask)?)
    }

    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> crate::Result<VisionTextDualEncoderConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        VisionTextDualEncoderConfig::from_file(&path)
    }

    const TOWERS: &str = r#""vision_config": {"model_type": "clip_vision_model", "patch_size": 16},
        "text_config": {"model_type": "bert", "hidden_size": 384}"#;

    #[test]
    fn text_pooling_defaults_to_hfs_pooler_and_reads_mean_and_cls() {
        let c = parse(&format!("{{{TOWERS}}}")).unwrap();
        assert_eq!(c.text_pooling, BertTextPooling::Pooler);
        assert_eq!((c.projection_dim, c.vision_config.patch_size), (512, 16));
        assert_eq!(c.text_config.hidden_size, 384);
        assert!((c.logit_scale_init_value - 2.6592).abs() < 1e-9);
        let c = parse(&format!(r#"{{{TOWERS}, "text_pooling": "mean"}}"#)).unwrap();
        assert_eq!(c.text_pooling, BertTextPooling::Mean);
        let c = parse(&format!(r#"{{{TOWERS}, "text_pooling": "cls"}}"#)).unwrap();
        assert_eq!(c.text_pooling, BertTextPooling::Pooler);
        let err = parse(&format!(r#"{{{TOWERS}, "text_pooling": "max"}}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json") && err.contains("max"), "{err}");
    }

    #[test]
    fn other_towers_are_refused_with_the_section_named() {
        let err = parse(
            r#"{"vision_config": {"model_type": "vit"}, "text_config": {"model_type": "bert"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("vision_config.model_type is `vit`") && err.contains("config.json"),
            "{err}"
        );
        let err = parse(
            r#"{"vision_config": {"model_type": "clip_vision_model"},
                "text_config": {"model_type": "roberta"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("text_config.model_type is `roberta`"), "{err}");
        let err = parse(r#"{"vision_config": {"model_type": "clip_vision_model"}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("text_config is missing"), "{err}");
    }
}
