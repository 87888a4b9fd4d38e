//! BERT (Devlin et al. 2019): a post-norm transformer encoder over word + position + segment
//! embeddings. It serves as the text tower of CLIP-style models (open_clip's HF text towers mean-pool
//! its states) and, with a causal mask and cross-attention to image tokens, as BLIP's text
//! encoder and decoder.
//!
//! Module paths are HF `BertModel`'s tensor names (`embeddings.LayerNorm`,
//! `encoder.layer.{i}.attention.self.query`, ...), without a prefix. Checkpoints saved from a
//! task model (`BertForMaskedLM`, ...) prefix them with `bert.`; pass `vb.pp("bert")` for those.

use std::path::Path;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::hub::read_json;
use crate::layers::{
    upcast, Activation, AttentionConfig, AttentionMask, KvBuffer, LayerNorm,
    LearnedPositionEmbedding, Linear, MultiHeadAttention, QkvLayout,
};

/// How positions enter the model. Only `absolute` (a learned table added to the embeddings) is
/// implemented; the relative variants (Shaw et al. 2018; Huang et al. 2020) are rejected by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionEmbeddingType {
    Absolute,
    RelativeKey,
    RelativeKeyQuery,
}

/// HF `BertConfig` (`model_type: "bert"`), with its defaults (those of `bert-base-uncased`) for
/// missing fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    /// Rows of `token_type_embeddings`. 0 builds no segment table (BLIP's text model has none).
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// For tokenisation and batching; the forward pass does not read it.
    pub pad_token_id: Option<u32>,
    pub position_embedding_type: PositionEmbeddingType,
    /// Self-attention is causal (HF adds the causal mask in `get_extended_attention_mask`).
    pub is_decoder: bool,
    /// Each layer gets a `crossattention` block over `encoder_hidden_states`. Unlike HF's
    /// `BertLayer`, this does not demand `is_decoder`: BLIP's text encoder cross-attends with
    /// bidirectional self-attention.
    pub add_cross_attention: bool,
    /// Width of the cross-attended states; `None` means `hidden_size`, the only width HF's
    /// `BertModel` takes. BLIP's image tokens are wider (salesforce BLIP's `encoder_width`,
    /// HF `BlipTextConfig.encoder_hidden_size`).
    #[serde(alias = "encoder_hidden_size")]
    pub encoder_width: Option<usize>,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: Activation::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: Some(0),
            position_embedding_type: PositionEmbeddingType::Absolute,
            is_decoder: false,
            add_cross_attention: false,
            encoder_width: None,
        }
    }
}

#[derive(Deserialize)]
struct ModelTypeOnly {
    model_type: Option<String>,
}

impl BertConfig {
    /// Reads a `config.json`, refusing other `model_type`s (RoBERTa's would load and compute
    /// wrong positions silently).
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let head: ModelTypeOnly = read_json(path, "model config")?;
        match head.model_type.as_deref() {
            Some("bert") | None => read_json(path, "BERT config"),
            Some(other) => Err(crate::Error::UnknownModelType {
                path: path.to_path_buf(),
                model_type: other.to_string(),
                supported: "bert",
            }),
        }
    }

    /// Multi-head attention as BERT stores it: `self.{query,key,value}` with biases, and the
    /// output projection in the sibling `output.dense` (so `out_proj: None`).
    fn attention(&self, kv_dim: usize) -> AttentionConfig {
        AttentionConfig::multi_head(
            self.hidden_size,
            kv_dim,
            self.num_attention_heads,
            true,
            QkvLayout::Separate {
                q: "query",
                k: "key",
                v: "value",
            },
            None,
        )
    }

    fn check_supported(&self) -> Result<()> {
        if self.position_embedding_type != PositionEmbeddingType::Absolute {
            candle_core::bail!(
                "position_embedding_type {:?} is not supported; only absolute positions are",
                self.position_embedding_type
            );
        }
        Ok(())
    }
}

/// HF `BertEmbeddings`: `LayerNorm(word + token_type + position)` (Devlin et al. 2019, fig. 2).
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    word_embeddings: candle_nn::Embedding,
    position_embeddings: LearnedPositionEmbedding,
    token_type_embeddings: Option<candle_nn::Embedding>,
    layer_norm: LayerNorm,
}

impl BertEmbeddings {
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check_supported()?;
        let d = cfg.hidden_size;
        let table = |rows: usize, name: &str| -> Result<candle_nn::Embedding> {
            Ok(candle_nn::Embedding::new(
                vb.pp(name).get((rows, d), "weight")?,
                d,
            ))
        };
        let token_type_embeddings = match cfg.type_vocab_size {
            0 => None,
            n => Some(table(n, "token_type_embeddings")?),
        };
        Ok(Self {
            word_embeddings: table(cfg.vocab_size, "word_embeddings")?,
            position_embeddings: LearnedPositionEmbedding::new(
                cfg.max_position_embeddings,
                d,
                vb.pp("position_embeddings"),
            )?,
            token_type_embeddings,
            // HF keeps TensorFlow's capitalised name.
            layer_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `[B, L, D]` for `input_ids` `[B, L]`. Missing `token_type_ids` mean segment 0 everywhere,
    /// as in HF.
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>) -> Result<Tensor> {
        self.forward_at(input_ids, token_type_ids, 0)
    }

    /// As [`Self::forward`] for tokens that start at position `offset`, as in incremental
    /// decoding (HF's `past_key_values_length`).
    pub fn forward_at(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        offset: usize,
    ) -> Result<Tensor> {
        let (_, l) = input_ids.dims2()?;
        let x = self.word_embeddings.forward(input_ids)?;
        let x = match (&self.token_type_embeddings, token_type_ids) {
            (Some(table), Some(ids)) => (x + table.forward(ids)?)?,
            (Some(table), None) => x.broadcast_add(&table.embeddings().narrow(0, 0, 1)?)?,
            (None, Some(_)) => {
                candle_core::bail!("token_type_ids were given but type_vocab_size is 0")
            }
            (None, None) => x,
        };
        let x = x.broadcast_add(&self.position_embeddings.forward(l, offset)?)?;
        self.layer_norm.forward(&x)
    }
}

/// HF `BertSelfOutput` and `BertOutput`, which differ only in input width:
/// `LayerNorm(dense(h) + residual)`, BERT's post-norm residual (Vaswani et al. 2017, §3.1).
#[derive(Debug, Clone)]
pub struct BertOutput {
    dense: Linear,
    layer_norm: LayerNorm,
}

impl BertOutput {
    pub fn new(in_dim: usize, cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            dense: Linear::new(in_dim, d, true, vb.pp("dense"))?,
            layer_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    pub fn forward(&self, h: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.layer_norm
            .forward(&(self.dense.forward(h)? + residual)?)
    }
}

/// HF `BertAttention`: multi-head attention (`self`) followed by its [`BertOutput`] (`output`).
/// The same block serves self-attention and cross-attention (`crossattention`).
#[derive(Debug, Clone)]
pub struct BertAttention {
    attention: MultiHeadAttention,
    output: BertOutput,
}

impl BertAttention {
    /// `kv_dim` is the width of the attended states: `hidden_size`, or the encoder's width.
    pub fn new(cfg: &BertConfig, kv_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attention: MultiHeadAttention::new(&cfg.attention(kv_dim), vb.pp("self"))?,
            output: BertOutput::new(cfg.hidden_size, cfg, vb.pp("output"))?,
        })
    }

    /// Attention of `x` over `keys_values` (pass `x` itself for self-attention), with an additive
    /// `mask`, then `LayerNorm(dense(.) + x)`.
    pub fn forward(
        &self,
        x: &Tensor,
        keys_values: &Tensor,
        mask: &AttentionMask,
    ) -> Result<Tensor> {
        let h = self.attention.forward_cross(x, keys_values, mask)?;
        self.output.forward(&h, x)
    }

    /// As [`Self::forward`] over keys and values already projected (and possibly cached) by
    /// [`MultiHeadAttention::key_values`].
    pub fn forward_kv(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttentionMask,
    ) -> Result<Tensor> {
        let h = self.attention.attend(x, k, v, mask)?;
        self.output.forward(&h, x)
    }

    /// Projected keys and values `[B, H, L, d]` of the attended states.
    pub fn key_values(&self, keys_values: &Tensor) -> Result<(Tensor, Tensor)> {
        self.attention.key_values(keys_values)
    }
}

/// HF `BertLayer`: self-attention, optional cross-attention, then the feed-forward block
/// `output(act(intermediate(x)), x)`, each with a post-norm residual.
#[derive(Debug, Clone)]
pub struct BertLayer {
    attention: BertAttention,
    crossattention: Option<BertAttention>,
    intermediate: Linear,
    act: Activation,
    output: BertOutput,
}

impl BertLayer {
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check_supported()?;
        let d = cfg.hidden_size;
        let crossattention = if cfg.add_cross_attention {
            let kv = cfg.encoder_width.unwrap_or(d);
            Some(BertAttention::new(cfg, kv, vb.pp("crossattention"))?)
        } else {
            None
        };
        Ok(Self {
            attention: BertAttention::new(cfg, d, vb.pp("attention"))?,
            crossattention,
            intermediate: Linear::new(
                d,
                cfg.intermediate_size,
                true,
                vb.pp("intermediate").pp("dense"),
            )?,
            act: cfg.hidden_act,
            output: BertOutput::new(cfg.intermediate_size, cfg, vb.pp("output"))?,
        })
    }

    /// `x` `[B, L, D]`; `mask` is the self-attention mask, `encoder_mask` the mask over
    /// `encoder_hidden_states` `[B, Lk, Dk]`. Cross-attention runs when encoder states are
    /// given, as in HF.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &AttentionMask,
        encoder_hidden_states: Option<&Tensor>,
        encoder_mask: &AttentionMask,
    ) -> Result<Tensor> {
        let x = self.attention.forward(x, x, mask)?;
        let x = match (&self.crossattention, encoder_hidden_states) {
            (Some(cross), Some(enc)) => cross.forward(&x, enc, encoder_mask)?,
            (None, Some(_)) => candle_core::bail!(
                "encoder_hidden_states were given but the model has no cross-attention \
                 (add_cross_attention is false)"
            ),
            (_, None) => x,
        };
        self.feed_forward(&x)
    }

    /// [`Self::forward`] for the next tokens of a decoder: the self-attention keys and values
    /// of `x` are appended to `cache`, and those of `encoder_hidden_states` are computed on the
    /// first call and reused after it. `mask` covers all cached keys plus `x`'s.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        mask: &AttentionMask,
        encoder_hidden_states: Option<&Tensor>,
        cache: &mut LayerKvCache,
    ) -> Result<Tensor> {
        let (k, v) = self.attention.key_values(x)?;
        let (k, v) = cache.self_kv.append(&k, &v)?;
        let x = self.attention.forward_kv(x, &k, &v, mask)?;
        let x = match (&self.crossattention, encoder_hidden_states) {
            (Some(cross), Some(enc)) => {
                let (k, v) = match &cache.cross_kv {
                    Some(kv) => kv.clone(),
                    None => cross.key_values(enc)?,
                };
                let out = cross.forward_kv(&x, &k, &v, &AttentionMask::none())?;
                cache.cross_kv = Some((k, v));
                out
            }
            (None, Some(_)) => candle_core::bail!(
                "encoder_hidden_states were given but the model has no cross-attention \
                 (add_cross_attention is false)"
            ),
            (_, None) => x,
        };
        self.feed_forward(&x)
    }

    /// `output(act(intermediate(x)), x)`.
    fn feed_forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.intermediate.forward(x)?)?;
        self.output.forward(&h, x)
    }
}

/// One layer's cached keys and values `[B, H, L, d]` (see [`BertLayer::forward_cached`]).
#[derive(Debug, Clone, Default)]
pub struct LayerKvCache {
    /// Self-attention keys and values, written in place.
    self_kv: KvBuffer,
    /// Cross-attention keys and values of the encoder states, computed once.
    cross_kv: Option<(Tensor, Tensor)>,
}

/// The key/value cache of a whole [`BertModel`] decoder, for incremental decoding with
/// [`BertModel::forward_cached`] (HF's `EncoderDecoderCache`: self-attention keys grow by the
/// new tokens at each step, cross-attention keys are computed once).
#[derive(Debug, Clone, Default)]
pub struct BertKvCache {
    layers: Vec<LayerKvCache>,
    len: usize,
}

impl BertKvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of tokens already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rearranges the cached rows: row `i` becomes the old row `indices[i]` (u32 `[N]`), as
    /// beam search keeps, drops and duplicates beams (HF's `Cache.reorder_cache`).
    pub fn reorder(&mut self, indices: &Tensor) -> Result<()> {
        for layer in &mut self.layers {
            layer.self_kv.reorder(indices)?;
            if let Some((k, v)) = layer.cross_kv.take() {
                layer.cross_kv = Some((k.index_select(indices, 0)?, v.index_select(indices, 0)?));
            }
        }
        Ok(())
    }
}

/// HF `BertEncoder`: the layers under `layer.{i}` (singular, as HF names them).
#[derive(Debug, Clone)]
pub struct BertEncoder {
    layers: Vec<BertLayer>,
}

impl BertEncoder {
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::new(cfg, vb.pp("layer").pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// Runs every layer with the same masks (see [`self_attention_mask`]).
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &AttentionMask,
        encoder_hidden_states: Option<&Tensor>,
        encoder_mask: &AttentionMask,
    ) -> Result<Tensor> {
        self.layers.iter().try_fold(x.clone(), |h, layer| {
            layer.forward(&h, mask, encoder_hidden_states, encoder_mask)
        })
    }
}

/// HF `BertPooler`: `tanh(dense(h[:, 0]))`, the `[CLS]` state trained on next-sentence
/// prediction (Devlin et al. 2019, §3.1).
#[derive(Debug, Clone)]
pub struct BertPooler {
    dense: Linear,
}

impl BertPooler {
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            dense: Linear::new(d, d, true, vb.pp("dense"))?,
        })
    }

    /// `[B, D]` from `last_hidden_state` `[B, L, D]`.
    pub fn forward(&self, last_hidden_state: &Tensor) -> Result<Tensor> {
        let first = last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?;
        self.dense.forward(&first)?.tanh()
    }
}

/// HF `BertModel`: embeddings, encoder and an optional pooler.
#[derive(Debug, Clone)]
pub struct BertModel {
    embeddings: BertEmbeddings,
    encoder: BertEncoder,
    pooler: Option<BertPooler>,
    pub config: BertConfig,
}

impl BertModel {
    /// `with_pooler` says whether `pooler.dense` is loaded (HF's `add_pooling_layer`). It is a
    /// caller's choice rather than a probe of the checkpoint, so a model built from an empty
    /// `VarMap` for training gets the same parameters as one loaded from disk.
    pub fn new(cfg: &BertConfig, vb: VarBuilder, with_pooler: bool) -> Result<Self> {
        let pooler = if with_pooler {
            Some(BertPooler::new(cfg, vb.pp("pooler"))?)
        } else {
            None
        };
        Ok(Self {
            embeddings: BertEmbeddings::new(cfg, vb.pp("embeddings"))?,
            encoder: BertEncoder::new(cfg, vb.pp("encoder"))?,
            pooler,
            config: cfg.clone(),
        })
    }

    /// HF `BertModel.forward`'s `last_hidden_state` `[B, L, D]`.
    ///
    /// `attention_mask` `[B, L]` (1 keep, 0 pad) masks padded keys, on top of a causal mask when
    /// `config.is_decoder`. `encoder_hidden_states` `[B, Lk, Dk]` are cross-attended with the
    /// optional `encoder_attention_mask` `[B, Lk]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
        encoder_attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = self.embeddings.forward(input_ids, token_type_ids)?;
        let mask = self_attention_mask(attention_mask, self.config.is_decoder);
        let encoder_mask = AttentionMask::padding(encoder_attention_mask);
        self.encoder
            .forward(&x, &mask, encoder_hidden_states, &encoder_mask)
    }

    /// Hidden states `[B, L, D]` of the next `input_ids` `[B, L]` of a decoder, given the tokens
    /// already in `cache` (which this call extends). With an empty cache and the whole sequence
    /// this equals [`Self::forward`] without padding; then feeding one token per call gives the
    /// same states as re-running the whole prefix. Causal when `config.is_decoder`; every
    /// cached token is attended (no padding mask), and the encoder states are all attended.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        cache: &mut BertKvCache,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<Tensor> {
        let offset = cache.len;
        let x = self.embeddings.forward_at(input_ids, None, offset)?;
        let l = x.dim(1)?;
        let mask = if self.config.is_decoder && l > 1 {
            AttentionMask::causal(offset)
        } else {
            AttentionMask::none()
        };
        cache
            .layers
            .resize_with(self.encoder.layers.len(), LayerKvCache::default);
        let mut h = x;
        for (layer, layer_cache) in self.encoder.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward_cached(&h, &mask, encoder_hidden_states, layer_cache)?;
        }
        cache.len += l;
        Ok(h)
    }

    /// The word embedding table `[vocab_size, D]`, which LM heads tie their output weight to.
    pub fn word_embeddings(&self) -> &Tensor {
        self.embeddings.word_embeddings.embeddings()
    }

    /// The pooler, when the model was built `with_pooler`.
    pub fn pooler(&self) -> Option<&BertPooler> {
        self.pooler.as_ref()
    }
}

/// The self-attention mask: padding from an HF `attention_mask` `[B, L]`, plus the causal
/// mask when `causal`, as HF's `get_extended_attention_mask` merges them.
pub fn self_attention_mask(attention_mask: Option<&Tensor>, causal: bool) -> AttentionMask {
    let mask = if causal {
        AttentionMask::causal(0)
    } else {
        AttentionMask::none()
    };
    mask.with_padding(attention_mask)
}

/// Mean pooling as sentence-transformers' `Pooling(pooling_mode_mean_tokens=True)` and
/// open_clip's `MeanPooler` compute it: `Σ_t m_t h_t / max(Σ_t m_t, 1e-9)` over the
/// `attention_mask` `[B, L]`, giving `[B, D]` from `hidden` `[B, L, D]`. The sums run in at least
/// f32, so half-precision inputs neither overflow nor divide by a mask count rounded to zero.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let (b, l, _) = hidden.dims3()?;
    if attention_mask.dims() != [b, l] {
        candle_core::bail!(
            "mean_pool: attention_mask has shape {:?} but the hidden states are {:?}",
            attention_mask.dims(),
            hidden.dims()
        );
    }
    let dtype = hidden.dtype();
    let acc = upcast(dtype);
    let mask = attention_mask.to_dtype(acc)?.unsqueeze(D::Minus1)?;
    let summed = hidden.to_dtype(acc)?.broadcast_mul(&mask)?.sum(1)?;
    let count = mask.sum(1)?.maximum(1e-9)?;
    summed.broadcast_div(&count)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn parse(json: &str) -> crate::Result<BertConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        BertConfig::from_file(&path)
    }

    #[test]
    fn missing_fields_take_hf_defaults() {
        let c = parse(r#"{"model_type": "bert"}"#).unwrap();
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.intermediate_size
            ),
            (30522, 768, 12, 12, 3072)
        );
        assert_eq!(c.hidden_act, Activation::Gelu);
        assert_eq!((c.max_position_embeddings, c.type_vocab_size), (512, 2));
        assert!((c.layer_norm_eps - 1e-12).abs() < 1e-20);
        assert_eq!(c.pad_token_id, Some(0));
        assert_eq!(c.position_embedding_type, PositionEmbeddingType::Absolute);
        assert!(!c.is_decoder && !c.add_cross_attention);
        assert_eq!(c.encoder_width, None);
    }

    #[test]
    fn blip_spellings_of_the_encoder_width_are_read() {
        let c = parse(r#"{"encoder_width": 1024, "add_cross_attention": true}"#).unwrap();
        assert_eq!(c.encoder_width, Some(1024));
        let c = parse(r#"{"encoder_hidden_size": 768}"#).unwrap();
        assert_eq!(c.encoder_width, Some(768));
    }

    #[test]
    fn other_model_types_and_relative_positions_are_refused() {
        let err = parse(r#"{"model_type": "roberta"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown model_type `roberta`"), "{err}");

        let cfg = parse(r#"{"position_embedding_type": "relative_key"}"#).unwrap();
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let err = BertModel::new(&cfg, vb, false).unwrap_err().to_string();
        assert!(err.contains("RelativeKey"), "{err}");
    }

    #[test]
    fn cross_attention_takes_a_wider_encoder() {
        let cfg = BertConfig {
            vocab_size: 10,
            hidden_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 16,
            max_position_embeddings: 6,
            type_vocab_size: 0,
            add_cross_attention: true,
            is_decoder: true,
            encoder_width: Some(12),
            ..BertConfig::default()
        };
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let model = BertModel::new(&cfg, vb, false).unwrap();
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        let image = Tensor::ones((1, 5, 12), DType::F32, &Device::Cpu).unwrap();
        let out = model.forward(&ids, None, None, Some(&image), None).unwrap();
        assert_eq!(out.dims(), &[1, 3, 8]);
        let err = model
            .forward(&ids, Some(&ids.zeros_like().unwrap()), None, None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("type_vocab_size is 0"), "{err}");
    }

    #[test]
    fn mean_pool_ignores_padding_and_survives_empty_rows() {
        let hidden = Tensor::new(
            &[
                [[1f32, 2.], [3., 4.], [100., 100.]],
                [[5., 6.], [7., 8.], [9., 10.]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let mask = Tensor::new(&[[1i64, 1, 0], [0, 0, 0]], &Device::Cpu).unwrap();
        let pooled = mean_pool(&hidden, &mask).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(pooled, vec![vec![2.0, 3.0], vec![0.0, 0.0]]);
        let bad = Tensor::new(&[[1i64, 1]], &Device::Cpu).unwrap();
        assert!(mean_pool(&hidden, &bad).is_err());
    }
}
