//! BLIP (Li et al. 2022): a ViT image encoder, and BERT text models that cross-attend to its
//! tokens — a causal decoder for captioning (`BlipForConditionalGeneration`), and a
//! bidirectional encoder with image-text matching (ITM) and contrastive (ITC) heads
//! (`BlipForImageTextRetrieval`).
//!
//! Module paths are HF transformers' tensor names: `vision_model.*`, `text_decoder.bert.*`,
//! `text_decoder.cls.predictions.*`, `text_encoder.*`, `vision_proj`, `text_proj`, `itm_head`.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::bert::{BertConfig, BertKvCache, BertModel, PositionEmbeddingType};
use crate::contrastive::l2_normalize;
use crate::error::CandleContext;
use crate::generation::{self, GenerationConfig, StepModel};
use crate::hub::{read_json, ModelRepo};
use crate::layers::{
    Activation, AttentionConfig, AttentionMask, ClassToken, Encoder, EncoderConfig, LayerNorm,
    Linear, PositionTable, QkvLayout, VitEmbeddings, VitEmbeddingsConfig,
};
use crate::weights::SafetensorsWeights;

/// HF `BlipTextConfig`, with its defaults for missing fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BlipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the image tokens; [`BlipConfig`] overrides it with the vision width, as HF does.
    pub encoder_hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// `[DEC]`: replaces the tokenizer's `[CLS]` at the start of every caption.
    pub bos_token_id: u32,
    /// Not where generation stops; that is [`Self::sep_token_id`].
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    /// `[SEP]`: captions end here (HF's `generate` passes it as `eos_token_id`).
    pub sep_token_id: u32,
    pub label_smoothing: f64,
}

impl Default for BlipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30524,
            hidden_size: 768,
            encoder_hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-12,
            bos_token_id: 30522,
            eos_token_id: 2,
            pad_token_id: 0,
            sep_token_id: 102,
            label_smoothing: 0.0,
        }
    }
}

impl BlipTextConfig {
    /// The BERT that HF's `BlipTextModel` is: no segment table, cross-attention in every layer
    /// (HF builds it whenever the text config `is_decoder`, which BLIP's always is), causal only
    /// when used as the decoder.
    pub fn bert(&self, causal: bool) -> BertConfig {
        BertConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act: self.hidden_act,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: 0,
            layer_norm_eps: self.layer_norm_eps,
            pad_token_id: Some(self.pad_token_id),
            position_embedding_type: PositionEmbeddingType::Absolute,
            is_decoder: causal,
            add_cross_attention: true,
            encoder_width: Some(self.encoder_hidden_size),
        }
    }
}

/// HF `BlipVisionConfig`, with its defaults for missing fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BlipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for BlipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 384,
            patch_size: 16,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// HF `BlipConfig` (`model_type: "blip"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BlipConfig {
    pub text_config: BlipTextConfig,
    pub vision_config: BlipVisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
    /// Width of the ITC space (`vision_proj`, `text_proj`).
    pub image_text_hidden_size: usize,
    pub label_smoothing: f64,
}

impl Default for BlipConfig {
    fn default() -> Self {
        Self {
            text_config: BlipTextConfig::default(),
            vision_config: BlipVisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
            image_text_hidden_size: 256,
            label_smoothing: 0.0,
        }
    }
}

#[derive(Deserialize)]
struct ModelTypeOnly {
    model_type: Option<String>,
}

impl BlipConfig {
    /// Reads a `config.json`, refusing other `model_type`s. The text model's
    /// `encoder_hidden_size` is set to the vision width, as HF's `BlipConfig.__init__` does.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let head: ModelTypeOnly = read_json(path, "model config")?;
        match head.model_type.as_deref() {
            Some("blip") | None => {
                let mut cfg: Self = read_json(path, "BLIP config")?;
                cfg.text_config.encoder_hidden_size = cfg.vision_config.hidden_size;
                Ok(cfg)
            }
            Some(other) => Err(crate::Error::UnknownModelType {
                path: path.to_path_buf(),
                model_type: other.to_string(),
                supported: "blip",
            }),
        }
    }
}

/// HF `BlipVisionModel`: ViT embeddings (class token and position table stored as bare
/// parameters, patch conv with bias), a pre-norm encoder with a fused `qkv` and a
/// `projection` output, and `post_layernorm` over every token.
#[derive(Debug, Clone)]
pub struct BlipVisionModel {
    embeddings: VitEmbeddings,
    encoder: Encoder,
    post_layernorm: LayerNorm,
}

impl BlipVisionModel {
    pub fn new(cfg: &BlipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = VitEmbeddingsConfig {
            num_channels: 3,
            image_size: cfg.image_size,
            patch_size: cfg.patch_size,
            hidden_size: d,
            patch_bias: true,
            class_token: ClassToken::Parameter,
            position_table: PositionTable::Parameter,
        };
        let enc = EncoderConfig {
            attention: AttentionConfig::multi_head(
                d,
                d,
                cfg.num_attention_heads,
                true,
                QkvLayout::Fused("qkv"),
                Some("projection"),
            ),
            intermediate_size: cfg.intermediate_size,
            activation: cfg.hidden_act,
            layer_norm_eps: cfg.layer_norm_eps,
            num_layers: cfg.num_hidden_layers,
        };
        Ok(Self {
            embeddings: VitEmbeddings::new(&emb, vb.pp("embeddings"))?,
            encoder: Encoder::new(&enc, vb.pp("encoder"))?,
            post_layernorm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
        })
    }

    /// HF's `last_hidden_state` `[B, 1 + N, D]`, after `post_layernorm`: the image tokens the
    /// text models cross-attend to (`image_embeds`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.embeddings.forward(pixel_values)?;
        let x = self.encoder.forward(&x, &AttentionMask::none())?;
        self.post_layernorm.forward(&x)
    }
}

/// HF `BlipTextLMPredictionHead` (under `cls.predictions`): `LayerNorm(act(dense(h)))`, then
/// the vocabulary projection, whose weight is the word embedding table unless the checkpoint
/// stores `decoder.weight`, plus a per-token `bias`.
#[derive(Debug, Clone)]
pub struct BlipTextLmHead {
    dense: Linear,
    act: Activation,
    layer_norm: LayerNorm,
    decoder: Linear,
}

impl BlipTextLmHead {
    /// `word_embeddings` is the tied weight `[vocab, D]`.
    pub fn new(cfg: &BlipTextConfig, word_embeddings: &Tensor, vb: VarBuilder) -> Result<Self> {
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let transform = vb.pp("transform");
        let weight = if vb.contains_tensor("decoder.weight") {
            vb.pp("decoder").get((v, d), "weight")?
        } else {
            word_embeddings.clone()
        };
        // HF ties `decoder.bias` to `bias` and saves whichever survives de-duplication.
        let bias = if !vb.contains_tensor("bias") && vb.contains_tensor("decoder.bias") {
            vb.pp("decoder").get(v, "bias")?
        } else {
            vb.get(v, "bias")?
        };
        Ok(Self {
            dense: Linear::new(d, d, true, transform.pp("dense"))?,
            act: cfg.hidden_act,
            layer_norm: LayerNorm::new(d, cfg.layer_norm_eps, transform.pp("LayerNorm"))?,
            decoder: Linear::from_weights(weight, Some(bias))?,
        })
    }

    /// Vocabulary logits `[.., vocab]` from hidden states `[.., D]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.dense.forward(hidden)?)?;
        self.decoder.forward(&self.layer_norm.forward(&h)?)
    }
}

/// HF `BlipForConditionalGeneration`: image captioning with a causal BERT decoder
/// (`text_decoder.bert`) that cross-attends to the image tokens, and its LM head
/// (`text_decoder.cls.predictions`).
#[derive(Debug, Clone)]
pub struct BlipForConditionalGeneration {
    pub vision_model: BlipVisionModel,
    pub text_decoder: BertModel,
    lm_head: BlipTextLmHead,
    pub config: BlipConfig,
}

impl BlipForConditionalGeneration {
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        let t = &cfg.text_config;
        let dec = vb.pp("text_decoder");
        let text_decoder = BertModel::new(&t.bert(true), dec.pp("bert"), false)?;
        let lm_head = BlipTextLmHead::new(
            t,
            text_decoder.word_embeddings(),
            dec.pp("cls").pp("predictions"),
        )?;
        Ok(Self {
            vision_model: BlipVisionModel::new(&cfg.vision_config, vb.pp("vision_model"))?,
            text_decoder,
            lm_head,
            config: cfg.clone(),
        })
    }

    /// Loads `config.json` and the safetensors of a local folder or hub repository.
    pub fn load(repo: &ModelRepo, dtype: Option<DType>, device: &Device) -> crate::Result<Self> {
        let (cfg, vb) = load_parts(repo, dtype, device)?;
        Self::new(&cfg, vb).context(|| {
            format!(
                "cannot build BlipForConditionalGeneration from {}",
                repo.describe()
            )
        })
    }

    /// The dtype the weights were loaded in, which `pixel_values` must have.
    pub fn dtype(&self) -> DType {
        self.text_decoder.word_embeddings().dtype()
    }

    /// Decoder logits `[B, L, vocab]` for every position of `input_ids` `[B, L]` (which start
    /// with `[DEC]`), cross-attending to `image_embeds` `[B, N, Dv]` from
    /// [`BlipVisionModel::forward`]. `attention_mask` `[B, L]` masks padding.
    pub fn logits(
        &self,
        image_embeds: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden =
            self.text_decoder
                .forward(input_ids, None, attention_mask, Some(image_embeds), None)?;
        self.lm_head.forward(&hidden)
    }

    /// HF `forward(pixel_values, input_ids, attention_mask).logits`.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let image_embeds = self.vision_model.forward(pixel_values)?;
        self.logits(&image_embeds, input_ids, attention_mask)
    }

    /// HF's captioning loss (`labels` = `input_ids` with padding ignored): the mean
    /// cross-entropy of each next token over positions whose target has `attention_mask` 1,
    /// with `label_smoothing` as `torch.nn.CrossEntropyLoss` applies it. Differentiable.
    pub fn lm_loss(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        label_smoothing: f64,
    ) -> Result<Tensor> {
        self.caption_loss(pixel_values, input_ids, attention_mask, 0, label_smoothing)
    }

    /// salesforce/BLIP's `BLIP_Decoder.forward` loss: [`Self::lm_loss`] with the first
    /// `prompt_length` tokens of every row (`[DEC]` and the prompt) also ignored as targets, as
    /// `decoder_targets[:, :prompt_length] = -100` does, so only the caption and its `[SEP]` are
    /// learned. `prompt_length` 0 or 1 is HF's loss.
    pub fn caption_loss(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        prompt_length: usize,
        label_smoothing: f64,
    ) -> Result<Tensor> {
        let image_embeds = self.vision_model.forward(pixel_values)?;
        self.caption_loss_on(
            &image_embeds,
            input_ids,
            attention_mask,
            prompt_length,
            label_smoothing,
        )
    }

    /// [`Self::caption_loss`] from precomputed `image_embeds` `[B, N, Dv]`.
    pub fn caption_loss_on(
        &self,
        image_embeds: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        prompt_length: usize,
        label_smoothing: f64,
    ) -> Result<Tensor> {
        let logits = self.logits(image_embeds, input_ids, Some(attention_mask))?;
        let (b, l, v) = logits.dims3()?;
        let logits = logits.narrow(1, 0, l - 1)?.reshape((b * (l - 1), v))?;
        let targets = input_ids.narrow(1, 1, l - 1)?.flatten_all()?;
        // Target j is token j + 1; tokens before `prompt_length` are not learned.
        let after_prompt: Vec<f32> = (1..l)
            .map(|j| if j < prompt_length { 0.0 } else { 1.0 })
            .collect();
        let after_prompt = Tensor::from_vec(after_prompt, (1, l - 1), input_ids.device())?;
        let keep = attention_mask
            .narrow(1, 1, l - 1)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&after_prompt)?
            .flatten_all()?;
        let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let nll = logp
            .gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?
            .squeeze(1)?
            .neg()?;
        let per_token = if label_smoothing > 0.0 {
            let uniform = (logp.mean(D::Minus1)?.neg()? * label_smoothing)?;
            ((nll * (1.0 - label_smoothing))? + uniform)?
        } else {
            nll
        };
        let total = (per_token * &keep)?.sum_all()?;
        total / keep.sum_all()?.to_scalar::<f32>()? as f64
    }

    /// The ids decoding starts from, as HF's `generate` builds them: `[DEC]` alone, or the
    /// tokenizer's `[CLS] prompt [SEP]` with `[CLS]` replaced by `[DEC]` and the final `[SEP]`
    /// dropped. `prompt_ids` is `[B, L]` or `[1, L]` (then repeated for every image).
    fn start_ids(&self, batch: usize, prompt_ids: Option<&Tensor>) -> Result<Vec<Vec<u32>>> {
        let bos = self.config.text_config.bos_token_id;
        let rows = match prompt_ids {
            None => vec![vec![bos]; batch],
            Some(ids) => {
                let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
                let rows = match rows.len() {
                    1 => vec![rows[0].clone(); batch],
                    n if n == batch => rows,
                    n => candle_core::bail!("{n} prompts for {batch} images"),
                };
                rows.into_iter()
                    .map(|mut row| {
                        if row.len() < 2 {
                            candle_core::bail!(
                                "a prompt must be the tokenizer's [CLS] ... [SEP] ids, got {row:?}"
                            );
                        }
                        row.pop();
                        row[0] = bos;
                        Ok(row)
                    })
                    .collect::<Result<_>>()?
            }
        };
        Ok(rows)
    }

    /// Refuses, before decoding, captions of up to `max_new_tokens` after `start_len` tokens
    /// (`[DEC]` and the prompt) that would run past the text decoder's
    /// `max_position_embeddings`. The error names the flag and how many new tokens fit.
    pub fn check_caption_length(
        &self,
        start_len: usize,
        max_new_tokens: usize,
    ) -> std::result::Result<(), String> {
        let limit = self.config.text_config.max_position_embeddings;
        let total = start_len.saturating_add(max_new_tokens);
        if total > limit {
            return Err(format!(
                "--max-new-tokens {max_new_tokens} after {start_len} start tokens reaches \
                 position {total}, past the text decoder's max_position_embeddings {limit}: ask \
                 for at most {} new tokens",
                limit.saturating_sub(start_len)
            ));
        }
        Ok(())
    }

    /// The generation settings HF's `BlipForConditionalGeneration.generate` starts from: stop
    /// at `[SEP]` (not `eos_token_id`), pad finished rows with `pad_token_id`, greedy, 20 new
    /// tokens.
    pub fn generation_defaults(&self) -> GenerationConfig {
        let t = &self.config.text_config;
        GenerationConfig {
            stop_tokens: vec![t.sep_token_id],
            pad_token: t.pad_token_id,
            ..GenerationConfig::default()
        }
    }

    /// Captions `pixel_values` `[B, 3, H, W]`, optionally continuing a prompt, with a KV cache.
    /// Returns each row as HF `generate` does: `[DEC]`, the prompt, the new tokens up to and
    /// including `[SEP]`, then padding while other rows go on. As HF does, the stop token and
    /// pad id are always BLIP's `[SEP]` and `pad_token_id`, whatever `cfg` says.
    pub fn generate(
        &self,
        pixel_values: &Tensor,
        prompt_ids: Option<&Tensor>,
        cfg: &GenerationConfig,
    ) -> Result<Vec<Vec<u32>>> {
        self.decode(pixel_values, prompt_ids, cfg, true)
    }

    /// [`Self::generate`] without the KV cache: every step re-runs the whole prefix. The
    /// reference the cached path is checked against.
    pub fn generate_uncached(
        &self,
        pixel_values: &Tensor,
        prompt_ids: Option<&Tensor>,
        cfg: &GenerationConfig,
    ) -> Result<Vec<Vec<u32>>> {
        self.decode(pixel_values, prompt_ids, cfg, false)
    }

    fn decode(
        &self,
        pixel_values: &Tensor,
        prompt_ids: Option<&Tensor>,
        cfg: &GenerationConfig,
        use_cache: bool,
    ) -> Result<Vec<Vec<u32>>> {
        let t = &self.config.text_config;
        let cfg = GenerationConfig {
            stop_tokens: vec![t.sep_token_id],
            pad_token: t.pad_token_id,
            ..cfg.clone()
        };
        let image_embeds = self.vision_model.forward(pixel_values)?;
        let starts = self.start_ids(image_embeds.dim(0)?, prompt_ids)?;
        let cache = if use_cache {
            DecoderCache::Batched(BertKvCache::new())
        } else {
            DecoderCache::Uncached
        };
        let mut step = CaptionStep {
            model: self,
            image_embeds,
            cache,
        };
        generation::generate(&mut step, starts, &cfg)
    }
}

/// How [`CaptionStep`] keeps the decoder's keys and values.
enum DecoderCache {
    /// Re-run the whole prefix each step.
    Uncached,
    /// One cache for the whole batch; beam search reorders its rows.
    Batched(BertKvCache),
}

/// The captioning decoder as a [`StepModel`]: the image tokens of every row, and the cache.
struct CaptionStep<'a> {
    model: &'a BlipForConditionalGeneration,
    image_embeds: Tensor,
    cache: DecoderCache,
}

impl StepModel for CaptionStep<'_> {
    fn next_logits(&mut self, rows: &[Vec<u32>], new: usize) -> Result<Tensor> {
        let dev = self.image_embeds.device().clone();
        let decoder = &self.model.text_decoder;
        let tail = |row: &Vec<u32>| row[row.len() - new..].to_vec();
        let hidden = match &mut self.cache {
            DecoderCache::Uncached => {
                let ids = Tensor::new(rows.to_vec(), &dev)?;
                decoder.forward(&ids, None, None, Some(&self.image_embeds), None)?
            }
            DecoderCache::Batched(cache) => {
                let ids = Tensor::new(rows.iter().map(tail).collect::<Vec<_>>(), &dev)?;
                decoder.forward_cached(&ids, cache, Some(&self.image_embeds))?
            }
        };
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
        self.model.lm_head.forward(&last)
    }

    fn reorder(&mut self, indices: &[usize]) -> Result<()> {
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx, self.image_embeds.device())?;
        self.image_embeds = self.image_embeds.index_select(&idx, 0)?;
        match &mut self.cache {
            DecoderCache::Uncached => {}
            DecoderCache::Batched(cache) => cache.reorder(&idx)?,
        }
        Ok(())
    }
}

/// HF `BlipForImageTextRetrieval`: a bidirectional BERT text encoder (`text_encoder`) that
/// cross-attends to the image for image-text matching (`itm_head`), or encodes the text alone
/// for the contrastive score (`vision_proj`, `text_proj`).
#[derive(Debug, Clone)]
pub struct BlipForImageTextRetrieval {
    pub vision_model: BlipVisionModel,
    pub text_encoder: BertModel,
    vision_proj: Linear,
    text_proj: Linear,
    itm_head: Linear,
    pub config: BlipConfig,
}

impl BlipForImageTextRetrieval {
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> Result<Self> {
        let (t, v) = (&cfg.text_config, &cfg.vision_config);
        let e = cfg.image_text_hidden_size;
        Ok(Self {
            vision_model: BlipVisionModel::new(v, vb.pp("vision_model"))?,
            text_encoder: BertModel::new(&t.bert(false), vb.pp("text_encoder"), false)?,
            vision_proj: Linear::new(v.hidden_size, e, true, vb.pp("vision_proj"))?,
            text_proj: Linear::new(t.hidden_size, e, true, vb.pp("text_proj"))?,
            itm_head: Linear::new(t.hidden_size, 2, true, vb.pp("itm_head"))?,
            config: cfg.clone(),
        })
    }

    /// Loads `config.json` and the safetensors of a local folder or hub repository.
    pub fn load(repo: &ModelRepo, dtype: Option<DType>, device: &Device) -> crate::Result<Self> {
        let (cfg, vb) = load_parts(repo, dtype, device)?;
        Self::new(&cfg, vb).context(|| {
            format!(
                "cannot build BlipForImageTextRetrieval from {}",
                repo.describe()
            )
        })
    }

    /// The dtype the weights were loaded in, which `pixel_values` must have.
    pub fn dtype(&self) -> DType {
        self.text_encoder.word_embeddings().dtype()
    }

    /// ITM logits `[B, 2]` (index 1: "matched") for the pairs `(image b, text b)`: HF
    /// `forward(use_itm_head=True).itm_score`. The ids are used as given (HF does not swap in an
    /// `[ENC]` token).
    pub fn itm_score(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let image_embeds = self.vision_model.forward(pixel_values)?;
        self.itm_logits(&image_embeds, input_ids, attention_mask)
    }

    /// [`Self::itm_score`] from precomputed `image_embeds` `[B, N, Dv]`.
    pub fn itm_logits(
        &self,
        image_embeds: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden =
            self.text_encoder
                .forward(input_ids, None, attention_mask, Some(image_embeds), None)?;
        self.itm_head.forward(&hidden.narrow(1, 0, 1)?.squeeze(1)?)
    }

    /// Normalised ITC image features `[B, E]`: `normalize(vision_proj(image_embeds[:, 0]))`.
    pub fn image_features(&self, image_embeds: &Tensor) -> Result<Tensor> {
        l2_normalize(
            &self
                .vision_proj
                .forward(&image_embeds.narrow(1, 0, 1)?.squeeze(1)?)?,
        )
    }

    /// Normalised ITC text features `[B, E]`: the text encoded without the image,
    /// `normalize(text_proj(h[:, 0]))`.
    pub fn text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden = self
            .text_encoder
            .forward(input_ids, None, attention_mask, None, None)?;
        l2_normalize(
            &self
                .text_proj
                .forward(&hidden.narrow(1, 0, 1)?.squeeze(1)?)?,
        )
    }

    /// Cosine similarities `[B_images, B_texts]` of every image with every text: HF
    /// `forward(use_itm_head=False).itm_score`.
    pub fn itc_score(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let image = self.image_features(&self.vision_model.forward(pixel_values)?)?;
        let text = self.text_features(input_ids, attention_mask)?;
        image.matmul(&text.t()?)
    }
}

/// The config and a memory-mapped weight builder of a BLIP checkpoint.
fn load_parts(
    repo: &ModelRepo,
    dtype: Option<DType>,
    device: &Device,
) -> crate::Result<(BlipConfig, VarBuilder<'static>)> {
    let config_path = repo.get("config.json")?;
    let cfg = BlipConfig::from_file(&config_path)?;
    let stored = crate::contrastive::config_dtype(&config_path)?;
    let dtype = crate::device::resolve_dtype(dtype, stored, device)?;
    let weights = SafetensorsWeights::open(&repo.weight_files()?)?;
    Ok((cfg, weights.into_var_builder(dtype, device)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> crate::Result<BlipConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        BlipConfig::from_file(&path)
    }

    #[test]
    fn missing_fields_take_hf_defaults() {
        let c = parse(r#"{"model_type": "blip"}"#).unwrap();
        let t = &c.text_config;
        assert_eq!(
            (
                t.vocab_size,
                t.hidden_size,
                t.intermediate_size,
                t.projection_dim
            ),
            (30524, 768, 3072, 768)
        );
        assert_eq!(
            (
                t.num_hidden_layers,
                t.num_attention_heads,
                t.max_position_embeddings
            ),
            (12, 8, 512)
        );
        assert_eq!(
            (
                t.bos_token_id,
                t.eos_token_id,
                t.pad_token_id,
                t.sep_token_id
            ),
            (30522, 2, 0, 102)
        );
        assert_eq!(t.hidden_act, Activation::Gelu);
        assert!((t.layer_norm_eps - 1e-12).abs() < 1e-20 && t.label_smoothing == 0.0);
        let v = &c.vision_config;
        assert_eq!(
            (v.hidden_size, v.intermediate_size, v.projection_dim),
            (768, 3072, 512)
        );
        assert_eq!(
            (
                v.num_hidden_layers,
                v.num_attention_heads,
                v.image_size,
                v.patch_size
            ),
            (12, 12, 384, 16)
        );
        assert!((v.layer_norm_eps - 1e-5).abs() < 1e-12);
        assert_eq!((c.projection_dim, c.image_text_hidden_size), (512, 256));
        assert!((c.logit_scale_init_value - 2.6592).abs() < 1e-12);
    }

    #[test]
    fn the_text_model_cross_attends_at_the_vision_width() {
        let c = parse(r#"{"vision_config": {"hidden_size": 1024}}"#).unwrap();
        assert_eq!(c.text_config.encoder_hidden_size, 1024);
        assert_eq!(c.text_config.bert(true).encoder_width, Some(1024));
        let err = parse(r#"{"model_type": "clip"}"#).unwrap_err().to_string();
        assert!(err.contains("unknown model_type `clip`"), "{err}");
    }
}
