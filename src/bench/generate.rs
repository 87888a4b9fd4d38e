//! `zoo bench generate` decodes the same prompts with plain greedy decoding, Medusa and MTP, and
//! reports tokens/s, verification steps, mean accepted tokens per step and the speedup over
//! plain greedy.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use zoo_datasets::chat::Message;
use zoo_models::generation::GenerationConfig;
use zoo_models::llm::{decode, Acceptance, Drafter, MedusaDrafter, MtpDrafter, NoDrafts};

use crate::common::LlmArgs;
use crate::flags;

#[derive(Args, Debug)]
pub struct GenerateBenchArgs {
    #[command(flatten)]
    pub model: LlmArgs,
    /// Each prompt is one user turn of a chat, rendered by the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Medusa heads to compare (a FasterDecoding folder).
    #[arg(long)]
    pub medusa: Option<PathBuf>,
    /// The Medusa tree (JSON list of paths, or `auto` as for zoo generate); default
    /// mc_sim_7b_63 cut to the heads.
    #[arg(long, value_parser = crate::generate::parse_choices)]
    pub medusa_choices: Option<crate::generate::Choices>,
    /// Also compare MTP modules: the checkpoint's (on by default when it has them), or with a
    /// value, those of a folder trained for this base.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub mtp: Option<Option<PathBuf>>,
    /// Also compare MTP tree drafts (as for zoo generate; `mtp-tree` in the results).
    #[command(flatten)]
    pub mtp_tree: crate::generate::MtpTreeArgs,
    /// The drafters' vocabulary (as for zoo generate).
    #[command(flatten)]
    pub draft_vocab: crate::generate::DraftVocabArgs,
    /// A prompt (repeatable).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A file of prompts, one per line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 64, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    /// Untimed runs of every method before timing.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub warmup: usize,
    #[arg(long)]
    pub json: bool,
}

/// One method's totals over all prompts.
struct Totals {
    name: &'static str,
    new_tokens: usize,
    steps: usize,
    seconds: f64,
    outputs: Vec<Vec<u32>>,
}

pub fn bench_generate(args: GenerateBenchArgs) -> Result<()> {
    let mut prompts = args.prompt.clone();
    if let Some(path) = &args.prompts {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    if prompts.is_empty() {
        bail!("give --prompt or --prompts");
    }
    let llm = args.model.load()?;
    let (model, tokenizer) = (&llm.model, &llm.tokenizer);
    let stop = llm.eos();
    let medusa = args
        .medusa
        .as_deref()
        .map(|dir| {
            crate::generate::load_medusa(&llm, dir, args.medusa_choices.as_ref(), &args.draft_vocab)
        })
        .transpose()?;
    let mtp = match &args.mtp {
        Some(dir) => Some(crate::generate::load_mtp(
            &llm,
            dir.as_deref(),
            &args.draft_vocab,
        )?),
        None if model.config.num_nextn_predict_layers > 0 => {
            Some(crate::generate::load_mtp(&llm, None, &args.draft_vocab)?)
        }
        None => None,
    };
    if args.draft_vocab.draft_vocab.is_some() && medusa.is_none() && mtp.is_none() {
        bail!("--draft-vocab sets what --medusa or --mtp drafts from: give one of them");
    }
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            if args.chat {
                llm.chat_ids(&[Message::new("user", p)])
            } else {
                Ok(tokenizer.encode(p)?)
            }
        })
        .collect::<Result<_>>()?;
    let max = args.max_new_tokens;
    for (text, ids) in prompts.iter().zip(&encoded) {
        if ids.is_empty() {
            bail!("the prompt {text:?} is empty after tokenization");
        }
        model
            .config
            .check_generation_length(ids.len(), max)
            .map_err(anyhow::Error::msg)?;
    }
    let cfg = GenerationConfig {
        max_new_tokens: max,
        stop_tokens: stop.clone(),
        pad_token: model.config.pad_token_id.unwrap_or(0),
        ..GenerationConfig::default()
    };

    // Every method is greedy decoding through the one loop, with its drafter.
    type MakeDrafter<'a> = Box<dyn Fn() -> Result<Box<dyn Drafter + 'a>> + 'a>;
    let mut methods: Vec<(&'static str, MakeDrafter)> = vec![(
        "greedy",
        Box::new(|| Ok(Box::new(NoDrafts) as Box<dyn Drafter>)),
    )];
    if let Some((heads, tree)) = &medusa {
        methods.push((
            "medusa",
            Box::new(move || Ok(Box::new(MedusaDrafter::new(heads, tree)?) as Box<dyn Drafter>)),
        ));
    }
    if let Some(mtp) = &mtp {
        methods.push((
            "mtp",
            Box::new(move || {
                Ok(Box::new(
                    MtpDrafter::new(mtp).with_min_confidence(args.mtp_tree.mtp_min_confidence),
                ) as Box<dyn Drafter>)
            }),
        ));
        if args.mtp_tree.mtp_tree.is_some() {
            methods.push((
                "mtp-tree",
                Box::new(move || Ok(Box::new(args.mtp_tree.drafter(mtp)) as Box<dyn Drafter>)),
            ));
        }
    }
    let run = |make: &MakeDrafter, prompt: &[u32]| -> Result<(Vec<u32>, usize)> {
        let mut drafter = make()?;
        let out = decode(
            model,
            drafter.as_mut(),
            prompt,
            &cfg,
            &Acceptance::Greedy,
            &mut |_| Ok(ControlFlow::Continue(())),
        )?;
        Ok((out.tokens, out.steps))
    };

    let mut totals: Vec<Totals> = methods
        .iter()
        .map(|(name, _)| Totals {
            name,
            new_tokens: 0,
            steps: 0,
            seconds: 0.0,
            outputs: Vec::new(),
        })
        .collect();
    for (_, method) in &methods {
        for _ in 0..args.warmup {
            run(method, &encoded[0])?;
        }
    }
    // The methods take turns on each prompt, so that a machine whose speed drifts during the
    // run (a shared VM's does by 10-20%) weighs on all of them alike.
    for prompt in &encoded {
        for ((name, method), t) in methods.iter().zip(&mut totals) {
            let start = Instant::now();
            let (tokens, steps) =
                run(method, prompt).with_context(|| format!("{name} decoding"))?;
            t.seconds += start.elapsed().as_secs_f64();
            t.new_tokens += tokens.len() - prompt.len();
            t.steps += steps;
            t.outputs.push(tokens);
        }
    }
    let base_rate = totals[0].new_tokens as f64 / totals[0].seconds.max(1e-9);
    let rows: Vec<serde_json::Value> = totals
        .iter()
        .map(|t| {
            let rate = t.new_tokens as f64 / t.seconds.max(1e-9);
            json!({
                "method": t.name,
                "prompts": encoded.len(),
                "new_tokens": t.new_tokens,
                "steps": t.steps,
                "mean_accepted": t.new_tokens as f64 / t.steps.max(1) as f64,
                "tokens_per_s": rate,
                "speedup": rate / base_rate,
                "identical_to_greedy": t.outputs == totals[0].outputs,
            })
        })
        .collect();
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "bench": "generate",
                "impl": "candle-zoo",
                "model": super::model_name(&args.model.model.model),
                "max_new_tokens": max,
                "threads": candle_core::utils::get_num_threads(),
                "results": rows,
            }))?
        )?;
    } else {
        outln!(
            "| method | new tokens | steps | mean accepted | tokens/s | speedup | same as greedy |"
        )?;
        outln!("|---|---|---|---|---|---|---|")?;
        for r in &rows {
            outln!(
                "| {} | {} | {} | {:.2} | {:.1} | {:.2}x | {} |",
                r["method"].as_str().unwrap_or(""),
                r["new_tokens"],
                r["steps"],
                r["mean_accepted"].as_f64().unwrap_or(0.0),
                r["tokens_per_s"].as_f64().unwrap_or(0.0),
                r["speedup"].as_f64().unwrap_or(0.0),
                r["identical_to_greedy"]
            )?;
        }
    }
    Ok(())
}
