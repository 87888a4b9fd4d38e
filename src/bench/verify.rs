//! `zoo bench verify`: the cost of one forward pass of k new tokens after a context, the cost
//! speculative decoding pays to verify k drafted tokens. Printed as milliseconds per forward and
//! as the ratio to one token, the curve `--medusa-choices` trees are sized against.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use serde_json::json;
use zoo_models::llm::{KvCache, LlamaForCausalLM};

use crate::common::LlmArgs;
use crate::flags;

#[derive(Args, Debug)]
pub struct VerifyBenchArgs {
    #[command(flatten)]
    pub model: LlmArgs,
    /// Tokens in the cache before each timed forward.
    #[arg(long, default_value_t = 256, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub context: usize,
    /// The numbers of new tokens to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4, 8, 16, 32, 64])]
    pub tokens: Vec<usize>,
    /// Timed forwards per size (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub repeats: usize,
    #[arg(long)]
    pub json: bool,
}

/// Milliseconds per forward pass of each of `sizes` new tokens after `context` random ones
/// (the median of `repeats`), each from the same cached context.
///
/// The sizes take turns: one forward of each size per round, a round for warm-up and then
/// `repeats` timed ones. A machine whose speed drifts (a shared VM's neighbours) then slows
/// every size alike, and the ratios between sizes, which `--medusa-choices auto` sizes its tree
/// by, hold better than when each size was timed in one go.
pub fn verify_costs(
    model: &LlamaForCausalLM,
    device: &Device,
    context: usize,
    sizes: &[usize],
    repeats: usize,
) -> Result<Vec<(usize, f64)>> {
    let vocab = model.config.vocab_size;
    let ids = super::random_ids(1, context, vocab, 1, device)?;
    let mut cache = KvCache::new();
    model.forward(&ids, &mut cache)?;
    let drafts = sizes
        .iter()
        .map(|&k| super::random_ids(1, k, vocab, 2 + k as u64, device))
        .collect::<Result<Vec<_>>>()?;
    let mut times = vec![Vec::with_capacity(repeats); sizes.len()];
    for round in 0..=repeats.max(1) {
        for (ids, times) in drafts.iter().zip(&mut times) {
            // Each forward starts from the context, as verification after a rejected draft
            // does (the cache rolled back): the warm-up round grows the cache's capacity once,
            // so the timed ones do not reallocate it.
            cache.truncate(context)?;
            let start = Instant::now();
            let out = model.forward(ids, &mut cache)?;
            out.logits.flatten_all()?.get(0)?.to_scalar::<f32>()?;
            if round > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
    }
    Ok(sizes
        .iter()
        .zip(times)
        .map(|(&k, mut times)| {
            times.sort_by(f64::total_cmp);
            (k, times[times.len() / 2] * 1e3)
        })
        .collect())
}

pub fn bench_verify(args: VerifyBenchArgs) -> Result<()> {
    let llm = args.model.load()?;
    let (model, device) = (&llm.model, &llm.device);
    let longest = args.tokens.iter().copied().max().unwrap_or(0);
    if args.tokens.contains(&0) {
        bail!("invalid value '0' for '--tokens': every size must be at least 1");
    }
    model
        .config
        .check_generation_length(args.context, longest)
        .map_err(|e| anyhow::anyhow!("--context {} with --tokens {longest}: {e}", args.context))?;
    let rows = verify_costs(model, device, args.context, &args.tokens, args.repeats)?;
    let one = rows
        .iter()
        .find(|(k, _)| *k == 1)
        .map(|r| r.1)
        .unwrap_or(rows[0].1);
    if args.json {
        let value = json!({
            "model": super::model_name(&args.model.model.model),
            "context": args.context,
            "threads": candle_core::utils::get_num_threads(),
            "forwards": rows.iter().map(|(k, ms)| json!({"tokens": k, "ms": ms, "vs_one": ms / one})).collect::<Vec<_>>(),
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        outln!("| tokens | ms / forward | × one token |\n|---|---|---|")?;
        for (k, ms) in &rows {
            outln!("| {k} | {ms:.2} | {:.2} |", ms / one)?;
        }
    }
    Ok(())
}
