//! Throughput of the quantized few-row kernel (`zoo_models::layers::quantized_matmul`) on
//! SmolLM2-135M's projection shapes, apart from the rest of a decoding step: random weights
//! quantized by candle, `ROWS` activation rows through the stacked q/k/v, `o_proj`, stacked
//! gate/up and `down_proj` of `LAYERS` layers, then the tied 49152×576 head; the weight bytes
//! read per second tell whether the kernel keeps up with memory.
//!
//! ```text
//! cargo run --release -p zoo-models --example quantized_matmul_throughput -- [q8_0|q4_1|q4_0|f32] [LAYERS] [ROWS] [REPS]
//! ```
//! `RAYON_NUM_THREADS=1` measures one core; `ROW_MAJOR=1` the checkpoint-layout kernel instead of
//! the interleaved one.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use zoo_models::layers::dense_rows;
use zoo_models::layers::quantized_matmul::{matmul, Interleaved};

fn main() {
    if let Err(e) = run() {
        eprintln!("quantized_matmul_throughput: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dtype = match args.first().map(String::as_str) {
        None | Some("q8_0") => GgmlDType::Q8_0,
        Some("q4_1") => GgmlDType::Q4_1,
        Some("q4_0") => GgmlDType::Q4_0,
        Some("f32") => GgmlDType::F32,
        Some(other) => return Err(format!("weights {other:?}: q8_0, q4_1, q4_0 or f32").into()),
    };
    let number = |i: usize, default: usize| -> Result<usize, String> {
        match args.get(i) {
            None => Ok(default),
            Some(s) => s
                .parse()
                .map_err(|_| format!("argument {}: {s:?} is not a count", i + 1)),
        }
    };
    let (layers, rows, reps) = (number(1, 30)?, number(2, 1)?, number(3, 50)?);
    // [out, in] of the stacked q/k/v, o_proj, stacked gate/up, down_proj; then the head.
    let layer = [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)];
    let shapes = (0..layers)
        .flat_map(|_| layer)
        .chain([(49152, 576)])
        .collect::<Vec<_>>();
    let dev = Device::Cpu;
    let mut weights = Vec::with_capacity(shapes.len());
    for &(n, k) in &shapes {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        weights.push((n, k, QTensor::quantize(&w, dtype)?.data()?.into_owned()));
    }
    // f32 weights go through `dense_rows`, the f32 few-row kernel.
    let dense: Vec<Vec<f32>> = if dtype == GgmlDType::F32 {
        weights.iter().map(|(_, _, w)| bytemuck_f32(w)).collect()
    } else {
        Vec::new()
    };
    let bytes: usize = weights.iter().map(|w| w.2.len()).sum();
    let x = Tensor::randn(0f32, 1.0, rows * 1536, &dev)?.to_vec1::<f32>()?;
    // Weights repacked for the interleaved kernel, where this CPU has it.
    let packed: Vec<Interleaved> =
        if dtype != GgmlDType::F32 && std::env::var_os("ROW_MAJOR").is_none() {
            weights
                .iter()
                .filter_map(|(n, k, w)| Interleaved::pack(w, dtype, *n, *k))
                .collect()
        } else {
            Vec::new()
        };
    let kernel = if !dense.is_empty() {
        "dense rows"
    } else if packed.is_empty() {
        "row-major"
    } else {
        "interleaved"
    };
    let pass = || {
        if !dense.is_empty() {
            for ((n, k, _), w) in weights.iter().zip(&dense) {
                let mut out = vec![0f32; rows * n];
                dense_rows::matmul(&x[..rows * k], rows, *k, w, *n, &mut out);
            }
            return;
        }
        if !packed.is_empty() {
            for w in &packed {
                let (n, k) = w.shape();
                let mut out = vec![0f32; rows * n];
                w.matmul(&x[..rows * k], rows, &mut out);
            }
            return;
        }
        for (n, k, w) in &weights {
            let mut out = vec![0f32; rows * n];
            assert!(matmul(&x[..rows * k], rows, *k, w, dtype, *n, &mut out));
        }
    };
    // On a thread of the pool, as `zoo` runs its commands.
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    let seconds = pool.install(|| {
        for _ in 0..3 {
            pass();
        }
        let start = Instant::now();
        for _ in 0..reps {
            pass();
        }
        start.elapsed().as_secs_f64() / reps as f64
    });
    println!(
        "{dtype:?} {kernel}, {layers} layers and the head ({:.0} MB), {rows} rows, {} threads: {:.2} ms a pass, {:.1} GB/s",
        bytes as f64 / 1e6,
        pool.current_num_threads(),
        seconds * 1e3,
        bytes as f64 / seconds / 1e9
    );
    Ok(())
}

/// Little-endian f32 bytes as floats.
fn bytemuck_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
