//! The pre-norm transformer encoder (ViT / CLIP / SigLIP form):
//! `x = x + Attn(LN₁(x)); x = x + MLP(LN₂(x))`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::{Activation, AttentionConfig, AttentionMask, LayerNorm, Mlp, MultiHeadAttention};

/// Widths and names shared by every layer of one encoder.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    pub attention: AttentionConfig,
    pub intermediate_size: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    pub num_layers: usize,
}

impl EncoderConfig {
    /// CLIP/SigLIP naming (`{q,k,v,out}_proj` with biases) and widths.
    pub fn clip_style(
        hidden: usize,
        heads: usize,
        intermediate: usize,
        activation: Activation,
        layer_norm_eps: f64,
        num_layers: usize,
    ) -> Self {
        Self {
            attention: AttentionConfig::clip_style(hidden, heads),
            intermediate_size: intermediate,
            activation,
            layer_norm_eps,
            num_layers,
        }
    }
}

/// One pre-norm block with HF's names: `layer_norm1`, `self_attn`, `layer_norm2`, `mlp`.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: MultiHeadAttention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    pub fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.attention.embed_dim;
        Ok(Self {
            layer_norm1: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: MultiHeadAttention::new(&cfg.attention, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(d, cfg.intermediate_size, cfg.activation, vb.pp("mlp"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        x + h
    }
}

/// A stack of [`EncoderLayer`]s under `layers.{i}`.
#[derive(Debug, Clone)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    pub fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.num_layers)
            .map(|i| EncoderLayer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    pub fn forward(&self, x: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        self.layers
            .iter()
            .try_fold(x.clone(), |h, layer| layer.forward(&h, mask))
    }
}
