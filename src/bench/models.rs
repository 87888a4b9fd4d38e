//! `zoo bench embed|train-step|caption`: the model benchmarks `bench_torch.py` mirrors.

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use zoo_models::blip::BlipForConditionalGeneration;
use zoo_models::contrastive::{load_dual_encoder, DualEncoderConfig};
use zoo_models::hub::ModelRepo;
use zoo_trainers::contrastive::contrastive_loss;
use zoo_trainers::data::{ContrastiveBatch, DataPosition};
use zoo_trainers::model::TrainableDualEncoder;
use zoo_trainers::optim::{named_grads, AdamW, AdamWConfig};
use zoo_trainers::precision::{GradScaler, Precision};

use super::{
    gemm_peak_gflops, median_seconds, model_name, print_report, random_ids, random_tensor,
};
use crate::common::ModelArgs;
use crate::flags;

#[derive(Args, Debug)]
pub struct EmbedBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 8, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub batch: usize,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub warmup: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub repeats: usize,
    #[arg(long)]
    pub json: bool,
}

/// The sizes of a ViT vision tower: hidden width, MLP width, layers, image size, patch size.
fn vit_shape(cfg: &DualEncoderConfig) -> Option<(usize, usize, usize, usize, usize)> {
    let shape = |d, i, l, s, p| Some((d, i, l, s, p));
    match cfg {
        DualEncoderConfig::Clip(c) => {
            let v = &c.vision_config;
            let (d, i, l) = (v.hidden_size, v.intermediate_size, v.num_hidden_layers);
            shape(d, i, l, v.image_size, v.patch_size)
        }
        DualEncoderConfig::Siglip(c) => {
            let v = &c.vision_config;
            let (d, i, l) = (v.hidden_size, v.intermediate_size, v.num_hidden_layers);
            shape(d, i, l, v.image_size, v.patch_size)
        }
        DualEncoderConfig::VisionText(_) => None,
    }
}

/// A lower bound on the memory one image takes in the vision tower: its f32 pixels, and the
/// activations of one encoder layer (inference) or of every layer (training keeps them for the
/// backward): per token, the residual, q/k/v, the attention output and the MLP's hidden units.
fn vision_bytes_per_image(cfg: &DualEncoderConfig, training: bool) -> f64 {
    let s = cfg.image_size() as f64;
    let pixels = 3.0 * s * s * 4.0;
    let Some((d, i, layers, _, p)) = vit_shape(cfg) else {
        return pixels;
    };
    let tokens = (s / p.max(1) as f64).powi(2);
    let layer = tokens * (5 * d + i) as f64 * 4.0;
    pixels + layer * if training { layers as f64 } else { 1.0 }
}

/// Refuses a `--batch` whose images would not fit in memory, before allocating them.
fn ensure_batch_fits(cfg: &DualEncoderConfig, batch: usize, training: bool) -> Result<()> {
    let bytes = batch as f64 * vision_bytes_per_image(cfg, training);
    zoo_models::device::ensure_fits_in_memory(&format!("--batch {batch}"), bytes)
        .map_err(anyhow::Error::msg)
}

/// Forward FLOPs of one image through a ViT tower (2·m·n·k per matmul: patch embedding, q/k/v
/// and output projections, `QKᵀ` and `PV`, the MLP, and the pooling head or projection; no
/// elementwise work).
pub fn vision_flops(cfg: &DualEncoderConfig) -> Option<f64> {
    let (d, i, layers, s, p) = vit_shape(cfg)?;
    let (class_token, head, proj) = match cfg {
        DualEncoderConfig::Clip(c) => (true, false, c.projection_dim),
        DualEncoderConfig::Siglip(c) => (false, c.vision_config.vision_use_head, 0),
        DualEncoderConfig::VisionText(_) => return None,
    };
    let f = |x: usize| x as f64;
    let patches = (s / p) * (s / p);
    let t = patches + usize::from(class_token);
    let layer = 2.0 * f(t) * f(d) * f(4 * d) + 4.0 * f(t) * f(t) * f(d) + 4.0 * f(t) * f(d) * f(i);
    let mut total = 2.0 * f(patches) * f(3 * p * p) * f(d) + f(layers) * layer;
    if head {
        // One probe query: q and output projections, k/v over every token, attention, MLP.
        total +=
            4.0 * f(d) * f(d) + 4.0 * f(t) * f(d) * f(d) + 4.0 * f(t) * f(d) + 4.0 * f(d) * f(i);
    }
    total += 2.0 * f(d) * f(proj);
    Some(total)
}

pub fn bench_embed(args: EmbedBenchArgs) -> Result<()> {
    let device = args.model.device()?;
    let repo = ModelRepo::open(&args.model.model)?;
    let loaded = load_dual_encoder(&repo, args.model.dtype()?, &device)?;
    let cfg = &loaded.config;
    let (s, l, b) = (cfg.image_size(), cfg.max_text_len(), args.batch);
    ensure_batch_fits(cfg, b, false)?;
    let pixels = random_tensor(&[b, 3, s, s], 1, &device)?.to_dtype(loaded.dtype)?;
    let ids = random_ids(b, l, text_vocab(cfg), 2, &device)?;
    let image_s = median_seconds(args.warmup, args.repeats, || {
        loaded
            .model
            .image_features(&pixels)?
            .device()
            .synchronize()?;
        Ok(())
    })?;
    let text_s = median_seconds(args.warmup, args.repeats, || {
        loaded
            .model
            .text_features(&ids, None)?
            .device()
            .synchronize()?;
        Ok(())
    })?;
    let gemm = gemm_peak_gflops(&device)?;
    let images_per_s = b as f64 / image_s;
    let flops = vision_flops(cfg);
    let mfu = flops.map(|f| f * images_per_s / 1e9 / gemm);
    let report = json!({
        "bench": "embed", "impl": "candle-zoo", "model": model_name(&args.model.model),
        "threads": candle_core::utils::get_num_threads(), "batch": b, "image_size": s,
        "text_len": l, "image_ms": image_s * 1e3, "text_ms": text_s * 1e3,
        "images_per_s": images_per_s, "texts_per_s": b as f64 / text_s,
        "gemm_gflops": gemm, "vision_gflop_per_image": flops.map(|f| f / 1e9), "mfu": mfu,
    });
    let table = vec![vec![
        model_name(&args.model.model),
        b.to_string(),
        format!("{images_per_s:.1}"),
        format!("{:.1}", b as f64 / text_s),
        format!("{gemm:.0}"),
        mfu.map_or("-".into(), |m| format!("{:.0}%", m * 100.0)),
    ]];
    print_report(
        args.json,
        &report,
        &[
            "model",
            "batch",
            "images/s",
            "texts/s",
            "GEMM GFLOP/s",
            "vision MFU",
        ],
        &table,
    )
}

/// The text tower's vocabulary, for random token ids.
fn text_vocab(cfg: &DualEncoderConfig) -> usize {
    match cfg {
        DualEncoderConfig::Clip(c) => c.text_config.vocab_size,
        DualEncoderConfig::Siglip(c) => c.text_config.vocab_size,
        DualEncoderConfig::VisionText(c) => c.text_config.vocab_size,
    }
}

#[derive(Args, Debug)]
pub struct TrainStepBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 16, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub batch: usize,
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub warmup: usize,
    /// Timed steps; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub steps: usize,
    /// fp32, fp16 or amp_fp16 on the CPU (see `zoo train --precision`).
    #[arg(long, default_value = "fp32", value_parser = |s: &str| s.parse::<Precision>())]
    pub precision: Precision,
    #[arg(long)]
    pub json: bool,
}

/// One contrastive training step as `zoo train clip|siglip` takes it: forward of both towers,
/// the CLIP or SigLIP loss, backward, AdamW (lr 1e-5, weight decay 0.1, betas 0.9/0.98).
pub fn bench_train_step(args: TrainStepBenchArgs) -> Result<()> {
    let device = args.model.device()?;
    if args.model.dtype.is_some() {
        bail!("zoo bench train-step trains in f32; drop --dtype");
    }
    let model = TrainableDualEncoder::from_pretrained(&args.model.model, None, &device)?;
    let cfg = &model.config;
    let (s, l, b) = (cfg.image_size(), cfg.max_text_len(), args.batch);
    ensure_batch_fits(cfg, b, true)?;
    let batch = ContrastiveBatch {
        pixel_values: random_tensor(&[b, 3, s, s], 1, &device)?,
        input_ids: random_ids(b, l, text_vocab(cfg), 2, &device)?,
        attention_mask: None,
        position: DataPosition::default(),
    };
    let vars = model.trainable_vars(false, false);
    let config = AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let mut optimizer = AdamW::new(vars.clone(), config)?;
    args.precision.check_device(&device)?;
    let scaler = GradScaler::default();
    let secs = median_seconds(args.warmup, args.steps, || {
        let loss = contrastive_loss(&model, args.precision, &batch, (false, false), None)?;
        let loss = if args.precision.scales_loss() {
            // As the loop does under f16 (the scale cancels when the gradients are unscaled).
            (loss * scaler.scale)?
        } else {
            loss
        };
        let mut grads = named_grads(&vars, &loss.backward()?);
        if args.precision.scales_loss() && !scaler.unscale(&mut grads)? {
            return Ok(());
        }
        optimizer.step(&grads, 1e-5)?;
        model.clamp_logit_scale()?;
        Ok(())
    })?;
    let report = json!({
        "bench": "train-step", "impl": "candle-zoo", "model": model_name(&args.model.model),
        "precision": args.precision.to_string(),
        "threads": candle_core::utils::get_num_threads(), "batch": b,
        "ms_per_step": secs * 1e3, "samples_per_s": b as f64 / secs,
    });
    let table = vec![vec![
        model_name(&args.model.model),
        b.to_string(),
        format!("{:.0}", secs * 1e3),
        format!("{:.1}", b as f64 / secs),
    ]];
    print_report(
        args.json,
        &report,
        &["model", "batch", "ms/step", "samples/s"],
        &table,
    )
}

#[derive(Args, Debug)]
pub struct CaptionBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images captioned one at a time (random pixels).
    #[arg(long, default_value_t = 5, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub images: usize,
    /// Every caption is exactly this long (`[SEP]` is held back until then), as
    /// `bench_torch.py` sets `min_new_tokens`.
    #[arg(long, default_value_t = 20, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub warmup: usize,
    #[arg(long)]
    pub json: bool,
}

/// Greedy BLIP captions of random images at batch 1, with the KV cache.
pub fn bench_caption(args: CaptionBenchArgs) -> Result<()> {
    let device = args.model.device()?;
    let repo = ModelRepo::open(&args.model.model)?;
    let model = BlipForConditionalGeneration::load(&repo, args.model.dtype()?, &device)?;
    model
        .check_caption_length(1, args.max_new_tokens)
        .map_err(anyhow::Error::msg)?;
    let s = model.config.vision_config.image_size;
    let cfg = zoo_models::generation::GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.max_new_tokens,
        ..model.generation_defaults()
    };
    let dtype = model.dtype();
    let images: Vec<_> = (0..args.images.max(1))
        .map(|i| Ok(random_tensor(&[1, 3, s, s], 10 + i as u64, &device)?.to_dtype(dtype)?))
        .collect::<Result<_>>()?;
    for _ in 0..args.warmup {
        model.generate(&images[0], None, &cfg)?;
    }
    let mut total = 0.0;
    for image in &images {
        let start = std::time::Instant::now();
        model.generate(image, None, &cfg)?;
        total += start.elapsed().as_secs_f64();
    }
    let ms = total / images.len() as f64 * 1e3;
    let report = json!({
        "bench": "caption", "impl": "candle-zoo", "model": model_name(&args.model.model),
        "threads": candle_core::utils::get_num_threads(), "new_tokens": args.max_new_tokens,
        "images": images.len(), "ms_per_caption": ms,
    });
    let table = vec![vec![
        model_name(&args.model.model),
        args.max_new_tokens.to_string(),
        format!("{ms:.0}"),
    ]];
    print_report(
        args.json,
        &report,
        &["model", "new tokens", "ms/caption"],
        &table,
    )
}
