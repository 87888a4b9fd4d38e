//! Mixed precision: a tiny CLIP trained under `amp_fp16` (and pure `fp16`) reaches the loss of
//! the same run in fp32; every parameter gets an f32 gradient through the half-precision
//! copy; bf16 is refused on the CPU; the loss scaler's state is kept.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use zoo_datasets::synthetic::{Shapes, Split};
use zoo_models::contrastive::ScoreKind;
use zoo_trainers::contrastive::{contrastive_loss, run, ModelSpec, RunConfig, RunData};
use zoo_trainers::data::{ContrastiveBatch, DataPosition, RecordStream, SyntheticStream};
use zoo_trainers::model::TrainableDualEncoder;
use zoo_trainers::optim::{without_gradient, AdamWConfig};
use zoo_trainers::precision::Precision;
use zoo_trainers::train::TrainConfig;

fn fixed_pairs(n: usize) -> RunData {
    let shapes = Shapes::with_diagonal_held_out(32, 11);
    RunData {
        train: Arc::new(move |_| {
            Ok(
                Box::new(SyntheticStream::new(shapes.clone(), Split::Train, 0).take(n))
                    as RecordStream,
            )
        }),
        zeroshot: None,
        retrieval: None,
    }
}

fn config(precision: Precision, output: &Path, steps: u64) -> RunConfig {
    RunConfig {
        model: ModelSpec::Preset("clip-tiny".into()),
        objective: ScoreKind::Softmax,
        train: TrainConfig {
            precision,
            steps,
            lr: 2e-3,
            warmup: 2,
            accum_freq: 1,
            grad_clip_norm: Some(1.0),
            save_every: None,
            eval_every: None,
            output: output.to_path_buf(),
            seed: 0,
            progress: false,
        },
        batch_size: 8,
        workers: 2,
        optimizer: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        image_size: None,
        lock_image: false,
        lock_text: false,
        siglip_chunk: None,
        max_bad_fraction: 0.1,
        resume: None,
        device: Device::Cpu,
    }
}

fn losses(precision: Precision, steps: u64) -> (Vec<f64>, Option<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let s = run(config(precision, dir.path(), steps), fixed_pairs(8)).unwrap();
    // The saved model is f32, in HF layout, whatever the compute precision.
    let saved = candle_core::safetensors::load(
        dir.path().join("final").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(saved.values().all(|t| t.dtype() == DType::F32));
    (s.state.losses, s.state.scaler.map(|sc| sc.scale))
}

#[test]
fn amp_fp16_and_fp16_reach_the_fp32_loss() {
    let steps = 120;
    let (fp32, no_scaler) = losses(Precision::Fp32, steps);
    assert!(no_scaler.is_none());
    let fp32_last = *fp32.last().unwrap();
    assert!(fp32_last < 0.01, "fp32 overfits: {fp32_last}");
    for precision in [Precision::AmpFp16, Precision::Fp16] {
        let (half, scale) = losses(precision, steps);
        // The first loss differs only by half-precision rounding of the same model.
        assert!(
            (half[0] - fp32[0]).abs() < 2e-3,
            "{precision}: first loss {} vs {}",
            half[0],
            fp32[0]
        );
        let last = *half.last().unwrap();
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
        println!(
            "{precision}: first {:.4} mean {:.4} last {last:.5}; fp32 first {:.4} mean {:.4} last {fp32_last:.5}",
            half[0],
            mean(&half),
            fp32[0],
            mean(&fp32)
        );
        // The trajectories part (training is chaotic at this learning rate: the mean loss over
        // the run was 0.27 against 0.20 when measured) but end at the same place: 5e-4
        // against 9e-4 when measured.
        assert!(
            last < fp32_last + 0.01,
            "{precision}: final loss {last} vs fp32 {fp32_last}"
        );
        assert!(
            scale.is_some_and(|s| s > 0.0),
            "{precision}: f16 scales the loss"
        );
    }
}

/// Every variable gets a finite, non-zero f32 gradient through the half-precision copy.
#[test]
fn every_parameter_gets_an_f32_gradient_under_amp_fp16() {
    let m = TrainableDualEncoder::from_preset("clip-tiny", None, 3, &Device::Cpu).unwrap();
    let shapes = Shapes::with_diagonal_held_out(32, 1);
    let samples: Vec<_> = (0..4).map(|i| shapes.sample(Split::Train, i)).collect();
    let mut pixels = Vec::new();
    for s in &samples {
        pixels.extend(
            m.processor
                .preprocess(&DynamicImage::ImageRgb8(s.image.clone()))
                .0,
        );
    }
    let captions: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
    let inputs = m.pipeline().tokenize(&captions).unwrap();
    let batch = ContrastiveBatch {
        pixel_values: Tensor::from_vec(pixels, (4, 3, 32, 32), &Device::Cpu).unwrap(),
        input_ids: inputs.input_ids,
        attention_mask: inputs.attention_mask,
        position: DataPosition::default(),
    };
    let loss = contrastive_loss(&m, Precision::AmpFp16, &batch, (false, false), None).unwrap();
    assert_eq!(loss.dtype(), DType::F32);
    let grads = loss.backward().unwrap();
    let vars = m.trainable_vars(false, false);
    assert_eq!(
        without_gradient(&vars, &grads).unwrap(),
        Vec::<String>::new()
    );
    for (name, var) in &vars {
        let g = grads.get(var).unwrap();
        assert_eq!(g.dtype(), DType::F32, "{name}");
        let sum = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(sum.is_finite(), "{name}");
    }
}

#[test]
fn bf16_is_refused_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let err = run(config(Precision::Bf16, dir.path(), 1), fixed_pairs(8))
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("use --precision amp_fp16"),
        "{err}"
    );
}
