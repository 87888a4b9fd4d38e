//! `zoo match`: image-text matching with BLIP (HF `BlipForImageTextRetrieval`): the ITM
//! probability and the ITC cosine score of every image with every text.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;
use serde_json::json;
use zoo_models::hub::ModelRepo;
use zoo_trainers::capfilt::ItmFilter;

use crate::common::{progress, ImageSizeArgs, ModelArgs};

/// Images are decoded and encoded this many at a time.
const IMAGE_CHUNK: usize = 16;

#[derive(Args, Debug)]
pub struct MatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub image: ImageSizeArgs,
    /// An image (repeatable).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// A text (repeatable).
    #[arg(long = "text")]
    pub texts: Vec<String>,
    /// Print JSON: a list of {"image", "text", "itm_prob", "itc_score"}.
    #[arg(long)]
    pub json: bool,
}

/// One scored pair.
struct Pair {
    image: usize,
    text: usize,
    itm_prob: f32,
    itc_score: f32,
}

pub fn run(args: MatchArgs) -> Result<()> {
    if args.images.is_empty() || args.texts.is_empty() {
        bail!("nothing to match: give at least one --image and one --text");
    }
    let device = args.model.device()?;
    let repo = ModelRepo::open(&args.model.model)?;
    let mut filter = ItmFilter::load(&repo, args.model.dtype()?, &device)?;
    args.image.apply(&mut filter.processor)?;
    let model = &filter.model;
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let (input_ids, mask) = filter.tokenize(&texts)?;
    let text_features = model.text_features(&input_ids, Some(&mask))?;
    let n_texts = texts.len();

    let bar = progress(args.images.len(), "images");
    let mut pairs = Vec::with_capacity(args.images.len() * n_texts);
    for (c, chunk) in args.images.chunks(IMAGE_CHUNK).enumerate() {
        let pixels = filter
            .processor
            .load_batch(chunk, &device)?
            .to_dtype(model.dtype())?;
        let image_embeds = model.vision_model.forward(&pixels)?;
        let itc = model
            .image_features(&image_embeds)?
            .matmul(&text_features.t()?)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        for (i, itc_row) in itc.iter().enumerate() {
            // Each image against every text at once.
            let image = image_embeds.narrow(0, i, 1)?;
            let probs = filter.itm_probs_of_tokens(&image, &input_ids, &mask)?;
            for (t, (&itc_score, &itm_prob)) in itc_row.iter().zip(&probs).enumerate() {
                pairs.push(Pair {
                    image: c * IMAGE_CHUNK + i,
                    text: t,
                    itm_prob,
                    itc_score,
                });
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();

    if args.json {
        let value: Vec<_> = pairs
            .iter()
            .map(|p| {
                json!({
                    "image": args.images[p.image],
                    "text": args.texts[p.text],
                    "itm_prob": p.itm_prob,
                    "itc_score": p.itc_score,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    let mut last = None;
    for p in &pairs {
        if last != Some(p.image) {
            outln!("{}", args.images[p.image].display())?;
            last = Some(p.image);
        }
        outln!(
            "  itm={:.4}  itc={:>7.4}  {}",
            p.itm_prob,
            p.itc_score,
            args.texts[p.text]
        )?;
    }
    Ok(())
}
