//! BLIP caption training (`zoo train blip --objective caption`): [`TrainableBlipCaptioner`], a
//! `BlipForConditionalGeneration` whose weights are variables named as in the HF checkpoint;
//! [`CaptionTask`], the LM objective of salesforce/BLIP's `BLIP_Decoder` for the training loop;
//! and [`run`], which sets up a whole run from a [`RunConfig`].
//!
//! A caption is learned as `[DEC] prompt caption [SEP]`: the tokenizer's `[CLS]` is replaced by
//! `[DEC]`, and `[DEC]`, the prompt and the padding are not targets of the loss.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};
use zoo_datasets::preprocess::{ImageProcessor, ImageProcessorConfig};
use zoo_datasets::sources::Pair;
use zoo_datasets::tokenize::{Padding, TextTokenizer};
use zoo_models::blip::{
    BlipConfig, BlipForConditionalGeneration, BlipTextConfig, BlipVisionConfig,
};
use zoo_models::generation::GenerationConfig;
use zoo_models::hub::ModelRepo;
use zoo_models::weights::SafetensorsWeights;

use crate::caption_metrics::score_captions;
use crate::checkpoint;
use crate::data::{
    BatchLoader, ContrastiveBatch, DataPosition, LoaderConfig, StreamFactory, TextEncoder,
};
use crate::error::{Error, Result};
use crate::model::{fine_tune_at, save_hf_folder, varmap_tensors};
use crate::optim::AdamWConfig;
use crate::precision::Precision;
use crate::rng::Rng;
use crate::train::{initial_state, run_task, Task, TrainConfig, TrainState};

/// The presets `zoo train blip` can start from scratch.
pub const PRESETS: &str = "blip-tiny";

/// salesforce/BLIP's captioning prompt (`configs/caption_coco.yaml`).
pub const DEFAULT_PROMPT: &str = "a picture of ";

/// salesforce/BLIP's label smoothing for the captioning loss (`BLIP_Decoder.forward`).
pub const DEFAULT_LABEL_SMOOTHING: f64 = 0.1;

/// salesforce/BLIP truncates training captions (with the prompt) to 40 tokens.
const MAX_CAPTION_TOKENS: usize = 40;

/// Standard deviation of every initial weight: BERT's `initializer_range`, and the
/// `trunc_normal_(std=.02)` of salesforce/BLIP's ViT position table and class token.
const INIT_STD: f64 = 0.02;

/// The config of a preset. Presets tokenize with the bundled BERT tokenizer
/// ([`TextTokenizer::bert_uncased`]), so their vocabulary is BLIP's 30 524 tokens.
pub fn preset_config(name: &str, image_size: Option<usize>) -> Result<BlipConfig> {
    let mut cfg = match name {
        "blip-tiny" => BlipConfig {
            text_config: BlipTextConfig {
                hidden_size: 64,
                encoder_hidden_size: 64,
                intermediate_size: 256,
                projection_dim: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                max_position_embeddings: 64,
                ..BlipTextConfig::default()
            },
            vision_config: BlipVisionConfig {
                hidden_size: 64,
                intermediate_size: 256,
                projection_dim: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                image_size: 32,
                patch_size: 8,
                ..BlipVisionConfig::default()
            },
            projection_dim: 64,
            image_text_hidden_size: 64,
            ..BlipConfig::default()
        },
        other => {
            return Err(Error::Input(format!(
                "unknown BLIP preset `{other}`; presets: {PRESETS}, or give an HF \
                 BlipForConditionalGeneration folder or hub id"
            )))
        }
    };
    if let Some(size) = image_size {
        cfg.vision_config.image_size = size;
    }
    Ok(cfg)
}

/// HF `BlipImageProcessor` at `size`: bicubic resize to a square, OpenAI CLIP's mean and std.
pub(crate) fn preset_processor(size: usize) -> Value {
    json!({
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "BlipProcessor",
        "do_convert_rgb": true,
        "do_resize": true, "size": {"height": size, "width": size}, "resample": 3,
        "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
        "image_mean": zoo_datasets::preprocess::OPENAI_CLIP_MEAN,
        "image_std": zoo_datasets::preprocess::OPENAI_CLIP_STD,
    })
}

/// A BLIP captioner whose weights are trainable variables. The LM head's weight is the word
/// embedding table itself (one variable), as HF ties them.
pub struct TrainableBlipCaptioner {
    pub model: BlipForConditionalGeneration,
    pub config: BlipConfig,
    pub varmap: VarMap,
    pub tokenizer: TextTokenizer,
    pub processor: ImageProcessor,
    processor_json: Value,
    pub device: Device,
}

impl TrainableBlipCaptioner {
    /// A preset with weights drawn from an RNG seeded with `seed` (see [`initial_value`]).
    pub fn from_preset(
        name: &str,
        image_size: Option<usize>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let config = preset_config(name, image_size)?;
        let mut rng = Rng::new(seed);
        let varmap = VarMap::new();
        {
            let mut data = lock(&varmap)?;
            for (name, shape) in parameter_shapes(&config)? {
                let t = initial_value(&name, &shape, &mut rng, device)?;
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        let processor_json = preset_processor(config.vision_config.image_size);
        Self::assemble(
            config,
            varmap,
            TextTokenizer::bert_uncased()?,
            processor_json,
            device,
        )
    }

    /// Fine-tuning: every parameter of an HF `BlipForConditionalGeneration` (folder or hub id)
    /// becomes a variable. A stored `cls.predictions.decoder.weight` is dropped, as HF ties it
    /// to the word embeddings; a `decoder.bias` stands in for a missing `bias`.
    pub fn from_pretrained(spec: &str, device: &Device) -> Result<Self> {
        let repo = ModelRepo::open(spec)?;
        let config = BlipConfig::from_file(&repo.get("config.json")?)?;
        let weights = SafetensorsWeights::open(&repo.weight_files()?)?;
        let stored: HashSet<String> = weights.names().into_iter().collect();
        let vb = weights.into_var_builder(DType::F32, device);
        let varmap = VarMap::new();
        {
            let mut data = lock(&varmap)?;
            for (name, shape) in parameter_shapes(&config)? {
                let source = match name.strip_suffix("cls.predictions.bias") {
                    Some(head) if !stored.contains(&name) => {
                        format!("{head}cls.predictions.decoder.bias")
                    }
                    _ => name.clone(),
                };
                let t = vb.get(shape, &source).map_err(|e| {
                    Error::Input(format!(
                        "{} does not fit its BlipForConditionalGeneration config: {e}",
                        repo.describe()
                    ))
                })?;
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        let tokenizer = TextTokenizer::from_files(
            &repo.get("tokenizer.json")?,
            repo.get_optional("tokenizer_config.json")?.as_deref(),
        )?;
        let processor_json: Value = zoo_models::hub::read_json(
            &repo.get("preprocessor_config.json")?,
            "preprocessor config",
        )?;
        Self::assemble(config, varmap, tokenizer, processor_json, device)
    }

    fn assemble(
        config: BlipConfig,
        varmap: VarMap,
        tokenizer: TextTokenizer,
        processor_json: Value,
        device: &Device,
    ) -> Result<Self> {
        if tokenizer.vocab_size() > config.text_config.vocab_size {
            return Err(Error::Input(format!(
                "the tokenizer has {} tokens but the BLIP text model's vocab_size is {}",
                tokenizer.vocab_size(),
                config.text_config.vocab_size
            )));
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = BlipForConditionalGeneration::new(&config, vb)?;
        let processor = ImageProcessor::new(
            ImageProcessorConfig::from_json(&processor_json.to_string())
                .map_err(|e| Error::Input(format!("preprocessor config: {e}")))?,
        );
        Ok(Self {
            model,
            config,
            varmap,
            tokenizer,
            processor,
            processor_json,
            device: device.clone(),
        })
    }

    /// Every variable, sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The token length training captions are truncated to: salesforce/BLIP's 40, or less if
    /// the position table or tokenizer is shorter.
    pub fn max_text_len(&self) -> usize {
        let model = MAX_CAPTION_TOKENS.min(self.config.text_config.max_position_embeddings);
        self.tokenizer
            .model_max_length()
            .map_or(model, |t| t.min(model))
    }

    /// How many leading tokens of `[DEC] prompt caption [SEP]` are `[DEC]` and the prompt:
    /// salesforce/BLIP's `prompt_length = len(tokenizer(prompt).input_ids) - 1`.
    pub fn prompt_length(&self, prompt: &str) -> Result<usize> {
        Ok(self.tokenizer.encode(prompt)?.len().saturating_sub(1))
    }

    /// The ids of `[DEC] prompt caption [SEP]` for each caption, truncated to
    /// [`max_text_len`](Self::max_text_len): what the loader's workers produce.
    pub fn caption_encoder(&self, prompt: &str) -> TextEncoder {
        let (tokenizer, prompt) = (self.tokenizer.clone(), prompt.to_string());
        let (bos, max_len) = (self.config.text_config.bos_token_id, self.max_text_len());
        Arc::new(move |caption: &str| {
            let text = format!("{prompt}{caption}");
            let mut ids = tokenizer
                .encode_batch(&[text.as_str()], Padding::Longest, max_len)?
                .input_ids
                .remove(0);
            if let Some(first) = ids.first_mut() {
                *first = bos;
            }
            Ok(ids)
        })
    }

    /// Greedy captions of `pixel_values` (see [`greedy_captions`]).
    pub fn caption(
        &self,
        pixel_values: &Tensor,
        prompt: &str,
        max_new_tokens: usize,
    ) -> Result<Vec<(Vec<u32>, String)>> {
        greedy_captions(
            &self.model,
            &self.tokenizer,
            pixel_values,
            prompt,
            max_new_tokens,
        )
    }

    /// Pixel values `[N, 3, H, W]` of images, with HF's preprocessing (no augmentation).
    pub fn pixel_values(&self, images: &[&image::DynamicImage]) -> Result<Tensor> {
        pixel_values(&self.processor, images, &self.device)
    }

    /// HF's `config.json` of the model: `model_type` blip, `BlipForConditionalGeneration`.
    pub fn hf_config(&self) -> Value {
        let mut cfg = serde_json::to_value(&self.config).unwrap_or_default();
        cfg["model_type"] = "blip".into();
        cfg["architectures"] = json!(["BlipForConditionalGeneration"]);
        cfg["text_config"]["model_type"] = "blip_text_model".into();
        cfg["vision_config"]["model_type"] = "blip_vision_model".into();
        cfg
    }

    /// Writes an HF-layout checkpoint into `dir` that `zoo caption` and HF transformers load:
    /// `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
    /// `preprocessor_config.json`. Fails, writing nothing, if any weight is not finite.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        save_hf_folder(
            &varmap_tensors(&self.varmap)?,
            dir,
            &self.hf_config(),
            Some(&self.processor_json),
            &self.tokenizer,
            None,
        )
    }
}

fn lock(varmap: &VarMap) -> Result<std::sync::MutexGuard<'_, HashMap<String, Var>>> {
    varmap
        .data()
        .lock()
        .map_err(|_| Error::Input("poisoned varmap".into()))
}

/// The name and shape of every parameter the captioner reads, sorted by name: the variables
/// building it against an empty `VarMap` creates. That `VarMap` holds no
/// `cls.predictions.decoder.*`, so the LM head takes the tied word embeddings and `bias`.
fn parameter_shapes(config: &BlipConfig) -> Result<Vec<(String, Shape)>> {
    let probe = VarMap::new();
    BlipForConditionalGeneration::new(
        config,
        VarBuilder::from_varmap(&probe, DType::F32, &Device::Cpu),
    )?;
    let mut specs: Vec<(String, Shape)> = lock(&probe)?
        .iter()
        .map(|(n, v)| (n.clone(), v.shape().clone()))
        .collect();
    specs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(specs)
}

/// Initial value of a parameter, as BLIP initialises: norms at (1, 0), biases at 0, every other
/// weight (linear, embedding, patch conv, position table, class token) N(0, 0.02²).
pub fn initial_value(name: &str, shape: &Shape, rng: &mut Rng, device: &Device) -> Result<Tensor> {
    let is_norm = ["norm", "LayerNorm"].iter().any(|k| name.contains(k));
    Ok(if name.ends_with("bias") {
        Tensor::zeros(shape, DType::F32, device)?
    } else if is_norm {
        Tensor::ones(shape, DType::F32, device)?
    } else {
        rng.normal_tensor(shape, INIT_STD, device)?
    })
}

/// Greedy captions of `pixel_values` `[B, 3, H, W]` continuing `prompt` (empty: none): the
/// generated token ids after `[DEC]` and the prompt, without the final `[SEP]`, and their
/// decoded text.
pub fn greedy_captions(
    model: &BlipForConditionalGeneration,
    tokenizer: &TextTokenizer,
    pixel_values: &Tensor,
    prompt: &str,
    max_new_tokens: usize,
) -> Result<Vec<(Vec<u32>, String)>> {
    let prompt_ids = if prompt.is_empty() {
        None
    } else {
        let ids = tokenizer.encode(prompt)?;
        Some(Tensor::new(vec![ids], pixel_values.device())?)
    };
    // Rows start with `[DEC]` and the prompt's tokens.
    let start = tokenizer.encode(prompt)?.len().saturating_sub(1).max(1);
    let cfg = GenerationConfig {
        max_new_tokens,
        ..model.generation_defaults()
    };
    let sep = model.config.text_config.sep_token_id;
    let pad = model.config.text_config.pad_token_id;
    let rows = model.generate(pixel_values, prompt_ids.as_ref(), &cfg)?;
    rows.into_iter()
        .map(|row| {
            let new: Vec<u32> = row[start.min(row.len())..]
                .iter()
                .copied()
                .take_while(|&t| t != sep && t != pad)
                .collect();
            let text = tokenizer
                .inner()
                .decode(&new, true)
                .map_err(|e| Error::Input(format!("cannot decode a caption: {e}")))?;
            Ok((new, text))
        })
        .collect()
}

/// Pixel values `[N, 3, H, W]` of images, with HF's preprocessing (no augmentation).
pub fn pixel_values(
    processor: &ImageProcessor,
    images: &[&image::DynamicImage],
    device: &Device,
) -> Result<Tensor> {
    let mut pixels = Vec::new();
    let mut dims = (0, 0);
    for image in images {
        let (values, h, w) = processor.preprocess(image).map_err(Error::Input)?;
        dims = (h, w);
        pixels.extend(values);
    }
    Ok(Tensor::from_vec(
        pixels,
        (images.len(), 3, dims.0, dims.1),
        device,
    )?)
}

/// Held-out pairs whose greedy captions are scored (BLEU-4, CIDEr-D) at each evaluation.
pub struct CaptionEvalSet {
    pub pixel_values: Vec<Tensor>,
    pub captions: Vec<String>,
}

/// Images captioned per generation call during evaluation.
const EVAL_CHUNK: usize = 32;

impl CaptionEvalSet {
    /// Preprocesses `pairs` (no augmentation) for repeated evaluation.
    pub fn from_pairs(pairs: &[Pair], processor: &ImageProcessor, device: &Device) -> Result<Self> {
        let pixel_values = pairs
            .chunks(EVAL_CHUNK)
            .map(|c| {
                pixel_values(
                    processor,
                    &c.iter().map(|p| &p.image).collect::<Vec<_>>(),
                    device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            pixel_values,
            captions: pairs.iter().map(|p| p.caption.clone()).collect(),
        })
    }

    /// BLEU-4 and CIDEr-D (`val_bleu4`, `val_cider`) of `model`'s greedy captions continuing
    /// `prompt`, against the true captions.
    pub fn score(
        &self,
        model: &BlipForConditionalGeneration,
        tokenizer: &TextTokenizer,
        prompt: &str,
    ) -> Result<Vec<(String, f64)>> {
        let mut predictions = Vec::with_capacity(self.captions.len());
        for pixels in &self.pixel_values {
            let captions = greedy_captions(model, tokenizer, pixels, prompt, MAX_CAPTION_TOKENS)?;
            predictions.extend(captions.into_iter().map(|(_, text)| text));
        }
        let references: Vec<Vec<&str>> = self.captions.iter().map(|c| vec![c.as_str()]).collect();
        let scores = score_captions(&predictions, &references)?;
        Ok(vec![
            ("val_bleu4".into(), scores.bleu[3]),
            ("val_cider".into(), scores.cider),
        ])
    }
}

/// Caption training on batches of images and `[DEC] prompt caption [SEP]` ids.
pub struct CaptionTask {
    pub model: TrainableBlipCaptioner,
    loader: BatchLoader,
    position: DataPosition,
    prompt: String,
    prompt_length: usize,
    label_smoothing: f64,
    precision: Precision,
    pub eval: Option<CaptionEvalSet>,
}

impl Task for CaptionTask {
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
            .ok_or_else(|| Error::Input("caption batches need an attention mask".into()))?;
        // Under mixed precision, a half-precision copy built from the f32 variables (see
        // `crate::precision`); the loss itself is taken in f32.
        let m = &self.model;
        let model = self
            .precision
            .compute_model(&m.model, &m.varmap, &m.device, |vb| {
                BlipForConditionalGeneration::new(&m.config, vb)
            })?;
        Ok(model.caption_loss(
            &batch
                .pixel_values
                .to_dtype(self.precision.compute_dtype())?,
            &batch.input_ids,
            mask,
            self.prompt_length,
            self.label_smoothing,
        )?)
    }

    fn mixed_precision(&self) -> bool {
        true
    }

    fn step_metrics(&self) -> Result<Vec<(String, f64)>> {
        Ok(vec![(
            "skipped_samples".into(),
            self.loader.skipped().total() as f64,
        )])
    }

    fn evaluate(&mut self, _output: &Path, _step: u64) -> Result<Vec<(String, f64)>> {
        match &self.eval {
            Some(set) => set.score(&self.model.model, &self.model.tokenizer, &self.prompt),
            None => Ok(Vec::new()),
        }
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.model.save_hf(dir)
    }
}

/// Where the captioner of a run comes from.
#[derive(Debug, Clone)]
pub enum ModelSpec {
    /// A preset ([`PRESETS`]) trained from scratch.
    Preset(String),
    /// An HF `BlipForConditionalGeneration` folder or hub id to fine-tune.
    Pretrained(String),
}

/// Everything a caption run needs; `zoo train blip --objective caption` fills it.
pub struct RunConfig {
    pub model: ModelSpec,
    /// Text before every caption, not learned (salesforce/BLIP's "a picture of ").
    pub prompt: String,
    pub label_smoothing: f64,
    pub train: TrainConfig,
    pub batch_size: usize,
    pub workers: usize,
    pub optimizer: AdamWConfig,
    pub image_size: Option<usize>,
    /// RandomResizedCrop, as the contrastive loader augments.
    pub augment: bool,
    pub max_bad_fraction: f64,
    pub resume: Option<PathBuf>,
    pub device: Device,
}

/// The data side of a caption run.
pub struct RunData {
    pub train: StreamFactory,
    /// Held-out pairs to caption and score at each evaluation.
    pub val: Option<Vec<Pair>>,
}

/// The result of a caption run.
pub struct RunSummary {
    pub state: TrainState,
    pub task: CaptionTask,
    pub final_dir: PathBuf,
}

/// Builds the captioner (preset, pretrained or resumed), the loader, the optimizer and the
/// metrics log, then trains with the shared loop.
pub fn run(config: RunConfig, data: RunData) -> Result<RunSummary> {
    let resume_dir = config
        .resume
        .as_deref()
        .map(checkpoint::resolve)
        .transpose()?;
    let model = match (&resume_dir, &config.model) {
        (Some(dir), _) => {
            TrainableBlipCaptioner::from_pretrained(&dir.to_string_lossy(), &config.device)?
        }
        (None, ModelSpec::Preset(name)) => TrainableBlipCaptioner::from_preset(
            name,
            config.image_size,
            config.train.seed,
            &config.device,
        )?,
        (None, ModelSpec::Pretrained(spec)) => {
            let mut model = TrainableBlipCaptioner::from_pretrained(spec, &config.device)?;
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
    let state = initial_state(resume_dir.as_deref(), config.train.seed)?;
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
    let loader = BatchLoader::start_with_encoder(
        data.train,
        state.data,
        model.processor.clone(),
        &model.tokenizer,
        model.caption_encoder(&config.prompt),
        loader_config,
        &config.device,
    )?;
    let eval = data
        .val
        .map(|pairs| CaptionEvalSet::from_pairs(&pairs, &model.processor, &model.device))
        .transpose()?;
    let prompt_length = model.prompt_length(&config.prompt)?;
    let mut task = CaptionTask {
        model,
        loader,
        position: state.data,
        prompt: config.prompt,
        prompt_length,
        precision: config.train.precision,
        label_smoothing: config.label_smoothing,
        eval,
    };
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
