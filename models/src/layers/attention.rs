//! Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1) over the three weight
//! layouts found in HF checkpoints, the masks it takes, and its two backends.
//!
//! - **naive**: `softmax(Q Kᵀ / √d + mask) V` from matmuls and `candle_nn::ops::softmax` (which
//!   has a backward), the softmax in f32 as HF's eager attention takes it; the mask is the
//!   additive tensor HF builds.
//! - **fused**: [`fused_attention`] on the CPU, tiled with an online softmax, which never builds
//!   the `Lq × Lk` scores and has its own backward. On Metal, inference takes candle's `sdpa`.
//!
//! [`set_attention_backend`] chooses for the whole process (`zoo --attention`); the default,
//! `auto`, takes the fused kernel where `zoo bench attention` measured it faster.
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::decode_attention::{decode_attention, decode_attention_fits, DECODE_MAX_QUERIES};
use super::fused_attention::{fused_attention, KeyVisibility, TreeMask, MAX_HEAD_DIM};
use super::{Linear, QuantizedWeights};

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
    /// Width of the queries' input and of the output.
    pub embed_dim: usize,
    /// Width of the keys/values input; differs from `embed_dim` in cross-attention.
    pub kv_dim: usize,
    pub num_heads: usize,
    /// Key/value heads; fewer than `num_heads` is grouped-query attention (Ainslie et al.
    /// 2023), each key/value head serving `num_heads / num_kv_heads` query heads.
    pub num_kv_heads: usize,
    /// Width of one head; `embed_dim / num_heads` except where a config sets `head_dim`.
    pub head_dim: usize,
    /// Biases of the q, k and v projections.
    pub bias: bool,
    /// Bias of the output projection.
    pub out_bias: bool,
    pub layout: QkvLayout,
    /// The output projection's module name (`out_proj`, `projection`, `o_proj`), or `None` when
    /// the checkpoint keeps it elsewhere (BERT's `attention.output.dense`).
    pub out_proj: Option<&'static str>,
}

impl AttentionConfig {
    /// Multi-head attention with as many key/value heads as query heads, heads of
    /// `embed_dim / num_heads`, and biases everywhere or nowhere.
    pub fn multi_head(
        embed_dim: usize,
        kv_dim: usize,
        num_heads: usize,
        bias: bool,
        layout: QkvLayout,
        out_proj: Option<&'static str>,
    ) -> Self {
        Self {
            embed_dim,
            kv_dim,
            num_heads,
            num_kv_heads: num_heads,
            head_dim: embed_dim / num_heads.max(1),
            bias,
            out_bias: bias,
            layout,
            out_proj,
        }
    }

    /// Self-attention with CLIP/SigLIP naming: `{q,k,v,out}_proj` with biases.
    pub fn clip_style(embed_dim: usize, num_heads: usize) -> Self {
        Self::multi_head(
            embed_dim,
            embed_dim,
            num_heads,
            true,
            QkvLayout::QKV_PROJ,
            Some("out_proj"),
        )
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}

/// Multi-head attention: `softmax(Q Kᵀ / √d + mask) V`, then the output projection.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    projections: Projections,
    out: Option<Linear>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl MultiHeadAttention {
    pub fn new(cfg: &AttentionConfig, vb: VarBuilder) -> Result<Self> {
        Self::load(cfg, vb, &QuantizedWeights::default())
    }

    /// [`Self::new`] with the separate projections taken from `quantized` where it has them.
    pub fn load(
        cfg: &AttentionConfig,
        vb: VarBuilder,
        quantized: &QuantizedWeights,
    ) -> Result<Self> {
        let (e, kv, h, hkv, d) = (
            cfg.embed_dim,
            cfg.kv_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        if h > 0 && e % h != 0 && d == e / h {
            candle_core::bail!(
                "{}: hidden size {e} is not divisible by num_attention_heads {h}",
                vb.prefix()
            );
        }
        if h == 0 || d == 0 || hkv == 0 || h % hkv != 0 {
            candle_core::bail!(
                "{}: {h} attention heads of width {d} cannot be served by {hkv} key/value heads \
                 (hidden size {e})",
                vb.prefix()
            );
        }
        let (q_out, kv_out) = (h * d, hkv * d);
        let (q, k, v) = match cfg.layout {
            QkvLayout::Separate { q, k, v } => (
                quantized.linear(e, q_out, cfg.bias, vb.pp(q))?,
                quantized.linear(kv, kv_out, cfg.bias, vb.pp(k))?,
                quantized.linear(kv, kv_out, cfg.bias, vb.pp(v))?,
            ),
            QkvLayout::Fused(name) => {
                let vb = vb.pp(name);
                let w = vb.get((3 * q_out, e), "weight")?;
                let b = if cfg.bias {
                    Some(vb.get(3 * q_out, "bias")?)
                } else {
                    None
                };
                split_fused(&w, b.as_ref(), q_out)?
            }
            QkvLayout::InProj => {
                let w = vb.get((3 * q_out, e), "in_proj_weight")?;
                let b = if cfg.bias {
                    Some(vb.get(3 * q_out, "in_proj_bias")?)
                } else {
                    None
                };
                split_fused(&w, b.as_ref(), q_out)?
            }
        };
        let out = match cfg.out_proj {
            Some(name) => Some(quantized.linear(q_out, e, cfg.out_bias, vb.pp(name))?),
            None => None,
        };
        Ok(Self {
            projections: Projections::Separate { q, k, v },
            out,
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
            scale: (d as f64).powf(-0.5),
        })
    }

    /// Self-attention over `x` `[B, L, D]`.
    pub fn forward(&self, x: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        let (q, k, v) = self.self_attention_qkv(x)?;
        self.attend_heads(&q, &k, &v, mask)
    }

    /// Attention of `queries` `[B, Lq, D]` over `keys_values` `[B, Lk, Dkv]`.
    pub fn forward_cross(
        &self,
        queries: &Tensor,
        keys_values: &Tensor,
        mask: &AttentionMask,
    ) -> Result<Tensor> {
        let (k, v) = self.key_values(keys_values)?;
        self.attend(queries, &k, &v, mask)
    }

    /// The projected keys and values of `keys_values` `[B, Lk, Dkv]`, each split into heads
    /// `[B, Hkv, Lk, d]`. A decoder caches these: its past tokens' for self-attention, the
    /// encoder's once for cross-attention.
    pub fn key_values(&self, keys_values: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.projections {
            Projections::Separate { k, v, .. } => Ok((
                split_heads(&k.forward(keys_values)?, self.num_kv_heads)?,
                split_heads(&v.forward(keys_values)?, self.num_kv_heads)?,
            )),
            Projections::Fused(_) => {
                let (_, k, v) = self.self_attention_qkv(keys_values)?;
                Ok((k, v))
            }
        }
    }

    /// The projected queries of `x` `[B, L, D]`, split into heads `[B, H, L, d]`.
    pub fn queries(&self, x: &Tensor) -> Result<Tensor> {
        match &self.projections {
            Projections::Separate { q, .. } => split_heads(&q.forward(x)?, self.num_heads),
            Projections::Fused(_) => Ok(self.self_attention_qkv(x)?.0),
        }
    }

    /// The queries `[B, H, L, d]`, keys and values `[B, Hkv, L, d]` of self-attention over `x`
    /// `[B, L, D]`: [`Self::queries`] and [`Self::key_values`] of `x`, in one matmul and one
    /// head split when the projections are stacked ([`Self::stack_projections`]).
    pub fn self_attention_qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let qkv = match &self.projections {
            Projections::Separate { .. } => {
                let (k, v) = self.key_values(x)?;
                return Ok((self.queries(x)?, k, v));
            }
            Projections::Fused(qkv) => qkv.forward(x)?,
        };
        let (h, hkv) = (self.num_heads, self.num_kv_heads);
        let heads = split_heads(&qkv, h + 2 * hkv)?;
        // Each part is contiguous for a batch of one (the decoding case), a copy otherwise.
        Ok((
            heads.narrow(1, 0, h)?.contiguous()?,
            heads.narrow(1, h, hkv)?.contiguous()?,
            heads.narrow(1, h + hkv, hkv)?.contiguous()?,
        ))
    }

    /// The same attention with its query, key and value projections stacked into one
    /// ([`Linear::concat`]), for self-attention at inference: [`Self::self_attention_qkv`]
    /// reads the input once and quantizes it once for quantized weights, and a step of
    /// decoding runs one parallel matmul instead of three. Every output keeps its bits.
    /// Unchanged where the projections cannot be stacked (training variables, or keys and
    /// values projected from inputs of another width).
    pub fn stack_projections(self) -> Result<Self> {
        let Projections::Separate { q, k, v } = &self.projections else {
            return Ok(self);
        };
        match Linear::concat(&[q, k, v])? {
            Some(qkv) => Ok(Self {
                projections: Projections::Fused(qkv),
                ..self
            }),
            None => Ok(self),
        }
    }

    /// Attention of `queries` `[B, Lq, D]` over keys and values already projected by
    /// [`Self::key_values`] (possibly concatenated along the sequence axis with cached ones).
    pub fn attend(
        &self,
        queries: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttentionMask,
    ) -> Result<Tensor> {
        self.attend_heads(&self.queries(queries)?, k, v, mask)
    }

    /// Attention of projected query heads `q` `[B, H, Lq, d]` (e.g. after a rotary embedding)
    /// over key/value heads `[B, Hkv, Lk, d]`, each shared by `H / Hkv` query heads; then the
    /// heads are merged and projected out.
    pub fn attend_heads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttentionMask,
    ) -> Result<Tensor> {
        let ctx = attention(q, k, v, self.scale, mask)?;
        let (b, _, lq, _) = ctx.dims4()?;
        let ctx = ctx
            .transpose(1, 2)?
            .reshape((b, lq, self.num_heads * self.head_dim))?;
        match &self.out {
            Some(out) => out.forward(&ctx),
            None => Ok(ctx),
        }
    }
}

/// The query, key and value projections.
#[derive(Debug, Clone)]
enum Projections {
    /// Apart, as checkpoints and training keep them.
    Separate { q: Linear, k: Linear, v: Linear },
    /// Stacked by [`MultiHeadAttention::stack_projections`]: the output holds the `H` query
    /// heads, then the `Hkv` key heads and the `Hkv` value heads.
    Fused(Linear),
}

/// `[B, L, H*d]` → `[B, H, L, d]`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, hd) = x.dims3()?;
    x.reshape((b, l, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[B, Hkv, L, d]` → `[B, Hkv·n, L, d]`, each head repeated `n` times in place (HF's
/// `repeat_kv`).
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, h, l, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h, n, l, d))?
        .reshape((b, h * n, l, d))
}

/// Splits a stacked `[3E, E]` projection (and its bias) into q, k and v.
fn split_fused(w: &Tensor, b: Option<&Tensor>, e: usize) -> Result<(Linear, Linear, Linear)> {
    let part = |i: usize| -> Result<Linear> {
        let bias = b.map(|b| b.narrow(0, i * e, e)).transpose()?;
        Linear::from_weights(w.narrow(0, i * e, e)?, bias)
    };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// Which keys each query sees, kept structured so the fused backend never builds an
/// `Lq × Lk` tensor; [`Self::additive`] builds the additive mask HF uses, for the naive one.
#[derive(Debug, Clone, Default)]
pub struct AttentionMask {
    causal_offset: Option<usize>,
    keep: Option<Tensor>,
    tree: Option<Arc<TreeMask>>,
    additive: Option<Tensor>,
}

impl AttentionMask {
    /// Whether every query sees every key.
    pub fn is_none(&self) -> bool {
        self.causal_offset.is_none()
            && self.keep.is_none()
            && self.tree.is_none()
            && self.additive.is_none()
    }

    /// Every query sees every key.
    pub fn none() -> Self {
        Self::default()
    }

    /// Query `i`, at absolute position `offset + i` (after `offset` cached tokens), sees keys
    /// `0..=offset + i`.
    pub fn causal(offset: usize) -> Self {
        Self {
            causal_offset: Some(offset),
            ..Self::default()
        }
    }

    /// Also hides the padding of an HF `attention_mask` `[B, Lk]` (1 = keep, 0 = pad).
    pub fn with_padding(mut self, attention_mask: Option<&Tensor>) -> Self {
        self.keep = attention_mask.cloned();
        self
    }

    /// Key padding only (see [`Self::with_padding`]).
    pub fn padding(attention_mask: Option<&Tensor>) -> Self {
        Self::none().with_padding(attention_mask)
    }

    /// The queries are the nodes of a draft tree (see [`TreeMask`]).
    pub fn tree(tree: TreeMask) -> Self {
        Self {
            tree: Some(Arc::new(tree)),
            ..Self::default()
        }
    }

    /// An arbitrary additive mask broadcasting to `[B, H, Lq, Lk]`; always taken by the naive
    /// backend.
    pub fn additive(mask: Tensor) -> Self {
        Self {
            additive: Some(mask),
            ..Self::default()
        }
    }

    /// The additive mask for `lq` queries over `lk` keys in `dtype`, merged as HF merges its
    /// causal and padding masks; `None` when nothing is hidden.
    pub fn to_additive(
        &self,
        lq: usize,
        lk: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Option<Tensor>> {
        let causal = self
            .causal_offset
            .map(|offset| causal_mask(lq, lk, offset, dtype, dev))
            .transpose()?;
        let padding = self
            .keep
            .as_ref()
            .map(|m| padding_mask(m, dtype))
            .transpose()?;
        let tree = self
            .tree
            .as_ref()
            .map(|tree| tree_mask(tree, lq, lk, dtype, dev))
            .transpose()?;
        let structured = combine_masks(combine_masks(causal, padding)?, tree)?;
        combine_masks(structured, self.additive.clone())
    }

    /// The structured form the fused and decode kernels take, or `None` for an additive mask.
    pub fn key_visibility(&self) -> Result<Option<KeyVisibility>> {
        if self.additive.is_some() {
            return Ok(None);
        }
        let keep = match &self.keep {
            Some(m) => Some(
                m.to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|x| x != 0.0)
                    .collect(),
            ),
            None => None,
        };
        Ok(Some(KeyVisibility {
            causal_offset: self.causal_offset,
            keep,
            tree: self.tree.clone(),
        }))
    }
}

/// How attention is computed (`zoo --attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionBackend {
    /// The fused kernel for shapes where it was measured faster ([`fused_is_faster`]), else naive.
    Auto,
    Naive,
    /// The fused kernel wherever it applies (CPU, f32/f16, head width ≤ 256, no additive mask;
    /// Metal inference takes `sdpa`); naive elsewhere.
    Fused,
}

impl std::str::FromStr for AttentionBackend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "naive" => Ok(Self::Naive),
            "fused" => Ok(Self::Fused),
            other => Err(format!(
                "unknown attention backend {other:?}: use auto, naive or fused"
            )),
        }
    }
}

static BACKEND: AtomicU8 = AtomicU8::new(0);

/// Chooses the attention backend for every model in this process.
pub fn set_attention_backend(backend: AttentionBackend) {
    let code = match backend {
        AttentionBackend::Auto => 0,
        AttentionBackend::Naive => 1,
        AttentionBackend::Fused => 2,
    };
    BACKEND.store(code, Ordering::Relaxed);
}

/// The backend chosen by [`set_attention_backend`] (`Auto` until then).
pub fn attention_backend() -> AttentionBackend {
    match BACKEND.load(Ordering::Relaxed) {
        1 => AttentionBackend::Naive,
        2 => AttentionBackend::Fused,
        _ => AttentionBackend::Auto,
    }
}

/// Where `auto` takes the fused kernel on the CPU: from `Lq · Lk` ≥ this many scores per head.
/// `zoo bench attention` (8 heads of 64, 2 cores) measured the fused kernel faster from 64
/// tokens on, forward and backward, causal or not, and about even below (BENCHMARKS.md).
pub const AUTO_FUSED_MIN_SCORES: usize = 64 * 64;

/// Whether `auto` takes the fused kernel for `lq` queries over `lk` keys.
pub fn fused_is_faster(lq: usize, lk: usize) -> bool {
    lq * lk >= AUTO_FUSED_MIN_SCORES
}

/// `softmax(q kᵀ · scale + mask) v` for q `[B, H, Lq, d]` over k and v `[B, Hkv, Lk, d]`, each
/// key/value head shared by `H / Hkv` query heads, by the backend [`set_attention_backend`]
/// chose.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask,
) -> Result<Tensor> {
    let (lq, lk, d) = (q.dim(2)?, k.dim(2)?, q.dim(3)?);
    let backend = attention_backend();
    // Decoding and verifying drafts: row-exact (see `decode_attention`), in place on the cache.
    if backend != AttentionBackend::Naive
        && (lq <= DECODE_MAX_QUERIES || mask.tree.is_some())
        && decode_attention_fits(q, k, v)
    {
        if let Some(visibility) = mask.key_visibility()? {
            return decode_attention(q, k, v, scale, &visibility);
        }
    }
    let fused = match backend {
        AttentionBackend::Naive => false,
        AttentionBackend::Fused => true,
        AttentionBackend::Auto => fused_is_faster(lq, lk),
    };
    let kernel_fits = matches!(q.dtype(), DType::F32 | DType::F16) && d <= MAX_HEAD_DIM;
    if fused && kernel_fits {
        if q.device().is_cpu() {
            if let Some(visibility) = mask.key_visibility()? {
                return fused_attention(q, k, v, scale, visibility);
            }
        } else if q.device().is_metal() && !(q.track_op() || k.track_op() || v.track_op()) {
            // candle's Metal sdpa has no backward: inference only.
            let additive = mask
                .to_additive(lq, lk, q.dtype(), q.device())?
                .map(|m| m.broadcast_as((q.dim(0)?, q.dim(1)?, lq, lk))?.contiguous())
                .transpose()?;
            return candle_nn::ops::sdpa(q, k, v, additive.as_ref(), false, scale as f32, 1.0);
        }
    }
    naive_attention(q, k, v, scale, mask)
}

/// The naive backend of [`attention`]: keys and values repeated per query head, the additive
/// mask built, then [`scaled_dot_product_attention`].
pub fn naive_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask,
) -> Result<Tensor> {
    let groups = q.dim(1)? / k.dim(1)?.max(1);
    let inference = !(q.track_op() || k.track_op() || v.track_op());
    if inference && groups > 1 {
        // Each key/value head serves its `groups` query heads as rows of one product, so the
        // cache is read in place instead of repeated per query head; a mask shared by the
        // heads is repeated per group of rows.
        let (b, h, lq, d) = q.dims4()?;
        let (hkv, lk) = (k.dim(1)?, k.dim(2)?);
        let additive = mask.to_additive(lq, lk, q.dtype(), q.device())?;
        let shared = additive
            .as_ref()
            .is_none_or(|m| m.rank() == 4 && m.dim(1).ok() == Some(1));
        if shared {
            let q = q.contiguous()?.reshape((b, hkv, groups * lq, d))?;
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let scores = match additive {
                Some(m) => {
                    scores.broadcast_add(&m.repeat((1, 1, groups, 1))?.to_dtype(scores.dtype())?)?
                }
                None => scores,
            };
            let probs =
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(super::upcast(scores.dtype()))?)?;
            let ctx = probs.to_dtype(v.dtype())?.matmul(v)?;
            return ctx.reshape((b, h, lq, d));
        }
    }
    let (k, v) = (repeat_kv(k, groups)?, repeat_kv(v, groups)?);
    let additive = mask.to_additive(q.dim(2)?, k.dim(2)?, q.dtype(), q.device())?;
    scaled_dot_product_attention(q, &k, &v, scale, additive.as_ref())
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

/// Additive mask `[1, 1, Lq, Lk]` of a draft tree's `Lq` nodes after its cached keys.
fn tree_mask(tree: &TreeMask, lq: usize, lk: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    if tree.len() != lq || tree.cached() + lq != lk {
        candle_core::bail!(
            "attention: a draft tree of {} nodes after {} cached keys for {lq} queries over {lk} keys",
            tree.len(),
            tree.cached()
        );
    }
    let min = mask_min(dtype) as f32;
    let data: Vec<f32> = (0..lq)
        .flat_map(|i| (0..lk).map(move |j| if tree.sees(i, j) { 0.0 } else { min }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Grouped-query self-attention with its projections stacked gives the queries, keys,
    /// values and outputs of the separate projections, bit for bit.
    #[test]
    fn stacked_projections_give_the_separate_projections_bits() {
        let dev = Device::Cpu;
        let (e, h, hkv, d) = (64usize, 4usize, 2usize, 16usize);
        for bias in [false, true] {
            let mut tensors = HashMap::new();
            for (name, out, inp) in [
                ("q_proj", h * d, e),
                ("k_proj", hkv * d, e),
                ("v_proj", hkv * d, e),
                ("o_proj", e, h * d),
            ] {
                let w = Tensor::randn(0f32, 0.3, (out, inp), &dev).unwrap();
                tensors.insert(format!("{name}.weight"), w);
                tensors.insert(
                    format!("{name}.bias"),
                    Tensor::randn(0f32, 0.3, out, &dev).unwrap(),
                );
            }
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
            let cfg = AttentionConfig {
                embed_dim: e,
                kv_dim: e,
                num_heads: h,
                num_kv_heads: hkv,
                head_dim: d,
                bias,
                out_bias: bias,
                layout: QkvLayout::QKV_PROJ,
                out_proj: Some("o_proj"),
            };
            let separate = MultiHeadAttention::load(&cfg, vb, &Default::default()).unwrap();
            let stacked = separate.clone().stack_projections().unwrap();
            assert!(matches!(stacked.projections, Projections::Fused(_)));
            let bits = |t: &Tensor| -> Vec<u32> {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            for l in [1usize, 3, 7] {
                let x = Tensor::randn(0f32, 1.0, (1, l, e), &dev).unwrap();
                let a = separate.self_attention_qkv(&x).unwrap();
                let b = stacked.self_attention_qkv(&x).unwrap();
                assert_eq!(a.0.dims(), &[1, h, l, d]);
                assert_eq!(b.1.dims(), &[1, hkv, l, d]);
                assert_eq!(bits(&a.0), bits(&b.0), "queries, {l} rows");
                assert_eq!(bits(&a.1), bits(&b.1), "keys, {l} rows");
                assert_eq!(bits(&a.2), bits(&b.2), "values, {l} rows");
                let mask = AttentionMask::causal(0);
                let (ya, yb) = (
                    separate.forward(&x, &mask).unwrap(),
                    stacked.forward(&x, &mask).unwrap(),
                );
                assert_eq!(bits(&ya), bits(&yb), "outputs, {l} rows");
            }
        }
    }
}
