//! BLIP pretraining (`zoo train blip --objective pretrain`): salesforce/BLIP's `BLIP_Pretrain`
//! (Li et al. 2022, §3.2) as a [`Task`] of the shared training loop. One model learns three
//! objectives at once, and the loss is their sum:
//!
//! - **ITC**, image-text contrastive: unimodal image and text features are aligned against
//!   those of momentum encoders (an exponential moving average of the online encoders, m =
//!   0.995), whose features also fill two queues of negatives. The targets are distilled:
//!   `α · softmax(momentum similarities) + (1 − α) · one-hot`, α ramping up from 0 over the first
//!   steps. Similarities are divided by a learnable temperature kept in [0.001, 0.5].
//! - **ITM**, image-text matching: the image-grounded text encoder classifies each pair as
//!   matched or not, with one hard negative image per text and one hard negative text per image,
//!   sampled in proportion to their contrastive similarity.
//! - **LM**, language modelling: the image-grounded decoder learns the caption with label
//!   smoothing 0.1.
//!
//! Parameters are named as HF's checkpoints name them, so a saved folder is at once a
//! `BlipForImageTextRetrieval` (`zoo match`, `zoo capfilt --filter`) and a
//! `BlipForConditionalGeneration` (`zoo caption`, `zoo capfilt --captioner`). As in BLIP, the
//! decoder shares every parameter with the encoder except its self-attention layers; shared
//! ones are one variable, written under both names. The temperature, momentum encoders and
//! queues are not part of either HF model: they go to [`STATE_FILE`] beside the weights.
//!
//! One deliberate difference: salesforce/BLIP puts `[ENC]` in place of `[CLS]` in the ITM
//! input, but HF's `BlipForImageTextRetrieval` (and so `zoo match`) scores the tokenizer's
//! `[CLS] ...` ids as given. Training ITM on the ids it is used with keeps a zoo-pretrained
//! filter consistent with its inference.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};
use zoo_datasets::preprocess::{ImageProcessor, ImageProcessorConfig};
use zoo_datasets::sources::Pair;
use zoo_datasets::tokenize::{Padding, TextTokenizer};
use zoo_models::blip::{BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval};
use zoo_models::hub::ModelRepo;
use zoo_models::weights::SafetensorsWeights;

use crate::blip_caption::{
    initial_value, pixel_values, preset_config, preset_processor, CaptionEvalSet,
};
use crate::checkpoint;
use crate::data::{BatchLoader, ContrastiveBatch, DataPosition, LoaderConfig, StreamFactory};
use crate::error::{Error, Result};
use crate::eval::retrieval_report;
use crate::loss::cross_entropy;
use crate::model::{fine_tune_at, save_hf_folder};
use crate::optim::AdamWConfig;
use crate::rng::Rng;
use crate::train::{initial_state, run_task, Task, TrainConfig, TrainState};

/// salesforce/BLIP's `queue_size` (`configs/pretrain.yaml`).
pub const DEFAULT_QUEUE_SIZE: usize = 57_600;
/// The momentum encoders' EMA coefficient.
pub const DEFAULT_MOMENTUM: f64 = 0.995;
/// The weight of the momentum encoders' soft targets in ITC.
pub const DEFAULT_ALPHA: f64 = 0.4;
/// BLIP's initial temperature, and the range it is clamped to before every forward.
const INIT_TEMP: f64 = 0.07;
const TEMP_RANGE: (f64, f64) = (0.001, 0.5);
/// The LM loss's label smoothing (`BertLMHeadModel` in salesforce/BLIP's `med.py`).
const LM_LABEL_SMOOTHING: f64 = 0.1;
/// salesforce/BLIP tokenizes pretraining captions to at most 30 tokens.
const MAX_PRETRAIN_TOKENS: usize = 30;
/// The hard-negative sampling weights are `softmax(sim) + 1e-4`, as in BLIP.
const NEGATIVE_FLOOR: f64 = 1e-4;
/// Temperature, momentum encoders and queues, beside `model.safetensors`.
pub const STATE_FILE: &str = "blip_pretrain_state.safetensors";
/// The encoders that have a momentum copy (BLIP's `model_pairs`).
const MOMENTUM_PREFIXES: [&str; 4] = [
    "vision_model.",
    "vision_proj.",
    "text_encoder.",
    "text_proj.",
];

/// The ITC settings of a run.
#[derive(Debug, Clone, Copy)]
pub struct PretrainSettings {
    /// Features kept in each queue; 0: in-batch negatives only.
    pub queue_size: usize,
    pub momentum: f64,
    pub alpha: f64,
    /// α rises linearly from 0 to `alpha` over these steps (BLIP: the first epoch).
    pub alpha_ramp_steps: u64,
}

impl Default for PretrainSettings {
    fn default() -> Self {
        Self {
            queue_size: DEFAULT_QUEUE_SIZE,
            momentum: DEFAULT_MOMENTUM,
            alpha: DEFAULT_ALPHA,
            alpha_ramp_steps: 0,
        }
    }
}

impl PretrainSettings {
    /// α at optimizer step `step` (0-based).
    pub fn alpha_at(&self, step: u64) -> f64 {
        if self.alpha_ramp_steps == 0 {
            self.alpha
        } else {
            self.alpha * (step as f64 / self.alpha_ramp_steps as f64).min(1.0)
        }
    }
}

/// The name of the encoder variable a decoder parameter is tied to: every
/// `text_decoder.bert.*` except the self-attention layers (salesforce/BLIP's
/// `tie_encoder_decoder_weights(..., skip_key='/attention')`).
pub fn tied_source(name: &str) -> Option<String> {
    let rest = name.strip_prefix("text_decoder.bert.")?;
    if rest.split('.').any(|part| part == "attention") {
        None
    } else {
        Some(format!("text_encoder.{rest}"))
    }
}

/// The three BLIP losses of one batch, each with its graph.
pub struct PretrainLosses {
    pub itc: Tensor,
    pub itm: Tensor,
    pub lm: Tensor,
}

impl PretrainLosses {
    pub fn total(&self) -> Result<Tensor> {
        Ok(((&self.itc + &self.itm)? + &self.lm)?)
    }
}

/// The momentum encoders (BLIP's `visual_encoder_m`, `vision_proj_m`, `text_encoder_m`,
/// `text_proj_m`) and the feature queues. Never trained by gradients.
struct Momentum {
    model: BlipForImageTextRetrieval,
    /// (name, momentum copy, online variable).
    pairs: Vec<(String, Var, Var)>,
    /// `[E, Q]` normalised features, as BLIP's `image_queue` / `text_queue`.
    image_queue: Tensor,
    text_queue: Tensor,
    ptr: usize,
}

impl Momentum {
    /// `θ_m ← m θ_m + (1 − m) θ` (BLIP's `_momentum_update`).
    fn update(&self, m: f64) -> Result<()> {
        for (_, copy, online) in &self.pairs {
            let next = (copy.as_tensor().detach().affine(m, 0.0)?
                + online.as_tensor().detach().affine(1.0 - m, 0.0)?)?;
            copy.set(&next)?;
        }
        Ok(())
    }

    /// Writes `image` and `text` features `[B, E]` into the queues at the pointer, wrapping
    /// around (BLIP's `_dequeue_and_enqueue`).
    fn enqueue(&mut self, image: &Tensor, text: &Tensor) -> Result<()> {
        let q = self.image_queue.dim(1)?;
        if q == 0 {
            return Ok(());
        }
        let b = image.dim(0)?.min(q);
        let write = |queue: &Tensor, feats: &Tensor| -> Result<Tensor> {
            let cols = feats.narrow(0, 0, b)?.t()?;
            let mut parts = Vec::new();
            let first = b.min(q - self.ptr);
            let wrapped = b - first;
            if wrapped > 0 {
                parts.push(cols.narrow(1, first, wrapped)?);
            }
            if self.ptr > wrapped {
                parts.push(queue.narrow(1, wrapped, self.ptr - wrapped)?);
            }
            parts.push(cols.narrow(1, 0, first)?);
            let end = self.ptr + first;
            if end < q {
                parts.push(queue.narrow(1, end, q - end)?);
            }
            Ok(Tensor::cat(&parts, 1)?.contiguous()?)
        };
        self.image_queue = write(&self.image_queue, image)?;
        self.text_queue = write(&self.text_queue, text)?;
        self.ptr = (self.ptr + b) % q;
        Ok(())
    }
}

/// BLIP with its three objectives: the retrieval model (vision tower, text encoder,
/// projections, ITM head) and the captioner (decoder and LM head) share one set of variables.
pub struct TrainableBlipPretrain {
    pub retrieval: BlipForImageTextRetrieval,
    pub captioner: BlipForConditionalGeneration,
    pub config: BlipConfig,
    /// Every trainable variable: the untied parameters and `temp`.
    pub varmap: VarMap,
    pub tokenizer: TextTokenizer,
    pub processor: ImageProcessor,
    processor_json: Value,
    pub device: Device,
    /// Parameters of the model the pretrained checkpoint did not hold, freshly initialised.
    pub initialised: Vec<String>,
    temp: Var,
    momentum: Momentum,
    /// Every parameter name of the two HF models with its shape, tied ones included.
    names: Vec<(String, Shape)>,
}

impl TrainableBlipPretrain {
    /// A preset (see [`crate::blip_caption::PRESETS`]) with BLIP's initialisation, seeded.
    pub fn from_preset(
        name: &str,
        image_size: Option<usize>,
        settings: &PretrainSettings,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let config = preset_config(name, image_size)?;
        let names = parameter_shapes(&config)?;
        let mut rng = Rng::new(seed);
        let varmap = VarMap::new();
        {
            let mut data = lock(&varmap)?;
            for (name, shape) in trainable(&names) {
                let t = initial_value(name, shape, &mut rng, device)?;
                data.insert(name.clone(), Var::from_tensor(&t)?);
            }
            data.insert("temp".into(), Var::new(INIT_TEMP as f32, device)?);
        }
        let processor_json = preset_processor(config.vision_config.image_size);
        let tokenizer = TextTokenizer::bert_uncased()?;
        Self::assemble(
            config,
            names,
            varmap,
            (tokenizer, processor_json),
            None,
            settings,
            seed,
            device,
        )
    }

    /// Continues from a checkpoint: a folder or hub id holding at least an HF
    /// `BlipForImageTextRetrieval` (e.g. `Salesforce/blip-itm-base-coco`). Decoder weights come
    /// from its `text_decoder.*` when present (a zoo pretraining checkpoint) and are otherwise
    /// initialised, and listed in [`Self::initialised`]. The temperature, momentum encoders and
    /// queues come from its [`STATE_FILE`] when present; otherwise the momentum encoders start
    /// as copies, as BLIP's `copy_params` does.
    pub fn from_pretrained(
        spec: &str,
        settings: &PretrainSettings,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let repo = ModelRepo::open(spec)?;
        let config = BlipConfig::from_file(&repo.get("config.json")?)?;
        let names = parameter_shapes(&config)?;
        let weights = SafetensorsWeights::open(&repo.weight_files()?)?;
        let stored: HashSet<String> = weights.names().into_iter().collect();
        let vb = weights.into_var_builder(DType::F32, device);
        let state = match repo.get_optional(STATE_FILE)? {
            Some(path) => Some(
                candle_core::safetensors::load(&path, device)
                    .map_err(|e| Error::Input(format!("cannot read {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let mut rng = Rng::new(seed);
        let varmap = VarMap::new();
        let mut initialised = Vec::new();
        {
            let mut data = lock(&varmap)?;
            for (name, shape) in trainable(&names) {
                let source = match name.strip_suffix("cls.predictions.bias") {
                    Some(head) if !stored.contains(name) => {
                        format!("{head}cls.predictions.decoder.bias")
                    }
                    _ => name.clone(),
                };
                let t = if stored.contains(&source) {
                    vb.get(shape.clone(), &source).map_err(|e| {
                        Error::Input(format!(
                            "{} does not fit its BLIP config: {e}",
                            repo.describe()
                        ))
                    })?
                } else if name.starts_with("text_decoder.") {
                    initialised.push(name.clone());
                    initial_value(name, shape, &mut rng, device)?
                } else {
                    return Err(Error::Input(format!(
                        "{} has no `{name}`: BLIP pretraining starts from a \
                         BlipForImageTextRetrieval checkpoint (text_encoder, vision_proj, \
                         text_proj, itm_head), e.g. Salesforce/blip-itm-base-coco",
                        repo.describe()
                    )));
                };
                data.insert(name.clone(), Var::from_tensor(&t)?);
            }
            let temp = match state.as_ref().and_then(|s| s.get("temp")) {
                Some(t) => t.to_dtype(DType::F32)?.reshape(())?,
                None => Tensor::new(INIT_TEMP as f32, device)?,
            };
            data.insert("temp".into(), Var::from_tensor(&temp)?);
        }
        let tokenizer = TextTokenizer::from_files(
            &repo.get("tokenizer.json")?,
            repo.get_optional("tokenizer_config.json")?.as_deref(),
        )?;
        let processor_json: Value = zoo_models::hub::read_json(
            &repo.get("preprocessor_config.json")?,
            "preprocessor config",
        )?;
        let mut model = Self::assemble(
            config,
            names,
            varmap,
            (tokenizer, processor_json),
            state,
            settings,
            seed,
            device,
        )?;
        model.initialised = initialised;
        Ok(model)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: BlipConfig,
        names: Vec<(String, Shape)>,
        varmap: VarMap,
        (tokenizer, processor_json): (TextTokenizer, Value),
        state: Option<HashMap<String, Tensor>>,
        settings: &PretrainSettings,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if tokenizer.vocab_size() > config.text_config.vocab_size {
            return Err(Error::Input(format!(
                "the tokenizer has {} tokens but the BLIP text model's vocab_size is {}",
                tokenizer.vocab_size(),
                config.text_config.vocab_size
            )));
        }
        let vars = lock(&varmap)?.clone();
        let temp = vars
            .get("temp")
            .cloned()
            .ok_or_else(|| Error::Input("the BLIP pretraining variables lack `temp`".into()))?;
        let online = |name: &str| -> Result<Tensor> {
            let source = tied_source(name).unwrap_or_else(|| name.to_string());
            vars.get(&source)
                .map(|v| v.as_tensor().clone())
                .ok_or_else(|| Error::Input(format!("no variable `{source}`")))
        };
        let mut tensors = HashMap::new();
        for (name, _) in &names {
            tensors.insert(name.clone(), online(name)?);
        }
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, device);
        let retrieval = BlipForImageTextRetrieval::new(&config, vb.clone())?;
        let captioner = BlipForConditionalGeneration::new(&config, vb)?;

        // Momentum copies: from the saved state, or copies of the online encoders.
        let mut pairs = Vec::new();
        for (name, _) in names.iter().filter(|(n, _)| has_momentum(n)) {
            let source = online(name)?;
            let value = match state
                .as_ref()
                .and_then(|s| s.get(&format!("momentum.{name}")))
            {
                Some(t) => t.to_dtype(DType::F32)?,
                None => source.detach().copy()?,
            };
            if value.shape() != source.shape() {
                return Err(Error::Input(format!(
                    "{STATE_FILE}: momentum.{name} has shape {:?}, the model {:?}",
                    value.dims(),
                    source.dims()
                )));
            }
            let copy = Var::from_tensor(&value)?;
            // The variable itself, not a detached view: the momentum step updates it in place,
            // and layers keep derived copies (transposed weights) of plain tensors only.
            tensors.insert(name.clone(), copy.as_tensor().clone());
            pairs.push((name.clone(), copy, vars[name].clone()));
        }
        let momentum_model = BlipForImageTextRetrieval::new(
            &config,
            VarBuilder::from_tensors(tensors, DType::F32, device),
        )?;
        let e = config.image_text_hidden_size;
        let q = settings.queue_size;
        let saved_queue = |key: &str| -> Result<Option<Tensor>> {
            match state.as_ref().and_then(|s| s.get(key)) {
                Some(t) if t.dims() == [e, q] => Ok(Some(t.to_dtype(DType::F32)?)),
                Some(t) => Err(Error::Input(format!(
                    "{STATE_FILE}: {key} has shape {:?}, but this run's queue is [{e}, {q}] \
                     (--queue-size must match the checkpoint's)",
                    t.dims()
                ))),
                None => Ok(None),
            }
        };
        let mut rng = Rng::derive(seed, 0xb11b);
        let mut random_queue = || -> Result<Tensor> {
            let t = rng.normal_tensor((e, q), 1.0, device)?;
            Ok(t.broadcast_div(&t.sqr()?.sum_keepdim(0)?.sqrt()?)?)
        };
        let image_queue = match saved_queue("image_queue")? {
            Some(t) => t,
            None => random_queue()?,
        };
        let text_queue = match saved_queue("text_queue")? {
            Some(t) => t,
            None => random_queue()?,
        };
        let ptr = match state.as_ref().and_then(|s| s.get("queue_ptr")) {
            Some(t) => t.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?[0] as usize,
            None => 0,
        };
        let processor = ImageProcessor::new(
            ImageProcessorConfig::from_json(&processor_json.to_string())
                .map_err(|e| Error::Input(format!("preprocessor config: {e}")))?,
        );
        Ok(Self {
            retrieval,
            captioner,
            config,
            varmap,
            tokenizer,
            processor,
            processor_json,
            device: device.clone(),
            initialised: Vec::new(),
            temp,
            momentum: Momentum {
                model: momentum_model,
                pairs,
                image_queue,
                text_queue,
                ptr: if q == 0 { 0 } else { ptr % q },
            },
            names,
        })
    }

    /// Every trainable variable, sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The current temperature.
    pub fn temperature(&self) -> Result<f64> {
        Ok(f64::from(self.temp.as_tensor().to_scalar::<f32>()?))
    }

    /// Token length of the training captions: BLIP's 30, or less if the model is shorter.
    pub fn max_text_len(&self) -> usize {
        let model = MAX_PRETRAIN_TOKENS.min(self.config.text_config.max_position_embeddings);
        self.tokenizer
            .model_max_length()
            .map_or(model, |t| t.min(model))
    }

    /// The three losses of a batch of images `[B, 3, H, W]` and their `[CLS] caption [SEP]` ids
    /// and mask `[B, L]`. Like BLIP's `forward`, this clamps the temperature, takes a momentum
    /// step and enqueues the momentum features. `rng` draws the hard negatives.
    pub fn losses(
        &mut self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        alpha: f64,
        momentum: f64,
        rng: &mut Rng,
    ) -> Result<PretrainLosses> {
        let b = pixel_values.dim(0)?;
        if b < 2 {
            return Err(Error::Input(
                "BLIP pretraining needs at least 2 pairs per batch (ITM draws its negatives \
                 from the other pairs)"
                    .into(),
            ));
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let (lo, hi) = TEMP_RANGE;
        self.temp
            .set(&self.temp.as_tensor().detach().clamp(lo, hi)?)?;
        let temp = self.temp.as_tensor();

        // Image-text contrastive, with momentum distillation.
        let image_embeds = self.retrieval.vision_model.forward(pixel_values)?;
        let image_feat = self.retrieval.image_features(&image_embeds)?;
        let text_feat = self.retrieval.text_features(&ids, Some(attention_mask))?;

        self.momentum.update(momentum)?;
        let m = &self.momentum.model;
        // Momentum features carry no gradient (BLIP computes them under `no_grad`).
        let image_feat_m = m
            .image_features(&m.vision_model.forward(pixel_values)?)?
            .detach();
        let text_feat_m = m.text_features(&ids, Some(attention_mask))?.detach();
        let with_queue = |feat: &Tensor, queue: &Tensor| -> Result<Tensor> {
            Ok(if queue.dim(1)? == 0 {
                feat.t()?
            } else {
                Tensor::cat(&[&feat.t()?, queue], 1)?
            })
        };
        let image_feat_all = with_queue(&image_feat_m, &self.momentum.image_queue)?;
        let text_feat_all = with_queue(&text_feat_m, &self.momentum.text_queue)?;
        let detached_temp = temp.detach();
        let sim_i2t_m = image_feat_m
            .matmul(&text_feat_all)?
            .broadcast_div(&detached_temp)?;
        let sim_t2i_m = text_feat_m
            .matmul(&image_feat_all)?
            .broadcast_div(&detached_temp)?;
        // Rows with the same caption are each other's positives (BLIP's retrieval fine-tuning
        // does this for pairs of one image id; exact duplicate captions are its analogue).
        let rows = ids.to_vec2::<u32>()?;
        let same: Vec<Vec<bool>> = rows
            .iter()
            .map(|a| rows.iter().map(|b| a == b).collect())
            .collect();
        let positives = positive_targets(&same, image_feat_all.dim(1)?, pixel_values.device())?;
        let soft_targets = |sim_m: &Tensor| -> Result<Tensor> {
            let p = candle_nn::ops::softmax(sim_m, D::Minus1)?;
            Ok((p.affine(alpha, 0.0)? + positives.affine(1.0 - alpha, 0.0)?)?)
        };
        let sim_i2t = image_feat.matmul(&text_feat_all)?.broadcast_div(temp)?;
        let sim_t2i = text_feat.matmul(&image_feat_all)?.broadcast_div(temp)?;
        let itc = ((soft_cross_entropy(&sim_i2t, &soft_targets(&sim_i2t_m)?)?
            + soft_cross_entropy(&sim_t2i, &soft_targets(&sim_t2i_m)?)?)?
            / 2.0)?;
        self.momentum.enqueue(&image_feat_m, &text_feat_m)?;

        // Image-text matching: the positives, then a hard negative image for each text and a
        // hard negative text for each image.
        let negative_image = sample_negatives(&sim_t2i.narrow(1, 0, b)?, &same, rng)?;
        let negative_text = sample_negatives(&sim_i2t.narrow(1, 0, b)?, &same, rng)?;
        let dev = pixel_values.device();
        let neg_images = Tensor::new(negative_image, dev)?;
        let neg_texts = Tensor::new(negative_text, dev)?;
        let itm_images = Tensor::cat(
            &[
                &image_embeds,
                &image_embeds.index_select(&neg_images, 0)?,
                &image_embeds,
            ],
            0,
        )?;
        let itm_ids = Tensor::cat(&[&ids, &ids, &ids.index_select(&neg_texts, 0)?], 0)?;
        let itm_mask = Tensor::cat(
            &[
                attention_mask,
                attention_mask,
                &attention_mask.index_select(&neg_texts, 0)?,
            ],
            0,
        )?;
        let itm_logits = self
            .retrieval
            .itm_logits(&itm_images, &itm_ids, Some(&itm_mask))?;
        let labels: Vec<u32> = (0..3 * b).map(|i| u32::from(i < b)).collect();
        let itm = cross_entropy(&itm_logits, &Tensor::new(labels, dev)?)?;

        // Language modelling: the caption after `[DEC]`.
        let bos = self.config.text_config.bos_token_id;
        let mut rows = rows;
        for row in &mut rows {
            row[0] = bos;
        }
        let decoder_ids = Tensor::new(rows, dev)?;
        let lm = self.captioner.caption_loss_on(
            &image_embeds,
            &decoder_ids,
            attention_mask,
            0,
            LM_LABEL_SMOOTHING,
        )?;
        Ok(PretrainLosses { itc, itm, lm })
    }

    /// HF's `config.json`: `model_type` blip, loadable as either architecture.
    pub fn hf_config(&self) -> Value {
        let mut cfg = serde_json::to_value(&self.config).unwrap_or_default();
        cfg["model_type"] = "blip".into();
        cfg["architectures"] = json!(["BlipForImageTextRetrieval", "BlipForConditionalGeneration"]);
        cfg["text_config"]["model_type"] = "blip_text_model".into();
        cfg["vision_config"]["model_type"] = "blip_vision_model".into();
        cfg
    }

    /// Writes the model into `dir` in HF layout (every parameter of both architectures, tied
    /// ones under both names), with the tokenizer and image processor, and [`STATE_FILE`].
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let vars = lock(&self.varmap)?;
        let mut tensors = HashMap::new();
        for (name, _) in &self.names {
            let source = tied_source(name).unwrap_or_else(|| name.clone());
            let var = vars
                .get(&source)
                .ok_or_else(|| Error::Input(format!("no variable `{source}`")))?;
            tensors.insert(name.clone(), var.as_tensor().detach());
        }
        drop(vars);
        save_hf_folder(
            &tensors,
            dir,
            &self.hf_config(),
            Some(&self.processor_json),
            &self.tokenizer,
            None,
        )?;
        let mut state = HashMap::new();
        state.insert("temp".to_string(), self.temp.as_tensor().detach());
        for (name, copy, _) in &self.momentum.pairs {
            state.insert(format!("momentum.{name}"), copy.as_tensor().detach());
        }
        state.insert("image_queue".into(), self.momentum.image_queue.clone());
        state.insert("text_queue".into(), self.momentum.text_queue.clone());
        state.insert(
            "queue_ptr".into(),
            Tensor::new(&[self.momentum.ptr as u32], &self.device)?,
        );
        zoo_models::weights::save_safetensors_atomic(&state, &dir.join(STATE_FILE))?;
        Ok(())
    }
}

/// `−Σ_j targets_ij · log softmax(logits)_ij`, averaged over rows.
fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok((logp * targets)?.sum(D::Minus1)?.mean_all()?.neg()?)
}

/// ITC's hard targets `[B, cols]`: for row `i`, `1/k` at each of the `k` in-batch columns
/// whose caption equals row `i`'s (at least `i` itself), 0 elsewhere (the queue).
fn positive_targets(same: &[Vec<bool>], cols: usize, device: &Device) -> Result<Tensor> {
    let b = same.len();
    let mut v = vec![0f32; b * cols];
    for (i, row) in same.iter().enumerate() {
        let k = row.iter().filter(|&&s| s).count().max(1) as f32;
        for (j, &s) in row.iter().enumerate() {
            if s {
                v[i * cols + j] = 1.0 / k;
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, cols), device)?)
}

/// For each row of in-batch similarities `[B, B]`, one column drawn with probability
/// proportional to `softmax(row) + 1e-4` (BLIP's `torch.multinomial` over `weights_t2i` /
/// `weights_i2t`), never the row itself nor a pair with the same caption (`same`), unless every
/// other pair has it.
fn sample_negatives(sim: &Tensor, same: &[Vec<bool>], rng: &mut Rng) -> Result<Vec<u32>> {
    let weights = candle_nn::ops::softmax(&sim.detach(), D::Minus1)?.to_vec2::<f32>()?;
    weights
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let all_same = (0..row.len()).all(|j| j == i || same[i][j]);
            let w: Vec<f64> = row
                .iter()
                .enumerate()
                .map(|(j, &p)| {
                    if j == i || (same[i][j] && !all_same) {
                        0.0
                    } else {
                        f64::from(p) + NEGATIVE_FLOOR
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            if !(total > 0.0 && total.is_finite()) {
                return Err(Error::Input(format!(
                    "cannot draw a hard negative: the similarities of row {i} are not finite"
                )));
            }
            let mut r = rng.uniform() * total;
            let mut pick = 0;
            for (j, &wj) in w.iter().enumerate() {
                if wj > 0.0 {
                    pick = j;
                    if r < wj {
                        break;
                    }
                    r -= wj;
                }
            }
            Ok(pick as u32)
        })
        .collect()
}

fn has_momentum(name: &str) -> bool {
    MOMENTUM_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The parameters that are variables: all but the decoder's tied ones.
fn trainable(names: &[(String, Shape)]) -> impl Iterator<Item = (&String, &Shape)> {
    names
        .iter()
        .filter(|(n, _)| tied_source(n).is_none())
        .map(|(n, s)| (n, s))
}

fn lock(varmap: &VarMap) -> Result<std::sync::MutexGuard<'_, HashMap<String, Var>>> {
    varmap
        .data()
        .lock()
        .map_err(|_| Error::Input("poisoned varmap".into()))
}

/// The name and shape of every parameter of `BlipForImageTextRetrieval` and
/// `BlipForConditionalGeneration` (without the LM head's tied `decoder.weight`), sorted.
fn parameter_shapes(config: &BlipConfig) -> Result<Vec<(String, Shape)>> {
    let probe = VarMap::new();
    let vb = VarBuilder::from_varmap(&probe, DType::F32, &Device::Cpu);
    BlipForImageTextRetrieval::new(config, vb.clone())?;
    BlipForConditionalGeneration::new(config, vb)?;
    let mut specs: Vec<(String, Shape)> = lock(&probe)?
        .iter()
        .map(|(n, v)| (n.clone(), v.shape().clone()))
        .collect();
    specs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(specs)
}

/// Held-out pairs for evaluation: ITC retrieval recall and greedy-caption BLEU-4 / CIDEr-D.
pub struct PretrainEvalSet {
    captions: CaptionEvalSet,
    ids: Tensor,
    mask: Tensor,
}

impl PretrainEvalSet {
    pub fn from_pairs(pairs: &[Pair], model: &TrainableBlipPretrain) -> Result<Self> {
        let captions = CaptionEvalSet::from_pairs(pairs, &model.processor, &model.device)?;
        let texts: Vec<&str> = pairs.iter().map(|p| p.caption.as_str()).collect();
        let enc = model
            .tokenizer
            .encode_batch(&texts, Padding::Longest, model.max_text_len())?;
        let to_tensor =
            |rows: Vec<Vec<u32>>| -> Result<Tensor> { Ok(Tensor::new(rows, &model.device)?) };
        Ok(Self {
            captions,
            ids: to_tensor(enc.input_ids)?,
            mask: to_tensor(enc.attention_mask)?,
        })
    }

    fn evaluate(&self, model: &TrainableBlipPretrain) -> Result<Vec<(String, f64)>> {
        let mut image = Vec::new();
        for pixels in &self.captions.pixel_values {
            let embeds = model.retrieval.vision_model.forward(pixels)?;
            image.push(model.retrieval.image_features(&embeds)?);
        }
        let image = Tensor::cat(&image, 0)?;
        let text = model.retrieval.text_features(&self.ids, Some(&self.mask))?;
        let recall = retrieval_report(&image, &text)?;
        let mut metrics: Vec<(String, f64)> = vec![
            ("val_image_to_text_R@1".into(), recall.image_to_text[0]),
            ("val_text_to_image_R@1".into(), recall.text_to_image[0]),
        ];
        metrics.extend(
            self.captions
                .score(&model.captioner, &model.tokenizer, "")?,
        );
        Ok(metrics)
    }
}

/// BLIP pretraining on batches of images and `[CLS] caption [SEP]` ids.
pub struct PretrainTask {
    pub model: TrainableBlipPretrain,
    loader: BatchLoader,
    position: DataPosition,
    settings: PretrainSettings,
    seed: u64,
    /// Optimizer steps taken, for α's ramp.
    step: u64,
    /// Micro-batches drawn, which seed each batch's negative sampling.
    micro_batches: u64,
    /// Sums of (ITC, ITM, LM) over the micro-batches of the current step, and their count.
    sums: ([f64; 3], usize),
    last: Vec<(String, f64)>,
    pub eval: Option<PretrainEvalSet>,
}

impl PretrainTask {
    pub fn new(
        model: TrainableBlipPretrain,
        loader: BatchLoader,
        state: &TrainState,
        accum_freq: usize,
        settings: PretrainSettings,
    ) -> Self {
        Self {
            model,
            loader,
            position: state.data,
            settings,
            seed: state.seed,
            step: state.step,
            micro_batches: state.step * accum_freq.max(1) as u64,
            sums: ([0.0; 3], 0),
            last: Vec::new(),
            eval: None,
        }
    }
}

impl Task for PretrainTask {
    type Batch = ContrastiveBatch;

    fn next_batch(&mut self) -> Result<ContrastiveBatch> {
        let batch = self.loader.next_batch()?;
        self.position = batch.position;
        Ok(batch)
    }

    fn data_position(&self) -> DataPosition {
        self.position
    }

    fn batch_size(&self, batch: &ContrastiveBatch) -> usize {
        batch.pixel_values.dim(0).unwrap_or(0)
    }

    fn loss(&mut self, batch: &ContrastiveBatch) -> Result<Tensor> {
        let mask = batch
            .attention_mask
            .as_ref()
            .ok_or_else(|| Error::Input("pretraining batches need an attention mask".into()))?;
        let mut rng = Rng::derive(self.seed, 0x17a_0000_0000 + self.micro_batches);
        self.micro_batches += 1;
        let losses = self.model.losses(
            &batch.pixel_values,
            &batch.input_ids,
            mask,
            self.settings.alpha_at(self.step),
            self.settings.momentum,
            &mut rng,
        )?;
        for (sum, loss) in self
            .sums
            .0
            .iter_mut()
            .zip([&losses.itc, &losses.itm, &losses.lm])
        {
            *sum += f64::from(loss.to_scalar::<f32>()?);
        }
        self.sums.1 += 1;
        losses.total()
    }

    fn after_step(&mut self) -> Result<()> {
        let n = self.sums.1.max(1) as f64;
        let [itc, itm, lm] = self.sums.0.map(|s| s / n);
        self.last = vec![
            ("loss_itc".into(), itc),
            ("loss_itm".into(), itm),
            ("loss_lm".into(), lm),
            ("temp".into(), self.model.temperature()?),
            ("alpha".into(), self.settings.alpha_at(self.step)),
            (
                "skipped_samples".into(),
                self.loader.skipped().total() as f64,
            ),
        ];
        self.sums = ([0.0; 3], 0);
        self.step += 1;
        Ok(())
    }

    fn step_metrics(&self) -> Result<Vec<(String, f64)>> {
        Ok(self.last.clone())
    }

    fn evaluate(&mut self, _output: &Path, _step: u64) -> Result<Vec<(String, f64)>> {
        match &self.eval {
            Some(set) => set.evaluate(&self.model),
            None => Ok(Vec::new()),
        }
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.model.save_hf(dir)
    }
}

/// Where the model of a pretraining run comes from.
#[derive(Debug, Clone)]
pub enum ModelSpec {
    Preset(String),
    /// A `BlipForImageTextRetrieval` folder or hub id (or a zoo pretraining checkpoint).
    Pretrained(String),
}

/// Everything a pretraining run needs; `zoo train blip --objective pretrain` fills it.
pub struct RunConfig {
    pub model: ModelSpec,
    pub settings: PretrainSettings,
    pub train: TrainConfig,
    pub batch_size: usize,
    pub workers: usize,
    pub optimizer: AdamWConfig,
    pub image_size: Option<usize>,
    pub augment: bool,
    pub max_bad_fraction: f64,
    pub resume: Option<PathBuf>,
    pub device: Device,
}

/// The data of a pretraining run: training pairs, and held-out pairs to evaluate on.
pub struct RunData {
    pub train: StreamFactory,
    pub val: Option<Vec<Pair>>,
}

pub struct RunSummary {
    pub state: TrainState,
    pub task: PretrainTask,
    pub final_dir: PathBuf,
}

/// Builds the model (preset, pretrained or resumed, with its momentum state), the loader, the
/// optimizer and the metrics log, then trains with the shared loop.
pub fn run(config: RunConfig, data: RunData) -> Result<RunSummary> {
    if config.batch_size < 2 {
        return Err(Error::Input(
            "BLIP pretraining needs --batch-size of at least 2 (ITM negatives come from the \
             batch)"
                .into(),
        ));
    }
    let resume_dir = config
        .resume
        .as_deref()
        .map(checkpoint::resolve)
        .transpose()?;
    let seed = config.train.seed;
    let model = match (&resume_dir, &config.model) {
        (Some(dir), _) => {
            if !dir.join(STATE_FILE).exists() {
                return Err(Error::Input(format!(
                    "{} has no {STATE_FILE}: it is not a BLIP pretraining checkpoint",
                    dir.display()
                )));
            }
            TrainableBlipPretrain::from_pretrained(
                &dir.to_string_lossy(),
                &config.settings,
                seed,
                &config.device,
            )?
        }
        (None, ModelSpec::Preset(name)) => TrainableBlipPretrain::from_preset(
            name,
            config.image_size,
            &config.settings,
            seed,
            &config.device,
        )?,
        (None, ModelSpec::Pretrained(spec)) => {
            let mut model = TrainableBlipPretrain::from_pretrained(
                spec,
                &config.settings,
                seed,
                &config.device,
            )?;
            if let Some(size) = config.image_size {
                let v = &model.config.vision_config;
                let stored = (v.image_size, v.patch_size);
                if let Some(p) = fine_tune_at(&mut model.processor_json, size, stored)? {
                    model.processor = p;
                }
            }
            model
        }
    };
    if !model.initialised.is_empty() {
        eprintln!(
            "{} decoder tensors were not in the checkpoint and start from BLIP's \
             initialisation (e.g. {})",
            model.initialised.len(),
            model.initialised[0]
        );
    }
    let state = initial_state(resume_dir.as_deref(), seed)?;
    let vars = model.trainable_vars();
    let loader_config = LoaderConfig {
        batch_size: config.batch_size,
        workers: config.workers,
        seed: state.seed,
        augment: config.augment,
        max_bad_fraction: config.max_bad_fraction,
        max_text_len: model.max_text_len(),
        padding: Padding::Longest,
        use_attention_mask: true,
    };
    let loader = BatchLoader::start(
        data.train,
        state.data,
        model.processor.clone(),
        model.tokenizer.clone(),
        loader_config,
        &config.device,
    )?;
    let eval = data
        .val
        .map(|pairs| PretrainEvalSet::from_pairs(&pairs, &model))
        .transpose()?;
    let mut task = PretrainTask::new(
        model,
        loader,
        &state,
        config.train.accum_freq,
        config.settings,
    );
    task.eval = eval;
    let state = run_task(
        &mut task,
        &vars,
        config.optimizer,
        &config.train,
        resume_dir.as_deref(),
        state,
        &config.device,
    )?;
    Ok(RunSummary {
        state,
        task,
        final_dir: config.train.output.join("final"),
    })
}

/// Pixel values of `images` as the model preprocesses them (no augmentation).
pub fn preprocess(
    model: &TrainableBlipPretrain,
    images: &[&image::DynamicImage],
) -> Result<Tensor> {
    pixel_values(&model.processor, images, &model.device)
}
