//! CLIP (Radford et al. 2021): a ViT image tower and a causal transformer text tower, each
//! projected into a shared embedding space where matching pairs have high cosine similarity.
//!
//! Module paths are HF `CLIPModel`'s tensor names: `text_model.*`, `vision_model.*`,
//! `visual_projection`, `text_projection`, `logit_scale`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::layers::{
    Activation, AttentionMask, ClassToken, Encoder, EncoderConfig, LayerNorm,
    LearnedPositionEmbedding, Linear, PositionTable, VitEmbeddings, VitEmbeddingsConfig,
};

/// HF `CLIPTextConfig`, with its defaults for missing fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
        }
    }
}

/// HF `CLIPVisionConfig`, with its defaults for missing fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// HF `CLIPConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            text_config: ClipTextConfig::default(),
            vision_config: ClipVisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
        }
    }
}

/// How the text tower picks the token whose state represents the sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPooling {
    /// The highest token id, which is `<|endoftext|>` in the original vocabulary. HF uses this
    /// when the config's `eos_token_id` is the legacy value 2.
    ArgmaxId,
    /// The first occurrence of this eos id.
    FirstEos(u32),
}

/// `CLIPTextTransformer`: token + position embeddings, causal encoder, final LayerNorm, pooling.
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    token_embedding: candle_nn::Embedding,
    position_embedding: LearnedPositionEmbedding,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    pooling: TextPooling,
}

impl ClipTextTransformer {
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let d = cfg.hidden_size;
        let token_embedding = candle_nn::Embedding::new(
            emb.pp("token_embedding")
                .get((cfg.vocab_size, d), "weight")?,
            d,
        );
        let position_embedding = LearnedPositionEmbedding::new(
            cfg.max_position_embeddings,
            d,
            emb.pp("position_embedding"),
        )?;
        let enc = EncoderConfig::clip_style(
            d,
            cfg.num_attention_heads,
            cfg.intermediate_size,
            cfg.hidden_act,
            cfg.layer_norm_eps,
            cfg.num_hidden_layers,
        );
        let pooling = match cfg.eos_token_id {
            Some(2) | None => TextPooling::ArgmaxId,
            Some(id) => TextPooling::FirstEos(id),
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            encoder: Encoder::new(&enc, vb.pp("encoder"))?,
            final_layer_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            pooling,
        })
    }

    /// Final hidden states `[B, L, D]` for `input_ids` `[B, L]`, with an optional HF
    /// `attention_mask` `[B, L]` (1 keep, 0 pad) on top of the causal mask.
    pub fn last_hidden_state(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, l) = input_ids.dims2()?;
        let tokens = self.token_embedding.forward(input_ids)?;
        let x = tokens.broadcast_add(&self.position_embedding.forward(l, 0)?)?;
        let mask = AttentionMask::causal(0).with_padding(attention_mask);
        let x = self.encoder.forward(&x, &mask)?;
        self.final_layer_norm.forward(&x)
    }

    /// The pooled sentence state `[B, D]` (before `text_projection`).
    pub fn pooled_output(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden = self.last_hidden_state(input_ids, attention_mask)?;
        let index = self.pool_index(input_ids)?;
        gather_rows(&hidden, &index)
    }

    /// Per row, the position pooled by HF's rule (first eos, or argmax id).
    fn pool_index(&self, input_ids: &Tensor) -> Result<Tensor> {
        let ids = input_ids.to_dtype(DType::I64)?;
        match self.pooling {
            TextPooling::ArgmaxId => ids.argmax(D::Minus1),
            TextPooling::FirstEos(eos) => {
                // argmax over (ids == eos) returns the first maximal position, like torch's.
                // A row without eos gives 0, as HF's `.int().argmax(-1)` does.
                ids.eq(eos as i64)?.to_dtype(DType::U32)?.argmax(D::Minus1)
            }
        }
    }
}

/// `hidden[b, index[b], :]` for each row `b`.
pub(crate) fn gather_rows(hidden: &Tensor, index: &Tensor) -> Result<Tensor> {
    let (b, _, d) = hidden.dims3()?;
    let index = index
        .to_dtype(DType::U32)?
        .reshape((b, 1, 1))?
        .broadcast_as((b, 1, d))?
        .contiguous()?;
    hidden.gather(&index, 1)?.squeeze(1)
}

/// `CLIPVisionTransformer`: patch + class + position embeddings, `pre_layrnorm` (HF's spelling),
/// encoder, and `post_layernorm` on the class token.
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    embeddings: VitEmbeddings,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
}

impl ClipVisionTransformer {
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = VitEmbeddingsConfig {
            num_channels: cfg.num_channels,
            image_size: cfg.image_size,
            patch_size: cfg.patch_size,
            hidden_size: d,
            patch_bias: false,
            class_token: ClassToken::Vector,
            position_table: PositionTable::Embedding,
        };
        let enc = EncoderConfig::clip_style(
            d,
            cfg.num_attention_heads,
            cfg.intermediate_size,
            cfg.hidden_act,
            cfg.layer_norm_eps,
            cfg.num_hidden_layers,
        );
        Ok(Self {
            embeddings: VitEmbeddings::new(&emb, vb.pp("embeddings"))?,
            pre_layrnorm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            encoder: Encoder::new(&enc, vb.pp("encoder"))?,
            post_layernorm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
        })
    }

    /// Encoder output `[B, 1 + N, D]` (before `post_layernorm`).
    pub fn last_hidden_state(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.embeddings.forward(pixel_values)?;
        let x = self.pre_layrnorm.forward(&x)?;
        self.encoder.forward(&x, &AttentionMask::none())
    }

    /// `post_layernorm` of the class token, `[B, D]`.
    pub fn pooled_output(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let hidden = self.last_hidden_state(pixel_values)?;
        self.post_layernorm
            .forward(&hidden.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

/// HF `CLIPModel`.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub text_model: ClipTextTransformer,
    pub vision_model: ClipVisionTransformer,
    visual_projection: Linear,
    text_projection: Linear,
    /// Scalar log temperature; logits are scaled by `exp(logit_scale)`.
    logit_scale: Tensor,
    pub config: ClipConfig,
}

impl ClipModel {
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let (t, v) = (&cfg.text_config, &cfg.vision_config);
        Ok(Self {
            text_model: ClipTextTransformer::new(t, vb.pp("text_model"))?,
            vision_model: ClipVisionTransformer::new(v, vb.pp("vision_model"))?,
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

    /// `get_text_features`: projected, unnormalised text embeddings `[B, P]`.
    pub fn get_text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.text_projection
            .forward(&self.text_model.pooled_output(input_ids, attention_mask)?)
    }

    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }
}
