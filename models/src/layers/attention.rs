//! Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1) over the three weight
//! layouts found in HF checkpoints, plus the additive masks it takes.
//!
//! The softmax is `candle_nn::ops::softmax`, which has a backward, and is taken in f32 as HF's
//! eager attention does (`softmax(..., dtype=torch.float32)`).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::Linear;

/// How the query/key/value projections are stored in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// Three modules, e.g. CLIP's `q_proj`, `k_proj`, `v_proj` or BERT's `query`, `key`, `value`.
    Separate {
        q: &'static str,
        k: &'static str,
        v: &'static str,
    },
    /// One module whose output stacks q, k and v, e.g. BLIP's vision `qkv`.
    Fused(&'static str),
    /// `torch.nn.MultiheadAttention`: `in_proj_weight` `[3D, D]` and `in_proj_bias` `[3D]`.
    InProj,
}

impl QkvLayout {
    /// CLIP, SigLIP and Llama naming.
    pub const QKV_PROJ: Self = Self::Separate {
        q: "q_proj",
        k: "k_proj",
        v: "v_proj",
    };
}

/// Shape and naming of one attention module.
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    /// Width of the queries and of the output.
    pub embed_dim: usize,
    /// Width of the keys/values input; differs from `embed_dim` in cross-attention.
    pub kv_dim: usize,
    pub num_heads: usize,
    pub bias: bool,
    pub layout: QkvLayout,
    /// The output projection's module name (`out_proj`, `projection`), or `None` when the
    /// checkpoint keeps it elsewhere (BERT's `attention.output.dense`).
    pub out_proj: Option<&'static str>,
}

impl AttentionConfig {
    /// Self-attention with CLIP/SigLIP naming: `{q,k,v,out}_proj` with biases.
    pub fn clip_style(embed_dim: usize, num_heads: usize) -> Self {
        Self {
            embed_dim,
            kv_dim: embed_dim,
            num_heads,
            bias: true,
            layout: QkvLayout::QKV_PROJ,
            out_proj: Some("out_proj"),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
}

/// Multi-head attention: `softmax(Q Kᵀ / √d + mask) V`, then the output projection.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Option<Linear>,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl MultiHeadAttention {
    pub fn new(cfg: &AttentionConfig, vb: VarBuilder) -> Result<Self> {
        let (e, kv) = (cfg.embed_dim, cfg.kv_dim);
        if cfg.num_heads == 0 || e % cfg.num_heads != 0 {
            candle_core::bail!(
                "{}: hidden size {e} is not divisible by num_attention_heads {}",
                vb.prefix(),
                cfg.num_heads
            );
        }
        let (q, k, v) = match cfg.layout {
            QkvLayout::Separate { q, k, v } => (
                Linear::new(e, e, cfg.bias, vb.pp(q))?,
                Linear::new(kv, e, cfg.bias, vb.pp(k))?,
                Linear::new(kv, e, cfg.bias, vb.pp(v))?,
            ),
            QkvLayout::Fused(name) => {
                let vb = vb.pp(name);
                let w = vb.get((3 * e, e), "weight")?;
                let b = if cfg.bias {
                    Some(vb.get(3 * e, "bias")?)
                } else {
                    None
                };
                split_fused(&w, b.as_ref(), e)?
            }
            QkvLayout::InProj => {
                let w = vb.get((3 * e, e), "in_proj_weight")?;
                let b = if cfg.bias {
                    Some(vb.get(3 * e, "in_proj_bias")?)
                } else {
                    None
                };
                split_fused(&w, b.as_ref(), e)?
            }
        };
        let out = match cfg.out_proj {
            Some(name) => Some(Linear::new(e, e, cfg.bias, vb.pp(name))?),
            None => None,
        };
        let head_dim = cfg.head_dim();
        Ok(Self {
            q,
            k,
            v,
            out,
            num_heads: cfg.num_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// Self-attention over `x` `[B, L, D]`. `mask` is additive and broadcasts to `[B, H, L, L]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_cross(x, x, mask)
    }

    /// Attention of `queries` `[B, Lq, D]` over `keys_values` `[B, Lk, Dkv]`.
    pub fn forward_cross(
        &self,
        queries: &Tensor,
        keys_values: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (k, v) = self.key_values(keys_values)?;
        self.attend(queries, &k, &v, mask)
    }

    /// The projected keys and values of `keys_values` `[B, Lk, Dkv]`, each split into heads
    /// `[B, H, Lk, d]`. A decoder caches these: its past tokens' for self-attention, the
    /// encoder's once for cross-attention.
    pub fn key_values(&self, keys_values: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = self.split_heads(&self.k.forward(keys_values)?)?;
        let v = self.split_heads(&self.v.forward(keys_values)?)?;
        Ok((k, v))
    }

    /// Attention of `queries` `[B, Lq, D]` over keys and values already projected by
    /// [`Self::key_values`] (possibly concatenated along the sequence axis with cached ones).
    pub fn attend(
        &self,
        queries: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = self.split_heads(&self.q.forward(queries)?)?;
        let ctx = scaled_dot_product_attention(&q, k, v, self.scale, mask)?;
        let (b, _, lq, _) = ctx.dims4()?;
        let ctx = ctx
            .transpose(1, 2)?
            .reshape((b, lq, self.num_heads * self.head_dim))?;
        match &self.out {
            Some(out) => out.forward(&ctx),
            None => Ok(ctx),
        }
    }

    /// `[B, L, H*d]` → `[B, H, L, d]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }
}

/// Splits a stacked `[3E, E]` projection (and its bias) into q, k and v.
fn split_fused(w: &Tensor, b: Option<&Tensor>, e: usize) -> Result<(Linear, Linear, Linear)> {
    let part = |i: usize| -> Result<Linear> {
        let bias = b.map(|b| b.narrow(0, i * e, e)).transpose()?;
        Ok(Linear::from_weights(w.narrow(0, i * e, e)?, bias))
    };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// `softmax(q kᵀ · scale + mask) v` on `[B, H, L, d]` tensors; the softmax runs in f32.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let probs =
        candle_nn::ops::softmax(&scores.to_dtype(super::upcast(scores.dtype()))?, D::Minus1)?;
    probs.to_dtype(v.dtype())?.matmul(v)
}

/// The most negative finite value of `dtype`, which HF uses for masked positions
/// (`torch.finfo(dtype).min`), so a fully masked row yields a uniform softmax, never NaN.
pub fn mask_min(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => f64::from(half::f16::MIN),
        DType::BF16 => f64::from(half::bf16::MIN),
        DType::F64 => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

/// Additive causal mask `[1, 1, Lq, Lk]`: query `i` (at absolute position `offset + i`) sees keys
/// `0..=offset + i`.
pub fn causal_mask(
    lq: usize,
    lk: usize,
    offset: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let min = mask_min(dtype) as f32;
    let data: Vec<f32> = (0..lq)
        .flat_map(|i| (0..lk).map(move |j| if j > offset + i { min } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (1, 1, lq, lk), dev)?.to_dtype(dtype)
}

/// Additive padding mask `[B, 1, 1, L]` from an HF `attention_mask` `[B, L]` (1 = keep, 0 = pad).
pub fn padding_mask(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, l) = attention_mask.dims2()?;
    let keep = attention_mask.to_dtype(DType::F32)?;
    let mask = ((keep - 1.0)? * -(mask_min(DType::F32)))?;
    mask.reshape((b, 1, 1, l))?.to_dtype(dtype)
}

/// Adds two optional additive masks, clamping at the dtype's minimum as HF does when it merges
/// its causal and padding masks.
pub fn combine_masks(a: Option<Tensor>, b: Option<Tensor>) -> Result<Option<Tensor>> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let min = mask_min(DType::F32);
            let sum = a
                .to_dtype(DType::F32)?
                .broadcast_add(&b.to_dtype(DType::F32)?)?
                .clamp(min, 0.0)?;
            Ok(Some(sum.to_dtype(a.dtype())?))
        }
        (a, None) => Ok(a),
        (None, b) => Ok(b),
    }
}
