//! Normalisation layers written from differentiable primitives.
//!
//! Candle's fused `ops::layer_norm` / `ops::rms_norm` (and `candle_nn::LayerNorm::forward` on
//! contiguous input) have no backward, so training through them silently drops gradients
//! (CANDLE_NOTES.md). These layers compute the statistics in at least f32 (half inputs are upcast), as
//! PyTorch does for half-precision inputs, and cast back at the end.

use candle_core::{Module, Result, Tensor, D};

use super::upcast;
use candle_nn::VarBuilder;

/// `torch.nn.LayerNorm` over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let bias = Some(vb.get(dim, "bias")?);
        Ok(Self { weight, bias, eps })
    }

    /// A LayerNorm without the additive bias (as in some LLM checkpoints).
    pub fn new_no_bias(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        Ok(Self {
            weight,
            bias: None,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(upcast(dtype))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        // Parameters kept in f32 under mixed precision (autocast) are applied in f32, then
        // the result is cast to the input's dtype; otherwise in the input's dtype, as HF.
        let mixed = self.weight.dtype() != dtype;
        let normed = if mixed {
            normed.to_dtype(self.weight.dtype())?
        } else {
            normed.to_dtype(dtype)?
        };
        let normed = normed.broadcast_mul(&self.weight)?;
        let out = match &self.bias {
            Some(b) => normed.broadcast_add(b)?,
            None => normed,
        };
        out.to_dtype(dtype)
    }
}

/// Root-mean-square norm (Zhang & Sennrich 2019) as HF's `LlamaRMSNorm`:
/// `weight * (x / sqrt(mean(x²) + eps))`, with the statistics in at least f32 and the cast back to the
/// input dtype made *before* the weight multiply.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(upcast(dtype))?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        if self.weight.dtype() != dtype {
            // An f32 weight under mixed precision: applied in f32, then cast back.
            return normed
                .to_dtype(self.weight.dtype())?
                .broadcast_mul(&self.weight)?
                .to_dtype(dtype);
        }
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}
