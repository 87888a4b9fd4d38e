//! `zoo match`: image-text matching with BLIP (HF `BlipForImageTextRetrieval`): the ITM
//! probability and the ITC cosine score of every image with every text.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use clap::Args;
use serde_json::json;
use zoo_datasets::preprocess::ImageProcessor;
use zoo_datasets::tokenize::{Padding, TextTokenizer};
use zoo_models::blip::BlipForImageTextRetrieval;
use zoo_models::hub::ModelRepo;

use crate::common::{progress, ModelArgs};

/// Images are decoded and encoded this many at a time.
const IMAGE_CHUNK: usize = 16;

#[derive(Args, Debug)]
pub struct MatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    let model = BlipForImageTextRetrieval::load(&repo, args.model.dtype()?, &device)?;
    let tokenizer = TextTokenizer::from_files(
        &repo.get("tokenizer.json")?,
        repo.get_optional("tokenizer_config.json")?.as_deref(),
    )?;
    let processor = ImageProcessor::from_file(&repo.get("preprocessor_config.json")?)?;

    // As HF's BlipProcessor: "[CLS] text [SEP]", padded to the longest, with the mask.
    let max_len = model.config.text_config.max_position_embeddings;
    let max_len = tokenizer
        .model_max_length()
        .map_or(max_len, |m| m.min(max_len));
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let (input_ids, mask) = tokenizer
        .encode_batch(&texts, Padding::Longest, max_len)?
        .to_tensors(&device)?;
    let text_features = model.text_features(&input_ids, Some(&mask))?;
    let n_texts = texts.len();

    let bar = progress(args.images.len(), "images");
    let mut pairs = Vec::with_capacity(args.images.len() * n_texts);
    for (c, chunk) in args.images.chunks(IMAGE_CHUNK).enumerate() {
        let pixels = processor
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
            let (_, n, d) = image.dims3()?;
            let image = image.broadcast_as((n_texts, n, d))?.contiguous()?;
            let logits = model.itm_logits(&image, &input_ids, Some(&mask))?;
            let probs = softmax_rows(&logits.to_dtype(DType::F32)?)?;
            for (t, &itc_score) in itc_row.iter().enumerate() {
                pairs.push(Pair {
                    image: c * IMAGE_CHUNK + i,
                    text: t,
                    itm_prob: probs[t][1],
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
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let mut last = None;
    for p in &pairs {
        if last != Some(p.image) {
            println!("{}", args.images[p.image].display());
            last = Some(p.image);
        }
        println!(
            "  itm={:.4}  itc={:>7.4}  {}",
            p.itm_prob, p.itc_score, args.texts[p.text]
        );
    }
    Ok(())
}

/// Softmax over the two ITM classes of each row.
fn softmax_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_vec2::<f32>()?)
}
