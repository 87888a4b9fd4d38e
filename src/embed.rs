//! `zoo embed`: image and text embeddings, and HF's `logits_per_image`, from CLIP or SigLIP.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use serde_json::json;
use zoo_trainers::pipeline::{DualEncoderPipeline, IMAGE_CHUNK};

use crate::common::{progress, save_safetensors, ImageSizeArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub image: ImageSizeArgs,
    /// An image to embed (repeatable).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// A text to embed (repeatable).
    #[arg(long = "text")]
    pub texts: Vec<String>,
    /// Write pixel_values, input_ids, image_embeds, text_embeds and logits_per_image here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EmbedArgs) -> Result<()> {
    if args.images.is_empty() && args.texts.is_empty() {
        bail!("nothing to embed: give at least one --image or --text");
    }
    let device = args.model.device()?;
    let mut pipeline = DualEncoderPipeline::load(&args.model.model, &device, args.model.dtype()?)?;
    args.image.apply(&mut pipeline.processor)?;

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut image_embeds = None;
    if !args.images.is_empty() {
        let bar = progress(args.images.len(), "images");
        let (mut pixels, mut embeds) = (Vec::new(), Vec::new());
        for chunk in args.images.chunks(IMAGE_CHUNK) {
            let pv = pipeline.pixel_values(chunk)?;
            embeds.push(pipeline.embed_pixels(&pv)?);
            pixels.push(pv);
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        let embeds = Tensor::cat(&embeds, 0)?;
        tensors.insert(
            "pixel_values".into(),
            Tensor::cat(&pixels, 0)?.to_dtype(DType::F32)?,
        );
        tensors.insert("image_embeds".into(), embeds.clone());
        image_embeds = Some(embeds);
    }
    let mut text_embeds = None;
    if !args.texts.is_empty() {
        let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
        let inputs = pipeline.tokenize(&texts)?;
        let embeds = pipeline.embed_tokens(&inputs)?;
        tensors.insert("input_ids".into(), inputs.input_ids.to_dtype(DType::I64)?);
        tensors.insert("text_embeds".into(), embeds.clone());
        text_embeds = Some(embeds);
    }
    let logits = match (&image_embeds, &text_embeds) {
        (Some(i), Some(t)) => {
            let logits = pipeline.logits_per_image(i, t)?;
            tensors.insert("logits_per_image".into(), logits.clone());
            Some(logits)
        }
        _ => None,
    };
    if let Some(out) = &args.out {
        save_safetensors(&tensors, out)?;
    }

    let shape = |t: &Option<Tensor>| t.as_ref().map(|t| t.dims().to_vec());
    let probs = logits
        .as_ref()
        .map(|l| pipeline.probabilities(l))
        .transpose()?;
    if args.json {
        let value = json!({
            "model": pipeline.source,
            "model_type": pipeline.config.model_type(),
            "images": args.images,
            "texts": args.texts,
            "image_embeds_shape": shape(&image_embeds),
            "text_embeds_shape": shape(&text_embeds),
            "logits_per_image": logits.as_ref().map(|l| l.to_vec2::<f32>()).transpose()?,
            "probs": probs.as_ref().map(|p| p.to_vec2::<f32>()).transpose()?,
            "out": args.out,
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    outln!(
        "model: {} ({})",
        pipeline.source,
        pipeline.config.model_type()
    )?;
    if let Some(s) = shape(&image_embeds) {
        outln!("image_embeds: {s:?}")?;
    }
    if let Some(s) = shape(&text_embeds) {
        outln!("text_embeds: {s:?}")?;
    }
    if let (Some(logits), Some(probs)) = (logits, probs) {
        let (logits, probs) = (logits.to_vec2::<f32>()?, probs.to_vec2::<f32>()?);
        for (i, image) in args.images.iter().enumerate() {
            outln!("{}", image.display())?;
            for (j, text) in args.texts.iter().enumerate() {
                outln!("  {:>9.4}  p={:.4}  {text}", logits[i][j], probs[i][j])?;
            }
        }
    }
    if let Some(out) = &args.out {
        outln!("wrote {}", out.display())?;
    }
    Ok(())
}
