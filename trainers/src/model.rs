//! Trainable dual encoders: every weight a `Var` in a `VarMap` named as in the HF checkpoint,
//! built from a preset (from scratch, seeded), from a CLIP preset with a pretrained BERT text
//! tower (open_clip's HF text towers, LiT), or from an HF folder / hub id (fine-tuning), and
//! saved back in HF layout.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};
use zoo_datasets::preprocess::{ImageProcessor, ImageProcessorConfig};
use zoo_datasets::tokenize::TextTokenizer;
use zoo_models::bert::BertConfig;
use zoo_models::clip::{ClipConfig, ClipTextConfig, ClipVisionConfig};
use zoo_models::contrastive::{DualEncoder, DualEncoderConfig};
use zoo_models::dual_bert::{BertTextPooling, VisionTextDualEncoderConfig};
use zoo_models::hub::ModelRepo;
use zoo_models::layers::Activation;
use zoo_models::siglip::{SiglipConfig, SiglipTextConfig, SiglipVisionConfig};
use zoo_models::weights::SafetensorsWeights;

use crate::error::{Error, Result};
use crate::loss::init;
use crate::pipeline::DualEncoderPipeline;
use crate::rng::Rng;

/// The presets `zoo train` can start from scratch.
pub const PRESETS: &str = "clip-tiny, siglip-tiny, clip-vit-b-32, siglip-base-patch16-224";

/// CLIP BPE ids of `<|startoftext|>` and `<|endoftext|>`.
const CLIP_BOS: u32 = 49406;
const CLIP_EOS: u32 = 49407;
const CLIP_VOCAB: usize = 49408;

/// The config of a preset. Every preset tokenizes with the bundled CLIP BPE tokenizer, so all
/// work offline; the SigLIP presets therefore use its 49 408-token vocabulary.
pub fn preset_config(name: &str, image_size: Option<usize>) -> Result<DualEncoderConfig> {
    let tiny_text = |act| ClipTextConfig {
        vocab_size: CLIP_VOCAB,
        hidden_size: 64,
        intermediate_size: 256,
        projection_dim: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 32,
        hidden_act: act,
        layer_norm_eps: 1e-5,
        pad_token_id: Some(CLIP_EOS),
        bos_token_id: Some(CLIP_BOS),
        eos_token_id: Some(CLIP_EOS),
    };
    let mut cfg = match name {
        "clip-tiny" => DualEncoderConfig::Clip(ClipConfig {
            text_config: tiny_text(Activation::QuickGelu),
            vision_config: ClipVisionConfig {
                hidden_size: 64,
                intermediate_size: 256,
                projection_dim: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                image_size: 32,
                patch_size: 8,
                ..ClipVisionConfig::default()
            },
            projection_dim: 64,
            logit_scale_init_value: init::CLIP_LOGIT_SCALE,
        }),
        "siglip-tiny" => DualEncoderConfig::Siglip(SiglipConfig {
            text_config: SiglipTextConfig {
                vocab_size: CLIP_VOCAB,
                hidden_size: 64,
                intermediate_size: 256,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                max_position_embeddings: 32,
                pad_token_id: Some(CLIP_EOS),
                bos_token_id: Some(CLIP_BOS),
                eos_token_id: Some(CLIP_EOS),
                projection_size: Some(64),
                ..SiglipTextConfig::default()
            },
            vision_config: SiglipVisionConfig {
                hidden_size: 64,
                intermediate_size: 256,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                image_size: 32,
                patch_size: 8,
                ..SiglipVisionConfig::default()
            },
        }),
        "clip-vit-b-32" => DualEncoderConfig::Clip(ClipConfig {
            text_config: ClipTextConfig {
                pad_token_id: Some(CLIP_EOS),
                ..ClipTextConfig::default()
            },
            ..ClipConfig::default()
        }),
        "siglip-base-patch16-224" => DualEncoderConfig::Siglip(SiglipConfig {
            text_config: SiglipTextConfig {
                vocab_size: CLIP_VOCAB,
                pad_token_id: Some(CLIP_EOS),
                bos_token_id: Some(CLIP_BOS),
                eos_token_id: Some(CLIP_EOS),
                ..SiglipTextConfig::default()
            },
            vision_config: SiglipVisionConfig::default(),
        }),
        other => {
            return Err(Error::Input(format!(
                "unknown preset `{other}`; presets: {PRESETS}, or give an HF folder or hub id"
            )))
        }
    };
    if let Some(size) = image_size {
        cfg.set_image_size(size);
    }
    Ok(cfg)
}

/// HF's preprocessing for a preset: CLIP resizes the shortest edge and centre-crops, SigLIP
/// resizes to a square; both bicubic.
fn preset_processor(cfg: &DualEncoderConfig) -> Value {
    let s = cfg.image_size();
    match cfg {
        DualEncoderConfig::Clip(_) | DualEncoderConfig::VisionText(_) => json!({
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": true, "size": {"shortest_edge": s}, "resample": 3,
            "do_center_crop": true, "crop_size": {"height": s, "width": s},
            "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
            "image_mean": zoo_datasets::preprocess::OPENAI_CLIP_MEAN,
            "image_std": zoo_datasets::preprocess::OPENAI_CLIP_STD,
            "do_convert_rgb": true,
        }),
        DualEncoderConfig::Siglip(_) => json!({
            "image_processor_type": "SiglipImageProcessor",
            "do_resize": true, "size": {"height": s, "width": s}, "resample": 3,
            "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        }),
    }
}

/// A dual encoder whose weights are trainable variables.
pub struct TrainableDualEncoder {
    pub model: DualEncoder,
    pub config: DualEncoderConfig,
    pub varmap: VarMap,
    pub tokenizer: TextTokenizer,
    pub processor: ImageProcessor,
    processor_json: Value,
    pub device: Device,
}

impl TrainableDualEncoder {
    /// A preset initialised from `seed` (see [`initial_value`]).
    pub fn from_preset(
        name: &str,
        image_size: Option<usize>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let config = preset_config(name, image_size)?;
        let varmap = initialised_varmap(&config, seed, device, |_, _| None)?;
        let processor_json = preset_processor(&config);
        Self::assemble(
            config,
            varmap,
            TextTokenizer::clip()?,
            processor_json,
            device,
        )
    }

    /// A CLIP preset's image tower (initialised from `seed`) with the pretrained BERT of
    /// `text_tower` (an HF folder or hub id with `config.json`, safetensors weights and
    /// `tokenizer.json`) as its text tower: open_clip's HF text tower, mean-pooled over the
    /// attention mask and projected by a new bias-free `text_projection` initialised
    /// N(0, hidden^-1/2) into the preset's `projection_dim`. The tokenizer is the BERT's.
    pub fn from_preset_with_text_tower(
        preset: &str,
        text_tower: &str,
        image_size: Option<usize>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let DualEncoderConfig::Clip(clip) = preset_config(preset, image_size)? else {
            return Err(Error::Input(format!(
                "a BERT text tower goes with a CLIP image tower and loss; `{preset}` is not a CLIP \
                 preset (use clip-tiny or clip-vit-b-32 with `zoo train clip`)"
            )));
        };
        let repo = ModelRepo::open(text_tower)?;
        let text_config = BertConfig::from_file(&repo.get("config.json")?)?;
        let tokenizer = TextTokenizer::from_files(
            &repo.get("tokenizer.json")?,
            repo.get_optional("tokenizer_config.json")?.as_deref(),
        )?;
        if tokenizer.vocab_size() > text_config.vocab_size {
            return Err(Error::Input(format!(
                "the tokenizer of {} has {} tokens but its BERT's vocab_size is {}",
                repo.describe(),
                tokenizer.vocab_size(),
                text_config.vocab_size
            )));
        }
        let config = DualEncoderConfig::VisionText(VisionTextDualEncoderConfig {
            vision_config: clip.vision_config,
            text_config,
            projection_dim: clip.projection_dim,
            logit_scale_init_value: clip.logit_scale_init_value,
            text_pooling: BertTextPooling::Mean,
        });
        let weights = SafetensorsWeights::open(&repo.weight_files()?)?;
        // sentence-transformers and `BertModel.save_pretrained` store unprefixed names; task
        // models (`BertForMaskedLM`, ...) put the encoder under `bert.`.
        let prefix = if weights
            .names()
            .iter()
            .any(|n| n == "embeddings.word_embeddings.weight")
        {
            ""
        } else {
            "bert."
        };
        let bert = weights.into_var_builder(DType::F32, device);
        let varmap = initialised_varmap(&config, seed, device, |name, shape| {
            let inner = name.strip_prefix("text_model.")?;
            Some(bert.get(shape.clone(), &format!("{prefix}{inner}")))
        })
        .map_err(|e| {
            Error::Input(format!(
                "cannot use {} as a BERT text tower: {e}",
                repo.describe()
            ))
        })?;
        let processor_json = preset_processor(&config);
        Self::assemble(config, varmap, tokenizer, processor_json, device)
    }

    /// Fine-tuning: every tensor of an HF checkpoint (folder or hub id) becomes a variable.
    pub fn from_pretrained(spec: &str, image_size: Option<usize>, device: &Device) -> Result<Self> {
        let repo = ModelRepo::open(spec)?;
        let config_path = repo.get("config.json")?;
        let config = DualEncoderConfig::from_file(&config_path)?;
        let weights = SafetensorsWeights::open(&repo.weight_files()?)?;
        let names = weights.names();
        let vb = weights.into_var_builder(DType::F32, device);
        let varmap = VarMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Error::Input("poisoned varmap".into()))?;
            for name in names {
                let t = vb.get_unchecked(&name)?;
                if t.dtype().is_float() {
                    data.insert(name, Var::from_tensor(&t)?);
                }
            }
        }
        let tokenizer_json = repo.get("tokenizer.json")?;
        let tokenizer_config = repo.get_optional("tokenizer_config.json")?;
        let tokenizer = TextTokenizer::from_files(&tokenizer_json, tokenizer_config.as_deref())?;
        let processor_path = repo.get("preprocessor_config.json")?;
        let mut processor_json: Value =
            zoo_models::hub::read_json(&processor_path, "preprocessor config")?;
        // Another resolution: images are prepared at `size` and the vision tower interpolates
        // its learned position table at every forward (HF's `interpolate_pos_encoding=True`),
        // so the gradient reaches the table as the checkpoint stores it.
        if let Some(size) = image_size {
            let stored = (config.image_size(), config.patch_size());
            fine_tune_at(&mut processor_json, size, stored)?;
        }
        let out = Self::assemble(config, varmap, tokenizer, processor_json, device)?;
        out.drop_unused_variables()?;
        Ok(out)
    }

    fn assemble(
        config: DualEncoderConfig,
        varmap: VarMap,
        tokenizer: TextTokenizer,
        processor_json: Value,
        device: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = DualEncoder::new(&config, vb)?;
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

    /// Removes checkpoint tensors the model never reads (e.g. `position_ids` buffers), so that
    /// every variable left is a parameter that receives a gradient.
    fn drop_unused_variables(&self) -> Result<()> {
        let used: std::collections::HashSet<String> = parameter_shapes(&self.config, &self.device)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Input("poisoned varmap".into()))?;
        data.retain(|k, _| used.contains(k));
        Ok(())
    }

    /// The variables to optimise, sorted by name; `--lock-image` / `--lock-text` freeze a tower
    /// (LiT-style), including its projection, except for a BERT text tower's projection (see
    /// [`lock_text_keeps_projection`](Self::lock_text_keeps_projection)).
    pub fn trainable_vars(&self, lock_image: bool, lock_text: bool) -> Vec<(String, Var)> {
        let keep_text_projection = self.lock_text_keeps_projection();
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<(String, Var)> = data
            .iter()
            .filter(|(name, _)| {
                let image =
                    name.starts_with("vision_model.") || name.starts_with("visual_projection.");
                let text = name.starts_with("text_model.")
                    || !keep_text_projection && name.starts_with("text_projection.");
                !(lock_image && image || lock_text && text)
            })
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Whether `--lock-text` leaves `text_projection` trainable: yes for a BERT text tower, no for
    /// CLIP and SigLIP. Their projection was trained together with their text tower, so locking
    /// the tower locks it too. A BERT tower (open_clip's HF text towers) comes from a sentence
    /// encoder trained on its own, and its projection into the joint space is new; frozen, it
    /// would pin the locked tower's embeddings to a random map. LiT (Zhai et al. 2022) locks the
    /// pretrained tower and learns everything after it, as open_clip's `HFTextEncoder.lock`
    /// freezes the transformer but not `proj`. The rule is per kind, not per origin, so a run
    /// resumed from its checkpoint trains the same variables.
    pub fn lock_text_keeps_projection(&self) -> bool {
        matches!(self.config, DualEncoderConfig::VisionText(_))
    }

    /// Projected text features `[B, P]` for the loss. Under `lock_text` nothing before the
    /// trainable variables needs a backward pass, so the graph is cut where the locked part
    /// ends: after the projection for CLIP and SigLIP, between a BERT tower and its projection
    /// (see [`lock_text_keeps_projection`](Self::lock_text_keeps_projection)).
    pub fn text_features_for_loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        lock_text: bool,
    ) -> Result<Tensor> {
        text_features_for_loss(&self.model, input_ids, attention_mask, lock_text)
    }

    /// `logit_scale` (and SigLIP's `logit_bias`) as variables.
    pub fn logit_vars(&self) -> (Var, Option<Var>) {
        let data = self.varmap.data().lock().expect("varmap lock");
        (data["logit_scale"].clone(), data.get("logit_bias").cloned())
    }

    /// CLIP §2.5: the learnable temperature is clipped so logits are scaled by at most 100.
    pub fn clamp_logit_scale(&self) -> Result<()> {
        let (scale, _) = self.logit_vars();
        let clamped = scale.as_tensor().clamp(f64::MIN, init::MAX_LOGIT_SCALE)?;
        scale.set(&clamped)?;
        Ok(())
    }

    /// The token length texts are truncated to.
    pub fn max_text_len(&self) -> usize {
        let model = self.config.max_text_len();
        self.tokenizer
            .model_max_length()
            .map_or(model, |t| t.min(model))
    }

    /// A read-only pipeline over the current weights (shared, not copied), for evaluation.
    pub fn pipeline(&self) -> DualEncoderPipeline {
        DualEncoderPipeline {
            model: self.model.clone(),
            config: self.config.clone(),
            tokenizer: self.tokenizer.clone(),
            processor: self.processor.clone(),
            device: self.device.clone(),
            dtype: DType::F32,
            source: "training model".into(),
        }
    }

    /// Writes an HF-layout checkpoint into `dir`: `config.json`, `model.safetensors`,
    /// `tokenizer.json`, `tokenizer_config.json`, `preprocessor_config.json`. Fails, writing
    /// nothing, if any weight is not finite.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        save_hf_folder(
            &varmap_tensors(&self.varmap)?,
            dir,
            &self.config.to_hf_json(),
            Some(&self.processor_json),
            &self.tokenizer,
            Some(self.max_text_len()),
        )
    }

    /// Replaces the weights with those of an HF checkpoint folder written by [`save_hf`].
    pub fn load_weights(&self, path: &Path) -> Result<()> {
        let loaded = candle_core::safetensors::load(path, &self.device)?;
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Input("poisoned varmap".into()))?;
        for (name, var) in data.iter() {
            let t = loaded
                .get(name)
                .ok_or_else(|| Error::Input(format!("{} lacks `{name}`", path.display())))?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

/// Fine-tuning at `n × n` pixels a checkpoint stored at `stored × stored` with `patch`-pixel
/// patches: sets its preprocessing to `n` and returns the new processor (the vision tower
/// interpolates its stored position table at every forward, so the table trains as stored).
pub(crate) fn fine_tune_at(
    json: &mut Value,
    n: usize,
    (stored, patch): (usize, usize),
) -> Result<Option<ImageProcessor>> {
    if n == stored {
        return Ok(None);
    }
    if n < patch {
        return Err(Error::Input(format!(
            "--image-size {n} is smaller than one {patch}-pixel patch"
        )));
    }
    resize_processor_json(json, n);
    let config = ImageProcessorConfig::from_json(&json.to_string())
        .map_err(|e| Error::Input(format!("preprocessor config: {e}")))?;
    Ok(Some(ImageProcessor::new(config)))
}

/// Sets an HF `preprocessor_config.json` to prepare `n × n` images: `size` (shortest edge, or
/// height and width) and `crop_size`.
fn resize_processor_json(json: &mut Value, n: usize) {
    if let Some(size) = json.get_mut("size") {
        match size {
            Value::Object(map) if map.contains_key("shortest_edge") => {
                map.insert("shortest_edge".into(), n.into());
            }
            Value::Object(map) => {
                map.insert("height".into(), n.into());
                map.insert("width".into(), n.into());
            }
            other => *other = n.into(),
        }
    }
    if json.get("crop_size").is_some() {
        json["crop_size"] = serde_json::json!({ "height": n, "width": n });
    }
}

/// The current value of every variable of `varmap`, detached, by name.
pub(crate) fn varmap_tensors(varmap: &VarMap) -> Result<std::collections::HashMap<String, Tensor>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Input("poisoned varmap".into()))?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect())
}

/// Writes weights as an HF-layout folder: `model.safetensors` (atomically), `config.json`,
/// `preprocessor_config.json` (image models), `tokenizer.json` and `tokenizer_config.json` (with
/// `model_max_length` = `max_text_len` when given). Fails, writing nothing, if any weight is not
/// finite. Shared by every trainable model.
pub(crate) fn save_hf_folder(
    tensors: &std::collections::HashMap<String, Tensor>,
    dir: &Path,
    config: &Value,
    processor: Option<&Value>,
    tokenizer: &TextTokenizer,
    max_text_len: Option<usize>,
) -> Result<()> {
    for (name, t) in tensors {
        let finite = t
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite());
        if !finite {
            return Err(Error::Input(format!(
                "refusing to save: `{name}` holds non-finite values"
            )));
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Input(format!("cannot create {}: {e}", dir.display())))?;
    zoo_models::weights::save_safetensors_atomic(tensors, &dir.join("model.safetensors"))?;
    write_json(&dir.join("config.json"), config)?;
    if let Some(processor) = processor {
        write_json(&dir.join("preprocessor_config.json"), processor)?;
    }
    tokenizer.save(dir, max_text_len)?;
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(path, text)
        .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))
}

/// A `VarMap` holding every parameter of `config`: the tensor `pretrained` gives for a name, or
/// else [`initial_value`] drawn from an RNG seeded with `seed`.
fn initialised_varmap(
    config: &DualEncoderConfig,
    seed: u64,
    device: &Device,
    pretrained: impl Fn(&str, &Shape) -> Option<candle_core::Result<Tensor>>,
) -> Result<VarMap> {
    let mut rng = Rng::new(seed);
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Input("poisoned varmap".into()))?;
        for (name, shape) in parameter_shapes(config, device)? {
            let t = match pretrained(&name, &shape) {
                Some(t) => t?,
                None => initial_value(config, &name, &shape, &mut rng, device)?,
            };
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}

/// The name and shape of every parameter the model reads, found by building it once against a
/// recording backend.
fn parameter_shapes(config: &DualEncoderConfig, device: &Device) -> Result<Vec<(String, Shape)>> {
    let recorder = ShapeRecorder::default();
    let specs = {
        let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, device.clone());
        DualEncoder::new(config, vb)?;
        recorder
            .specs
            .lock()
            .map_err(|_| Error::Input("poisoned recorder".into()))?
            .clone()
    };
    Ok(specs)
}

#[derive(Default, Clone)]
struct ShapeRecorder {
    specs: std::sync::Arc<Mutex<Vec<(String, Shape)>>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut specs) = self.specs.lock() {
            specs.push((name.to_string(), s.clone()));
        }
        Tensor::zeros(s, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("`{name}` requested without a shape")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Initial value of a parameter, following the spirit of HF's `CLIPPreTrainedModel._init_weights`:
/// norms at (1, 0), biases at 0, token tables N(0, 0.02), position tables N(0, 0.01), class
/// token and probe N(0, D^-1/2), projections N(0, fan_in^-1/2), and the papers' temperatures.
pub fn initial_value(
    config: &DualEncoderConfig,
    name: &str,
    shape: &Shape,
    rng: &mut Rng,
    device: &Device,
) -> Result<Tensor> {
    let dims = shape.dims();
    let constant = |v: f64| Tensor::full(v as f32, shape, device);
    let is_norm = ["norm", "layrnorm", "LayerNorm"]
        .iter()
        .any(|k| name.contains(k));
    let t = if name == "logit_scale" {
        let v = match config {
            DualEncoderConfig::Clip(_) | DualEncoderConfig::VisionText(_) => init::CLIP_LOGIT_SCALE,
            DualEncoderConfig::Siglip(_) => init::SIGLIP_LOGIT_SCALE,
        };
        constant(v)?
    } else if name == "logit_bias" {
        constant(init::SIGLIP_LOGIT_BIAS)?
    } else if name.ends_with("bias") || name.ends_with("in_proj_bias") {
        constant(0.0)?
    } else if is_norm && name.ends_with("weight") {
        constant(1.0)?
    } else if name.contains("token_embedding") {
        rng.normal_tensor(shape, 0.02, device)?
    } else if name.contains("position_embedding") {
        rng.normal_tensor(shape, 0.01, device)?
    } else if name.ends_with("class_embedding") || name.ends_with("probe") {
        let d = *dims.last().unwrap_or(&1);
        rng.normal_tensor(shape, (d as f64).powf(-0.5), device)?
    } else if dims.len() >= 2 {
        let fan_in: usize = dims[1..].iter().product();
        rng.normal_tensor(shape, (fan_in as f64).powf(-0.5), device)?
    } else {
        constant(0.0)?
    };
    Ok(t)
}

/// [`TrainableDualEncoder::text_features_for_loss`] through `encoder`, e.g. the half-precision
/// copy a mixed-precision step computes with.
pub fn text_features_for_loss(
    encoder: &DualEncoder,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    lock_text: bool,
) -> Result<Tensor> {
    Ok(match (encoder, lock_text) {
        (model, false) => model.text_features(input_ids, attention_mask)?,
        (DualEncoder::VisionText(m), true) => {
            m.project_text(&m.text_pooled_output(input_ids, attention_mask)?.detach())?
        }
        (model, true) => model.text_features(input_ids, attention_mask)?.detach(),
    })
}
