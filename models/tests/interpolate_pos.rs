//! Vision towers on images of another size than the checkpoint's: the learned position table
//! is resized bicubically as HF's `interpolate_pos_encoding=True` does, and the outputs match HF
//! (`scripts/make_interpolation_fixtures.py`, transformers 4.57.1) for CLIP, SigLIP and BLIP at
//! larger, smaller non-square and the trained sizes.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use zoo_models::blip::BlipForConditionalGeneration;
use zoo_models::contrastive::{load_dual_encoder, DualEncoder};
use zoo_models::hub::ModelRepo;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("interpolate_pos.safetensors"), &Device::Cpu)
        .unwrap()
}

fn repo(name: &str) -> ModelRepo {
    ModelRepo::open(&fixtures().join(name).to_string_lossy()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn check(r: &HashMap<String, Tensor>, key: &str, hidden: Tensor, pooled: Option<Tensor>) {
    let d = max_diff(&hidden, &r[&format!("{key}.last_hidden_state")]);
    assert!(d < 1e-4, "{key}: last_hidden_state differs by {d}");
    if let Some(pooled) = pooled {
        let d = max_diff(&pooled, &r[&format!("{key}.pooler_output")]);
        assert!(d < 1e-4, "{key}: pooler_output differs by {d}");
    }
}

/// A CLIP or SigLIP fixture's vision tower (hidden states and pooled output) at `sizes`.
fn check_dual_encoder(name: &str, sizes: &[&str]) {
    let r = reference();
    let model = load_dual_encoder(&repo(name), Some(DType::F32), &Device::Cpu)
        .unwrap()
        .model;
    for size in sizes {
        let key = format!("{name}.{size}");
        let pixels = &r[&format!("{key}.pixel_values")];
        let (hidden, pooled) = match &model {
            DualEncoder::Clip(m) => (
                m.vision_model.last_hidden_state(pixels),
                m.vision_model.pooled_output(pixels),
            ),
            DualEncoder::Siglip(m) => (
                m.vision_model.last_hidden_state(pixels),
                m.vision_model.pooled_output(pixels),
            ),
            DualEncoder::VisionText(_) => panic!("{name} is not CLIP or SigLIP"),
        };
        check(&r, &key, hidden.unwrap(), Some(pooled.unwrap()));
    }
}

#[test]
fn clip_vision_matches_hf_at_other_image_sizes() {
    check_dual_encoder("clip-tiny-eos", &["64x64", "48x80", "48x48"]);
}

#[test]
fn siglip_vision_matches_hf_at_other_image_sizes() {
    check_dual_encoder("siglip-tiny", &["48x48", "24x40", "32x32"]);
}

#[test]
fn blip_vision_matches_hf_at_other_image_sizes() {
    let r = reference();
    let model = BlipForConditionalGeneration::load(
        &repo("blip-tiny-caption"),
        Some(DType::F32),
        &Device::Cpu,
    )
    .unwrap();
    for size in ["48x48", "40x24", "32x32"] {
        let key = format!("blip-tiny-caption.{size}");
        let pixels = &r[&format!("{key}.pixel_values")];
        check(&r, &key, model.vision_model.forward(pixels).unwrap(), None);
    }
}
