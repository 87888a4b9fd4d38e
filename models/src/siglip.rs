//! SigLIP (Zhai et al. 2023): CLIP's two towers trained with a pairwise sigmoid loss. The image
//! tower has no class token and pools with a multihead-attention probe; the text tower is
//! bidirectional and pools its last token; logits add a learned bias to the scaled cosine.
//!
//! Module paths are HF `SiglipModel`'s tensor names.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::layers::{
    Activation, AttentionMask, AttentionPoolingHead, ClassToken, Encoder, EncoderConfig, LayerNorm,
    LearnedPositionEmbedding, Linear, PositionTable, VitEmbeddings, VitEmbeddingsConfig,
};

/// HF `SiglipTextConfig`, with its defaults for missing fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SiglipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Width of `text_model.head`; `None` means `hidden_size`.
    pub projection_size: Option<usize>,
}

impl Default for SiglipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 64,
            hidden_act: Activation::GeluTanh,
            layer_norm_eps: 1e-6,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
            projection_size: None,
        }
    }
}

/// HF `SiglipVisionConfig`, with its defaults for missing fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SiglipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// Whether the tower ends in the attention-pooling `head`.
    pub vision_use_head: bool,
}

impl Default for SiglipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 16,
            hidden_act: Activation::GeluTanh,
            layer_norm_eps: 1e-6,
            vision_use_head: true,
        }
    }
}

/// HF `SiglipConfig`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SiglipConfig {
    pub text_config: SiglipTextConfig,
    pub vision_config: SiglipVisionConfig,
}

/// `SiglipTextTransformer`: embeddings, bidirectional encoder, `final_layer_norm`, the last
/// token's state through `head`.
#[derive(Debug, Clone)]
pub struct SiglipTextTransformer {
    token_embedding: candle_nn::Embedding,
    position_embedding: LearnedPositionEmbedding,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    head: Linear,
}

impl SiglipTextTransformer {
    pub fn new(cfg: &SiglipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let enc = EncoderConfig::clip_style(
            d,
            cfg.num_attention_heads,
            cfg.intermediate_size,
            cfg.hidden_act,
            cfg.layer_norm_eps,
            cfg.num_hidden_layers,
        );
        Ok(Self {
            token_embedding: candle_nn::Embedding::new(
                emb.pp("token_embedding")
                    .get((cfg.vocab_size, d), "weight")?,
                d,
            ),
            position_embedding: LearnedPositionEmbedding::new(
                cfg.max_position_embeddings,
                d,
                emb.pp("position_embedding"),
            )?,
            encoder: Encoder::new(&enc, vb.pp("encoder"))?,
            final_layer_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            head: Linear::new(d, cfg.projection_size.unwrap_or(d), true, vb.pp("head"))?,
        })
    }

    /// Final hidden states `[B, L, D]`. SigLIP is trained on text padded to the maximum length
    /// without a mask; an `attention_mask` is honoured when given, as in HF.
    pub fn last_hidden_state(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, l) = input_ids.dims2()?;
        let x = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(l, 0)?)?;
        let x = self
            .encoder
            .forward(&x, &AttentionMask::padding(attention_mask))?;
        self.final_layer_norm.forward(&x)
    }

    /// `head(last_hidden_state[:, -1])`, `[B, P]`.
    pub fn pooled_output(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden = self.last_hidden_state(input_ids, attention_mask)?;
        let l = hidden.dim(1)?;
        self.head.forward(&hidden.narrow(1, l - 1, 1)?.squeeze(1)?)
    }
}

/// `SiglipVisionTransformer`: patch + position embeddings, encoder, `post_layernorm`, and the
/// attention-pooling `head`.
#[derive(Debug, Clone)]
pub struct SiglipVisionTransformer {
    embeddings: VitEmbeddings,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    head: Option<AttentionPoolingHead>,
}

impl SiglipVisionTransformer {
    pub fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = VitEmbeddingsConfig {
            num_channels: cfg.num_channels,
            image_size: cfg.image_size,
            patch_size: cfg.patch_size,
            hidden_size: d,
            patch_bias: true,
            class_token: ClassToken::None,
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
        let head = if cfg.vision_use_head {
            Some(AttentionPoolingHead::new(
                d,
                cfg.num_attention_heads,
                cfg.intermediate_size,
                cfg.hidden_act,
                cfg.layer_norm_eps,
                vb.pp("head"),
            )?)
        } else {
            None
        };
        Ok(Self {
            embeddings: VitEmbeddings::new(&emb, vb.pp("embeddings"))?,
            encoder: Encoder::new(&enc, vb.pp("encoder"))?,
            post_layernorm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
            head,
        })
    }

    /// `post_layernorm(encoder(embeddings))`, `[B, N, D]`.
    pub fn last_hidden_state(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.embeddings.forward(pixel_values)?;
        self.post_layernorm
            .forward(&self.encoder.forward(&x, &AttentionMask::none())?)
    }

    /// The attention-pooled image state `[B, D]`.
    pub fn pooled_output(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let hidden = self.last_hidden_state(pixel_values)?;
        match &self.head {
            Some(head) => head.forward(&hidden),
            None => candle_core::bail!(
                "this SigLIP vision tower has vision_use_head = false, so it has no pooled output"
            ),
        }
    }
}

/// HF `SiglipModel`.
#[derive(Debug, Clone)]
pub struct SiglipModel {
    pub text_model: SiglipTextTransformer,
    pub vision_model: SiglipVisionTransformer,
    logit_scale: Tensor,
    logit_bias: Tensor,
    pub config: SiglipConfig,
}

impl SiglipModel {
    pub fn new(cfg: &SiglipConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            text_model: SiglipTextTransformer::new(&cfg.text_config, vb.pp("text_model"))?,
            vision_model: SiglipVisionTransformer::new(&cfg.vision_config, vb.pp("vision_model"))?,
            logit_scale: vb.get(1, "logit_scale")?,
            logit_bias: vb.get(1, "logit_bias")?,
            config: cfg.clone(),
        })
    }

    /// `get_image_features`: pooled image embeddings `[B, D]` (unnormalised).
    pub fn get_image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision_model.pooled_output(pixel_values)
    }

    /// `get_text_features`: pooled text embeddings `[B, P]` (unnormalised).
    pub fn get_text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.text_model.pooled_output(input_ids, attention_mask)
    }

    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    pub fn logit_bias(&self) -> &Tensor {
        &self.logit_bias
    }
}
