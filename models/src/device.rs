//! Parsing `--device` and `--dtype`, and choosing a dtype the device can compute in.

use candle_core::{DType, Device};

use crate::error::{CandleContext, Error, Result};

/// `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0).context(|| {
            "cannot open the Metal device (was zoo built with --features metal?)".into()
        }),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| {
                    Error::Unsupported(format!("bad device `{spec}`: expected cuda:N"))
                })?,
                None => 0,
            };
            Device::new_cuda(ordinal).context(|| {
                format!("cannot open CUDA device {ordinal} (was zoo built with --features cuda?)")
            })
        }
        _ => Err(Error::Unsupported(format!(
            "unknown device `{spec}`: expected cpu, cuda, cuda:N or metal"
        ))),
    }
}

/// `f32`, `f16` or `bf16` (also PyTorch's `float32`, `float16`, `bfloat16`).
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::Unsupported(format!(
            "unknown dtype `{other}`: expected f32, f16 or bf16"
        ))),
    }
}

/// The dtype to compute in: the one asked for, else the checkpoint's, else f32.
///
/// Candle's CPU matmul has no bf16 kernel, so bf16 on CPU is refused when asked for and replaced
/// by f32 when it only comes from the checkpoint.
pub fn resolve_dtype(
    requested: Option<DType>,
    stored: Option<DType>,
    device: &Device,
) -> Result<DType> {
    match (requested, stored) {
        (Some(DType::BF16), _) if device.is_cpu() => Err(Error::Unsupported(
            "bf16 is not supported on CPU (Candle has no CPU bf16 matmul): use --dtype f32 or f16"
                .into(),
        )),
        (Some(d), _) => Ok(d),
        (None, Some(DType::BF16)) if device.is_cpu() => Ok(DType::F32),
        (None, Some(d)) => Ok(d),
        (None, None) => Ok(DType::F32),
    }
}

/// The machine's physical memory in bytes (`MemTotal` of `/proc/meminfo`), or `None` where it
/// cannot be read.
pub fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses, before anything is allocated, work whose buffers (`bytes`, an estimate made in
/// f64 so that it cannot overflow) would not fit in the machine's memory. The error says what
/// and how much: `what` reads as "--lengths 100000 (the naive attention scores)".
pub fn ensure_fits_in_memory(what: &str, bytes: f64) -> std::result::Result<(), String> {
    let Some(total) = physical_memory() else {
        return Ok(());
    };
    if bytes.is_finite() && bytes <= total as f64 {
        return Ok(());
    }
    const GIB: f64 = (1u64 << 30) as f64;
    Err(format!(
        "{what} would need at least {:.1} GiB of memory, more than this machine's {:.1} GiB",
        bytes / GIB,
        total as f64 / GIB
    ))
}
