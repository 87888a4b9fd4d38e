//! The activations HF configs name in `hidden_act`, each with a backward.
//!
//! On the CPU in f32, quick GELU, tanh GELU and SiLU run as one parallel, vectorised pass with
//! their own backward ([`ActivationOp`]); Candle's unary ops call libm's scalar `tanh`, `exp` and
//! `powf` on one thread, a tenth of a SigLIP training step. Elsewhere they are composed from
//! Candle ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use serde::{Deserialize, Serialize};

use super::fast_math::{par_map, par_zip, sigmoid_poly, tanh_poly, zip_into};

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

impl Activation {
    /// `act(gate) · up` for `gate_up` `[…, 2n]`, whose first `n` features are the gate's and
    /// the last `n` the up projection's: the gated feed-forward product (Shazeer 2020) of a
    /// stacked projection. On the CPU in f32 outside a training graph it is one pass, with the
    /// bits of [`Self::forward`] followed by the product.
    pub fn gated(&self, gate_up: &Tensor) -> Result<Tensor> {
        let n = gate_up.dim(candle_core::D::Minus1)? / 2;
        let fused = matches!(self, Self::QuickGelu | Self::GeluTanh | Self::Silu);
        if fused
            && gate_up.device().is_cpu()
            && gate_up.dtype() == DType::F32
            && !gate_up.track_op()
        {
            return gate_up.contiguous()?.apply_op1_no_bwd(&GatedOp(*self));
        }
        let gate = gate_up.narrow(candle_core::D::Minus1, 0, n)?;
        let up = gate_up.narrow(candle_core::D::Minus1, n, n)?;
        self.forward(&gate)? * up
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

/// `$body` with `$f` bound to `$fn` (`value` or `derivative`) of the fused activation `$act`,
/// fixed: one small closure per activation, which the vectorised loops of
/// [`super::fast_math`] inline. A closure that matches on the activation per element is
/// called per element instead, in scalar code.
macro_rules! with_fixed {
    ($act:expr, $fn:ident, |$f:ident| $body:expr) => {
        match $act {
            Activation::QuickGelu => {
                let $f = |x: f32| $fn(Activation::QuickGelu, x);
                $body
            }
            Activation::GeluTanh => {
                let $f = |x: f32| $fn(Activation::GeluTanh, x);
                $body
            }
            _ => {
                let $f = |x: f32| $fn(Activation::Silu, x);
                $body
            }
        }
    };
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
        let x = f32_slice(s, l)?;
        let out = with_fixed!(act, value, |f| par_map(x, f));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(grad.apply_op2_no_bwd(x, &ActivationGrad(self.0))?))
    }
}

/// `act(gate) · up` over rows `[gate | up]` of a contiguous f32 CPU tensor.
struct GatedOp(Activation);

impl CustomOp1 for GatedOp {
    fn name(&self) -> &'static str {
        "gated-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let act = self.0;
        let x = f32_slice(s, l)?;
        let mut dims = l.dims().to_vec();
        let Some(last) = dims.last_mut().filter(|d| **d % 2 == 0) else {
            candle_core::bail!(
                "gated activation: the last dimension of {:?} is odd",
                l.dims()
            )
        };
        *last /= 2;
        let n = *last;
        let mut out = vec![0f32; x.len() / 2];
        // Rows in tasks of at least 16k outputs: a decoding step's one row stays on the
        // calling thread.
        if let Some(rows_per_task) = 16_384usize.checked_div(n) {
            let rows_per_task = rows_per_task.max(1);
            out.par_chunks_mut(rows_per_task * n)
                .zip(x.par_chunks(rows_per_task * 2 * n))
                .for_each(|(o, x)| {
                    for (o, row) in o.chunks_exact_mut(n).zip(x.chunks_exact(2 * n)) {
                        let (gate, up) = row.split_at(n);
                        with_fixed!(act, value, |f| zip_into(gate, up, o, &|g, u| f(g) * u));
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
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
        let (g, x) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let out = with_fixed!(act, derivative, |f| par_zip(g, x, |g, x| g * f(x)));
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

    /// The gated product of a stacked `[gate | up]` has the bits of the activation followed by
    /// the product, over one row and many (threaded) rows, for every activation; a tensor in
    /// a training graph takes the composed ops and keeps its gradient.
    #[test]
    fn the_gated_product_has_the_bits_of_the_activation_times_up() {
        let dev = Device::Cpu;
        for rows in [1usize, 3, 40] {
            let x = Tensor::randn(0f32, 2.0, (rows, 2 * 1000), &dev).unwrap();
            let (gate, up) = (
                x.narrow(1, 0, 1000).unwrap(),
                x.narrow(1, 1000, 1000).unwrap(),
            );
            for act in [
                Activation::QuickGelu,
                Activation::Gelu,
                Activation::GeluTanh,
                Activation::Silu,
                Activation::Relu,
            ] {
                let want = (act.forward(&gate).unwrap() * &up).unwrap();
                let got = act.gated(&x).unwrap();
                assert_eq!(got.dims(), &[rows, 1000]);
                let (want, got) = (
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                let same = want
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{act:?}, {rows} rows");
            }
        }
        let x = Var::new(&[[1f32, -2.0, 0.5, 3.0]], &dev).unwrap();
        let y = Activation::Silu.gated(&x).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(&x).unwrap().to_vec2::<f32>().unwrap();
        // d/d up = silu(gate); d/d gate = up · silu'(gate).
        let silu = |v: f32| v / (1.0 + (-v).exp());
        assert!((g[0][2] - silu(1.0)).abs() < 1e-5 && (g[0][3] - silu(-2.0)).abs() < 1e-5);
        assert!(g[0][0] != 0.0 && g[0][1] != 0.0);
    }
}
