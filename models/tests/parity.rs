//! HF parity: tiny random CLIP and SigLIP checkpoints made by `scripts/make_fixtures.py` with
//! transformers 4.57.1, compared on HF's own inputs (token ids and pixel values).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use zoo_models::contrastive::{l2_normalize, load_dual_encoder, DualEncoder};
use zoo_models::hub::ModelRepo;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn reference(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
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

fn load(name: &str) -> DualEncoder {
    let repo = ModelRepo::open(fixture(name).to_str().unwrap()).unwrap();
    load_dual_encoder(&repo, Some(DType::F32), &Device::Cpu)
        .unwrap()
        .model
}

/// Checks text features, image features, normalised embeddings and `logits_per_image`.
fn check_parity(name: &str, use_mask: bool) {
    let model = load(name);
    let r = reference(name);
    let mask = use_mask.then(|| r["attention_mask"].clone());
    let text = model.text_features(&r["input_ids"], mask.as_ref()).unwrap();
    let image = model.image_features(&r["pixel_values"]).unwrap();
    let d_text = max_abs_diff(&text, &r["text_features"]);
    let d_image = max_abs_diff(&image, &r["image_features"]);
    assert!(
        d_text < 1e-4,
        "{name}: text features differ from HF by {d_text}"
    );
    assert!(
        d_image < 1e-4,
        "{name}: image features differ from HF by {d_image}"
    );

    let out = model
        .forward(&r["pixel_values"], &r["input_ids"], mask.as_ref())
        .unwrap();
    for (ours, theirs) in [
        (&out.text_embeds, "text_embeds"),
        (&out.image_embeds, "image_embeds"),
        (&out.logits_per_image, "logits_per_image"),
    ] {
        let d = max_abs_diff(ours, &r[theirs]);
        assert!(d < 1e-4, "{name}: {theirs} differs from HF by {d}");
    }
    let renormed = l2_normalize(&text).unwrap();
    assert!(max_abs_diff(&renormed, &r["text_embeds"]) < 1e-4);
}

#[test]
fn clip_with_legacy_eos_pools_argmax_and_matches_hf() {
    check_parity("clip-tiny-argmax", true);
}

#[test]
fn clip_with_real_eos_pools_first_eos_and_matches_hf_from_shards() {
    // gelu, 48 px images, weights in four shards behind model.safetensors.index.json.
    check_parity("clip-tiny-eos", true);
}

#[test]
fn siglip_matches_hf_with_max_length_padding_and_no_mask() {
    check_parity("siglip-tiny", false);
}

#[test]
fn f16_inference_stays_close_to_f32() {
    let repo = ModelRepo::open(fixture("clip-tiny-argmax").to_str().unwrap()).unwrap();
    let half = load_dual_encoder(&repo, Some(DType::F16), &Device::Cpu)
        .unwrap()
        .model;
    let r = reference("clip-tiny-argmax");
    let pixels = r["pixel_values"].to_dtype(DType::F16).unwrap();
    let out = half
        .forward(&pixels, &r["input_ids"], Some(&r["attention_mask"]))
        .unwrap();
    let logits = out.logits_per_image.to_dtype(DType::F32).unwrap();
    let d = max_abs_diff(&logits, &r["logits_per_image"]);
    assert!(d < 0.05, "f16 logits differ from HF f32 by {d}");
}
