//! The activations HF configs name in `hidden_act`, each with a backward.
//!
//! On the CPU in f32, quick GELU, tanh GELU and SiLU run as one parallel, vectorised pass with
//! their own backward ([`ActivationOp`]); Candle's unary ops call libm's scalar `tanh`, `exp` and
//! `powf` on one thread, a tenth of a SigLIP training step. Elsewhere they are composed from
//! Candle ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use serde::{Deserialize, Serialize};

use super::fast_math::{par_map, par_zip, sigmoid_poly, tanh_poly};

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
        let fused = matches!(self, Self::QuickGelu | Self::GeluTanh | Self::Silu);
        if fused && x.device().is_cpu() && x.dtype() == DType::F32 {
            return x.contiguous()?.apply_op1(ActivationOp(*self));
        }
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

/// `√(2/π)` and the cubic coefficient of the tanh GELU.
const GELU_C: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

/// The activation and its derivative at `x`.
#[inline(always)]
fn value(act: Activation, x: f32) -> f32 {
    match act {
        Activation::QuickGelu => x * sigmoid_poly(1.702 * x),
        Activation::GeluTanh => 0.5 * x * (1.0 + tanh_poly(GELU_C * (x + GELU_A * x * x * x))),
        _ => x * sigmoid_poly(x),
    }
}

#[inline(always)]
fn derivative(act: Activation, x: f32) -> f32 {
    match act {
        Activation::QuickGelu => {
            let s = sigmoid_poly(1.702 * x);
            s + 1.702 * x * s * (1.0 - s)
        }
        Activation::GeluTanh => {
            let t = tanh_poly(GELU_C * (x + GELU_A * x * x * x));
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)
        }
        _ => {
            let s = sigmoid_poly(x);
            s * (1.0 + x * (1.0 - s))
        }
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(x), Some((a, b))) => Ok(&x[a..b]),
        _ => candle_core::bail!("activation: a contiguous f32 tensor was expected"),
    }
}

/// Quick GELU, tanh GELU or SiLU over a contiguous f32 CPU tensor.
struct ActivationOp(Activation);

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let act = self.0;
        let out = par_map(f32_slice(s, l)?, |x| value(act, x));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(grad.apply_op2_no_bwd(x, &ActivationGrad(self.0))?))
    }
}

/// `grad · f'(x)`.
struct ActivationGrad(Activation);

impl CustomOp2 for ActivationGrad {
    fn name(&self) -> &'static str {
        "activation-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let act = self.0;
        let out = par_zip(f32_slice(s1, l1)?, f32_slice(s2, l2)?, |g, x| {
            g * derivative(act, x)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused f32 pass against the composed ops in f64: values and gradients.
    #[test]
    fn fused_cpu_activations_match_the_composed_ops() {
        let data: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) * 6e-4).collect();
        let x = Var::new(data.as_slice(), &Device::Cpu).unwrap();
        let x64 = Var::new(
            data.iter()
                .map(|&v| f64::from(v))
                .collect::<Vec<_>>()
                .as_slice(),
            &Device::Cpu,
        )
        .unwrap();
        let w = Tensor::arange(0f32, 40_000.0, &Device::Cpu)
            .unwrap()
            .affine(1e-4, -2.0)
            .unwrap();
        for act in [
            Activation::QuickGelu,
            Activation::GeluTanh,
            Activation::Silu,
        ] {
            let y = act.forward(&x).unwrap();
            let y64 = act.forward(&x64).unwrap();
            let diff = (y.to_dtype(DType::F64).unwrap() - &y64)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(diff < 2e-6, "{act:?}: value {diff:e}");
            let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g64 = (y64 * w.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let diff = (g.get(&x).unwrap().to_dtype(DType::F64).unwrap() - g64.get(&x64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(diff < 2e-5, "{act:?}: gradient {diff:e}");
        }
    }
}
