//! The Llama architecture (Touvron et al. 2023) in HF's `LlamaForCausalLM` layout: token
//! embeddings, pre-norm decoder layers of grouped-query self-attention with rotary positions and
//! a SwiGLU feed-forward block, both around RMSNorm, a final RMSNorm, and the LM head (tied to
//! the embeddings or not). Qwen2's layout is the same with biases on q, k and v.
//!
//! [`LlamaForCausalLM::forward`] returns the hidden states and logits of every position, not
//! only the last: speculative decoding verifies many positions in one pass. Positions and an
//! extra attention mask can be given explicitly ([`LlamaForCausalLM::forward_at`]), which tree
//! verification needs; [`KvCache`] can be rolled back and compacted to the accepted tokens.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::LlamaConfig;
use crate::error::CandleContext;
use crate::generation::StepModel;
use crate::hub::ModelRepo;
use crate::layers::{
    apply_rotary, rotary_cos_sin, Activation, AttentionConfig, AttentionMask, KvBuffer, Linear,
    MultiHeadAttention, QkvLayout, QuantizedWeights, RmsNorm, RopeConfig, RopeScaling, TreeMask,
};
use crate::weights::SafetensorsWeights;

/// The SwiGLU feed-forward block (Shazeer 2020): `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate_up: GateUp,
    down_proj: Linear,
    act: Activation,
}

/// `gate_proj` and `up_proj`, apart as in the checkpoint, or stacked into one projection at
/// inference ([`Linear::concat`]): one matmul over the input instead of two, and the product
/// in one pass ([`Activation::gated`]), with the same bits.
#[derive(Debug, Clone)]
enum GateUp {
    Separate { gate_proj: Linear, up_proj: Linear },
    Stacked(Linear),
}

impl GatedMlp {
    pub fn new(
        hidden: usize,
        intermediate: usize,
        bias: bool,
        act: Activation,
        vb: VarBuilder,
        quantized: &QuantizedWeights,
    ) -> Result<Self> {
        let gate_proj = quantized.linear(hidden, intermediate, bias, vb.pp("gate_proj"))?;
        let up_proj = quantized.linear(hidden, intermediate, bias, vb.pp("up_proj"))?;
        let gate_up = match Linear::concat(&[&gate_proj, &up_proj])? {
            Some(stacked) => GateUp::Stacked(stacked),
            None => GateUp::Separate { gate_proj, up_proj },
        };
        Ok(Self {
            gate_up,
            down_proj: quantized.linear(intermediate, hidden, bias, vb.pp("down_proj"))?,
            act,
        })
    }
}

impl Module for GatedMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                (self.act.forward(&gate_proj.forward(x)?)? * up_proj.forward(x)?)?
            }
            GateUp::Stacked(gate_up) => self.act.gated(&gate_up.forward(x)?)?,
        };
        self.down_proj.forward(&hidden)
    }
}

/// Rotary positions for the whole model: frequencies per [`RopeConfig`], recomputed for the
/// sequence length under dynamic NTK scaling.
#[derive(Debug, Clone)]
pub struct Rotary {
    config: RopeConfig,
    /// The frequencies and cos/sin factor for sequences up to `max_position_embeddings`.
    base: (Vec<f32>, f64),
}

impl Rotary {
    pub fn new(config: RopeConfig) -> Self {
        let base = config.frequencies(config.max_position_embeddings);
        Self { config, base }
    }

    /// `cos`, `sin` `[L, dim]` for `positions`. Dynamic NTK, as HF's `dynamic_rope_update`,
    /// uses the frequencies of length `max(positions) + 1` once that exceeds
    /// `max_position_embeddings`.
    pub fn cos_sin(&self, positions: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        let seq_len = positions.iter().max().map_or(0, |&p| p as usize + 1);
        let dynamic = matches!(self.config.scaling, RopeScaling::Dynamic { .. })
            && seq_len > self.config.max_position_embeddings;
        let owned;
        let (inv_freq, scaling) = if dynamic {
            owned = self.config.frequencies(seq_len);
            (&owned.0, owned.1)
        } else {
            (&self.base.0, self.base.1)
        };
        rotary_cos_sin(inv_freq, positions, scaling, device)
    }
}

/// One layer's cached keys and values `[B, Hkv, L, d]`, written in place.
pub type LayerKv = KvBuffer;

/// Keys and values of every layer for the tokens processed so far. Unlike a plain append-only
/// cache it can be rolled back ([`Self::truncate`]) and compacted to chosen positions
/// ([`Self::keep`]), as speculative decoding needs after verifying candidates.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every cached token from position `len` on.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        for kv in &mut self.layers {
            kv.truncate(len);
        }
        self.len = len;
        Ok(())
    }

    /// Keeps the first `prefix` tokens and then the cached tokens at `positions` (each
    /// `>= prefix`, in order), dropping the rest: the accepted path of a verified tree.
    pub fn keep(&mut self, prefix: usize, positions: &[usize]) -> Result<()> {
        if positions.iter().any(|&p| p < prefix || p >= self.len) {
            candle_core::bail!(
                "cannot keep positions {positions:?} after a prefix of {prefix} in a cache of {}",
                self.len
            );
        }
        // The path right after the prefix, in order (a chain's accepted drafts): a truncation.
        if positions.iter().enumerate().all(|(i, &p)| p == prefix + i) {
            return self.truncate(prefix + positions.len());
        }
        let device = match self.layers.iter().find_map(|kv| kv.get().transpose()) {
            Some(kv) => kv?.0.device().clone(),
            None => return Ok(()),
        };
        let index: Vec<u32> = (0..prefix)
            .chain(positions.iter().copied())
            .map(|p| p as u32)
            .collect();
        let index = Tensor::new(index, &device)?;
        for kv in &mut self.layers {
            kv.keep(&index)?;
        }
        self.len = prefix + positions.len();
        Ok(())
    }

    /// Rearranges the batch rows (beam search).
    pub fn reorder(&mut self, rows: &Tensor) -> Result<()> {
        for kv in &mut self.layers {
            kv.reorder(rows)?;
        }
        Ok(())
    }
}

/// HF `LlamaAttention`: q/k/v projections (grouped-query), RoPE on q and k, attention with the
/// cache, `o_proj`.
#[derive(Debug, Clone)]
pub struct LlamaAttention {
    attn: MultiHeadAttention,
}

impl LlamaAttention {
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder, quantized: &QuantizedWeights) -> Result<Self> {
        let (qkv_bias, out_bias) = cfg.attention_biases();
        let attn_cfg = AttentionConfig {
            embed_dim: cfg.hidden_size,
            kv_dim: cfg.hidden_size,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_kv_heads(),
            head_dim: cfg.head_dim(),
            bias: qkv_bias,
            out_bias,
            layout: QkvLayout::QKV_PROJ,
            out_proj: Some("o_proj"),
        };
        Ok(Self {
            attn: MultiHeadAttention::load(&attn_cfg, vb, quantized)?.stack_projections()?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: &mut LayerKv,
    ) -> Result<Tensor> {
        let (q, k, v) = self.attn.self_attention_qkv(x)?;
        let (q, k) = (rotate(&q, cos, sin)?, rotate(&k, cos, sin)?);
        let (k, v) = cache.append(&k, &v)?;
        self.attn.attend_heads(&q, &k, &v, mask)
    }
}

/// RoPE on the first `cos.dim(1)` channels of each head (all of them unless
/// `partial_rotary_factor` < 1).
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (d, r) = (x.dim(3)?, cos.dim(1)?);
    if r == d {
        return apply_rotary(x, cos, sin);
    }
    let rotated = apply_rotary(&x.narrow(3, 0, r)?, cos, sin)?;
    Tensor::cat(&[&rotated, &x.narrow(3, r, d - r)?], 3)
}

/// HF `LlamaDecoderLayer`: `h = x + attn(norm(x))`, `out = h + mlp(norm(h))`.
#[derive(Debug, Clone)]
pub struct LlamaDecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: LlamaAttention,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

impl LlamaDecoderLayer {
    /// Layer `vb`, its projections from `quantized` where it has them.
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder, quantized: &QuantizedWeights) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::new(d, eps, vb.pp("input_layernorm"))?,
            self_attn: LlamaAttention::new(cfg, vb.pp("self_attn"), quantized)?,
            post_attention_layernorm: RmsNorm::new(d, eps, vb.pp("post_attention_layernorm"))?,
            mlp: GatedMlp::new(
                d,
                cfg.intermediate_size,
                cfg.mlp_bias,
                cfg.hidden_act,
                vb.pp("mlp"),
                quantized,
            )?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: &mut LayerKv,
    ) -> Result<Tensor> {
        let attn =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, cos, sin, mask, cache)?;
        let h = (x + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?;
        h + mlp
    }
}

/// HF `LlamaModel`: `embed_tokens`, `layers.{i}`, `norm`.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    embed_tokens: candle_nn::Embedding,
    pub layers: Vec<LlamaDecoderLayer>,
    norm: RmsNorm,
    rotary: Rotary,
}

impl LlamaModel {
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder, quantized: &QuantizedWeights) -> Result<Self> {
        let rope = cfg.rope().map_err(candle_core::Error::msg)?;
        let table = vb.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?;
        Ok(Self {
            embed_tokens: candle_nn::Embedding::new(table, cfg.hidden_size),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| LlamaDecoderLayer::new(cfg, vb.pp("layers").pp(i), quantized))
                .collect::<Result<_>>()?,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            rotary: Rotary::new(rope),
        })
    }

    /// RoPE `cos`, `sin` for `positions` (see [`Rotary::cos_sin`]).
    pub fn rotary_cos_sin(&self, positions: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        self.rotary.cos_sin(positions, device)
    }

    /// The token embedding table `[vocab, D]`.
    pub fn embeddings(&self) -> &Tensor {
        self.embed_tokens.embeddings()
    }

    /// `embed_tokens(ids)`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids)
    }

    /// The final-norm hidden states `[B, L, D]` of `input_ids` `[B, L]` at `positions` `[L]`,
    /// attending to the cached tokens and to each other under `mask`.
    pub fn forward_at(
        &self,
        input_ids: &Tensor,
        positions: &[u32],
        mask: &AttentionMask,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rotary.cos_sin(positions, input_ids.device())?;
        let mut h = self.embed(input_ids)?;
        cache.layers.resize(self.layers.len(), KvBuffer::new());
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward(&h, &cos, &sin, mask, kv)?;
        }
        cache.len += input_ids.dim(1)?;
        self.norm.forward(&h)
    }
}

/// HF `LlamaForCausalLM`: [`LlamaModel`] under `model.` and `lm_head`.
#[derive(Debug, Clone)]
pub struct LlamaForCausalLM {
    pub model: LlamaModel,
    lm_head: Linear,
    pub config: LlamaConfig,
}

/// The hidden states and logits of every position of a forward pass.
pub struct CausalLmOutput {
    /// `[B, L, D]`, after the final norm.
    pub hidden: Tensor,
    /// `[B, L, vocab]`.
    pub logits: Tensor,
}

impl LlamaForCausalLM {
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Self::load_weights(cfg, vb, &QuantizedWeights::default())
    }

    /// [`Self::new`] with the projections taken from `quantized` where it has them (a
    /// quantized GGUF checkpoint's). A tied `lm_head` is the quantized embedding table when
    /// `quantized` has one, as llama.cpp multiplies by it.
    pub fn load_weights(
        cfg: &LlamaConfig,
        vb: VarBuilder,
        quantized: &QuantizedWeights,
    ) -> Result<Self> {
        let quantized = &quantized.for_decoding();
        let model = LlamaModel::new(cfg, vb.pp("model"), quantized)?;
        let lm_head = match quantized.get("model.embed_tokens.weight") {
            Some(table) if cfg.tie_word_embeddings => {
                Linear::quantized(table.clone(), None)?.for_decoding()?
            }
            _ if cfg.tie_word_embeddings => Linear::decoding(model.embeddings().clone(), None)?,
            _ => quantized.linear(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"))?,
        };
        Ok(Self {
            model,
            lm_head,
            config: cfg.clone(),
        })
    }

    /// Loads `config.json` and the safetensors of a local folder or hub repository.
    pub fn load(repo: &ModelRepo, dtype: Option<DType>, device: &Device) -> crate::Result<Self> {
        let config_path = repo.get("config.json")?;
        let cfg = LlamaConfig::from_file(&config_path)?;
        let stored = crate::contrastive::config_dtype(&config_path)?;
        let dtype = crate::device::resolve_dtype(dtype, stored, device)?;
        let weights = SafetensorsWeights::open(&repo.weight_files()?)?;
        Self::new(&cfg, weights.into_var_builder(dtype, device))
            .context(|| format!("cannot build LlamaForCausalLM from {}", repo.describe()))
    }

    /// The output projection `[D] → [vocab]`, which MTP modules share.
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// Hidden states and logits of every position of `input_ids` `[B, L]`, continuing the
    /// cached tokens with causal attention.
    pub fn forward(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<CausalLmOutput> {
        let (offset, l) = (cache.len(), input_ids.dim(1)?);
        let positions: Vec<u32> = (offset..offset + l).map(|p| p as u32).collect();
        let mask = if l > 1 {
            AttentionMask::causal(offset)
        } else {
            AttentionMask::none()
        };
        self.forward_at(input_ids, &positions, &mask, cache)
    }

    /// [`Self::forward`] with explicit positions and mask (see [`LlamaModel::forward_at`]).
    pub fn forward_at(
        &self,
        input_ids: &Tensor,
        positions: &[u32],
        mask: &AttentionMask,
        cache: &mut KvCache,
    ) -> Result<CausalLmOutput> {
        let hidden = self.model.forward_at(input_ids, positions, mask, cache)?;
        let logits = self.lm_head.forward(&hidden)?;
        Ok(CausalLmOutput { hidden, logits })
    }

    /// The mask of `l` new tokens after `cached` cached ones where new token `i` sees the
    /// cache and the new tokens `j` with `visible[i][j]` (itself and its ancestors in a tree).
    pub fn tree_mask(cached: usize, visible: &[Vec<bool>]) -> Result<AttentionMask> {
        Ok(AttentionMask::tree(TreeMask::new(
            cached,
            visible.to_vec(),
        )?))
    }
}

/// A causal LM as a [`StepModel`] for [`crate::generation::generate`], with a [`KvCache`].
pub struct LlamaStep<'a> {
    pub model: &'a LlamaForCausalLM,
    pub cache: KvCache,
}

impl StepModel for LlamaStep<'_> {
    fn next_logits(&mut self, rows: &[Vec<u32>], new: usize) -> Result<Tensor> {
        let device = self.model.model.embeddings().device().clone();
        let tails: Vec<Vec<u32>> = rows.iter().map(|r| r[r.len() - new..].to_vec()).collect();
        let ids = Tensor::new(tails, &device)?;
        let out = self.model.forward(&ids, &mut self.cache)?;
        let l = out.logits.dim(1)?;
        out.logits.narrow(1, l - 1, 1)?.squeeze(1)
    }

    fn reorder(&mut self, indices: &[usize]) -> Result<()> {
        let device = self.model.model.embeddings().device().clone();
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        self.cache.reorder(&Tensor::new(idx, &device)?)
    }
}
