//! The activations HF configs name in `hidden_act`, each with a backward in Candle.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// An activation function, deserialised from HF's `hidden_act` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, the approximation OpenAI's CLIP was trained with.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact GELU, `x * Φ(x)` with the error function (`torch.nn.GELU()`).
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU. HF's `gelu_new` and `gelu_pytorch_tanh` are the same
    /// function; the second is merely PyTorch's fused kernel for it.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    /// `x * sigmoid(x)`; HF also calls it `swish`.
    #[serde(rename = "silu", alias = "swish")]
    Silu,
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Silu => x.silu(),
            Self::Relu => x.relu(),
        }
    }
}

impl candle_core::Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Activation::forward(self, x)
    }
}
