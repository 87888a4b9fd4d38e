//! `zoo train clip|siglip`: contrastive pretraining or fine-tuning, with open_clip's flags, and
//! `--text-tower` for a pretrained BERT text tower (open_clip's HF text towers, LiT).
//! `zoo train blip --objective caption`: BLIP caption training (salesforce/BLIP's LM loss) with
//! the same data, optimizer and loop flags.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use zoo_datasets::synthetic::Shapes;
use zoo_models::contrastive::ScoreKind;
use zoo_trainers::blip_caption;
use zoo_trainers::blip_pretrain;
use zoo_trainers::contrastive::{
    parse_templates, run, ModelSpec, RetrievalSet, RunConfig, RunData, ZeroShotSet,
};
use zoo_trainers::data::{synthetic_factory, DataSpec, DatasetType, StreamFactory};
use zoo_trainers::model::PRESETS;
use zoo_trainers::optim::AdamWConfig;
use zoo_trainers::precision::Precision;
use zoo_trainers::train::{format_metrics, TrainConfig};

use crate::flags;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Objective {
    /// Softmax contrastive loss (CLIP).
    Clip,
    /// Pairwise sigmoid loss (SigLIP).
    Siglip,
    /// BLIP; the loss is chosen with --objective.
    Blip,
    /// A Llama-architecture causal LM on text files or JSONL.
    Lm,
    /// Medusa-1 heads on a frozen LM (--model) over text files or JSONL.
    Medusa,
    /// DeepSeek-V3-style MTP modules, with the LM (joint) or on a frozen one.
    Mtp,
}

/// BLIP's training objectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BlipObjective {
    /// The captioning LM loss of salesforce/BLIP's `BLIP_Decoder`.
    Caption,
    /// salesforce/BLIP's pretraining: ITC (momentum encoders, queues, momentum distillation)
    /// + ITM (hard negatives) + LM.
    Pretrain,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Which model family and loss.
    #[arg(value_enum, value_name = "FAMILY")]
    pub family: Objective,
    /// A preset to train from scratch (clip-tiny, siglip-tiny, clip-vit-b-32,
    /// siglip-base-patch16-224; blip-tiny; llama-tiny, llama-small), or an HF folder / hub id to
    /// fine-tune (for blip, a BlipForConditionalGeneration such as
    /// Salesforce/blip-image-captioning-base; for medusa, the LM to add heads to). Default: the
    /// tiny preset.
    #[arg(long)]
    pub model: Option<String>,
    /// BLIP only: caption (the LM loss) or pretrain (ITC + ITM + LM).
    #[arg(long, value_enum)]
    pub objective: Option<BlipObjective>,
    /// BLIP caption training: text before every caption, not learned (salesforce/BLIP's).
    #[arg(long, default_value = blip_caption::DEFAULT_PROMPT)]
    pub prompt: String,
    /// BLIP caption training: label smoothing of the LM loss.
    #[arg(long, default_value_t = blip_caption::DEFAULT_LABEL_SMOOTHING, value_parser = flags::below_one::<f64>, allow_negative_numbers = true)]
    pub label_smoothing: f64,
    /// LM: `train` to train a byte-level BPE of --vocab-size tokens on the training corpus, or a
    /// folder / hub id with tokenizer.json (for a preset; a pretrained model keeps its own).
    #[arg(long, default_value = "train")]
    pub tokenizer: String,
    /// LM: vocabulary size of a trained tokenizer.
    #[arg(long, default_value_t = 8000, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub vocab_size: usize,
    /// MTP: number of modules (depth k predicts the token k + 1 ahead).
    #[arg(long, default_value_t = 1, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub mtp_depth: usize,
    /// MTP: the loss is the LM loss + λ / depth · Σ module losses.
    #[arg(long, default_value_t = 0.3, value_parser = flags::non_negative::<f64>, allow_negative_numbers = true)]
    pub mtp_lambda: f64,
    /// MTP: train only the modules, on the frozen LM's hidden states.
    #[arg(long)]
    pub freeze_backbone: bool,
    /// Medusa: number of heads (head k predicts the token k + 1 after the next).
    #[arg(long, default_value_t = 4, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub medusa_num_heads: usize,
    /// Medusa: ResBlocks per head.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub medusa_num_layers: usize,
    /// Medusa-2: train the backbone with the heads (LM loss + λ₀ · heads' loss); without it,
    /// Medusa-1 trains the heads on the frozen backbone.
    #[arg(long)]
    pub joint: bool,
    /// Medusa-2: λ₀, the weight of the heads' loss (FasterDecoding's medusa_heads_coefficient).
    #[arg(long, default_value_t = 0.2, value_parser = flags::non_negative::<f64>, allow_negative_numbers = true)]
    pub medusa_heads_coefficient: f64,
    /// Medusa-2: the heads' learning rate over the backbone's (medusa_lr_multiplier).
    #[arg(long, default_value_t = 4.0, value_parser = flags::positive::<f64>, allow_negative_numbers = true)]
    pub medusa_lr_multiplier: f64,
    /// Medusa-2: steps that train only the heads, on the frozen backbone, before joint training.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub medusa_warmup_steps: u64,
    /// Medusa: train on the backbone's own continuations of prompts cut from the corpus
    /// (written to OUTPUT/self_distill.jsonl); with --joint the LM loss becomes the KL from the
    /// original backbone.
    #[arg(long)]
    pub self_distill: bool,
    /// Self-distillation of a chat model: every line of the training text files (or JSONL
    /// `text`) is one user turn, rendered by the model's chat template; the model's replies
    /// (until eos, --seq-len tokens in all) are the data. --val-data prompts get replies too.
    #[arg(long, requires = "self_distill")]
    pub chat: bool,
    /// Medusa: new heads project with the backbone's lm_head instead of a copy each
    /// (FasterDecoding's "version 2" layout: one ResBlock of weights per head).
    #[arg(long)]
    pub medusa_shared_lm_head: bool,
    /// Medusa and MTP: train and measure the heads or modules on the first N tokens of the
    /// vocabulary, which `zoo generate --draft-vocab N` drafts from (targets outside it are not
    /// scored); their vocabulary projection costs N/vocabulary of the whole one.
    #[arg(long, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub draft_vocab: Option<usize>,
    /// Self-distillation: prompt tokens kept from each sequence (default: a quarter of
    /// --seq-len).
    #[arg(long, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub distill_prompt_len: Option<usize>,
    /// Self-distillation: sampling temperature of the generations (0: greedy).
    #[arg(long, default_value_t = 0.3, value_parser = flags::non_negative::<f32>, allow_negative_numbers = true)]
    pub distill_temperature: f32,
    /// Self-distillation: generate at most this many sequences.
    #[arg(long, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub distill_sequences: Option<usize>,
    /// LM: tokens per training sequence (the corpus is packed into sequences of this length;
    /// a chat, JSONL with a prompt, takes one, cut or padded to it).
    #[arg(long, default_value_t = 256, value_parser = flags::at_least_two::<usize>, allow_negative_numbers = true)]
    pub seq_len: usize,
    /// BLIP pretraining: momentum features kept as extra ITC negatives (0: in-batch only).
    #[arg(long, default_value_t = blip_pretrain::DEFAULT_QUEUE_SIZE, allow_negative_numbers = true)]
    pub queue_size: usize,
    /// BLIP pretraining: EMA coefficient of the momentum encoders.
    #[arg(long, default_value_t = blip_pretrain::DEFAULT_MOMENTUM, value_parser = flags::below_one::<f64>, allow_negative_numbers = true)]
    pub momentum: f64,
    /// BLIP pretraining: weight of the momentum encoders' soft ITC targets.
    #[arg(long, default_value_t = blip_pretrain::DEFAULT_ALPHA, value_parser = flags::unit_interval::<f64>, allow_negative_numbers = true)]
    pub alpha: f64,
    /// BLIP pretraining: alpha rises linearly from 0 over this many steps (BLIP: the first
    /// epoch). Default: --warmup.
    #[arg(long, allow_negative_numbers = true)]
    pub alpha_ramp_steps: Option<u64>,
    /// An HF BERT folder or hub id (config.json, safetensors, tokenizer.json), e.g.
    /// sentence-transformers/all-MiniLM-L6-v2, as the text tower of the CLIP preset --model:
    /// its weights and tokenizer, mean pooling, and a new linear projection. Saved as an HF
    /// VisionTextDualEncoderModel.
    #[arg(long)]
    pub text_tower: Option<String>,
    /// Training pairs: a CSV/TSV, a JSONL file, WebDataset shards (`shard-{0000..0009}.tar`,
    /// a glob or a path), or `synthetic`.
    #[arg(long)]
    pub train_data: String,
    /// Validation pairs for image-text retrieval, or for blip captions to score (same formats).
    #[arg(long)]
    pub val_data: Option<String>,
    /// auto, csv, jsonl, webdataset or synthetic.
    #[arg(long, default_value = "auto", value_parser = flags::dataset_type)]
    pub dataset_type: String,
    #[arg(long, default_value = "filepath")]
    pub csv_img_key: String,
    #[arg(long, default_value = "title")]
    pub csv_caption_key: String,
    /// Column separator; default tab for .tsv, comma otherwise.
    #[arg(long)]
    pub csv_separator: Option<char>,
    /// Samples per epoch, for --epochs with WebDataset or synthetic data.
    #[arg(long, value_parser = flags::count::<u64>, allow_negative_numbers = true)]
    pub train_num_samples: Option<u64>,
    #[arg(long, default_value_t = 64, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Train this many epochs (see --train-num-samples; for lm, mtp and medusa, passes over
    /// the packed sequences) ...
    #[arg(long, conflicts_with = "steps", value_parser = flags::count::<u64>, allow_negative_numbers = true)]
    pub epochs: Option<u64>,
    /// ... or this many optimizer steps.
    #[arg(long, value_parser = flags::count::<u64>, allow_negative_numbers = true)]
    pub steps: Option<u64>,
    #[arg(long, default_value_t = 5e-4, value_parser = flags::non_negative::<f64>, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.2, value_parser = flags::non_negative::<f64>, allow_negative_numbers = true)]
    pub wd: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 100, allow_negative_numbers = true)]
    pub warmup: u64,
    #[arg(long, default_value_t = 0.9, value_parser = flags::below_one::<f64>, allow_negative_numbers = true)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.98, value_parser = flags::below_one::<f64>, allow_negative_numbers = true)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-6, value_parser = flags::positive::<f64>, allow_negative_numbers = true)]
    pub eps: f64,
    /// Clip gradients to this global L2 norm.
    #[arg(long, value_parser = flags::positive::<f64>, allow_negative_numbers = true)]
    pub grad_clip_norm: Option<f64>,
    /// Accumulate gradients over this many batches per step.
    #[arg(long, default_value_t = 1, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub accum_freq: usize,
    /// fp32, fp16, bf16, amp_fp16 or amp_bf16 (open_clip's names): f32 master weights and
    /// optimizer state, the forward and backward in f16/bf16 (amp_* keep norms in f32), dynamic
    /// loss scaling for f16. For clip, siglip, blip --objective caption and lm without MTP;
    /// bf16 needs CUDA or Metal.
    #[arg(long, default_value = "fp32", value_parser = parse_precision)]
    pub precision: Precision,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Output folder: checkpoints, final/, metrics.jsonl, plots.
    #[arg(long)]
    pub output: PathBuf,
    /// Resume from a checkpoint folder (or the newest checkpoint in an output folder).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Write OUTPUT/checkpoint-STEP every this many steps.
    #[arg(long, value_parser = flags::count::<u64>, allow_negative_numbers = true)]
    pub save_every: Option<u64>,
    /// An ImageFolder for zero-shot evaluation.
    #[arg(long)]
    pub zeroshot_data: Option<PathBuf>,
    /// Class names for --zeroshot-data, one per line in folder order.
    #[arg(long)]
    pub zeroshot_classnames: Option<PathBuf>,
    /// openai, simple, or a file of templates.
    #[arg(long, default_value = "simple")]
    pub zeroshot_templates: String,
    /// Evaluate (zero-shot and retrieval; for blip, BLEU-4 and CIDEr of greedy captions of
    /// --val-data) every this many steps, and at the end.
    #[arg(long, value_parser = flags::count::<u64>, allow_negative_numbers = true)]
    pub zeroshot_frequency: Option<u64>,
    /// Freeze the image tower (LiT).
    #[arg(long)]
    pub lock_image: bool,
    /// Freeze the text tower (with --text-tower, LiT-style: the BERT is frozen and its new
    /// projection still trains).
    #[arg(long)]
    pub lock_text: bool,
    /// Image size: a preset's; for a pretrained CLIP or SigLIP, fine-tune at this size (images
    /// prepared at N, position embeddings interpolated at every forward, as HF's
    /// interpolate_pos_encoding=True). BLIP checkpoints keep their own size.
    #[arg(long, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub image_size: Option<usize>,
    /// Data-loading threads.
    #[arg(long, default_value_t = 2, value_parser = flags::workers, allow_negative_numbers = true)]
    pub workers: usize,
    /// Compute the SigLIP loss in blocks of this many texts.
    #[arg(long, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub siglip_chunk: Option<usize>,
    /// Stop if more than this fraction of samples is bad.
    #[arg(long, default_value_t = 0.1, value_parser = flags::unit_interval::<f64>, allow_negative_numbers = true)]
    pub max_bad_fraction: f64,
    /// Images kept for retrieval evaluation.
    #[arg(long, default_value_t = 1000, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub val_samples: usize,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu", value_parser = flags::device)]
    pub device: String,
}

fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    s.parse()
}

pub fn run_train(args: TrainArgs) -> Result<()> {
    if let Some(n) = args.image_size {
        crate::common::check_image_size(n)?;
    }
    if args.draft_vocab.is_some() && !matches!(args.family, Objective::Medusa | Objective::Mtp) {
        bail!("--draft-vocab is for `zoo train medusa|mtp`: what their drafts are drawn from");
    }
    let (objective, default_model) = match args.family {
        Objective::Clip => (ScoreKind::Softmax, "clip-tiny"),
        Objective::Siglip => (ScoreKind::Sigmoid, "siglip-tiny"),
        Objective::Blip => return run_blip(args),
        Objective::Lm => return run_lm(args),
        Objective::Medusa => return run_medusa(args),
        Objective::Mtp => return run_lm(args),
    };
    if let Some(o) = args.objective {
        bail!(
            "--objective {} is for `zoo train blip`; `zoo train clip|siglip` picks its loss by \
             the family",
            o.to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
        );
    }
    if args.batch_size < 2 {
        bail!("invalid value '1' for '--batch-size': a contrastive loss needs at least 2");
    }
    let device = zoo_models::device::parse_device(&args.device)?;
    let model_name = args
        .model
        .clone()
        .unwrap_or_else(|| default_model.to_string());
    let is_preset = PRESETS.split(", ").any(|p| p == model_name);
    let model = match (args.text_tower.clone(), is_preset) {
        (None, true) => ModelSpec::Preset(model_name),
        (None, false) => ModelSpec::Pretrained(model_name),
        (Some(text_tower), true) => ModelSpec::PresetWithTextTower {
            preset: model_name,
            text_tower,
        },
        (Some(_), false) => bail!(
            "--text-tower replaces the text tower of a preset ({PRESETS}); `{model_name}` is not \
             one (a checkpoint trained with --text-tower already has its BERT: pass it alone)"
        ),
    };
    let (train, steps) = train_stream(&args)?;
    let mut data = RunData {
        train,
        zeroshot: None,
        retrieval: None,
    };
    if let Some(root) = args.zeroshot_data.clone() {
        let templates = parse_templates(&args.zeroshot_templates)?;
        let classnames = args.zeroshot_classnames.clone();
        let set = ZeroShotSet::image_folder(&root, classnames.as_deref(), templates)?;
        data.zeroshot = Some(Box::new(move |_| Ok(set)));
    }
    if let Some(val) = &args.val_data {
        let (pairs, skipped) = data_spec(&args, val)?.load_pairs(args.val_samples)?;
        if skipped.total() > 0 {
            eprintln!("validation data: skipped {skipped}");
        }
        data.retrieval = Some(Box::new(move |m| {
            RetrievalSet::from_pairs(pairs, &m.processor, &m.device)
        }));
    }
    let config = RunConfig {
        model,
        objective,
        train: train_config(&args, steps),
        batch_size: args.batch_size,
        workers: args.workers,
        optimizer: optimizer_config(&args),
        image_size: args.image_size,
        lock_image: args.lock_image,
        lock_text: args.lock_text,
        siglip_chunk: args.siglip_chunk,
        max_bad_fraction: args.max_bad_fraction,
        resume: args.resume.clone(),
        device,
    };
    let summary = run(config, data).with_context(|| training_failed(&args))?;
    let last = summary.state.losses.last().copied().unwrap_or(f64::NAN);
    outln!("trained {} steps; final loss {last:.4}", summary.state.step)?;
    if let Some(zs) = &summary.task.last_zeroshot {
        outln!(
            "{}",
            format_metrics(
                summary.state.step,
                &[
                    ("zeroshot_top1".into(), zs.top1),
                    ("zeroshot_top5".into(), zs.top5)
                ]
            )
        )?;
    }
    outln!("model: {}", summary.final_dir.display())?;
    outln!("metrics: {}", args.output.join("metrics.jsonl").display())?;
    Ok(())
}

/// The data spec `--dataset-type` and the CSV flags give for `path`.
fn data_spec(args: &TrainArgs, path: &str) -> Result<DataSpec> {
    Ok(DataSpec {
        path: path.to_string(),
        kind: args.dataset_type.parse().map_err(anyhow::Error::msg)?,
        csv_img_key: args.csv_img_key.clone(),
        csv_caption_key: args.csv_caption_key.clone(),
        csv_separator: args.csv_separator.map(|c| c as u8),
        shuffle_buffer: 1000,
    })
}

/// The training stream of `--train-data` and the number of optimizer steps (`--steps`, or
/// `--epochs` over its length).
fn train_stream(args: &TrainArgs) -> Result<(StreamFactory, u64)> {
    let train_spec = data_spec(args, &args.train_data)?;
    let per_step = args.batch_size * args.accum_freq.max(1);
    let (factory, epoch_size) = if train_spec.resolved_kind() == DatasetType::Synthetic {
        let n = args.train_num_samples.unwrap_or(10_000);
        let size = args.image_size.unwrap_or(32) as u32;
        let shapes = Shapes::with_diagonal_held_out(size, args.seed);
        (synthetic_factory(shapes, n), Some(n))
    } else {
        let len = match train_spec.resolved_kind() {
            DatasetType::WebDataset => args.train_num_samples,
            _ => Some(
                args.train_num_samples
                    .unwrap_or(train_spec.open(0, 0, false)?.size_hint().0 as u64),
            ),
        };
        (train_spec.factory(args.seed)?, len)
    };
    let steps = match (args.steps, args.epochs, epoch_size) {
        (Some(s), _, _) => s,
        (None, Some(e), Some(n)) => zoo_trainers::train::steps_for_epochs(e, n, per_step),
        (None, Some(_), None) => bail!("--epochs with WebDataset shards needs --train-num-samples"),
        (None, None, _) => bail!("give --steps or --epochs"),
    };
    Ok((factory, steps))
}

fn train_config(args: &TrainArgs, steps: u64) -> TrainConfig {
    TrainConfig {
        precision: args.precision,
        steps,
        lr: args.lr,
        warmup: args.warmup.min(steps),
        accum_freq: args.accum_freq.max(1),
        grad_clip_norm: args.grad_clip_norm,
        save_every: args.save_every,
        eval_every: args.zeroshot_frequency,
        output: args.output.clone(),
        seed: args.seed,
        progress: true,
    }
}

fn optimizer_config(args: &TrainArgs) -> AdamWConfig {
    AdamWConfig {
        beta1: args.beta1,
        beta2: args.beta2,
        eps: args.eps,
        weight_decay: args.wd,
    }
}

/// `zoo train blip --objective caption|pretrain`.
fn run_blip(args: TrainArgs) -> Result<()> {
    let Some(objective) = args.objective else {
        bail!("`zoo train blip` needs --objective caption or --objective pretrain");
    };
    let contrastive_only = [
        (args.text_tower.is_some(), "--text-tower"),
        (args.lock_image, "--lock-image"),
        (args.lock_text, "--lock-text"),
        (args.siglip_chunk.is_some(), "--siglip-chunk"),
        (args.zeroshot_data.is_some(), "--zeroshot-data"),
    ];
    if let Some((_, flag)) = contrastive_only.iter().find(|(given, _)| *given) {
        bail!("{flag} is for `zoo train clip|siglip`, not `zoo train blip`");
    }
    let device = zoo_models::device::parse_device(&args.device)?;
    let model_name = args.model.clone().unwrap_or_else(|| "blip-tiny".into());
    let is_preset = blip_caption::PRESETS.split(", ").any(|p| p == model_name);
    let (train, steps) = train_stream(&args)?;
    let val = match &args.val_data {
        Some(path) => {
            let (pairs, skipped) = data_spec(&args, path)?.load_pairs(args.val_samples)?;
            if skipped.total() > 0 {
                eprintln!("validation data: skipped {skipped}");
            }
            Some(pairs)
        }
        None => None,
    };
    let final_dir = match objective {
        BlipObjective::Caption => {
            let config = blip_caption::RunConfig {
                model: if is_preset {
                    blip_caption::ModelSpec::Preset(model_name)
                } else {
                    blip_caption::ModelSpec::Pretrained(model_name)
                },
                prompt: args.prompt.clone(),
                label_smoothing: args.label_smoothing,
                train: train_config(&args, steps),
                batch_size: args.batch_size,
                workers: args.workers,
                optimizer: optimizer_config(&args),
                image_size: args.image_size,
                augment: true,
                max_bad_fraction: args.max_bad_fraction,
                resume: args.resume.clone(),
                device,
            };
            let summary = blip_caption::run(config, blip_caption::RunData { train, val })
                .with_context(|| training_failed(&args))?;
            report(&summary.state.losses, summary.state.step)?;
            summary.final_dir
        }
        BlipObjective::Pretrain => {
            if args.queue_size > 0 && args.queue_size < args.batch_size {
                bail!(
                    "--queue-size {} must be 0 or at least --batch-size {}",
                    args.queue_size,
                    args.batch_size
                );
            }
            let train_config = train_config(&args, steps);
            let config = blip_pretrain::RunConfig {
                model: if is_preset {
                    blip_pretrain::ModelSpec::Preset(model_name)
                } else {
                    blip_pretrain::ModelSpec::Pretrained(model_name)
                },
                settings: blip_pretrain::PretrainSettings {
                    queue_size: args.queue_size,
                    momentum: args.momentum,
                    alpha: args.alpha,
                    alpha_ramp_steps: args.alpha_ramp_steps.unwrap_or(train_config.warmup),
                },
                train: train_config,
                batch_size: args.batch_size,
                workers: args.workers,
                optimizer: optimizer_config(&args),
                image_size: args.image_size,
                augment: true,
                max_bad_fraction: args.max_bad_fraction,
                resume: args.resume.clone(),
                device,
            };
            let summary = blip_pretrain::run(config, blip_pretrain::RunData { train, val })
                .with_context(|| training_failed(&args))?;
            report(&summary.state.losses, summary.state.step)?;
            summary.final_dir
        }
    };
    outln!("model: {}", final_dir.display())?;
    outln!("metrics: {}", args.output.join("metrics.jsonl").display())?;
    Ok(())
}

/// The context of a failed run: the data it read, which most run-time errors are about.
fn training_failed(args: &TrainArgs) -> String {
    format!("training on --train-data {} failed", args.train_data)
}

fn report(losses: &[f64], step: u64) -> Result<()> {
    let last = losses.last().copied().unwrap_or(f64::NAN);
    outln!("trained {step} steps; final loss {last:.4}")?;
    Ok(())
}

/// The files of a `--train-data` / `--val-data` for `zoo train lm`: comma-separated paths or
/// globs.
pub fn text_files(spec: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part.contains(['*', '?', '[']) {
            let mut matched: Vec<PathBuf> = glob::glob(part)
                .with_context(|| format!("bad pattern {part}"))?
                .filter_map(std::result::Result::ok)
                .collect();
            if matched.is_empty() {
                bail!("{part} matches no files");
            }
            matched.sort();
            files.extend(matched);
        } else {
            let path = PathBuf::from(part);
            if !path.is_file() {
                bail!("{} does not exist", path.display());
            }
            files.push(path);
        }
    }
    if files.is_empty() {
        bail!("no training files given");
    }
    Ok(files)
}

/// `zoo train lm`, and `zoo train mtp` (the same with MTP modules).
fn run_lm(args: TrainArgs) -> Result<()> {
    use zoo_trainers::lm;
    let not_lm = [
        (args.objective.is_some(), "--objective"),
        (args.text_tower.is_some(), "--text-tower"),
        (args.lock_image, "--lock-image"),
        (args.zeroshot_data.is_some(), "--zeroshot-data"),
        (args.image_size.is_some(), "--image-size"),
        (args.joint, "--joint"),
        (args.self_distill, "--self-distill"),
        (args.medusa_shared_lm_head, "--medusa-shared-lm-head"),
    ];
    if let Some((_, flag)) = not_lm.iter().find(|(given, _)| *given) {
        bail!("{flag} is not a `zoo train lm` flag");
    }
    if args.steps.is_none() && args.epochs.is_none() {
        bail!("give --steps or --epochs");
    }
    let train_files = text_files(&args.train_data)?;
    let val_files = args.val_data.as_deref().map(text_files).transpose()?;
    let model_name = args.model.clone().unwrap_or_else(|| "llama-tiny".into());
    let model = if lm::PRESETS.split(", ").any(|p| p == model_name) {
        lm::ModelSpec::Preset(model_name)
    } else {
        lm::ModelSpec::Pretrained(model_name)
    };
    let tokenizer = match args.tokenizer.as_str() {
        "train" => lm::TokenizerSpec::Train {
            vocab_size: args.vocab_size,
        },
        other => lm::TokenizerSpec::Load(other.to_string()),
    };
    let config = lm::RunConfig {
        model,
        tokenizer,
        seq_len: args.seq_len,
        // With --epochs the trainer sets the steps (and caps the warmup) once it has packed the
        // corpus.
        train: train_config(&args, args.steps.unwrap_or(u64::MAX)),
        batch_size: args.batch_size,
        optimizer: optimizer_config(&args),
        resume: args.resume.clone(),
        device: zoo_models::device::parse_device(&args.device)?,
        mtp: matches!(args.family, Objective::Mtp).then_some(lm::MtpSettings {
            depth: args.mtp_depth,
            lambda: args.mtp_lambda,
            freeze_backbone: args.freeze_backbone,
            draft_vocab: args.draft_vocab,
        }),
        epochs: args.epochs,
    };
    let summary = lm::run(config, &train_files, val_files.as_deref())
        .with_context(|| training_failed(&args))?;
    if summary.skipped > 0 {
        eprintln!(
            "skipped {} JSONL lines or chats (malformed, a text that does not start with its prompt, \
             or no reply token within --seq-len)",
            summary.skipped
        );
    }
    report(&summary.state.losses, summary.state.step)?;
    outln!("model: {}", summary.final_dir.display())?;
    outln!("metrics: {}", args.output.join("metrics.jsonl").display())?;
    Ok(())
}

/// `zoo train medusa`.
fn run_medusa(args: TrainArgs) -> Result<()> {
    use zoo_trainers::medusa;
    let Some(model) = args.model.clone() else {
        bail!("`zoo train medusa` needs --model: the LlamaForCausalLM folder or hub id to add heads to");
    };
    if args.steps.is_none() && args.epochs.is_none() {
        bail!("give --steps or --epochs");
    }
    let medusa2_flags = [
        (
            args.medusa_heads_coefficient != 0.2,
            "--medusa-heads-coefficient",
        ),
        (args.medusa_lr_multiplier != 4.0, "--medusa-lr-multiplier"),
        (args.medusa_warmup_steps != 0, "--medusa-warmup-steps"),
    ];
    if let Some((_, flag)) = medusa2_flags
        .iter()
        .find(|(given, _)| *given && !args.joint)
    {
        bail!("{flag} is a Medusa-2 setting; add --joint to train the backbone too");
    }
    if args.chat && args.distill_prompt_len.is_some() {
        bail!(
            "--distill-prompt-len cuts prompts from a corpus; with --chat every line is a prompt"
        );
    }
    let train_files = text_files(&args.train_data)?;
    let config = medusa::RunConfig {
        model,
        num_heads: args.medusa_num_heads,
        num_layers: args.medusa_num_layers,
        shared_lm_head: args.medusa_shared_lm_head,
        draft_vocab: args.draft_vocab,
        seq_len: args.seq_len,
        // With --epochs the trainer sets the steps (and caps the warmup) once it has packed the
        // corpus.
        train: train_config(&args, args.steps.unwrap_or(u64::MAX)),
        batch_size: args.batch_size,
        optimizer: optimizer_config(&args),
        resume: args.resume.clone(),
        device: zoo_models::device::parse_device(&args.device)?,
        joint: args.joint.then_some(medusa::Medusa2 {
            heads_coefficient: args.medusa_heads_coefficient,
            heads_lr_multiplier: args.medusa_lr_multiplier,
            heads_warmup_steps: args.medusa_warmup_steps,
        }),
        self_distill: args.self_distill.then(|| medusa::SelfDistill {
            prompt_len: args.distill_prompt_len.unwrap_or((args.seq_len / 4).max(1)),
            temperature: args.distill_temperature,
            max_sequences: args.distill_sequences,
            chat: args.chat,
        }),
        epochs: args.epochs,
    };
    let val_files = args.val_data.as_deref().map(text_files).transpose()?;
    let summary = medusa::run(config, &train_files, val_files.as_deref())
        .with_context(|| training_failed(&args))?;
    if summary.skipped > 0 {
        eprintln!(
            "skipped {} JSONL lines or chats (malformed, a text that does not start with its prompt, \
             or no reply token within --seq-len)",
            summary.skipped
        );
    }
    report(&summary.state.losses, summary.state.step)?;
    if args.joint {
        outln!(
            "model with medusa heads (--model and --medusa): {}",
            summary.final_dir.display()
        )?;
    } else {
        outln!("medusa heads: {}", summary.final_dir.display())?;
    }
    outln!("metrics: {}", args.output.join("metrics.jsonl").display())?;
    Ok(())
}
