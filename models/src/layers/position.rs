//! Positional encodings: learned absolute, fixed sinusoidal (Vaswani et al. 2017, §3.5), and
//! rotary (RoPE, Su et al. 2021) in HF's `rotate_half` convention.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// A learned table `position_embedding.weight` `[max_positions, D]`, looked up by position id.
#[derive(Debug, Clone)]
pub struct LearnedPositionEmbedding {
    table: candle_nn::Embedding,
}

impl LearnedPositionEmbedding {
    pub fn new(max_positions: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        let table = vb.get((max_positions, dim), "weight")?;
        Ok(Self {
            table: candle_nn::Embedding::new(table, dim),
        })
    }

    pub fn max_positions(&self) -> usize {
        self.table.embeddings().dim(0).unwrap_or(0)
    }

    /// Embeddings `[L, D]` for positions `offset..offset + len`.
    pub fn forward(&self, len: usize, offset: usize) -> Result<Tensor> {
        let max = self.max_positions();
        if offset + len > max {
            candle_core::bail!(
                "sequence of {} tokens exceeds max_position_embeddings {max}",
                offset + len
            );
        }
        let ids = Tensor::arange(
            offset as u32,
            (offset + len) as u32,
            self.table.embeddings().device(),
        )?;
        self.table.forward(&ids)
    }
}

/// The fixed table `PE(p, 2i) = sin(p / 10000^{2i/d})`, `PE(p, 2i+1) = cos(p / 10000^{2i/d})`,
/// shape `[n, d]`.
pub fn sinusoidal_table(n: usize, d: usize, dev: &Device) -> Result<Tensor> {
    let mut data = vec![0f32; n * d];
    for p in 0..n {
        for i in 0..d {
            let freq = 10000f64.powf(-((2 * (i / 2)) as f64) / d as f64);
            let angle = p as f64 * freq;
            data[p * d + i] = if i % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
        }
    }
    Tensor::from_vec(data, (n, d), dev)
}

/// Rotary position embedding with precomputed `cos`/`sin` tables.
///
/// Matches HF's `apply_rotary_pos_emb`: the head dimension is split into two halves
/// (`rotate_half`), not interleaved pairs. Everything is built from differentiable ops
/// (narrow, neg, cat, mul), so gradients reach q and k; `candle_nn::rotary_emb::rope` has no
/// backward.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[max_positions, head_dim]`.
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// The default RoPE: `inv_freq_i = base^{-2i/d}`.
    pub fn new(head_dim: usize, max_positions: usize, base: f64, dev: &Device) -> Result<Self> {
        Self::from_inv_freq(&default_inv_freq(head_dim, base), max_positions, 1.0, dev)
    }

    /// Builds the tables from given inverse frequencies (scaled variants compute their own)
    /// and a multiplier applied to cos and sin (YaRN's attention scaling; 1.0 otherwise).
    pub fn from_inv_freq(
        inv_freq: &[f32],
        max_positions: usize,
        attention_scaling: f64,
        dev: &Device,
    ) -> Result<Self> {
        let half = inv_freq.len();
        let inv = Tensor::from_slice(inv_freq, (1, half), dev)?;
        let pos = Tensor::arange(0u32, max_positions as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = pos.matmul(&inv)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(Self {
            cos: (emb.cos()? * attention_scaling)?,
            sin: (emb.sin()? * attention_scaling)?,
        })
    }

    /// `cos`, `sin` `[L, head_dim]` for the given position ids `[L]`.
    pub fn cos_sin(&self, position_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(position_ids, 0)?,
            self.sin.index_select(position_ids, 0)?,
        ))
    }

    /// Rotates `x` `[B, H, L, d]` for positions `position_ids` `[L]`:
    /// `x·cos + rotate_half(x)·sin`.
    pub fn apply(&self, x: &Tensor, position_ids: &Tensor) -> Result<Tensor> {
        let (cos, sin) = self.cos_sin(position_ids)?;
        apply_rotary(x, &cos, &sin)
    }
}

/// `inv_freq_i = 1 / base^{2i/d}` for `i < d/2`, computed as HF does (f32 of the f64 ratio).
pub fn default_inv_freq(head_dim: usize, base: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (1.0 / base.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect()
}

/// The RoPE variants of HF's `rope_scaling` (`ROPE_INIT_FUNCTIONS` in `modeling_rope_utils`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation (Chen et al. 2023): every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: past `max_position_embeddings`, the base grows with the sequence length.
    Dynamic { factor: f64 },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN (Peng et al. 2023): per-frequency blend of interpolation and extrapolation, and a
    /// scale on cos/sin.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        attention_factor: Option<f64>,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

/// What a model's RoPE frequencies depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// The rotated width of a head (`head_dim · partial_rotary_factor`).
    pub dim: usize,
    pub base: f64,
    pub max_position_embeddings: usize,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The inverse frequencies `[dim / 2]` and the factor cos and sin are multiplied by, for a
    /// sequence of `seq_len` tokens (only dynamic NTK depends on it), as HF computes them.
    pub fn frequencies(&self, seq_len: usize) -> (Vec<f32>, f64) {
        let dim = self.dim;
        // HF: `base ** (arange(0, dim, 2).float() / dim)` in f32.
        let pos_freqs = |base: f64| -> Vec<f32> {
            (0..dim / 2)
                .map(|i| (base as f32).powf((2 * i) as f32 / dim as f32))
                .collect()
        };
        let inverse = |freqs: Vec<f32>| -> Vec<f32> { freqs.iter().map(|f| 1.0 / f).collect() };
        match &self.scaling {
            RopeScaling::Default => (inverse(pos_freqs(self.base)), 1.0),
            RopeScaling::Linear { factor } => {
                let factor = *factor as f32;
                let f = inverse(pos_freqs(self.base));
                (f.iter().map(|x| x / factor).collect(), 1.0)
            }
            RopeScaling::Dynamic { factor } => {
                let max = self.max_position_embeddings as f64;
                let seq = (seq_len as f64).max(max);
                let base = self.base
                    * ((factor * seq / max) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
                (inverse(pos_freqs(base)), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old = *original_max_position_embeddings as f32;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                let f = inverse(pos_freqs(self.base))
                    .into_iter()
                    .map(|inv| {
                        let wavelen = 2.0 * std::f32::consts::PI / inv;
                        let scaled = if wavelen > low_wavelen {
                            inv / factor
                        } else {
                            inv
                        };
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect();
                (f, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                    (Some(m), Some(all)) if *m != 0.0 && *all != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *all)
                    }
                    _ => get_mscale(*factor, 1.0),
                });
                let max = *original_max_position_embeddings as f64;
                let correction = |rotations: f64| {
                    (dim as f64 * (max / (rotations * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * self.base.ln())
                };
                let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
                if low == high {
                    high += 0.001;
                }
                let pos = pos_freqs(self.base);
                let factor = *factor as f32;
                let f = pos
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let ramp =
                            ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        let (inter, extra) = (1.0 / (factor * p), 1.0 / p);
                        inter * (1.0 - extrapolation) + extra * extrapolation
                    })
                    .collect();
                (f, attention)
            }
        }
    }
}

/// `cos`, `sin` `[L, 2·len(inv_freq)]` for positions `[L]`, times `scaling`, as HF's rotary
/// embeddings compute them (in f32).
pub fn rotary_cos_sin(
    inv_freq: &[f32],
    positions: &[u32],
    scaling: f64,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let inv = Tensor::from_slice(inv_freq, (1, half), dev)?;
    let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
    let pos = Tensor::from_vec(pos, (positions.len(), 1), dev)?;
    let freqs = pos.matmul(&inv)?;
    let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
    Ok(((emb.cos()? * scaling)?, (emb.sin()? * scaling)?))
}

/// `x·cos + rotate_half(x)·sin` for `x` `[B, H, L, d]` and `cos`, `sin` `[L, d]` (HF's
/// `apply_rotary_pos_emb`).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?
}

/// `[x₁, x₂] → [-x₂, x₁]` over the last dimension.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoidal_table_follows_vaswani() {
        let t = sinusoidal_table(4, 6, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(t[0], vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        let p = 3f64;
        for i in 0..3 {
            let angle = p / 10000f64.powf(2.0 * i as f64 / 6.0);
            assert!((t[3][2 * i] as f64 - angle.sin()).abs() < 1e-6);
            assert!((t[3][2 * i + 1] as f64 - angle.cos()).abs() < 1e-6);
        }
    }

    #[test]
    fn learned_positions_reject_sequences_past_the_table() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let pos = LearnedPositionEmbedding::new(8, 4, vb).unwrap();
        assert_eq!(pos.forward(3, 5).unwrap().dims(), &[3, 4]);
        let err = pos.forward(4, 5).unwrap_err().to_string();
        assert!(err.contains("max_position_embeddings 8"), "{err}");
    }
}
