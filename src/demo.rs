//! `zoo demo`: the embedded default. Offline and in a few minutes on a laptop CPU it generates
//! a synthetic shapes dataset, trains a tiny CLIP, and evaluates zero-shot classification on
//! colour–shape combinations never seen together in a training caption.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use zoo_datasets::synthetic::{Shapes, COLOURS, SHAPES};
use zoo_models::contrastive::ScoreKind;
use zoo_trainers::contrastive::{run, synthetic_data, ModelSpec, RunConfig};
use zoo_trainers::optim::AdamWConfig;
use zoo_trainers::train::TrainConfig;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// clip-tiny or siglip-tiny.
    #[arg(long, default_value = "clip-tiny")]
    pub model: String,
    #[arg(long, default_value_t = 400)]
    pub steps: u64,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Held-out images to evaluate on.
    #[arg(long, default_value_t = 500)]
    pub eval_samples: usize,
    #[arg(long, default_value = "zoo-demo")]
    pub output: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run_demo(args: DemoArgs) -> Result<()> {
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
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!();
    println!(
        "Zero-shot classification over {} colour–shape classes,",
        classes.len()
    );
    println!(
        "on {} images of combinations never seen in a training caption:",
        report.n
    );
    println!();
    println!("  {:<28} {:>9} {:>9}", "", "top-1", "top-5");
    println!(
        "  {:<28} {:>8.1}% {:>8.1}%",
        format!("{} ({} steps)", args.model, summary.state.step),
        report.top1 * 100.0,
        report.top5 * 100.0
    );
    println!(
        "  {:<28} {:>8.1}% {:>8.1}%",
        "chance",
        chance1 * 100.0,
        chance5 * 100.0
    );
    println!();
    for (name, acc) in &report.per_class {
        println!("  {name:<16} {:>6.1}%", acc * 100.0);
    }
    println!();
    println!("loss plot: {}", args.output.join("loss.png").display());
    println!(
        "confusion matrix: {}",
        args.output.join("confusion.png").display()
    );
    println!("trained model (HF layout): {}", summary.final_dir.display());
    Ok(())
}
