//! BLIP caption training provably learns: four pairs overfitted until greedy decoding
//! reproduces their captions, every parameter receiving a gradient, the prompt and padding kept
//! out of the loss, and saved checkpoints loading back as the same model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use image::DynamicImage;
use zoo_datasets::synthetic::{ShapeSample, Shapes, Split};
use zoo_models::blip::BlipForConditionalGeneration;
use zoo_models::hub::ModelRepo;
use zoo_trainers::blip_caption::{
    run, ModelSpec, RunConfig, RunData, TrainableBlipCaptioner, DEFAULT_PROMPT,
};
use zoo_trainers::data::{RecordStream, SyntheticStream};
use zoo_trainers::optim::{without_gradient, AdamWConfig};
use zoo_trainers::train::TrainConfig;

fn shapes() -> Shapes {
    Shapes::with_diagonal_held_out(32, 11)
}

fn samples(n: u64) -> Vec<ShapeSample> {
    let shapes = shapes();
    (0..n).map(|i| shapes.sample(Split::Train, i)).collect()
}

fn config(output: &Path, steps: u64, lr: f64) -> RunConfig {
    RunConfig {
        model: ModelSpec::Preset("blip-tiny".into()),
        prompt: DEFAULT_PROMPT.into(),
        label_smoothing: 0.1,
        train: TrainConfig {
            precision: Default::default(),
            steps,
            lr,
            warmup: 5,
            accum_freq: 1,
            grad_clip_norm: Some(1.0),
            save_every: None,
            eval_every: None,
            output: output.to_path_buf(),
            seed: 0,
            progress: false,
        },
        batch_size: 4,
        workers: 1,
        optimizer: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        image_size: None,
        augment: false,
        max_bad_fraction: 0.1,
        resume: None,
        device: Device::Cpu,
    }
}

/// The same four synthetic pairs every epoch.
fn four_pairs() -> RunData {
    let shapes = shapes();
    RunData {
        train: Arc::new(move |_| {
            Ok(
                Box::new(SyntheticStream::new(shapes.clone(), Split::Train, 0).take(4))
                    as RecordStream,
            )
        }),
        val: None,
    }
}

/// `[B, L]` ids and mask of `[DEC] prompt caption [SEP]` rows, padded to the longest.
fn caption_batch(m: &TrainableBlipCaptioner, captions: &[&str]) -> (Tensor, Tensor) {
    let encode = m.caption_encoder(DEFAULT_PROMPT);
    let rows: Vec<Vec<u32>> = captions.iter().map(|c| encode(c).unwrap()).collect();
    let len = rows.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for row in &rows {
        ids.extend(row.iter().map(|&t| i64::from(t)));
        ids.extend(std::iter::repeat_n(0i64, len - row.len()));
        mask.extend(std::iter::repeat_n(1i64, row.len()));
        mask.extend(std::iter::repeat_n(0i64, len - row.len()));
    }
    let n = rows.len();
    (
        Tensor::from_vec(ids, (n, len), &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, (n, len), &Device::Cpu).unwrap(),
    )
}

fn images(s: &[ShapeSample]) -> Vec<DynamicImage> {
    s.iter()
        .map(|s| DynamicImage::ImageRgb8(s.image.clone()))
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn captions_are_encoded_as_dec_prompt_caption_sep() {
    let m = TrainableBlipCaptioner::from_preset("blip-tiny", None, 0, &Device::Cpu).unwrap();
    let ids = m.caption_encoder(DEFAULT_PROMPT)("a small red circle on the left").unwrap();
    // bert-base-uncased: a 1037, picture 3861, of 1997, small 2235, red 2417, circle 4418.
    assert_eq!(ids[..7], [30522, 1037, 3861, 1997, 1037, 2235, 2417]);
    assert_eq!(ids.last(), Some(&102));
    assert_eq!(m.prompt_length(DEFAULT_PROMPT).unwrap(), 4);
    assert_eq!(m.prompt_length("").unwrap(), 1);
}

#[test]
fn the_caption_loss_ignores_the_prompt_and_padding() {
    let m = TrainableBlipCaptioner::from_preset("blip-tiny", None, 1, &Device::Cpu).unwrap();
    let s = samples(2);
    let imgs = images(&s);
    let pixels = m.pixel_values(&imgs.iter().collect::<Vec<_>>()).unwrap();
    // Different lengths, so the shorter row is padded.
    let (ids, mask) = caption_batch(&m, &[&s[0].caption, "a red circle"]);
    let eps = 0.1;
    let loss = m
        .model
        .caption_loss(&pixels, &ids, &mask, 4, eps)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();

    // By hand: smoothed cross-entropy of token j + 1 from position j, averaged over targets
    // that are neither prompt (j + 1 < 4) nor padding.
    let logits = m.model.forward(&pixels, &ids, Some(&mask)).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let logp: Vec<Vec<Vec<f32>>> = logp.to_vec3().unwrap();
    let ids: Vec<Vec<i64>> = ids.to_vec2().unwrap();
    let mask: Vec<Vec<i64>> = mask.to_vec2().unwrap();
    let (mut total, mut count) = (0.0f64, 0usize);
    for b in 0..2 {
        for j in 0..ids[b].len() - 1 {
            if j + 1 < 4 || mask[b][j + 1] == 0 {
                continue;
            }
            let row = &logp[b][j];
            let nll = -f64::from(row[ids[b][j + 1] as usize]);
            let uniform = -row.iter().map(|&x| f64::from(x)).sum::<f64>() / row.len() as f64;
            total += (1.0 - eps) * nll + eps * uniform;
            count += 1;
        }
    }
    assert_eq!(
        count,
        (s[0].caption.split(' ').count() + 1) + 4,
        "caption tokens and [SEP] of both rows"
    );
    let expected = total / count as f64;
    assert!(
        (f64::from(loss) - expected).abs() < 1e-4,
        "{loss} vs {expected}"
    );
}

#[test]
fn every_caption_parameter_receives_a_gradient() {
    let m = TrainableBlipCaptioner::from_preset("blip-tiny", None, 3, &Device::Cpu).unwrap();
    let s = samples(4);
    let imgs = images(&s);
    let pixels = m.pixel_values(&imgs.iter().collect::<Vec<_>>()).unwrap();
    let captions: Vec<&str> = s.iter().map(|s| s.caption.as_str()).collect();
    let (ids, mask) = caption_batch(&m, &captions);
    let loss = m.model.caption_loss(&pixels, &ids, &mask, 4, 0.1).unwrap();
    let grads = loss.backward().unwrap();
    let vars = m.trainable_vars();
    assert!(vars.len() > 40, "{} variables", vars.len());
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        !names.iter().any(|n| n.contains("predictions.decoder")),
        "the LM head must stay tied to the word embeddings: {names:?}"
    );
    let missing = without_gradient(&vars, &grads).unwrap();
    assert!(missing.is_empty(), "no gradient reached {missing:?}");
}

#[test]
fn blip_tiny_overfits_four_pairs_until_greedy_decoding_reproduces_them() {
    let dir = tempfile::tempdir().unwrap();
    let summary = run(config(dir.path(), 200, 2e-3), four_pairs()).unwrap();
    eprintln!(
        "{:?}",
        summary.state.losses.iter().step_by(20).collect::<Vec<_>>()
    );
    // Label smoothing 0.1 keeps the loss above about 0.1 · ln 30 524 even when every caption
    // token is certain.
    let losses = &summary.state.losses;
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.2 * first, "loss {first} -> {last}");

    let m = &summary.task.model;
    let s = samples(4);
    let imgs = images(&s);
    let pixels = m.pixel_values(&imgs.iter().collect::<Vec<_>>()).unwrap();
    let generated = m.caption(&pixels, DEFAULT_PROMPT, 20).unwrap();
    for (sample, (ids, text)) in s.iter().zip(&generated) {
        let mut want = m.tokenizer.encode(&sample.caption).unwrap();
        want.pop();
        want.remove(0);
        assert_eq!(ids, &want, "{text:?} for {:?}", sample.caption);
        assert_eq!(text, &sample.caption);
    }

    // The final checkpoint is what `zoo caption` loads.
    let final_dir: PathBuf = summary.final_dir.clone();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        assert!(final_dir.join(file).is_file(), "final/ lacks {file}");
    }
}

#[test]
fn saved_captioner_loads_in_blip_with_the_same_logits() {
    let m = TrainableBlipCaptioner::from_preset("blip-tiny", None, 5, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_hf(dir.path()).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_type"], "blip");
    assert_eq!(config["architectures"][0], "BlipForConditionalGeneration");
    let stored =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!stored.keys().any(|k| k.contains("predictions.decoder")));

    let repo = ModelRepo::open(&dir.path().to_string_lossy()).unwrap();
    let loaded = BlipForConditionalGeneration::load(&repo, Some(DType::F32), &Device::Cpu).unwrap();
    let s = samples(2);
    let imgs = images(&s);
    let pixels = m.pixel_values(&imgs.iter().collect::<Vec<_>>()).unwrap();
    let (ids, mask) = caption_batch(&m, &[&s[0].caption, &s[1].caption]);
    let a = m.model.forward(&pixels, &ids, Some(&mask)).unwrap();
    let b = loaded.forward(&pixels, &ids, Some(&mask)).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5);

    // And back into a trainable captioner (fine-tuning or resume from it).
    let again =
        TrainableBlipCaptioner::from_pretrained(&dir.path().to_string_lossy(), &Device::Cpu)
            .unwrap();
    let c = again.model.forward(&pixels, &ids, Some(&mask)).unwrap();
    assert!(max_abs_diff(&a, &c) < 1e-5);
    assert_eq!(again.trainable_vars().len(), m.trainable_vars().len());
}

#[test]
fn an_hf_checkpoint_fine_tunes_with_the_logits_it_loads_with() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/blip-tiny-caption");
    let spec = fixture.to_string_lossy();
    let m = TrainableBlipCaptioner::from_pretrained(&spec, &Device::Cpu).unwrap();
    let reference = BlipForConditionalGeneration::load(
        &ModelRepo::open(&spec).unwrap(),
        Some(DType::F32),
        &Device::Cpu,
    )
    .unwrap();
    let s = samples(1);
    let imgs = images(&s);
    let pixels = m.pixel_values(&imgs.iter().collect::<Vec<_>>()).unwrap();
    let bos = i64::from(m.config.text_config.bos_token_id);
    let ids = Tensor::new(&[[bos, 5, 7, 9]], &Device::Cpu).unwrap();
    let a = m.model.forward(&pixels, &ids, None).unwrap();
    let b = reference.forward(&pixels, &ids, None).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5);
}

/// `--image-size` when fine-tuning a checkpoint: images are prepared at the new size, the vision
/// tower interpolates its stored position table, which receives the gradient, and the saved
/// folder keeps the table as stored with preprocessing at the new size.
#[test]
fn fine_tuning_at_another_image_size_trains_the_stored_position_table() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/blip-tiny-caption");
    let dir = tempfile::tempdir().unwrap();
    let cfg = RunConfig {
        model: ModelSpec::Pretrained(fixture.to_string_lossy().into_owned()),
        image_size: Some(48),
        ..config(dir.path(), 3, 1e-3)
    };
    let summary = run(cfg, four_pairs()).unwrap();
    assert_eq!(summary.state.losses.len(), 3);
    let m = &summary.task.model;
    assert_eq!(
        m.processor.config.size,
        zoo_datasets::preprocess::ResizeTarget::Exact {
            height: 48,
            width: 48
        }
    );
    let imgs = images(&samples(2));
    let pixels = m.pixel_values(&imgs.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(pixels.dims(), [2, 3, 48, 48]);
    let (ids, mask) = caption_batch(m, &["a red circle", "a blue square"]);
    let loss = m.model.caption_loss(&pixels, &ids, &mask, 0, 0.0).unwrap();
    let grads = loss.backward().unwrap();
    let table = m
        .trainable_vars()
        .into_iter()
        .find(|(n, _)| n == "vision_model.embeddings.position_embedding")
        .map(|(_, v)| v)
        .expect("the position table is trainable");
    assert_eq!(
        table.dims(),
        [1, 17, 32],
        "the stored 4×4 grid + class position"
    );
    let g = grads.get(table.as_tensor()).unwrap();
    assert!(
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("final/preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["size"]["height"], 48, "{saved}");
    let too_small = RunConfig {
        model: ModelSpec::Pretrained(fixture.to_string_lossy().into_owned()),
        image_size: Some(4),
        ..config(dir.path(), 1, 1e-3)
    };
    let err = run(too_small, four_pairs()).err().expect("refused");
    assert!(
        err.to_string().contains("smaller than one 8-pixel patch"),
        "{err}"
    );
}

/// Caption training under `amp_fp16` starts from the fp32 loss (the same model in half
/// precision) and learns as the fp32 run does.
#[test]
fn amp_fp16_caption_training_follows_fp32() {
    let losses = |precision| {
        let dir = tempfile::tempdir().unwrap();
        let base = config(dir.path(), 40, 2e-3);
        let cfg = RunConfig {
            train: TrainConfig {
                precision,
                ..base.train.clone()
            },
            ..base
        };
        run(cfg, four_pairs()).unwrap().state.losses
    };
    let fp32 = losses(zoo_trainers::precision::Precision::Fp32);
    let amp = losses(zoo_trainers::precision::Precision::AmpFp16);
    println!(
        "fp32 {:.4} -> {:.4}, amp_fp16 {:.4} -> {:.4}",
        fp32[0], fp32[39], amp[0], amp[39]
    );
    assert!((amp[0] - fp32[0]).abs() < 5e-3, "{} vs {}", amp[0], fp32[0]);
    // Measured: 10.3011 -> 6.1385 in fp32, 10.3011 -> 6.1382 under amp_fp16.
    assert!(
        amp[39] < 0.7 * amp[0],
        "amp_fp16 learns: {} -> {}",
        amp[0],
        amp[39]
    );
    assert!(
        (amp[39] - fp32[39]).abs() < 0.05,
        "{} vs {}",
        amp[39],
        fp32[39]
    );
}
