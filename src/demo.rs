//! `zoo demo`: the embedded default. Offline and in a few minutes on a laptop CPU it generates
//! a synthetic shapes dataset, trains a tiny CLIP, and evaluates zero-shot classification on
//! colour–shape combinations never seen together in a training caption.
//!
//! `zoo demo caption` does the same for BLIP captioning: it trains a tiny captioner on the
//! synthetic shapes, captions images it never saw, and scores the captions against their true
//! ones with BLEU-4 and CIDEr-D.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use zoo_datasets::synthetic::{Shapes, COLOURS, SHAPES};
use zoo_models::contrastive::ScoreKind;
use zoo_trainers::contrastive::{run, synthetic_data, ModelSpec, RunConfig};
use zoo_trainers::optim::AdamWConfig;
use zoo_trainers::train::TrainConfig;

use crate::flags;

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(subcommand)]
    pub task: Option<DemoTask>,
    /// clip-tiny or siglip-tiny.
    #[arg(long, default_value = "clip-tiny", value_parser = ["clip-tiny", "siglip-tiny"])]
    pub model: String,
    #[arg(long, default_value_t = 400, value_parser = flags::count::<u64>, allow_negative_numbers = true)]
    pub steps: u64,
    #[arg(long, default_value_t = 64, value_parser = flags::at_least_two::<usize>, allow_negative_numbers = true)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Held-out images to evaluate on.
    #[arg(long, default_value_t = 500, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub eval_samples: usize,
    #[arg(long, default_value = "zoo-demo")]
    pub output: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum DemoTask {
    /// Train a tiny BLIP captioner on synthetic shapes, caption held-out images, and print
    /// BLEU-4 and CIDEr against their true captions.
    Caption(CaptionDemoArgs),
}

#[derive(Args, Debug)]
pub struct CaptionDemoArgs {
    #[arg(long, default_value_t = 500, value_parser = flags::count::<u64>, allow_negative_numbers = true)]
    pub steps: u64,
    #[arg(long, default_value_t = 32, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Held-out images to caption.
    #[arg(long, default_value_t = 200, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub eval_samples: usize,
    #[arg(long, default_value = "zoo-demo-caption")]
    pub output: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run_demo(args: DemoArgs) -> Result<()> {
    if let Some(DemoTask::Caption(caption)) = args.task {
        return run_caption_demo(caption);
    }
    let objective = if args.model.starts_with("siglip") {
        ScoreKind::Sigmoid
    } else {
        ScoreKind::Softmax
    };
    let shapes = Shapes::with_diagonal_held_out(32, args.seed);
    let held_out: Vec<String> = shapes
        .held_out
        .iter()
        .map(|&(c, s)| format!("{} {}", COLOURS[c].0, SHAPES[s]))
        .collect();
    eprintln!(
        "zoo demo: training {} on synthetic shapes; held out of training: {}",
        args.model,
        held_out.join(", ")
    );
    let data = synthetic_data(args.seed, 32, 1_000_000, args.eval_samples);
    let config = RunConfig {
        model: ModelSpec::Preset(args.model.clone()),
        objective,
        train: TrainConfig {
            precision: Default::default(),
            steps: args.steps,
            lr: 3e-3,
            warmup: args.steps / 10,
            accum_freq: 1,
            grad_clip_norm: Some(1.0),
            save_every: None,
            eval_every: Some((args.steps / 4).max(1)),
            output: args.output.clone(),
            seed: args.seed,
            progress: true,
        },
        batch_size: args.batch_size,
        workers: 2,
        optimizer: AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        },
        image_size: Some(32),
        lock_image: false,
        lock_text: false,
        siglip_chunk: None,
        max_bad_fraction: 0.1,
        resume: None,
        device: candle_core::Device::Cpu,
    };
    let summary = run(config, data).context("demo training failed")?;
    let report = summary
        .task
        .last_zeroshot
        .context("the demo evaluates zero-shot at the end")?;
    let classes = Shapes::class_names();
    let chance1 = 1.0 / classes.len() as f64;
    let chance5 = 5.0 / classes.len() as f64;
    if args.json {
        let per_class: serde_json::Map<String, serde_json::Value> = report
            .per_class
            .iter()
            .map(|(k, v)| (k.clone(), (*v).into()))
            .collect();
        let value = json!({
            "model": args.model, "steps": summary.state.step,
            "final_loss": summary.state.losses.last(),
            "held_out_classes": held_out, "n": report.n,
            "top1": report.top1, "top5": report.top5,
            "chance_top1": chance1, "chance_top5": chance5,
            "per_class": per_class,
            "output": args.output,
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    outln!()?;
    outln!(
        "Zero-shot classification over {} colour–shape classes,",
        classes.len()
    )?;
    outln!(
        "on {} images of combinations never seen in a training caption:",
        report.n
    )?;
    outln!()?;
    outln!("  {:<28} {:>9} {:>9}", "", "top-1", "top-5")?;
    outln!(
        "  {:<28} {:>8.1}% {:>8.1}%",
        format!("{} ({} steps)", args.model, summary.state.step),
        report.top1 * 100.0,
        report.top5 * 100.0
    )?;
    outln!(
        "  {:<28} {:>8.1}% {:>8.1}%",
        "chance",
        chance1 * 100.0,
        chance5 * 100.0
    )?;
    outln!()?;
    for (name, acc) in &report.per_class {
        outln!("  {name:<16} {:>6.1}%", acc * 100.0)?;
    }
    outln!()?;
    outln!("loss plot: {}", args.output.join("loss.png").display())?;
    outln!(
        "confusion matrix: {}",
        args.output.join("confusion.png").display()
    )?;
    outln!("trained model (HF layout): {}", summary.final_dir.display())?;
    Ok(())
}

/// `zoo demo caption`.
fn run_caption_demo(args: CaptionDemoArgs) -> Result<()> {
    use zoo_datasets::synthetic::Split;
    use zoo_trainers::blip_caption::{self, DEFAULT_PROMPT};
    use zoo_trainers::caption_metrics::score_captions;
    use zoo_trainers::data::synthetic_factory;

    let shapes = Shapes::with_diagonal_held_out(32, args.seed);
    // Other images of the same kinds: a different generator seed, so none was trained on.
    let eval_shapes = Shapes {
        seed: args.seed ^ 0x5EED,
        ..shapes.clone()
    };
    let held_out: Vec<zoo_datasets::sources::Pair> = (0..args.eval_samples as u64)
        .map(|i| {
            let s = eval_shapes.sample(Split::Train, i);
            zoo_datasets::sources::Pair {
                image: image::DynamicImage::ImageRgb8(s.image),
                caption: s.caption,
                key: format!("held-out-{i}"),
            }
        })
        .collect();
    eprintln!(
        "zoo demo caption: training blip-tiny to caption synthetic shapes ({} steps of {})",
        args.steps, args.batch_size
    );
    let config = blip_caption::RunConfig {
        model: blip_caption::ModelSpec::Preset("blip-tiny".into()),
        prompt: DEFAULT_PROMPT.into(),
        label_smoothing: blip_caption::DEFAULT_LABEL_SMOOTHING,
        train: TrainConfig {
            precision: Default::default(),
            steps: args.steps,
            lr: 2e-3,
            warmup: args.steps / 10,
            accum_freq: 1,
            grad_clip_norm: Some(1.0),
            save_every: None,
            eval_every: Some((args.steps / 4).max(1)),
            output: args.output.clone(),
            seed: args.seed,
            progress: true,
        },
        batch_size: args.batch_size,
        workers: 2,
        optimizer: AdamWConfig {
            weight_decay: 0.05,
            ..AdamWConfig::default()
        },
        image_size: Some(32),
        augment: false,
        max_bad_fraction: 0.1,
        resume: None,
        device: candle_core::Device::Cpu,
    };
    let data = blip_caption::RunData {
        train: synthetic_factory(shapes, 1_000_000),
        val: None,
    };
    let summary = blip_caption::run(config, data).context("demo training failed")?;
    let model = &summary.task.model;
    let mut predictions = Vec::with_capacity(held_out.len());
    for chunk in held_out.chunks(32) {
        let images: Vec<&image::DynamicImage> = chunk.iter().map(|p| &p.image).collect();
        let pixels = model.pixel_values(&images)?;
        for (_, text) in model.caption(&pixels, DEFAULT_PROMPT, 20)? {
            predictions.push(text);
        }
    }
    let references: Vec<Vec<&str>> = held_out.iter().map(|p| vec![p.caption.as_str()]).collect();
    let scores = score_captions(&predictions, &references)?;
    let exact = predictions
        .iter()
        .zip(&held_out)
        .filter(|(p, r)| p.trim() == r.caption)
        .count();
    if args.json {
        let examples: Vec<serde_json::Value> = predictions
            .iter()
            .zip(&held_out)
            .take(8)
            .map(|(p, r)| json!({"caption": p, "truth": r.caption}))
            .collect();
        let value = json!({
            "model": "blip-tiny", "steps": summary.state.step,
            "final_loss": summary.state.losses.last(),
            "n": held_out.len(), "bleu4": scores.bleu[3], "cider": scores.cider,
            "bleu": scores.bleu, "exact_match": exact as f64 / held_out.len() as f64,
            "examples": examples, "output": args.output,
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    outln!()?;
    outln!(
        "Greedy captions of {} held-out images (prompt \"{}\"):",
        held_out.len(),
        DEFAULT_PROMPT.trim_end()
    )?;
    outln!()?;
    for (p, r) in predictions.iter().zip(&held_out).take(8) {
        outln!("  {:<38} truth: {}", p, r.caption)?;
    }
    outln!()?;
    outln!("  BLEU-4   {:.3}", scores.bleu[3])?;
    outln!("  CIDEr-D  {:.3}", scores.cider)?;
    outln!(
        "  exact    {:.1}% of captions equal their truth",
        100.0 * exact as f64 / held_out.len() as f64
    )?;
    outln!()?;
    outln!("loss plot: {}", args.output.join("loss.png").display())?;
    outln!("trained model (HF layout): {}", summary.final_dir.display())?;
    Ok(())
}
