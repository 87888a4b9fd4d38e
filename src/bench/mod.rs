//! `zoo bench`: throughput and memory measured the way `scripts/bench_torch.py` measures
//! PyTorch, so `scripts/bench_all.sh` can set them side by side (BENCHMARKS.md). Every
//! subcommand prints one JSON object with `--json`, a Markdown table otherwise. Models come from
//! HF folders (`bench_torch.py make-models` writes random-weight ones of the benchmarked
//! configs); inputs are random tensors of the model's shapes, so tokenisation and image
//! decoding are not timed.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use clap::Subcommand;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod attention;
mod generate;
mod models;
pub mod verify;

pub use attention::AttentionBenchArgs;
pub use generate::GenerateBenchArgs;
pub use models::{CaptionBenchArgs, EmbedBenchArgs, TrainStepBenchArgs};
pub use verify::VerifyBenchArgs;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Images/s and texts/s of a CLIP or SigLIP model, with the GEMM peak and the vision
    /// tower's model FLOP utilisation.
    Embed(EmbedBenchArgs),
    /// Samples/s of a contrastive training step (forward, loss, backward, AdamW).
    TrainStep(TrainStepBenchArgs),
    /// Milliseconds per greedy BLIP caption.
    Caption(CaptionBenchArgs),
    /// Plain greedy, Medusa and MTP decoding of the same prompts, side by side.
    Generate(GenerateBenchArgs),
    /// Time and peak memory of naive against fused attention over sequence lengths.
    Attention(AttentionBenchArgs),
    /// Milliseconds per forward of 1, 2, 4 … 64 new tokens after a 256-token context: the cost
    /// of verifying drafted tokens.
    Verify(VerifyBenchArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Embed(args) => models::bench_embed(args),
        BenchCommand::TrainStep(args) => models::bench_train_step(args),
        BenchCommand::Caption(args) => models::bench_caption(args),
        BenchCommand::Generate(args) => generate::bench_generate(args),
        BenchCommand::Attention(args) => attention::bench_attention(args),
        BenchCommand::Verify(args) => verify::bench_verify(args),
    }
}

/// The folder or hub id's last component, as the reports name models.
pub fn model_name(spec: &str) -> String {
    let spec = spec.trim_end_matches('/');
    spec.rsplit('/').next().unwrap_or(spec).to_string()
}

/// Median seconds of `repeats` runs of `f` after `warmup` untimed ones.
pub fn median_seconds(
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Uniform values in [-1, 1) of `shape`, seeded.
pub fn random_tensor(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Token ids uniform in `0..vocab` of shape `[batch, len]`, seeded.
pub fn random_ids(
    batch: usize,
    len: usize,
    vocab: usize,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<u32> = (0..batch * len)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    Ok(Tensor::from_vec(data, (batch, len), device)?)
}

/// The best f32 GEMM rate of square matmuls through Candle on `device`, in GFLOP/s: the peak
/// that model FLOP utilisation is measured against.
pub fn gemm_peak_gflops(device: &Device) -> Result<f64> {
    let mut best = 0f64;
    for n in [1024usize, 2048] {
        let a = random_tensor(&[n, n], 1, device)?;
        let b = random_tensor(&[n, n], 2, device)?;
        let secs = median_seconds(1, 3, || {
            a.matmul(&b)?.device().synchronize()?;
            Ok(())
        })?;
        best = best.max(2.0 * (n * n * n) as f64 / secs / 1e9);
    }
    Ok(best)
}

/// Prints `report` as JSON, or `table` (Markdown rows under `header`).
pub fn print_report(
    json: bool,
    report: &serde_json::Value,
    header: &[&str],
    table: &[Vec<String>],
) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(report)?)?;
    } else {
        outln!("| {} |", header.join(" | "))?;
        outln!("|{}", "---|".repeat(header.len()))?;
        for row in table {
            outln!("| {} |", row.join(" | "))?;
        }
    }
    Ok(())
}
