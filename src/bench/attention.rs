//! `zoo bench attention`: time and peak heap memory of the naive and fused attention backends
//! over sequence lengths, forward only or forward and backward.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use clap::{Args, ValueEnum};
use serde_json::json;
use zoo_models::layers::{fused_attention, naive_attention, AttentionMask, KeyVisibility};

use super::{median_seconds, print_report, random_tensor};
use crate::flags;
use crate::memory::peak_bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Inference: the output only.
    Forward,
    /// Training: forward, then the backward of `out.sum()` to q, k and v.
    Train,
}

#[derive(Args, Debug)]
pub struct AttentionBenchArgs {
    /// Sequence lengths (queries = keys), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048,4096", value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub lengths: Vec<usize>,
    #[arg(long, default_value_t = 8, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than --heads); default --heads.
    #[arg(long, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub kv_heads: Option<usize>,
    #[arg(long, default_value_t = 64, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub head_dim: usize,
    #[arg(long, default_value_t = 1, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub batch: usize,
    /// A causal mask (decoder self-attention).
    #[arg(long)]
    pub causal: bool,
    #[arg(long, value_enum, default_value = "forward")]
    pub mode: Mode,
    /// Timed runs per point; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub repeats: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn bench_attention(args: AttentionBenchArgs) -> Result<()> {
    let device = Device::Cpu;
    let kv_heads = args.kv_heads.unwrap_or(args.heads);
    if args.lengths.is_empty()
        || args.heads == 0
        || kv_heads == 0
        || !args.heads.is_multiple_of(kv_heads)
    {
        bail!("give --lengths, and --heads a multiple of --kv-heads");
    }
    for &n in &args.lengths {
        // q, k, v and the output, and the naive path's scores and probabilities; training
        // also keeps their gradients.
        let (b, h, kv, d, n) = (
            args.batch as f64,
            args.heads as f64,
            kv_heads as f64,
            args.head_dim as f64,
            n as f64,
        );
        let forward = 4.0 * b * (2.0 * h * n * d + 2.0 * kv * n * d + 2.0 * h * n * n);
        let bytes = forward * if args.mode == Mode::Train { 2.0 } else { 1.0 };
        zoo_models::device::ensure_fits_in_memory(&format!("--lengths {n}"), bytes)
            .map_err(anyhow::Error::msg)?;
    }
    let scale = (args.head_dim as f64).powf(-0.5);
    let mut rows = Vec::new();
    for &n in &args.lengths {
        let q = random_tensor(&[args.batch, args.heads, n, args.head_dim], 1, &device)?;
        let k = random_tensor(&[args.batch, kv_heads, n, args.head_dim], 2, &device)?;
        let v = random_tensor(&[args.batch, kv_heads, n, args.head_dim], 3, &device)?;
        for backend in ["naive", "fused"] {
            let run = || -> Result<()> {
                let (q, k, v) = match args.mode {
                    Mode::Forward => (q.clone(), k.clone(), v.clone()),
                    Mode::Train => (
                        Var::from_tensor(&q)?.as_tensor().clone(),
                        Var::from_tensor(&k)?.as_tensor().clone(),
                        Var::from_tensor(&v)?.as_tensor().clone(),
                    ),
                };
                let out = attend(backend, (&q, &k, &v), scale, args.causal)?;
                if args.mode == Mode::Train {
                    out.sum_all()?.backward()?;
                }
                Ok(())
            };
            let (done, peak) = peak_bytes(run);
            done?;
            let secs = median_seconds(0, args.repeats, run)?;
            rows.push(json!({
                "backend": backend, "seq_len": n, "ms": secs * 1e3,
                "peak_mib": peak as f64 / (1 << 20) as f64,
            }));
        }
    }
    let report = json!({
        "bench": "attention", "impl": "candle-zoo",
        "threads": candle_core::utils::get_num_threads(), "heads": args.heads,
        "kv_heads": kv_heads, "head_dim": args.head_dim, "batch": args.batch,
        "causal": args.causal,
        "mode": match args.mode { Mode::Forward => "forward", Mode::Train => "train" },
        "rows": rows,
    });
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r["seq_len"].to_string(),
                r["backend"].as_str().unwrap_or("").to_string(),
                format!("{:.2}", r["ms"].as_f64().unwrap_or(0.0)),
                format!("{:.1}", r["peak_mib"].as_f64().unwrap_or(0.0)),
            ]
        })
        .collect();
    print_report(
        args.json,
        &report,
        &["N", "backend", "ms", "peak MiB"],
        &table,
    )
}

fn attend(
    backend: &str,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    Ok(if backend == "fused" {
        let visibility = KeyVisibility {
            causal_offset: causal.then_some(0),
            ..KeyVisibility::default()
        };
        fused_attention(q, k, v, scale, visibility)?
    } else {
        let mask = if causal {
            AttentionMask::causal(0)
        } else {
            AttentionMask::none()
        };
        naive_attention(q, k, v, scale, &mask)?
    })
}
