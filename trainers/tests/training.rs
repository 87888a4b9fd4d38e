//! Contrastive training provably learns: overfitting 8 pairs, every parameter receiving a
//! gradient, identical loss curves for identical seeds, exact resume, and the same under mixed
//! precision.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use zoo_datasets::synthetic::{Shapes, Split};
use zoo_models::contrastive::{l2_normalize, ScoreKind};
use zoo_trainers::contrastive::{contrastive_loss, run, ModelSpec, RunConfig, RunData, RunSummary};
use zoo_trainers::data::{ContrastiveBatch, DataPosition, RecordStream, SyntheticStream};
use zoo_trainers::loss::{clip_loss, siglip_loss};
use zoo_trainers::model::TrainableDualEncoder;
use zoo_trainers::optim::{without_gradient, AdamWConfig};
use zoo_trainers::precision::Precision;
use zoo_trainers::train::TrainConfig;

/// The same `n` synthetic pairs every epoch.
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

fn config(preset: &str, output: &Path, steps: u64, lr: f64, seed: u64) -> RunConfig {
    RunConfig {
        model: ModelSpec::Preset(preset.into()),
        objective: if preset.starts_with("siglip") {
            ScoreKind::Sigmoid
        } else {
            ScoreKind::Softmax
        },
        train: TrainConfig {
            precision: Default::default(),
            steps,
            lr,
            warmup: 2,
            accum_freq: 1,
            grad_clip_norm: Some(1.0),
            save_every: None,
            eval_every: None,
            output: output.to_path_buf(),
            seed,
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

fn train(cfg: RunConfig) -> RunSummary {
    run(cfg, fixed_pairs(8)).unwrap()
}

#[test]
fn clip_overfits_eight_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let s = train(config("clip-tiny", dir.path(), 150, 2e-3, 0));
    let (first, last) = (s.state.losses[0], *s.state.losses.last().unwrap());
    assert!(first > 1.5, "initial loss {first} should be near ln 8");
    assert!(last < 0.05, "loss after overfitting: {last} (from {first})");
}

#[test]
fn siglip_overfits_eight_pairs() {
    // SigLIP starts at scale 10 and bias −10, so even perfectly separated pairs cost
    // −log σ(10 − 10) per image until the temperature has grown, which AdamW does at about
    // `lr` per step: the loss falls from ~10 to a few tenths here, not to zero as CLIP's does.
    let dir = tempfile::tempdir().unwrap();
    let s = train(config("siglip-tiny", dir.path(), 200, 2e-3, 0));
    let (first, last) = (s.state.losses[0], *s.state.losses.last().unwrap());
    assert!(
        last < 0.05 * first,
        "loss after overfitting: {last} (from {first})"
    );
}

/// Every variable of a freshly initialised preset gets a non-zero gradient from its loss.
fn assert_gradient_reaches_everything(preset: &str) {
    let m = TrainableDualEncoder::from_preset(preset, None, 3, &Device::Cpu).unwrap();
    let shapes = Shapes::with_diagonal_held_out(32, 1);
    let samples: Vec<_> = (0..4).map(|i| shapes.sample(Split::Train, i)).collect();
    let images: Vec<DynamicImage> = samples
        .iter()
        .map(|s| DynamicImage::ImageRgb8(s.image.clone()))
        .collect();
    let mut pixels = Vec::new();
    for img in &images {
        pixels.extend(m.processor.preprocess(img).unwrap().0);
    }
    let pixels = candle_core::Tensor::from_vec(pixels, (4, 3, 32, 32), &Device::Cpu).unwrap();
    let captions: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
    let pipeline = m.pipeline();
    let inputs = pipeline.tokenize(&captions).unwrap();
    let img = l2_normalize(&m.model.image_features(&pixels).unwrap()).unwrap();
    let txt = l2_normalize(
        &m.model
            .text_features(&inputs.input_ids, inputs.attention_mask.as_ref())
            .unwrap(),
    )
    .unwrap();
    let (scale, bias) = m.logit_vars();
    let loss = match bias {
        None => clip_loss(&img, &txt, scale.as_tensor()).unwrap(),
        Some(b) => siglip_loss(&img, &txt, scale.as_tensor(), b.as_tensor()).unwrap(),
    };
    let grads = loss.backward().unwrap();
    let vars = m.trainable_vars(false, false);
    assert!(vars.len() > 30);
    let missing = without_gradient(&vars, &grads).unwrap();
    assert!(
        missing.is_empty(),
        "{preset}: no gradient reached {missing:?}"
    );
}

#[test]
fn every_trainable_parameter_of_the_presets_receives_a_gradient() {
    assert_gradient_reaches_everything("clip-tiny");
    assert_gradient_reaches_everything("siglip-tiny");
}

#[test]
fn the_same_seed_gives_the_same_loss_curve() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let first = train(config("clip-tiny", a.path(), 5, 1e-3, 7))
        .state
        .losses;
    let second = train(config("clip-tiny", b.path(), 5, 1e-3, 7))
        .state
        .losses;
    let other = train(config("clip-tiny", c.path(), 5, 1e-3, 8))
        .state
        .losses;
    assert_eq!(first, second);
    assert_ne!(first, other);
}

#[test]
fn resuming_from_a_checkpoint_reproduces_the_uninterrupted_losses() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut full = config("siglip-tiny", a.path(), 6, 1e-3, 5);
    full.train.save_every = Some(3);
    let uninterrupted = train(full).state.losses;
    let checkpoint = a.path().join("checkpoint-3");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(checkpoint.join(f).is_file(), "checkpoint lacks {f}");
    }
    let mut resumed = config("siglip-tiny", b.path(), 6, 1e-3, 5);
    resumed.resume = Some(checkpoint);
    let s = train(resumed);
    assert_eq!(s.state.step, 6);
    assert_eq!(s.state.losses, uninterrupted, "losses after resume differ");
}

#[test]
fn presets_start_at_the_papers_temperatures() {
    let clip = TrainableDualEncoder::from_preset("clip-tiny", None, 0, &Device::Cpu).unwrap();
    let (scale, bias) = clip.logit_vars();
    assert!((scale.as_tensor().to_scalar::<f32>().unwrap() - (1.0f32 / 0.07).ln()).abs() < 1e-5);
    assert!(bias.is_none());
    let siglip = TrainableDualEncoder::from_preset("siglip-tiny", None, 0, &Device::Cpu).unwrap();
    let (scale, bias) = siglip.logit_vars();
    assert!((scale.as_tensor().to_vec1::<f32>().unwrap()[0] - 10f32.ln()).abs() < 1e-5);
    assert_eq!(
        bias.unwrap().as_tensor().to_vec1::<f32>().unwrap(),
        vec![-10.0]
    );
}

#[test]
fn a_diverging_run_stops_with_a_message_and_saves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("clip-tiny", dir.path(), 4, 1e30, 0);
    cfg.train.grad_clip_norm = None;
    cfg.train.warmup = 0;
    let err = match run(cfg, fixed_pairs(8)) {
        Ok(_) => panic!("a learning rate of 1e30 must diverge"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("became") && err.contains("stopping"), "{err}");
    assert!(
        !dir.path().join("final").exists(),
        "nothing is saved after divergence"
    );
}

#[test]
fn too_many_bad_samples_stop_the_run_with_an_example() {
    use zoo_datasets::sources::{SkipReason, Skipped};
    let shapes = Shapes::with_diagonal_held_out(32, 1);
    // Every other record is an undecodable image.
    let data = RunData {
        train: Arc::new(move |_| {
            let shapes = shapes.clone();
            Ok(Box::new(
                SyntheticStream::new(shapes, Split::Train, 0)
                    .enumerate()
                    .map(|(i, r)| {
                        if i % 2 == 0 {
                            Err(Skipped {
                                key: format!("bad-{i}.jpg"),
                                reason: SkipReason::Undecodable,
                                message: "not a JPEG".into(),
                            })
                        } else {
                            r
                        }
                    }),
            ) as RecordStream)
        }),
        zeroshot: None,
        retrieval: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let err = match run(config("clip-tiny", dir.path(), 50, 1e-3, 0), data) {
        Ok(_) => panic!("half the data is bad"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("were bad") && err.contains("not a JPEG") && err.contains("10%"),
        "{err}"
    );
}

/// Fine-tuning at another resolution: images are prepared at the new size, and the vision
/// tower interpolates its position table at every forward, so the table as the checkpoint
/// stores it receives the gradient.
#[test]
fn fine_tuning_at_another_image_size_trains_the_stored_position_table() {
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/clip-tiny-eos");
    let model =
        TrainableDualEncoder::from_pretrained(&fixture.to_string_lossy(), Some(64), &Device::Cpu)
            .unwrap();
    assert_eq!(model.processor.config.crop_size, (64, 64));
    let image = fixture.join("../images/chelsea.png");
    let pixels = model.pipeline().pixel_values(&[&image]).unwrap();
    assert_eq!(pixels.dims(), [1, 3, 64, 64]);
    let features = model.model.image_features(&pixels).unwrap();
    let grads = features
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let vars = model.trainable_vars(false, false);
    let (_, table) = vars
        .iter()
        .find(|(n, _)| n == "vision_model.embeddings.position_embedding.weight")
        .unwrap();
    assert_eq!(
        table.dims(),
        [10, 32],
        "the stored 3×3 grid + class position"
    );
    let g: f32 = grads
        .get(table.as_tensor())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(g > 0.0);
    assert!(TrainableDualEncoder::from_pretrained(
        &fixture.to_string_lossy(),
        Some(8),
        &Device::Cpu
    )
    .is_err());
}

// Mixed precision: a tiny CLIP trained under `amp_fp16` (and pure `fp16`) reaches the loss of
// the same run in fp32; every parameter gets an f32 gradient through the half-precision copy;
// bf16 is refused on the CPU; the loss scaler's state is kept.

/// The CLIP overfitting run of [`clip_overfits_eight_pairs`] in `precision`.
fn with_precision(precision: Precision, output: &Path, steps: u64) -> RunConfig {
    let cfg = config("clip-tiny", output, steps, 2e-3, 0);
    RunConfig {
        train: TrainConfig {
            precision,
            ..cfg.train.clone()
        },
        ..cfg
    }
}

fn losses(precision: Precision, steps: u64) -> (Vec<f64>, Option<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let s = run(with_precision(precision, dir.path(), steps), fixed_pairs(8)).unwrap();
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
                .unwrap()
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
    let err = run(
        with_precision(Precision::Bf16, dir.path(), 1),
        fixed_pairs(8),
    )
    .err()
    .expect("refused");
    assert!(
        err.to_string().contains("use --precision amp_fp16"),
        "{err}"
    );
}
