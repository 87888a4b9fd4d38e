//! `zoo classify`: zero-shot classification of images over labels, with prompt ensembles.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use serde_json::json;
use zoo_trainers::pipeline::{DualEncoderPipeline, IMAGE_CHUNK};
use zoo_trainers::zeroshot::{build_classifier, classify};

use crate::common::{progress, ImageSizeArgs, ModelArgs};
use crate::flags;

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub image: ImageSizeArgs,
    /// Comma-separated class labels, e.g. "cat,dog,a red car".
    #[arg(long)]
    pub labels: Option<String>,
    /// A file with one label per line (blank lines and lines starting with # are skipped).
    #[arg(long)]
    pub labels_file: Option<PathBuf>,
    /// A prompt template with `{}` for the label (repeatable; several are averaged).
    #[arg(long = "template")]
    pub templates: Vec<String>,
    /// How many labels to show per image.
    #[arg(long, default_value_t = 5, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub top_k: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Images to classify.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

fn read_labels(args: &ClassifyArgs) -> Result<Vec<String>> {
    let mut labels: Vec<String> = Vec::new();
    if let Some(list) = &args.labels {
        labels.extend(
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    if let Some(path) = &args.labels_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read labels file {}", path.display()))?;
        labels.extend(
            text.lines()
                .map(str::trim)
                .filter(|s| !s.is_empty() && !s.starts_with('#'))
                .map(String::from),
        );
    }
    if labels.is_empty() {
        match &args.labels_file {
            Some(path) if args.labels.is_none() => {
                bail!("labels file {} has no labels", path.display())
            }
            _ => bail!(
                "no labels given: --labels is empty (give comma-separated labels or --labels-file)"
            ),
        }
    }
    Ok(labels)
}

pub fn run(args: ClassifyArgs) -> Result<()> {
    let labels = read_labels(&args)?;
    let device = args.model.device()?;
    let mut pipeline = DualEncoderPipeline::load(&args.model.model, &device, args.model.dtype()?)?;
    args.image.apply(&mut pipeline.processor)?;
    let classifier = build_classifier(&pipeline, &labels, &args.templates)?;

    let bar = progress(args.images.len(), "images");
    let mut embeds = Vec::new();
    for chunk in args.images.chunks(IMAGE_CHUNK) {
        embeds.push(pipeline.embed_pixels(&pipeline.pixel_values(chunk)?)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let embeds = Tensor::cat(&embeds, 0)?;
    let ranked = classify(&pipeline, &embeds, &classifier, &labels, args.top_k)?;

    if args.json {
        let value: Vec<_> = args
            .images
            .iter()
            .zip(&ranked)
            .map(|(image, preds)| {
                json!({
                    "image": image,
                    "predictions": preds.iter().map(|p| json!({"label": p.label, "prob": p.prob, "logit": p.logit})).collect::<Vec<_>>(),
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    for (image, preds) in args.images.iter().zip(&ranked) {
        outln!("{}", image.display())?;
        for p in preds {
            outln!("  {:>6.2}%  {}", p.prob * 100.0, p.label)?;
        }
    }
    Ok(())
}
