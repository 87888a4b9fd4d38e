//! Contrastive training of CLIP, SigLIP and BERT-tower dual encoders: the [`Task`] that plugs the dual encoder, its data
//! and its loss into the training loop, and [`run`], which sets up a whole run from a
//! [`RunConfig`] (what `zoo train clip|siglip` and `zoo demo` call).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use zoo_datasets::synthetic::{Shapes, Split};
use zoo_datasets::tokenize::Padding;
use zoo_models::contrastive::{l2_normalize, DualEncoder, ScoreKind};

use crate::checkpoint;
use crate::data::{
    synthetic_factory, BatchLoader, ContrastiveBatch, DataPosition, LoaderConfig, StreamFactory,
};
use crate::error::{Error, Result};
use crate::eval::{retrieval_report, zero_shot_report, ZeroShotReport};
use crate::loss::{clip_loss, siglip_loss, siglip_loss_chunked};
use crate::model::{text_features_for_loss, TrainableDualEncoder};
use crate::optim::AdamWConfig;
use crate::pipeline::{DualEncoderPipeline, IMAGE_CHUNK};
use crate::plot::confusion_png;
use crate::precision::Precision;
use crate::train::{initial_state, run_task, Task, TrainConfig, TrainState};
use crate::zeroshot::build_classifier;

/// Images for evaluation: generated in memory, or files decoded at each evaluation.
pub enum ImageSet {
    Pixels(Vec<Tensor>),
    Files(Vec<PathBuf>),
}

impl ImageSet {
    /// Normalised embeddings `[N, D]`.
    pub fn embed(&self, pipeline: &DualEncoderPipeline) -> Result<Tensor> {
        let chunks = match self {
            Self::Pixels(chunks) => chunks
                .iter()
                .map(|p| pipeline.embed_pixels(p))
                .collect::<Result<Vec<_>>>()?,
            Self::Files(paths) => paths
                .chunks(IMAGE_CHUNK)
                .map(|c| pipeline.embed_pixels(&pipeline.pixel_values(c)?))
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(Tensor::cat(&chunks, 0)?)
    }
}

/// A labelled zero-shot evaluation set.
pub struct ZeroShotSet {
    pub images: ImageSet,
    pub labels: Vec<usize>,
    pub class_names: Vec<String>,
    pub templates: Vec<String>,
}

impl ZeroShotSet {
    /// `n` held-out synthetic samples: only colour–shape pairs never captioned in training.
    pub fn synthetic_held_out(
        shapes: &Shapes,
        n: usize,
        processor: &zoo_datasets::preprocess::ImageProcessor,
        device: &Device,
    ) -> Result<Self> {
        let samples: Vec<_> = (0..n)
            .map(|i| shapes.sample(Split::HeldOut, i as u64))
            .collect();
        let labels = samples
            .iter()
            .map(|s| Shapes::class_index(s.colour, s.shape))
            .collect();
        let chunks = samples
            .chunks(IMAGE_CHUNK)
            .map(|chunk| {
                let mut pixels = Vec::new();
                let mut dims = (0, 0);
                for s in chunk {
                    let (values, h, w) = processor
                        .preprocess(&image::DynamicImage::ImageRgb8(s.image.clone()))
                        .map_err(Error::Input)?;
                    dims = (h, w);
                    pixels.extend(values);
                }
                Ok(Tensor::from_vec(
                    pixels,
                    (chunk.len(), 3, dims.0, dims.1),
                    device,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            images: ImageSet::Pixels(chunks),
            labels,
            class_names: Shapes::class_names(),
            templates: Shapes::templates(),
        })
    }

    /// An ImageFolder (one subfolder per class). Class names are the folder names, or the lines
    /// of `classnames` (one per class, in the sorted order of the folders).
    pub fn image_folder(
        root: &Path,
        classnames: Option<&Path>,
        templates: Vec<String>,
    ) -> Result<Self> {
        let folder = zoo_datasets::sources::ImageFolder::open(root)?;
        let mut class_names: Vec<String> = folder.class_names().to_vec();
        if let Some(path) = classnames {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::Input(format!("cannot read class names {}: {e}", path.display()))
            })?;
            let names: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if names.len() != class_names.len() {
                return Err(Error::Input(format!(
                    "{} lists {} class names but {} has {} class folders",
                    path.display(),
                    names.len(),
                    root.display(),
                    class_names.len()
                )));
            }
            class_names = names;
        }
        let (paths, labels) = folder.samples().iter().cloned().unzip();
        Ok(Self {
            images: ImageSet::Files(paths),
            labels,
            class_names,
            templates,
        })
    }

    pub fn evaluate(&self, pipeline: &DualEncoderPipeline) -> Result<ZeroShotReport> {
        let classifier = build_classifier(pipeline, &self.class_names, &self.templates)?;
        let embeds = self.images.embed(pipeline)?;
        zero_shot_report(
            pipeline,
            &classifier,
            &embeds,
            &self.labels,
            &self.class_names,
        )
    }
}

/// Paired images and captions for retrieval evaluation.
pub struct RetrievalSet {
    pub images: ImageSet,
    pub captions: Vec<String>,
}

impl RetrievalSet {
    /// Preprocesses `pairs` (no augmentation) for repeated evaluation.
    pub fn from_pairs(
        pairs: Vec<zoo_datasets::sources::Pair>,
        processor: &zoo_datasets::preprocess::ImageProcessor,
        device: &Device,
    ) -> Result<Self> {
        let mut chunks = Vec::new();
        for chunk in pairs.chunks(IMAGE_CHUNK) {
            let mut pixels = Vec::new();
            let mut dims = (0, 0);
            for p in chunk {
                let (values, h, w) = processor
                    .preprocess(&p.image)
                    .map_err(|e| Error::Input(format!("{}: {e}", p.key)))?;
                dims = (h, w);
                pixels.extend(values);
            }
            chunks.push(Tensor::from_vec(
                pixels,
                (chunk.len(), 3, dims.0, dims.1),
                device,
            )?);
        }
        Ok(Self {
            images: ImageSet::Pixels(chunks),
            captions: pairs.into_iter().map(|p| p.caption).collect(),
        })
    }
}

/// `openai` (80 prompts), `simple` (7), or a file with one template per line (`{}` = class).
pub fn parse_templates(spec: &str) -> Result<Vec<String>> {
    let list = match spec {
        "openai" => crate::templates::OPENAI_TEMPLATES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "simple" => crate::templates::SIMPLE_TEMPLATES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        path => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Input(format!("cannot read templates file {path}: {e}")))?;
            let list: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if let Some(bad) = list.iter().find(|t| !t.contains("{}")) {
                return Err(Error::Input(format!(
                    "template {bad:?} in {path} has no {{}} for the class name"
                )));
            }
            list
        }
    };
    if list.is_empty() {
        return Err(Error::Input(format!("no templates in {spec}")));
    }
    Ok(list)
}

/// The training loss of one batch: CLIP's symmetric InfoNCE or SigLIP's sigmoid loss (in
/// `siglip_chunk`-sized blocks when set) on the normalised features. A tower locked by
/// `(lock_image, lock_text)` gets no backward pass. Under mixed `precision` the towers run in
/// a half-precision copy built from the f32 variables; features and loss are f32.
pub fn contrastive_loss(
    model: &TrainableDualEncoder,
    precision: Precision,
    batch: &ContrastiveBatch,
    (lock_image, lock_text): (bool, bool),
    siglip_chunk: Option<usize>,
) -> Result<Tensor> {
    let encoder = precision.compute_model(&model.model, &model.varmap, &model.device, |vb| {
        DualEncoder::new(&model.config, vb)
    })?;
    let encoder = encoder.as_ref();
    let pixels = batch.pixel_values.to_dtype(precision.compute_dtype())?;
    let f32 = |t: Tensor| t.to_dtype(DType::F32);
    let mut img = l2_normalize(&f32(encoder.image_features(&pixels)?)?)?;
    if lock_image {
        img = img.detach();
    }
    let txt = l2_normalize(&f32(text_features_for_loss(
        encoder,
        &batch.input_ids,
        batch.attention_mask.as_ref(),
        lock_text,
    )?)?)?;
    let (scale, bias) = model.logit_vars();
    Ok(match (model.config.score_kind(), bias) {
        (ScoreKind::Softmax, _) => clip_loss(&img, &txt, scale.as_tensor())?,
        (ScoreKind::Sigmoid, Some(bias)) => match siglip_chunk {
            Some(c) => siglip_loss_chunked(&img, &txt, scale.as_tensor(), bias.as_tensor(), c)?,
            None => siglip_loss(&img, &txt, scale.as_tensor(), bias.as_tensor())?,
        },
        (ScoreKind::Sigmoid, None) => {
            return Err(Error::Input("SigLIP model without logit_bias".into()))
        }
    })
}

/// Dual encoder training on contrastive batches.
pub struct ContrastiveTask {
    pub model: TrainableDualEncoder,
    loader: BatchLoader,
    position: DataPosition,
    lock_image: bool,
    lock_text: bool,
    siglip_chunk: Option<usize>,
    precision: Precision,
    pub zeroshot: Option<ZeroShotSet>,
    pub retrieval: Option<RetrievalSet>,
    /// The latest zero-shot report, e.g. for the demo's table.
    pub last_zeroshot: Option<ZeroShotReport>,
}

impl Task for ContrastiveTask {
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
        contrastive_loss(
            &self.model,
            self.precision,
            batch,
            (self.lock_image, self.lock_text),
            self.siglip_chunk,
        )
    }

    fn after_step(&mut self) -> Result<()> {
        self.model.clamp_logit_scale()
    }

    fn mixed_precision(&self) -> bool {
        true
    }

    fn step_metrics(&self) -> Result<Vec<(String, f64)>> {
        let (scale, bias) = self.model.logit_vars();
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(f64::from(t.flatten_all()?.to_vec1::<f32>()?[0])) };
        let mut out = vec![("logit_scale".to_string(), scalar(scale.as_tensor())?.exp())];
        if let Some(b) = bias {
            out.push(("logit_bias".into(), scalar(b.as_tensor())?));
        }
        out.push((
            "skipped_samples".into(),
            self.loader.skipped().total() as f64,
        ));
        Ok(out)
    }

    fn evaluate(&mut self, output: &Path, step: u64) -> Result<Vec<(String, f64)>> {
        let pipeline = self.model.pipeline();
        let mut out = Vec::new();
        if let Some(zs) = &self.zeroshot {
            let report = zs.evaluate(&pipeline)?;
            out.push(("zeroshot_top1".to_string(), report.top1));
            out.push(("zeroshot_top5".to_string(), report.top5));
            confusion_png(
                &output.join("confusion.png"),
                &format!("zero-shot, step {step}: top-1 {:.1}%", report.top1 * 100.0),
                &zs.class_names,
                &report.confusion,
            )?;
            self.last_zeroshot = Some(report);
        }
        if let Some(rs) = &self.retrieval {
            let img = rs.images.embed(&pipeline)?;
            let refs: Vec<&str> = rs.captions.iter().map(String::as_str).collect();
            let txt = pipeline.embed_texts(&refs)?;
            out.extend(retrieval_report(&img, &txt)?.metrics());
        }
        Ok(out)
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.model.save_hf(dir)
    }
}

/// Where the model of a run comes from.
#[derive(Debug, Clone)]
pub enum ModelSpec {
    Preset(String),
    /// A CLIP preset's image tower with a pretrained BERT text tower (an HF folder or hub id);
    /// see [`TrainableDualEncoder::from_preset_with_text_tower`].
    PresetWithTextTower {
        preset: String,
        text_tower: String,
    },
    /// An HF folder or hub id to fine-tune.
    Pretrained(String),
}

/// Everything a contrastive run needs; `zoo train clip|siglip` fills it from open_clip-style
/// flags.
pub struct RunConfig {
    pub model: ModelSpec,
    /// `clip` or `siglip`: the loss; must match the model's kind.
    pub objective: ScoreKind,
    pub train: TrainConfig,
    pub batch_size: usize,
    pub workers: usize,
    pub optimizer: AdamWConfig,
    pub image_size: Option<usize>,
    pub lock_image: bool,
    pub lock_text: bool,
    pub siglip_chunk: Option<usize>,
    pub max_bad_fraction: f64,
    pub resume: Option<PathBuf>,
    pub device: Device,
}

/// Builds an evaluation set once the model (and so its preprocessing) is known.
pub type EvalSetBuilder<T> = Box<dyn FnOnce(&TrainableDualEncoder) -> Result<T>>;

/// The data side of a run.
pub struct RunData {
    pub train: StreamFactory,
    pub zeroshot: Option<EvalSetBuilder<ZeroShotSet>>,
    pub retrieval: Option<EvalSetBuilder<RetrievalSet>>,
}

/// The result of a run.
pub struct RunSummary {
    pub state: TrainState,
    pub task: ContrastiveTask,
    pub final_dir: PathBuf,
}

/// Builds the model (preset, pretrained or resumed), the data loader, the optimizer and the
/// metrics log, then trains.
pub fn run(config: RunConfig, data: RunData) -> Result<RunSummary> {
    let resume_dir = config
        .resume
        .as_deref()
        .map(checkpoint::resolve)
        .transpose()?;
    let model = match (&resume_dir, &config.model) {
        (Some(dir), _) => {
            TrainableDualEncoder::from_pretrained(&dir.to_string_lossy(), None, &config.device)?
        }
        (None, ModelSpec::Preset(name)) => TrainableDualEncoder::from_preset(
            name,
            config.image_size,
            config.train.seed,
            &config.device,
        )?,
        (None, ModelSpec::PresetWithTextTower { preset, text_tower }) => {
            TrainableDualEncoder::from_preset_with_text_tower(
                preset,
                text_tower,
                config.image_size,
                config.train.seed,
                &config.device,
            )?
        }
        (None, ModelSpec::Pretrained(spec)) => {
            TrainableDualEncoder::from_pretrained(spec, config.image_size, &config.device)?
        }
    };
    let kind = model.config.score_kind();
    if kind != config.objective {
        let (want, have) = (kind_name(config.objective), model.config.model_type());
        return Err(Error::Input(format!(
            "`zoo train {want}` was given a {have} model; use `zoo train {have}`"
        )));
    }
    let state = initial_state(resume_dir.as_deref(), config.train.seed)?;
    let vars = model.trainable_vars(config.lock_image, config.lock_text);
    let loader_config = LoaderConfig {
        batch_size: config.batch_size,
        workers: config.workers,
        seed: state.seed,
        augment: true,
        max_bad_fraction: config.max_bad_fraction,
        max_text_len: model.max_text_len(),
        padding: if model.config.pads_to_max_length() {
            Padding::MaxLength
        } else {
            Padding::Longest
        },
        use_attention_mask: !model.config.pads_to_max_length(),
    };
    let loader = BatchLoader::start(
        data.train,
        state.data,
        model.processor.clone(),
        model.tokenizer.clone(),
        loader_config,
        &config.device,
    )?;
    let zeroshot = data.zeroshot.map(|f| f(&model)).transpose()?;
    let retrieval = data.retrieval.map(|f| f(&model)).transpose()?;
    let mut task = ContrastiveTask {
        model,
        loader,
        position: state.data,
        lock_image: config.lock_image,
        lock_text: config.lock_text,
        siglip_chunk: config.siglip_chunk,
        precision: config.train.precision,
        zeroshot,
        retrieval,
        last_zeroshot: None,
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

fn kind_name(kind: ScoreKind) -> &'static str {
    match kind {
        ScoreKind::Softmax => "clip",
        ScoreKind::Sigmoid => "siglip",
    }
}

/// The synthetic-shapes data of `zoo demo` (and of `--dataset-type synthetic`).
pub fn synthetic_data(seed: u64, image_size: u32, epoch_size: u64, eval_samples: usize) -> RunData {
    let shapes = Shapes::with_diagonal_held_out(image_size, seed);
    let eval_shapes = Shapes {
        seed: seed ^ 0x5EED,
        ..shapes.clone()
    };
    let device_shapes = eval_shapes.clone();
    RunData {
        train: synthetic_factory(shapes, epoch_size),
        zeroshot: Some(Box::new(move |m: &TrainableDualEncoder| {
            ZeroShotSet::synthetic_held_out(&device_shapes, eval_samples, &m.processor, &m.device)
        })),
        retrieval: None,
    }
}
