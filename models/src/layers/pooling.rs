//! Multihead attention pooling ("MAP", Zhai et al. 2022; used by SigLIP's vision tower):
//! a learned probe attends over all tokens, then a residual MLP refines the pooled vector.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::{
    Activation, AttentionConfig, AttentionMask, LayerNorm, Mlp, MultiHeadAttention, QkvLayout,
};

/// HF's `SiglipMultiheadAttentionPoolingHead`: `probe`, `attention` (a
/// `torch.nn.MultiheadAttention`), `layernorm`, `mlp`.
#[derive(Debug, Clone)]
pub struct AttentionPoolingHead {
    probe: Tensor,
    attention: MultiHeadAttention,
    layernorm: LayerNorm,
    mlp: Mlp,
}

impl AttentionPoolingHead {
    pub fn new(
        hidden: usize,
        num_heads: usize,
        intermediate: usize,
        act: Activation,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let attn_cfg = AttentionConfig::multi_head(
            hidden,
            hidden,
            num_heads,
            true,
            QkvLayout::InProj,
            Some("out_proj"),
        );
        Ok(Self {
            probe: vb.get((1, 1, hidden), "probe")?,
            attention: MultiHeadAttention::new(&attn_cfg, vb.pp("attention"))?,
            layernorm: LayerNorm::new(hidden, eps, vb.pp("layernorm"))?,
            mlp: Mlp::new(hidden, intermediate, act, vb.pp("mlp"))?,
        })
    }

    /// `[B, L, D]` → `[B, D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        let probe = self.probe.broadcast_as((b, 1, d))?.to_dtype(x.dtype())?;
        let pooled = self
            .attention
            .forward_cross(&probe, x, &AttentionMask::none())?;
        let pooled = (&pooled + self.mlp.forward(&self.layernorm.forward(&pooled)?)?)?;
        pooled.squeeze(1)
    }
}
