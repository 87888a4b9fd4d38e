//! Mixed precision (`--precision`, open_clip's flag): f32 master weights and optimizer state, a
//! forward and backward in f16 or bf16, and dynamic loss scaling for f16.
//!
//! Each step the task builds its model from the f32 variables cast to the compute dtype
//! ([`Precision::var_builder`]); the casts are ops in the graph, so the backward arrives at
//! the f32 variables as f32 gradients. The modes:
//!
//! - `fp32`: no casts.
//! - `fp16`, `bf16`: every parameter cast, the whole network in half precision (its norms and
//!   softmaxes still take their statistics in f32, as every layer here does).
//! - `amp_fp16`, `amp_bf16`: as PyTorch's autocast keeps them, normalisation parameters stay
//!   f32 and norms apply them in f32 before casting back; the rest runs in half precision.
//!
//! Losses are taken in f32 in every mode. f16 has 5 exponent bits, so small gradients underflow:
//! with f16 the loss is multiplied by a scale before the backward and the gradients divided by
//! it after ([`GradScaler`], PyTorch's `GradScaler` rules).
//!
//! Candle's CPU matmul has no bf16 kernel, so the bf16 modes are refused on the CPU
//! ([`Precision::check_device`]).

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `--precision`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Bf16,
    AmpFp16,
    AmpBf16,
}

pub const PRECISIONS: &str = "fp32, fp16, bf16, amp_fp16, amp_bf16";

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "fp32" => Self::Fp32,
            "fp16" => Self::Fp16,
            "bf16" => Self::Bf16,
            "amp_fp16" | "amp" => Self::AmpFp16,
            "amp_bf16" => Self::AmpBf16,
            other => return Err(format!("unknown precision {other:?}: use {PRECISIONS}")),
        })
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
            Self::AmpFp16 => "amp_fp16",
            Self::AmpBf16 => "amp_bf16",
        })
    }
}

impl Precision {
    /// The dtype the network computes in.
    pub fn compute_dtype(self) -> DType {
        match self {
            Self::Fp32 => DType::F32,
            Self::Fp16 | Self::AmpFp16 => DType::F16,
            Self::Bf16 | Self::AmpBf16 => DType::BF16,
        }
    }

    /// Whether the loss is scaled (f16's narrow exponent range).
    pub fn scales_loss(self) -> bool {
        self.compute_dtype() == DType::F16
    }

    /// Whether parameter `name` stays f32 in the compute model: normalisation weights and
    /// biases under autocast.
    pub fn keeps_f32(self, name: &str) -> bool {
        match self {
            Self::AmpFp16 | Self::AmpBf16 => is_norm_parameter(name),
            _ => self == Self::Fp32,
        }
    }

    /// Refuses a mode the device cannot compute in.
    pub fn check_device(self, device: &Device) -> Result<()> {
        if device.is_cpu() && self.compute_dtype() == DType::BF16 {
            return Err(Error::Input(format!(
                "--precision {self}: Candle has no bf16 matmul on the CPU; on the CPU use \
                 --precision amp_fp16 (or fp16, or fp32), and bf16 on CUDA or Metal"
            )));
        }
        Ok(())
    }

    /// The model a step computes with: `model` itself in fp32, otherwise one built by `build`
    /// from [`Self::var_builder`] (the half-precision copy of the variables).
    pub fn compute_model<'a, M: Clone>(
        self,
        model: &'a M,
        varmap: &VarMap,
        device: &Device,
        build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
    ) -> Result<Cow<'a, M>> {
        if self == Self::Fp32 {
            return Ok(Cow::Borrowed(model));
        }
        Ok(Cow::Owned(build(self.var_builder(varmap, device)?)?))
    }

    /// A builder over `varmap`'s f32 variables that hands each one out cast to the compute
    /// dtype (or kept f32, see [`Self::keeps_f32`]). The casts are recorded, so gradients
    /// reach the variables.
    pub fn var_builder(self, varmap: &VarMap, device: &Device) -> Result<VarBuilder<'static>> {
        let vars = varmap
            .data()
            .lock()
            .map_err(|_| Error::Input("poisoned varmap".into()))?
            .clone();
        let backend = CastVars {
            vars,
            precision: self,
        };
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            self.compute_dtype(),
            device.clone(),
        ))
    }
}

/// A normalisation layer's parameter: its module is named `*norm*` (`layer_norm1`,
/// `post_layernorm`, CLIP's `pre_layrnorm`, BERT's `LayerNorm`, Llama's `input_layernorm`).
fn is_norm_parameter(name: &str) -> bool {
    name.rsplit('.')
        .nth(1)
        .is_some_and(|module| module.to_lowercase().contains("norm"))
}

/// The variables of a [`VarMap`], cast on the way out.
struct CastVars {
    vars: HashMap<String, Var>,
    precision: Precision,
}

impl CastVars {
    fn cast(&self, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
        let var = self.vars.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let t = var.as_tensor();
        if self.precision.keeps_f32(name) || !t.dtype().is_float() {
            Ok(t.clone())
        } else {
            t.to_dtype(dtype)
        }
    }
}

impl SimpleBackend for CastVars {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.cast(name, dtype)?;
        if t.shape() != &s {
            candle_core::bail!("{name}: expected shape {s:?}, found {:?}", t.shape());
        }
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.cast(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }
}

/// Dynamic loss scaling as PyTorch's `GradScaler`: start at 2¹⁶; a step whose gradients hold
/// an inf or NaN is skipped and the scale halved; after 2000 good steps in a row it doubles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    pub scale: f64,
    /// Good steps since the last change.
    pub good_steps: u64,
    pub growth_interval: u64,
    /// Steps skipped for overflow so far.
    pub skipped: u64,
}

impl Default for GradScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
            growth_interval: 2000,
            skipped: 0,
        }
    }
}

impl GradScaler {
    /// Divides `grads` (of a loss multiplied by [`Self::scale`]) by the scale; `false` when
    /// any is not finite, i.e. the step must be skipped.
    pub fn unscale(&self, grads: &mut HashMap<String, Tensor>) -> Result<bool> {
        let inv = 1.0 / self.scale;
        let mut finite = true;
        for g in grads.values_mut() {
            *g = (&*g * inv)?;
            let sum = g.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            finite &= sum.is_finite();
        }
        Ok(finite)
    }

    /// Updates the scale after a step that was (`finite`) or was not taken.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
            self.skipped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_open_clip_names_and_refuses_others() {
        assert_eq!("amp_fp16".parse::<Precision>().unwrap(), Precision::AmpFp16);
        assert_eq!("amp".parse::<Precision>().unwrap(), Precision::AmpFp16);
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        let err = "fp8".parse::<Precision>().unwrap_err();
        assert!(
            err.contains("fp32, fp16, bf16, amp_fp16, amp_bf16"),
            "{err}"
        );
        assert_eq!(Precision::AmpBf16.to_string(), "amp_bf16");
    }

    #[test]
    fn autocast_keeps_only_norm_parameters_in_f32() {
        let amp = Precision::AmpFp16;
        for name in [
            "vision_model.pre_layrnorm.weight",
            "vision_model.encoder.layers.0.layer_norm1.bias",
            "text_model.final_layer_norm.weight",
            "bert.encoder.layer.0.attention.output.LayerNorm.weight",
            "model.layers.3.input_layernorm.weight",
            "model.norm.weight",
        ] {
            assert!(amp.keeps_f32(name), "{name}");
            assert!(!Precision::Fp16.keeps_f32(name), "{name}");
        }
        for name in [
            "vision_model.encoder.layers.0.self_attn.q_proj.weight",
            "text_model.embeddings.token_embedding.weight",
            "logit_scale",
        ] {
            assert!(!amp.keeps_f32(name), "{name}");
        }
    }

    #[test]
    fn bf16_is_refused_on_the_cpu_with_what_to_use_instead() {
        let err = Precision::AmpBf16.check_device(&Device::Cpu).unwrap_err();
        assert!(
            err.to_string().contains("use --precision amp_fp16"),
            "{err}"
        );
        Precision::AmpFp16.check_device(&Device::Cpu).unwrap();
    }

    #[test]
    fn overflow_skips_and_halves_good_steps_grow_the_scale() {
        let mut scaler = GradScaler {
            growth_interval: 3,
            ..GradScaler::default()
        };
        let g = |v: f32| Tensor::new(&[v, 1.0], &Device::Cpu).unwrap();
        let mut grads = HashMap::from([("a".to_string(), g(65536.0 * 2.0))]);
        assert!(scaler.unscale(&mut grads).unwrap());
        assert_eq!(grads["a"].to_vec1::<f32>().unwrap()[0], 2.0);
        let mut bad = HashMap::from([("a".to_string(), g(f32::INFINITY))]);
        assert!(!scaler.unscale(&mut bad).unwrap());
        scaler.update(false);
        assert_eq!((scaler.scale, scaler.skipped), (32768.0, 1));
        for _ in 0..3 {
            scaler.update(true);
        }
        assert_eq!((scaler.scale, scaler.good_steps), (65536.0, 0));
    }
}
