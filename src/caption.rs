//! `zoo caption`: image captioning with BLIP (HF `BlipForConditionalGeneration.generate`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use zoo_models::blip::BlipForConditionalGeneration;
use zoo_models::generation::{
    BeamOptions, GenerationConfig, HfGenerationConfig, SamplingOptions, Strategy,
};
use zoo_models::hub::ModelRepo;
use zoo_trainers::capfilt::Captioner;

use crate::common::{progress, ImageSizeArgs, ModelArgs};
use crate::flags;

#[derive(Args, Debug)]
pub struct CaptionArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub image: ImageSizeArgs,
    /// Text the caption continues, e.g. "a picture of" (left out of the printed caption).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Most new tokens per caption. Default: the checkpoint's generation_config.json, else HF's
    /// `max_length` of 20 tokens including [DEC] and the prompt.
    #[arg(long, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub max_new_tokens: Option<usize>,
    /// [SEP] cannot end a caption before this many new tokens.
    #[arg(long, allow_negative_numbers = true)]
    pub min_new_tokens: Option<usize>,
    /// Beam search with this many beams (1: greedy).
    #[arg(long, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub beams: Option<usize>,
    /// Beam search: finished captions score sum(log p) / length^P.
    #[arg(long, value_parser = flags::finite::<f32>, allow_negative_numbers = true)]
    pub length_penalty: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, value_parser = flags::mass::<f32>, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Sampling temperature (turns sampling on).
    #[arg(long, value_parser = flags::positive::<f32>, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Sampling: keep only the k most likely tokens (0: all), HF's default 50.
    #[arg(long, default_value_t = 50, allow_negative_numbers = true)]
    pub top_k: usize,
    /// Seed of the sampling random stream.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// HF's repetition penalty (1: off).
    #[arg(long, value_parser = flags::positive::<f32>, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// Images captioned per forward pass.
    #[arg(long, default_value_t = 8, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Print JSON: a list of {"image", "caption", "token_ids"}.
    #[arg(long)]
    pub json: bool,
    /// Images to caption.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// The decoding settings: the flags, else the checkpoint's generation config, else HF's.
fn generation_config(
    args: &CaptionArgs,
    model: &BlipForConditionalGeneration,
    hf: &HfGenerationConfig,
    start_len: usize,
) -> Result<GenerationConfig> {
    let sampling = args.top_p.is_some() || args.temperature.is_some();
    let num_beams = args.beams.or(hf.num_beams).unwrap_or(1);
    if num_beams == 0 {
        bail!("--beams must be at least 1");
    }
    // Every beam of every image in a batch holds its logits over the vocabulary.
    let logits = (num_beams * args.batch_size) as f64
        * model.config.text_config.vocab_size as f64
        * 4.0
        * 2.0;
    zoo_models::device::ensure_fits_in_memory(&format!("--beams {num_beams}"), logits)
        .map_err(anyhow::Error::msg)?;
    if sampling && args.beams.is_some_and(|b| b > 1) {
        bail!("--beams and sampling (--top-p/--temperature) cannot be combined");
    }
    let strategy = if sampling {
        Strategy::Sample(SamplingOptions {
            temperature: args.temperature.unwrap_or(1.0),
            top_k: args.top_k,
            top_p: args.top_p.unwrap_or(1.0),
            seed: args.seed,
        })
    } else if num_beams > 1 {
        Strategy::Beam(BeamOptions {
            num_beams,
            length_penalty: args.length_penalty.or(hf.length_penalty).unwrap_or(1.0),
            ..BeamOptions::default()
        })
    } else {
        Strategy::Greedy
    };
    // A default length stops at the decoder's positions; --max-new-tokens past them is refused.
    let room = model
        .config
        .text_config
        .max_position_embeddings
        .saturating_sub(start_len);
    let max_new_tokens = args
        .max_new_tokens
        .unwrap_or_else(|| hf.max_new_tokens(start_len).min(room));
    let min_new_tokens = args
        .min_new_tokens
        .unwrap_or_else(|| hf.min_new_tokens(start_len));
    model
        .check_caption_length(start_len, max_new_tokens)
        .map_err(anyhow::Error::msg)?;
    if min_new_tokens > max_new_tokens {
        bail!("--min-new-tokens {min_new_tokens} is more than --max-new-tokens {max_new_tokens}");
    }
    Ok(GenerationConfig {
        max_new_tokens,
        min_new_tokens,
        repetition_penalty: args
            .repetition_penalty
            .or(hf.repetition_penalty)
            .unwrap_or(1.0),
        strategy,
        ..model.generation_defaults()
    })
}

pub fn run(args: CaptionArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = args.model.device()?;
    let repo = ModelRepo::open(&args.model.model)?;
    let mut captioner = Captioner::load(&repo, args.model.dtype()?, &device)?;
    args.image.apply(&mut captioner.processor)?;
    let hf = match repo.get_optional("generation_config.json")? {
        Some(path) => HfGenerationConfig::from_file(&path)?,
        None => HfGenerationConfig::default(),
    };
    let prompt = captioner.prompt(args.prompt.as_deref())?;
    let start_len = prompt.as_ref().map_or(1, |p| p.start_len);
    let cfg = generation_config(&args, &captioner.model, &hf, start_len)?;

    let bar = progress(args.images.len(), "images");
    let mut results = Vec::with_capacity(args.images.len());
    for chunk in args.images.chunks(args.batch_size) {
        let pixels = captioner.processor.load_batch(chunk, &device)?;
        let rows = captioner
            .generate(&pixels, prompt.as_ref(), &cfg)
            .with_context(|| format!("captioning {}", chunk[0].display()))?;
        for (image, (ids, caption)) in chunk.iter().zip(rows) {
            results.push((image, caption, ids));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();

    if args.json {
        let value: Vec<_> = results
            .iter()
            .map(|(image, caption, ids)| json!({"image": image, "caption": caption, "token_ids": ids}))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        for (image, caption, _) in &results {
            outln!("{}\t{caption}", image.display())?;
        }
    }
    Ok(())
}
