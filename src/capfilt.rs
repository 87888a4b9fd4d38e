//! `zoo capfilt`: BLIP's CapFilt bootstrapping (Li et al. 2022, §3.3) of noisy web pairs with
//! a captioner and an ITM filter; the work is `zoo_trainers::capfilt`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};
use zoo_models::hub::ModelRepo;
use zoo_trainers::capfilt::{progress_path, run, CapFiltConfig, Captioner, Counts, ItmFilter};
use zoo_trainers::data::{DataSpec, DatasetType};

use crate::common::progress;
use crate::flags;

#[derive(Args, Debug)]
pub struct CapfiltArgs {
    /// The captioner: a BlipForConditionalGeneration folder or hub id, e.g.
    /// Salesforce/blip-image-captioning-base.
    #[arg(long)]
    pub captioner: String,
    /// The filter: a BlipForImageTextRetrieval folder or hub id, e.g.
    /// Salesforce/blip-itm-base-coco.
    #[arg(long)]
    pub filter: String,
    /// The web pairs: a CSV/TSV, a JSONL file, a COCO captions JSON, or WebDataset shards.
    #[arg(long)]
    pub data: String,
    /// The bootstrapped pairs, appended as JSONL; progress goes to OUT.done, and a rerun
    /// resumes from it.
    #[arg(long)]
    pub out: PathBuf,
    /// Keep a caption when the filter's itm_prob is at least this.
    #[arg(long, default_value_t = 0.5, value_parser = flags::unit_interval::<f32>, allow_negative_numbers = true)]
    pub threshold: f32,
    /// Synthetic captions sampled per web pair.
    #[arg(long, default_value_t = 1, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub num_synthetic: usize,
    /// Nucleus sampling's probability mass.
    #[arg(long, default_value_t = 0.9, value_parser = flags::mass::<f32>, allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long, default_value_t = 30, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 5, allow_negative_numbers = true)]
    pub min_new_tokens: usize,
    /// The captioner's prompt, left out of the synthetic captions ("" for none).
    #[arg(long, default_value = "a picture of ")]
    pub prompt: String,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// auto, csv, jsonl, coco or webdataset.
    #[arg(long, default_value = "auto", value_parser = flags::dataset_type)]
    pub dataset_type: String,
    #[arg(long, default_value = "filepath")]
    pub csv_img_key: String,
    #[arg(long, default_value = "title")]
    pub csv_caption_key: String,
    /// Column separator; default tab for .tsv, comma otherwise.
    #[arg(long)]
    pub csv_separator: Option<char>,
    /// Web pairs captioned and scored per forward pass.
    #[arg(long, default_value_t = 8, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu", value_parser = flags::device)]
    pub device: String,
    /// f32, f16 or bf16; defaults to each checkpoint's dtype.
    #[arg(long, value_parser = flags::dtype)]
    pub dtype: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run_capfilt(args: CapfiltArgs) -> Result<()> {
    let kind: DatasetType = args
        .dataset_type
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let csv_separator = args
        .csv_separator
        .map(|c| u8::try_from(c).context("--csv-separator must be one ASCII character"))
        .transpose()?;
    let spec = DataSpec {
        path: args.data.clone(),
        kind,
        csv_img_key: args.csv_img_key.clone(),
        csv_caption_key: args.csv_caption_key.clone(),
        csv_separator,
        shuffle_buffer: 0,
    };
    if args.min_new_tokens > args.max_new_tokens {
        anyhow::bail!(
            "--min-new-tokens {} is more than --max-new-tokens {}",
            args.min_new_tokens,
            args.max_new_tokens
        );
    }
    let cfg = CapFiltConfig {
        threshold: args.threshold,
        num_synthetic: args.num_synthetic,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        prompt: (!args.prompt.is_empty()).then(|| args.prompt.clone()),
        seed: args.seed,
        batch_size: args.batch_size,
    };
    let device = zoo_models::device::parse_device(&args.device)?;
    let dtype = args
        .dtype
        .as_deref()
        .map(zoo_models::device::parse_dtype)
        .transpose()?;

    let records = spec.open(args.seed, 0, false)?;
    let captioner = Captioner::load(&ModelRepo::open(&args.captioner)?, dtype, &device)
        .with_context(|| format!("loading the captioner {}", args.captioner))?;
    let start_len = captioner
        .prompt(cfg.prompt.as_deref())?
        .map_or(1, |p| p.start_len);
    captioner
        .model
        .check_caption_length(start_len, cfg.max_new_tokens)
        .map_err(anyhow::Error::msg)?;
    let filter = ItmFilter::load(&ModelRepo::open(&args.filter)?, dtype, &device)
        .with_context(|| format!("loading the filter {}", args.filter))?;

    let bar = progress(records.size_hint().1.unwrap_or(0), "web pairs");
    let report = run(&captioner, &filter, records, &args.out, &cfg, &mut || {
        bar.inc(1)
    })?;
    bar.finish_and_clear();
    if report.processed == 0 && report.already_done == 0 {
        anyhow::bail!(
            "--data {} yielded no usable image-caption pairs ({}); {} holds no pairs",
            args.data,
            report.skipped,
            args.out.display()
        );
    }

    let counts = |c: &Counts| json!({"kept": c.kept, "removed": c.removed, "total": c.total()});
    if args.json {
        let mut skipped = Map::new();
        skipped.insert("total".into(), report.skipped.total().into());
        for (reason, n) in report.skipped.iter() {
            skipped.insert(reason.as_str().into(), n.into());
        }
        let value = json!({
            "out": args.out,
            "progress": progress_path(&args.out),
            "processed": report.processed,
            "already_done": report.already_done,
            "web": counts(&report.web),
            "synthetic": counts(&report.synthetic),
            "skipped": Value::Object(skipped),
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        outln!(
            "{} web pairs processed, {} already done, {}",
            report.processed,
            report.already_done,
            report.skipped
        )?;
        outln!(
            "{:<10} {:>8} {:>8} {:>8}",
            "source",
            "kept",
            "removed",
            "total"
        )?;
        for (name, c) in [("web", &report.web), ("synthetic", &report.synthetic)] {
            outln!("{name:<10} {:>8} {:>8} {:>8}", c.kept, c.removed, c.total())?;
        }
        outln!("wrote {}", args.out.display())?;
    }
    Ok(())
}
