//! The small-row quantized matmul (`layers::quantized_matmul`) against candle's quantized
//! matmul, which streams the weights once per row, and against the dequantized f32 product:
//! every supported type, every row count from 1 to 64, and row counts past one tile.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zoo_models::layers::quantized_matmul;

fn random(shape: (usize, usize), seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn small_row_kernel_matches_candles_quantized_matmul_for_every_type_and_row_count() {
    // 6 blocks per row: candle 0.11's Q4_1 and Q5_1 dot products panic on an odd count.
    let (n, k) = (80, 192);
    let w = random((n, k), 1);
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ] {
        assert!(quantized_matmul::supports(dtype));
        let q = QTensor::quantize(&w, dtype).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let data = q.data().unwrap().into_owned();
        let candle = QMatMul::from_qtensor(q).unwrap();
        let rows: Vec<usize> = (1..=64).chain([65, 130]).collect();
        for m in rows {
            let x = random((m, k), 100 + m as u64);
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut ours = vec![0f32; m * n];
            assert!(quantized_matmul::matmul(
                &xs, m, k, &data, dtype, n, &mut ours
            ));
            let theirs = candle.forward(&x).unwrap();
            let theirs = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Against the exact product with the dequantized weights: only the 8-bit
            // activations differ.
            let exact = x.matmul(&dense.t().unwrap()).unwrap();
            let exact = exact.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
            // Candle (as ggml) stores the activation scale in f16; this kernel keeps it f32.
            let diff = max_abs(&ours, &theirs) / scale;
            assert!(
                diff < 1e-3,
                "{dtype:?} m={m}: {diff} of the largest from candle's"
            );
            let rel = max_abs(&ours, &exact) / scale;
            assert!(
                rel < 0.02,
                "{dtype:?} m={m}: {rel} of the largest from the exact product"
            );
        }
    }
}

/// A row's result does not depend on the rows beside it: every row of an m-row product has
/// the bits of the same row alone (the plain-decoding pass), for every type and row count, and
/// for odd and even block counts. Greedy speculative decoding relies on it to choose exactly
/// the tokens of plain decoding.
#[test]
fn each_row_of_a_tile_has_the_bits_of_that_row_alone() {
    for (n, k) in [(40, 192), (24, 160)] {
        let w = random((n, k), 11);
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
        ] {
            let data = QTensor::quantize(&w, dtype)
                .unwrap()
                .data()
                .unwrap()
                .into_owned();
            for m in (2..=64).chain([65, 97]) {
                let x = random((m, k), 300 + m as u64)
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let mut tile = vec![0f32; m * n];
                assert!(quantized_matmul::matmul(
                    &x, m, k, &data, dtype, n, &mut tile
                ));
                for r in 0..m {
                    let mut alone = vec![0f32; n];
                    assert!(quantized_matmul::matmul(
                        &x[r * k..(r + 1) * k],
                        1,
                        k,
                        &data,
                        dtype,
                        n,
                        &mut alone
                    ));
                    let row = &tile[r * n..(r + 1) * n];
                    assert!(
                        row.iter()
                            .zip(&alone)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype:?} k={k} m={m} row {r}: {:?} vs {:?}",
                        &row[..4],
                        &alone[..4]
                    );
                }
            }
        }
    }
}

/// An odd number of blocks per row, which candle's own Q4_1/Q5_1 kernels refuse with a panic.
#[test]
fn odd_block_counts_match_the_exact_product() {
    let (n, m, k) = (48, 3, 160);
    let w = random((n, k), 7);
    let x = random((m, k), 8);
    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_1, GgmlDType::Q4_0] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let mut ours = vec![0f32; m * n];
        assert!(quantized_matmul::matmul(
            &xs,
            m,
            k,
            &q.data().unwrap(),
            dtype,
            n,
            &mut ours
        ));
        let exact = x.matmul(&dense.t().unwrap()).unwrap();
        let exact = exact.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(max_abs(&ours, &exact) / scale < 0.02, "{dtype:?}");
    }
}

#[test]
fn unsupported_types_and_widths_are_left_to_the_caller() {
    let mut out = vec![0f32; 4];
    assert!(!quantized_matmul::matmul(
        &[0.0; 48],
        1,
        48,
        &[0; 4 * 54],
        GgmlDType::Q8_0,
        4,
        &mut out
    ));
    assert!(!quantized_matmul::matmul(
        &[0.0; 256],
        1,
        256,
        &[0; 4],
        GgmlDType::Q4K,
        4,
        &mut out
    ));
}
