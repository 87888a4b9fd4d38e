//! A CLIP image tower with a pretrained BERT text tower (HF `VisionTextDualEncoderModel`, mean
//! pooled as open_clip's HF text towers are): the text side is the BERT's, every trainable
//! parameter learns, `--lock-text` freezes the BERT but not its projection (LiT), a saved model
//! reloads with the same embeddings, and an HF checkpoint without `text_pooling` gives HF's numbers.
//!
//! The BERT is the tiny random `tests/fixtures/bert-tiny`. It has no tokenizer, so
//! [`bert_tiny_tower`] copies it into a temporary folder with a small WordPiece `tokenizer.json`
//! written here (made at test time: `scripts/make_bert_fixtures.py` recreates the fixture folder).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use serde_json::json;
use tempfile::TempDir;
use zoo_datasets::synthetic::{Shapes, Split, COLOURS, SHAPES};
use zoo_models::bert::{mean_pool, BertConfig, BertModel};
use zoo_models::contrastive::{l2_normalize, load_dual_encoder, DualEncoderConfig, ScoreKind};
use zoo_models::dual_bert::BertTextPooling;
use zoo_models::hub::ModelRepo;
use zoo_models::weights::SafetensorsWeights;
use zoo_trainers::contrastive::{run, ModelSpec, RunConfig, RunData, RunSummary};
use zoo_trainers::data::{RecordStream, SyntheticStream};
use zoo_trainers::loss::clip_loss;
use zoo_trainers::model::TrainableDualEncoder;
use zoo_trainers::optim::AdamWConfig;
use zoo_trainers::pipeline::DualEncoderPipeline;
use zoo_trainers::train::TrainConfig;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A WordPiece `tokenizer.json` as HF's `BertTokenizerFast` saves one (lowercasing normaliser,
/// BERT pre-tokenizer, `[CLS] … [SEP]`), over the synthetic captions' words, single letters and
/// `##` letter continuations: 84 tokens, within bert-tiny's vocab_size of 100.
fn tiny_wordpiece_json() -> String {
    let mut tokens: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .map(String::from)
        .to_vec();
    let words = "a photo of small large on the left right at top bottom in middle";
    tokens.extend(words.split(' ').map(String::from));
    tokens.extend(COLOURS.iter().map(|(c, _)| c.to_string()));
    tokens.extend(SHAPES.iter().map(|s| s.to_string()));
    for c in 'a'..='z' {
        if !tokens.contains(&c.to_string()) {
            tokens.push(c.to_string());
        }
        tokens.push(format!("##{c}"));
    }
    tokens.extend([".", ",", "!", "?", "'", "-"].map(String::from));
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i.into()))
        .collect();
    assert!(vocab.len() <= 100, "{} tokens", vocab.len());
    let id = |t: &str| vocab[t].clone();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", id("[SEP]")],
                           "cls": ["[CLS]", id("[CLS]")]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab}
    })
    .to_string()
}

/// `tests/fixtures/bert-tiny` (config.json, model.safetensors) plus a tokenizer, as a folder
/// `--text-tower` accepts.
fn bert_tiny_tower() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("bert-tiny").join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), tiny_wordpiece_json()).unwrap();
    let config = json!({
        "tokenizer_class": "BertTokenizer", "do_lower_case": true, "model_max_length": 24,
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "mask_token": "[MASK]"
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

fn model_with_tower(tower: &Path, seed: u64) -> TrainableDualEncoder {
    TrainableDualEncoder::from_preset_with_text_tower(
        "clip-tiny",
        tower.to_str().unwrap(),
        None,
        seed,
        &Device::Cpu,
    )
    .unwrap()
}

/// `n` synthetic training samples as preprocessed pixels and captions.
fn samples(m: &TrainableDualEncoder, n: u64) -> (Tensor, Vec<String>) {
    let shapes = Shapes::with_diagonal_held_out(32, 1);
    let samples: Vec<_> = (0..n).map(|i| shapes.sample(Split::Train, i)).collect();
    let mut pixels = Vec::new();
    for s in &samples {
        let img = DynamicImage::ImageRgb8(s.image.clone());
        pixels.extend(m.processor.preprocess(&img).unwrap().0);
    }
    let pixels = Tensor::from_vec(pixels, (n as usize, 3, 32, 32), &Device::Cpu).unwrap();
    (pixels, samples.into_iter().map(|s| s.caption).collect())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
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

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn var_values(m: &TrainableDualEncoder) -> HashMap<String, Tensor> {
    let data = m.varmap.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect()
}

#[test]
fn the_text_tower_and_tokenizer_come_from_the_bert_folder() {
    let tower = bert_tiny_tower();
    let m = model_with_tower(tower.path(), 0);
    let DualEncoderConfig::VisionText(cfg) = &m.config else {
        panic!("not a vision-text dual encoder: {}", m.config.model_type())
    };
    assert_eq!(cfg.text_pooling, BertTextPooling::Mean);
    assert_eq!((cfg.projection_dim, cfg.vision_config.image_size), (64, 32));
    assert_eq!(m.config.score_kind(), ScoreKind::Softmax);
    assert!(!m.config.pads_to_max_length());
    // bert-tiny's 24 positions, also the tokenizer's model_max_length.
    assert_eq!((m.config.max_text_len(), m.max_text_len()), (24, 24));

    let values = var_values(&m);
    let bert = load_tensors(&fixture("bert-tiny").join("model.safetensors"));
    let mut text_vars = 0;
    for (name, t) in &values {
        if let Some(inner) = name.strip_prefix("text_model.") {
            assert_eq!(
                max_abs_diff(t, &bert[inner]),
                0.0,
                "{name} is not bert-tiny's"
            );
            text_vars += 1;
        }
    }
    // Every BertModel tensor except the pooler, which mean pooling does not use.
    assert_eq!(text_vars, bert.len() - 2);
    assert!(!values.contains_key("text_model.pooler.dense.weight"));
    assert_eq!(values["text_projection.weight"].dims(), &[64, 32]);
    assert!(values.contains_key("vision_model.vision_model.post_layernorm.weight"));

    let ids = m.tokenizer.encode("A small red circle").unwrap();
    let id = |t: &str| m.tokenizer.token_to_id(t).unwrap();
    assert_eq!(
        ids,
        vec![
            id("[CLS]"),
            id("a"),
            id("small"),
            id("red"),
            id("circle"),
            id("[SEP]")
        ]
    );
    assert_eq!(m.tokenizer.pad_id(), Some(0));
}

#[test]
fn mean_pooled_text_features_are_the_projection_of_bert_mean_pooling() {
    let tower = bert_tiny_tower();
    let m = model_with_tower(tower.path(), 1);
    let pipeline = m.pipeline();
    let texts = [
        "a red circle",
        "a large purple triangle at the bottom",
        "cross",
    ];
    let inputs = pipeline.tokenize(&texts).unwrap();
    let mask = inputs
        .attention_mask
        .clone()
        .expect("BERT text gets a mask");
    let ours = m
        .model
        .text_features(&inputs.input_ids, Some(&mask))
        .unwrap();

    let repo = ModelRepo::open(tower.path().to_str().unwrap()).unwrap();
    let cfg = BertConfig::from_file(&repo.get("config.json").unwrap()).unwrap();
    let vb = SafetensorsWeights::open(&repo.weight_files().unwrap())
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let bert = BertModel::new(&cfg, vb, false).unwrap();
    let hidden = bert
        .forward(&inputs.input_ids, None, Some(&mask), None, None)
        .unwrap();
    let pooled = mean_pool(&hidden, &mask).unwrap();
    let projection = var_values(&m)["text_projection.weight"].clone();
    let by_hand = pooled.matmul(&projection.t().unwrap()).unwrap();
    let d = max_abs_diff(&ours, &by_hand);
    assert!(
        d < 1e-5,
        "text features differ from the hand computation by {d}"
    );

    // Padding is invisible: a text alone embeds as it does inside a padded batch.
    let alone = pipeline.embed_texts(&texts[2..]).unwrap();
    let batched = pipeline
        .embed_texts(&texts)
        .unwrap()
        .narrow(0, 2, 1)
        .unwrap();
    let d = max_abs_diff(&alone, &batched);
    assert!(d < 1e-5, "padding changed a text embedding by {d}");
}

/// Every trainable variable gets a non-zero gradient from the CLIP loss; with `lock_text` the
/// BERT's variables are not trainable and the loss's graph does not reach them.
fn assert_gradient_reaches_every_trainable(lock_text: bool) {
    let tower = bert_tiny_tower();
    let m = model_with_tower(tower.path(), 3);
    let (pixels, captions) = samples(&m, 4);
    let captions: Vec<&str> = captions.iter().map(String::as_str).collect();
    let inputs = m.pipeline().tokenize(&captions).unwrap();
    let img = l2_normalize(&m.model.image_features(&pixels).unwrap()).unwrap();
    let txt = m
        .text_features_for_loss(&inputs.input_ids, inputs.attention_mask.as_ref(), lock_text)
        .unwrap();
    let (scale, bias) = m.logit_vars();
    assert!(bias.is_none());
    let loss = clip_loss(&img, &l2_normalize(&txt).unwrap(), scale.as_tensor()).unwrap();
    let grads = loss.backward().unwrap();

    let vars = m.trainable_vars(false, lock_text);
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"text_projection.weight"), "{names:?}");
    assert!(names.contains(&"logit_scale"));
    let text_model = names
        .iter()
        .filter(|n| n.starts_with("text_model."))
        .count();
    assert_eq!(
        text_model,
        if lock_text { 0 } else { 37 },
        "lock_text {lock_text}"
    );
    let zero_or_none = |t: &Tensor| {
        grads.get(t).is_none_or(|g| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                == 0.0
        })
    };
    let missing: Vec<&str> = vars
        .iter()
        .filter(|(_, v)| zero_or_none(v.as_tensor()))
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "lock_text {lock_text}: no gradient reached {missing:?}"
    );
    if lock_text {
        let data = m.varmap.data().lock().unwrap();
        let reached: Vec<&String> = data
            .iter()
            .filter(|(n, v)| n.starts_with("text_model.") && grads.get(v.as_tensor()).is_some())
            .map(|(n, _)| n)
            .collect();
        assert!(
            reached.is_empty(),
            "the locked BERT got gradients: {reached:?}"
        );
    }
}

#[test]
fn every_trainable_parameter_receives_a_gradient_with_and_without_lock_text() {
    assert_gradient_reaches_every_trainable(false);
    assert_gradient_reaches_every_trainable(true);
}

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

fn train(tower: &Path, output: &Path, steps: u64, lr: f64, lock_text: bool) -> RunSummary {
    let config = RunConfig {
        model: ModelSpec::PresetWithTextTower {
            preset: "clip-tiny".into(),
            text_tower: tower.to_str().unwrap().into(),
        },
        objective: ScoreKind::Softmax,
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
            seed: 0,
            progress: false,
        },
        batch_size: 8,
        workers: 1,
        optimizer: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        image_size: None,
        lock_image: false,
        lock_text,
        siglip_chunk: None,
        max_bad_fraction: 0.1,
        resume: None,
        device: Device::Cpu,
    };
    run(config, fixed_pairs(8)).unwrap()
}

#[test]
fn the_bert_tower_model_overfits_eight_pairs() {
    let (tower, out) = (bert_tiny_tower(), tempfile::tempdir().unwrap());
    let s = train(tower.path(), out.path(), 100, 2e-3, false);
    let (first, last) = (s.state.losses[0], *s.state.losses.last().unwrap());
    println!("loss {first:.4} -> {last:.4}");
    assert!(first > 1.5, "initial loss {first} should be near ln 8");
    assert!(last < 0.1, "loss after overfitting: {last} (from {first})");
}

#[test]
fn lock_text_freezes_the_bert_but_trains_its_projection() {
    let (tower, out) = (bert_tiny_tower(), tempfile::tempdir().unwrap());
    let before = var_values(&model_with_tower(tower.path(), 0));
    let s = train(tower.path(), out.path(), 40, 2e-3, true);
    let (first, last) = (s.state.losses[0], *s.state.losses.last().unwrap());
    println!("loss {first:.4} -> {last:.4}");
    assert!(last < 0.5 * first, "LiT loss {first} -> {last}");
    let after = var_values(&s.task.model);
    for (name, t) in &after {
        let moved = max_abs_diff(t, &before[name]);
        if name.starts_with("text_model.") {
            assert_eq!(moved, 0.0, "locked {name} changed");
        } else if name == "text_projection.weight" {
            assert!(moved > 0.0, "the projection did not train");
        }
    }
}

#[test]
fn a_saved_bert_tower_model_reloads_with_the_same_embeddings() {
    let (tower, out) = (bert_tiny_tower(), tempfile::tempdir().unwrap());
    let s = train(tower.path(), out.path(), 3, 1e-3, true);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.final_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_type"], "vision-text-dual-encoder");
    assert_eq!(config["architectures"][0], "VisionTextDualEncoderModel");
    assert_eq!(config["text_pooling"], "mean");
    assert_eq!(config["vision_config"]["model_type"], "clip_vision_model");
    assert_eq!(config["text_config"]["model_type"], "bert");
    let tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.final_dir.join("tokenizer.json")).unwrap())
            .unwrap();
    assert_eq!(tokenizer["model"]["type"], "WordPiece");

    let trained = s.task.model.pipeline();
    let loaded =
        DualEncoderPipeline::load(s.final_dir.to_str().unwrap(), &Device::Cpu, None).unwrap();
    assert_eq!(loaded.config.model_type(), "vision-text-dual-encoder");
    let (pixels, captions) = samples(&s.task.model, 4);
    let captions: Vec<&str> = captions.iter().map(String::as_str).collect();
    let d = max_abs_diff(
        &trained.embed_texts(&captions).unwrap(),
        &loaded.embed_texts(&captions).unwrap(),
    );
    assert!(d < 1e-5, "text embeddings differ after reload by {d}");
    let d = max_abs_diff(
        &trained.embed_pixels(&pixels).unwrap(),
        &loaded.embed_pixels(&pixels).unwrap(),
    );
    assert!(d < 1e-5, "image embeddings differ after reload by {d}");
    let logits = |p: &DualEncoderPipeline| {
        let (i, t) = (
            p.embed_pixels(&pixels).unwrap(),
            p.embed_texts(&captions).unwrap(),
        );
        p.logits_per_image(&i, &t).unwrap()
    };
    let d = max_abs_diff(&logits(&trained), &logits(&loaded));
    assert!(d < 1e-4, "logits differ after reload by {d}");
}

/// `tests/fixtures/vision-text-tiny` is an HF `VisionTextDualEncoderModel` (CLIP vision + BERT
/// with pooler, random weights) saved by transformers 4.57.1 with its outputs
/// (`scripts/make_vision_text_fixture.py`). Its config has no `text_pooling`, so the text is
/// pooled as HF pools it.
#[test]
fn an_hf_vision_text_dual_encoder_gives_hfs_numbers() {
    let dir = fixture("vision-text-tiny");
    let repo = ModelRepo::open(dir.to_str().unwrap()).unwrap();
    let loaded = load_dual_encoder(&repo, None, &Device::Cpu).unwrap();
    let DualEncoderConfig::VisionText(cfg) = &loaded.config else {
        panic!("not a vision-text dual encoder")
    };
    assert_eq!(cfg.text_pooling, BertTextPooling::Pooler);
    let r = load_tensors(&dir.join("reference.safetensors"));
    let out = loaded
        .model
        .forward(
            &r["pixel_values"],
            &r["input_ids"],
            Some(&r["attention_mask"]),
        )
        .unwrap();
    for (name, ours) in [
        ("image_embeds", &out.image_embeds),
        ("text_embeds", &out.text_embeds),
        ("logits_per_image", &out.logits_per_image),
    ] {
        let d = max_abs_diff(ours, &r[name]);
        println!("vision-text-tiny: {name} max abs diff {d:e}");
        assert!(d < 1e-4, "{name} differs from HF by {d}");
    }
    // With mean pooling the same weights give other text embeddings: the field is read.
    let DualEncoderConfig::VisionText(mut mean) = loaded.config.clone() else {
        unreachable!()
    };
    mean.text_pooling = BertTextPooling::Mean;
    let weights = SafetensorsWeights::open(&repo.weight_files().unwrap()).unwrap();
    let vb = weights.into_var_builder(DType::F32, &Device::Cpu);
    let model = zoo_models::dual_bert::VisionTextDualEncoderModel::new(&mean, vb).unwrap();
    let txt = model
        .get_text_features(&r["input_ids"], Some(&r["attention_mask"]))
        .unwrap();
    assert!(max_abs_diff(&l2_normalize(&txt).unwrap(), &r["text_embeds"]) > 1e-2);
}
