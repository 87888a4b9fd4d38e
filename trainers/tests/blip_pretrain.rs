//! BLIP pretraining (ITC + ITM + LM) provably learns: every parameter receives a gradient, and
//! each objective reaches exactly the parameters it should; a few pairs are overfitted under
//! all three losses; the same seed gives the same loss curve; a resumed run (momentum encoders,
//! queues and temperature included) reproduces the uninterrupted one; the saved folder loads as
//! both HF architectures; and CapFilt with the trained filter removes wrong captions and keeps
//! right ones.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use image::DynamicImage;
use zoo_datasets::sources::{Pair, Record};
use zoo_datasets::synthetic::{ShapeSample, Shapes, Split};
use zoo_datasets::tokenize::Padding;
use zoo_models::blip::{BlipForConditionalGeneration, BlipForImageTextRetrieval};
use zoo_models::hub::ModelRepo;
use zoo_trainers::blip_pretrain::{
    preprocess, run, tied_source, ModelSpec, PretrainSettings, RunConfig, RunData, RunSummary,
    TrainableBlipPretrain, STATE_FILE,
};
use zoo_trainers::capfilt::{self, CapFiltConfig, CaptionSource, Captioner, ItmFilter, KeptPair};
use zoo_trainers::data::{RecordStream, SyntheticStream};
use zoo_trainers::optim::AdamWConfig;
use zoo_trainers::rng::Rng;
use zoo_trainers::train::TrainConfig;

fn shapes() -> Shapes {
    Shapes::with_diagonal_held_out(32, 11)
}

/// `n` synthetic pairs with distinct captions.
fn distinct_samples(n: usize) -> Vec<ShapeSample> {
    let shapes = shapes();
    let mut seen = HashSet::new();
    (0..)
        .map(|i| shapes.sample(Split::Train, i))
        .filter(|s| seen.insert(s.caption.clone()))
        .take(n)
        .collect()
}

fn settings() -> PretrainSettings {
    PretrainSettings {
        queue_size: 16,
        momentum: 0.9,
        alpha: 0.4,
        alpha_ramp_steps: 2,
    }
}

fn config(output: &Path, steps: u64, lr: f64, seed: u64) -> RunConfig {
    RunConfig {
        model: ModelSpec::Preset("blip-tiny".into()),
        settings: settings(),
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
            seed,
            progress: false,
        },
        batch_size: 8,
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

/// The same 8 pairs (distinct captions) every epoch.
fn eight_pairs() -> RunData {
    let shapes = shapes();
    let mut seen = HashSet::new();
    let indices: Vec<u64> = (0..)
        .filter(|&i| seen.insert(shapes.sample(Split::Train, i).caption))
        .take(8)
        .collect();
    RunData {
        train: Arc::new(move |_| {
            let shapes = shapes.clone();
            let end = indices[indices.len() - 1] as usize + 1;
            let stream = SyntheticStream::new(shapes, Split::Train, 0)
                .take(end)
                .enumerate()
                .filter(|(i, _)| indices.contains(&(*i as u64)))
                .map(|(_, r)| r);
            Ok(Box::new(stream.collect::<Vec<_>>().into_iter()) as RecordStream)
        }),
        val: None,
    }
}

fn train(cfg: RunConfig) -> RunSummary {
    run(cfg, eight_pairs()).unwrap()
}

/// Pixel values, ids and mask of samples.
fn batch(m: &TrainableBlipPretrain, samples: &[ShapeSample]) -> (Tensor, Tensor, Tensor) {
    let images: Vec<DynamicImage> = samples
        .iter()
        .map(|s| DynamicImage::ImageRgb8(s.image.clone()))
        .collect();
    let pixels = preprocess(m, &images.iter().collect::<Vec<_>>()).unwrap();
    let captions: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
    let enc = m
        .tokenizer
        .encode_batch(&captions, Padding::Longest, 30)
        .unwrap();
    (
        pixels,
        Tensor::new(enc.input_ids, &Device::Cpu).unwrap(),
        Tensor::new(enc.attention_mask, &Device::Cpu).unwrap(),
    )
}

/// Names of the variables `loss` gives a non-zero gradient.
fn reached(m: &TrainableBlipPretrain, loss: &Tensor) -> HashSet<String> {
    let grads = loss.backward().unwrap();
    m.trainable_vars()
        .into_iter()
        .filter(|(_, v)| {
            grads.get(v.as_tensor()).is_some_and(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            })
        })
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn every_parameter_receives_a_gradient_and_each_objective_reaches_its_own() {
    let mut m = TrainableBlipPretrain::from_preset("blip-tiny", None, &settings(), 3, &Device::Cpu)
        .unwrap();
    let (pixels, ids, mask) = batch(&m, &distinct_samples(4));
    let losses = m
        .losses(&pixels, &ids, &mask, 0.4, 0.9, &mut Rng::new(0))
        .unwrap();
    let all: HashSet<String> = m.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert!(all.len() > 80, "{} variables", all.len());
    assert!(all.contains("temp"));
    assert!(
        all.iter().all(|n| tied_source(n).is_none()),
        "tied decoder weights must not be separate variables"
    );

    let total = reached(&m, &losses.total().unwrap());
    let missing: Vec<&String> = all.difference(&total).collect();
    assert!(missing.is_empty(), "no gradient reached {missing:?}");

    let is_cross = |n: &str| n.contains("crossattention");
    let itc = reached(&m, &losses.itc);
    let itc_expected: HashSet<String> = all
        .iter()
        .filter(|n| {
            n.starts_with("vision_model.")
                || n.starts_with("vision_proj.")
                || n.starts_with("text_proj.")
                || *n == "temp"
                || (n.starts_with("text_encoder.") && !is_cross(n))
        })
        .cloned()
        .collect();
    assert_eq!(
        itc, itc_expected,
        "ITC: unimodal encoders, projections, temp"
    );

    let itm = reached(&m, &losses.itm);
    let itm_expected: HashSet<String> = all
        .iter()
        .filter(|n| {
            n.starts_with("vision_model.")
                || n.starts_with("itm_head.")
                || n.starts_with("text_encoder.")
        })
        .cloned()
        .collect();
    assert_eq!(
        itm, itm_expected,
        "ITM: vision, grounded text encoder, head"
    );

    // The decoder shares all but its self-attention with the encoder, so LM reaches the
    // encoder's embeddings, cross-attention and feed-forward layers, but not its
    // self-attention, and none of the ITC/ITM heads.
    let lm = reached(&m, &losses.lm);
    for n in &all {
        let expected = n.starts_with("vision_model.")
            || n.starts_with("text_decoder.")
            || (n.starts_with("text_encoder.") && !n.contains(".attention."));
        assert_eq!(lm.contains(n), expected, "LM and {n}");
    }
}

/// One pretraining run overfitting the eight pairs, shared by the tests that need it: its
/// output folder and the per-step (ITC, ITM, LM) losses.
struct Overfitted {
    dir: tempfile::TempDir,
    losses: Vec<f64>,
    parts: Vec<[f64; 3]>,
}

fn overfitted() -> &'static Overfitted {
    static RUN: OnceLock<Overfitted> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 300, 2e-3, 0);
        // A queue would hold copies of these same 8 captions as negatives.
        cfg.settings.queue_size = 0;
        let losses = train(cfg).state.losses;
        let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let parts = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("loss_itc").is_some())
            .map(|v| ["loss_itc", "loss_itm", "loss_lm"].map(|k| v[k].as_f64().unwrap()))
            .collect();
        Overfitted { dir, losses, parts }
    })
}

#[test]
fn pretraining_overfits_eight_pairs_under_all_three_losses() {
    let run = overfitted();
    let (first, last) = (run.losses[0], *run.losses.last().unwrap());
    let (start, end) = (run.parts[0], *run.parts.last().unwrap());
    eprintln!("loss {first} -> {last}; (ITC, ITM, LM) {start:?} -> {end:?}");
    // Chance-level ITM (1 positive, 2 negatives) is 0.64; ITC keeps some loss as its targets
    // are α-softened.
    assert!(end[0] < 1.0, "ITC did not fall: {start:?} -> {end:?}");
    assert!(end[1] < 0.1, "ITM did not fall: {start:?} -> {end:?}");
    assert!(end[2] < 1.5, "LM did not fall: {start:?} -> {end:?}");
    assert!(last < first / 3.0);
}

/// CapFilt with the overfitted model as filter (and captioner): each of the eight images with
/// its own caption, and with the caption of an image of another colour and another shape.
#[test]
fn capfilt_with_the_pretrained_filter_removes_wrong_captions_and_keeps_right_ones() {
    let run = overfitted();
    let model = ModelRepo::open(&run.dir.path().join("final").to_string_lossy()).unwrap();
    let captioner = Captioner::load(&model, None, &Device::Cpu).unwrap();
    let filter = ItmFilter::load(&model, None, &Device::Cpu).unwrap();
    let samples = distinct_samples(8);
    let mut web = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let image = DynamicImage::ImageRgb8(s.image.clone());
        let wrong = samples
            .iter()
            .cycle()
            .skip(i + 1)
            .find(|o| o.colour != s.colour && o.shape != s.shape)
            .unwrap();
        for (caption, right) in [(&s.caption, true), (&wrong.caption, false)] {
            web.push((
                Pair {
                    image: image.clone(),
                    caption: caption.clone(),
                    key: format!("{i}-{right}"),
                },
                right,
            ));
        }
    }
    let out = run.dir.path().join("clean.jsonl");
    let records: Vec<Record> = web.iter().map(|(p, _)| Ok(p.clone())).collect();
    let report = capfilt::run(
        &captioner,
        &filter,
        records.into_iter(),
        &out,
        &CapFiltConfig::default(),
        &mut || {},
    )
    .unwrap();
    let kept: HashSet<(String, String)> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<KeptPair>(l).unwrap())
        .filter(|k| k.source == CaptionSource::Web)
        .map(|k| (k.image, k.caption))
        .collect();
    let kept_of = |want: bool| {
        web.iter()
            .filter(|(p, right)| {
                *right == want && kept.contains(&(p.key.clone(), p.caption.clone()))
            })
            .count()
    };
    let (right, wrong) = (kept_of(true), kept_of(false));
    eprintln!("kept {right}/8 right and {wrong}/8 wrong web captions; report {report:?}");
    assert_eq!(report.web.kept, (right + wrong) as u64);
    assert_eq!(report.web.total(), 16);
    assert!(right >= 6, "most right captions are kept: {right}/8");
    assert!(wrong <= 2, "most wrong captions are removed: {wrong}/8");
}

#[test]
fn the_same_seed_gives_the_same_loss_curve() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let first = train(config(a.path(), 4, 1e-3, 7)).state.losses;
    let second = train(config(b.path(), 4, 1e-3, 7)).state.losses;
    let other = train(config(c.path(), 4, 1e-3, 8)).state.losses;
    assert_eq!(first, second);
    assert_ne!(first, other);
}

#[test]
fn resuming_restores_momentum_encoders_queues_and_temperature() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut full = config(a.path(), 6, 1e-3, 5);
    full.train.save_every = Some(3);
    let uninterrupted = train(full).state.losses;
    let checkpoint = a.path().join("checkpoint-3");
    assert!(checkpoint.join(STATE_FILE).is_file());
    let mut resumed = config(b.path(), 6, 1e-3, 5);
    resumed.resume = Some(checkpoint);
    let s = train(resumed);
    assert_eq!(s.state.step, 6);
    assert_eq!(s.state.losses, uninterrupted, "losses after resume differ");
}

#[test]
fn the_saved_folder_is_both_hf_architectures() {
    let dir = tempfile::tempdir().unwrap();
    let s = train(config(dir.path(), 3, 1e-3, 1));
    let m = &s.task.model;
    let (pixels, ids, mask) = batch(m, &distinct_samples(3));
    let repo = ModelRepo::open(&s.final_dir.to_string_lossy()).unwrap();

    let retrieval = BlipForImageTextRetrieval::load(&repo, None, &Device::Cpu).unwrap();
    let want = m.retrieval.itm_score(&pixels, &ids, Some(&mask)).unwrap();
    let got = retrieval.itm_score(&pixels, &ids, Some(&mask)).unwrap();
    // Equal up to rounding: the loaded model multiplies by contiguous transposed weights (a
    // different GEMM kernel, so a different summation order) where the training variables are
    // read transposed in place.
    let diff: f32 = (want - got)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-6, "ITM logits differ by {diff}");

    let captioner = BlipForConditionalGeneration::load(&repo, None, &Device::Cpu).unwrap();
    let dec_ids = {
        let mut rows = ids.to_vec2::<u32>().unwrap();
        for r in &mut rows {
            r[0] = m.config.text_config.bos_token_id;
        }
        Tensor::new(rows, &Device::Cpu).unwrap()
    };
    let want = m.captioner.forward(&pixels, &dec_ids, Some(&mask)).unwrap();
    let got = captioner.forward(&pixels, &dec_ids, Some(&mask)).unwrap();
    // Equal up to rounding, as above: the loaded decoder's few-row projections go through the
    // small-row f32 kernel (one FMA chain per output) where the variables go through the GEMM.
    let diff: f32 = (want - got)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-6, "caption logits differ by {diff}");

    // Tied decoder weights are written under both names, equal.
    let weights =
        candle_core::safetensors::load(s.final_dir.join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let enc = &weights["text_encoder.encoder.layer.0.crossattention.self.query.weight"];
    let dec = &weights["text_decoder.bert.encoder.layer.0.crossattention.self.query.weight"];
    assert_eq!(
        enc.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        dec.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert!(
        !weights.contains_key("temp"),
        "temp belongs in {STATE_FILE}"
    );
}

/// `--image-size` when pretraining from a checkpoint: the images are prepared at the new size
/// and the vision tower interpolates its stored position table.
#[test]
fn pretraining_from_a_checkpoint_at_another_image_size() {
    let dir = tempfile::tempdir().unwrap();
    let first = train(config(&dir.path().join("a"), 1, 1e-3, 1));
    let cfg = RunConfig {
        model: ModelSpec::Pretrained(first.final_dir.to_string_lossy().into_owned()),
        image_size: Some(48),
        ..config(&dir.path().join("b"), 2, 1e-3, 1)
    };
    let s = train(cfg);
    assert!(s.state.losses.iter().all(|l| l.is_finite()));
    let m = &s.task.model;
    assert_eq!(
        m.processor.config.size,
        zoo_datasets::preprocess::ResizeTarget::Exact {
            height: 48,
            width: 48
        }
    );
    let (pixels, _, _) = batch(m, &distinct_samples(2));
    assert_eq!(pixels.dims(), [2, 3, 48, 48]);
    assert_eq!(m.config.vision_config.image_size, 32, "stored as it was");
}
