//! `zoo eval zeroshot`, `zoo eval retrieval` and `zoo eval caption`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use zoo_trainers::caption_metrics::evaluate_files;
use zoo_trainers::contrastive::{parse_templates, RetrievalSet, ZeroShotSet};
use zoo_trainers::data::DataSpec;
use zoo_trainers::eval::{retrieval_report, RECALL_AT};
use zoo_trainers::pipeline::DualEncoderPipeline;

use crate::common::{ImageSizeArgs, ModelArgs};
use crate::flags;

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Zero-shot classification accuracy on an ImageFolder (one subfolder per class).
    Zeroshot(ZeroshotArgs),
    /// Image-text retrieval recall@1/5/10 in both directions on paired data.
    Retrieval(RetrievalArgs),
    /// BLEU-1..4 and CIDEr-D of predicted captions against references, as pycocoevalcap.
    Caption(CaptionArgs),
    /// Perplexity of a causal LM on text files or JSONL.
    Lm(LmArgs),
}

#[derive(Args, Debug)]
pub struct LmArgs {
    #[command(flatten)]
    pub model: crate::common::LlmArgs,
    /// Text files or JSONL (`{"text": ...}`), comma-separated or globs.
    #[arg(long)]
    pub data: String,
    /// Tokens per evaluated sequence (the corpus is packed into sequences of this length).
    #[arg(long, default_value_t = 256, value_parser = flags::at_least_two::<usize>, allow_negative_numbers = true)]
    pub seq_len: usize,
    /// Score only the second half of each sequence, as llama.cpp's `llama-perplexity -c
    /// SEQ_LEN` does (each scored token sees at least half a window of context).
    #[arg(long)]
    pub second_half: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ZeroshotArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub image_size: ImageSizeArgs,
    /// The ImageFolder.
    #[arg(long)]
    pub data: PathBuf,
    /// Class names, one per line, in the sorted order of the class folders (default: folder names).
    #[arg(long)]
    pub classnames: Option<PathBuf>,
    /// openai (80 prompts), simple (7), or a file with one template per line.
    #[arg(long, default_value = "openai")]
    pub templates: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RetrievalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub image_size: ImageSizeArgs,
    /// Pairs: CSV/TSV, JSONL or WebDataset shards.
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value = "filepath")]
    pub csv_img_key: String,
    #[arg(long, default_value = "title")]
    pub csv_caption_key: String,
    #[arg(long)]
    pub csv_separator: Option<char>,
    /// Evaluate at most this many pairs.
    #[arg(long, default_value_t = 5000, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub max_samples: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CaptionArgs {
    /// Predicted captions: JSON as `zoo caption --json` prints it, COCO results JSON
    /// (`[{"image_id", "caption"}]`), or CSV with `image` and `caption` columns.
    #[arg(long)]
    pub predictions: PathBuf,
    /// Reference captions: COCO captions JSON (`images` + `annotations`), or CSV with
    /// `image` and `caption` columns and one row per caption.
    #[arg(long)]
    pub references: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Zeroshot(a) => zeroshot(a),
        EvalCommand::Retrieval(a) => retrieval(a),
        EvalCommand::Caption(a) => caption(a),
        EvalCommand::Lm(a) => lm(a),
    }
}

fn lm(args: LmArgs) -> Result<()> {
    use zoo_trainers::lm::{perplexity_after, Corpus};
    let llm = args.model.load()?;
    let (model, tokenizer, device) = (&llm.model, &llm.tokenizer, &llm.device);
    let files = crate::train::text_files(&args.data)?;
    let corpus = Corpus::read(&files)?;
    let eos = model
        .config
        .eos_token_ids()
        .first()
        .copied()
        .context("the model config has no eos_token_id")?;
    let limit = model.config.max_position_embeddings;
    if args.seq_len > limit {
        anyhow::bail!(
            "--seq-len {} exceeds the model's max_position_embeddings {limit}",
            args.seq_len
        );
    }
    // Conversations (JSONL lines with a prompt) are scored on their replies, as trained.
    let (seqs, dropped) = corpus.pack(tokenizer, eos, args.seq_len, 0)?;
    let skipped = corpus.skipped + dropped;
    let context = if args.second_half {
        args.seq_len / 2
    } else {
        0
    };
    let ppl = perplexity_after(model, seqs.sequences(), seqs.scored(), device, context)?;
    let tokens = seqs.len() * args.seq_len;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "perplexity": ppl, "sequences": seqs.len(), "tokens": tokens,
                "skipped_lines": skipped,
            }))?
        )?;
    } else {
        outln!(
            "perplexity {ppl:.4} over {} sequences of {} tokens ({} skipped lines)",
            seqs.len(),
            args.seq_len,
            skipped
        )?;
    }
    Ok(())
}

fn zeroshot(args: ZeroshotArgs) -> Result<()> {
    let device = args.model.device()?;
    let mut pipeline = DualEncoderPipeline::load(&args.model.model, &device, args.model.dtype()?)?;
    args.image_size.apply(&mut pipeline.processor)?;
    let set = ZeroShotSet::image_folder(
        &args.data,
        args.classnames.as_deref(),
        parse_templates(&args.templates)?,
    )?;
    let report = set.evaluate(&pipeline)?;
    if args.json {
        let per_class: BTreeMap<&str, f64> = report
            .per_class
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        let value = json!({"top1": report.top1, "top5": report.top5, "per_class": per_class, "n": report.n});
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    outln!(
        "zero-shot on {} ({} images, {} classes)",
        args.data.display(),
        report.n,
        set.class_names.len()
    )?;
    outln!("  top-1 {:6.2}%", report.top1 * 100.0)?;
    outln!("  top-5 {:6.2}%", report.top5 * 100.0)?;
    for (name, acc) in &report.per_class {
        outln!("  {:6.2}%  {name}", acc * 100.0)?;
    }
    Ok(())
}

fn retrieval(args: RetrievalArgs) -> Result<()> {
    let device = args.model.device()?;
    let mut pipeline = DualEncoderPipeline::load(&args.model.model, &device, args.model.dtype()?)?;
    args.image_size.apply(&mut pipeline.processor)?;
    let spec = DataSpec {
        path: args.data.clone(),
        kind: zoo_trainers::data::DatasetType::Auto,
        csv_img_key: args.csv_img_key,
        csv_caption_key: args.csv_caption_key,
        csv_separator: args.csv_separator.map(|c| c as u8),
        shuffle_buffer: 0,
    };
    let (pairs, skipped) = spec.load_pairs(args.max_samples)?;
    let set = RetrievalSet::from_pairs(pairs, &pipeline.processor, &device)?;
    let images = set.images.embed(&pipeline)?;
    let captions: Vec<&str> = set.captions.iter().map(String::as_str).collect();
    let texts = pipeline.embed_texts(&captions)?;
    let report = retrieval_report(&images, &texts)?;
    if args.json {
        let mut value = serde_json::Map::new();
        for (k, v) in report.metrics() {
            value.insert(k, v.into());
        }
        value.insert("n".into(), report.n.into());
        value.insert("skipped".into(), skipped.total().into());
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    outln!(
        "retrieval on {} ({} pairs, {} skipped)",
        args.data,
        report.n,
        skipped.total()
    )?;
    for (k, (i2t, t2i)) in RECALL_AT
        .iter()
        .zip(report.image_to_text.iter().zip(&report.text_to_image))
    {
        outln!(
            "  R@{k:<2}  image→text {:6.2}%  text→image {:6.2}%",
            i2t * 100.0,
            t2i * 100.0
        )?;
    }
    Ok(())
}

fn caption(args: CaptionArgs) -> Result<()> {
    let scores = evaluate_files(&args.predictions, &args.references)?;
    let [bleu1, bleu2, bleu3, bleu4] = scores.bleu;
    if args.json {
        let value = json!({"bleu1": bleu1, "bleu2": bleu2, "bleu3": bleu3, "bleu4": bleu4,
            "cider": scores.cider, "n": scores.n});
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    outln!(
        "captions in {} against {} ({} images)",
        args.predictions.display(),
        args.references.display(),
        scores.n
    )?;
    for (k, b) in scores.bleu.iter().enumerate() {
        outln!("  BLEU-{}  {b:.4}", k + 1)?;
    }
    outln!("  CIDEr-D {:.4}", scores.cider)?;
    Ok(())
}
