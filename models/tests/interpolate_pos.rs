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

#[test]
fn clip_vision_matches_hf_at_other_image_sizes() {
    let r = reference();
    let DualEncoder::Clip(model) =
        load_dual_encoder(&repo("clip-tiny-eos"), Some(DType::F32), &Device::Cpu)
            .unwrap()
            .model
    else {
        panic!("clip-tiny-eos is a CLIP");
    };
    for size in ["64x64", "48x80", "48x48"] {
        let key = format!("clip-tiny-eos.{size}");
        let pixels = &r[&format!("{key}.pixel_values")];
        let v = &model.vision_model;
        check(
            &r,
            &key,
            v.last_hidden_state(pixels).unwrap(),
            Some(v.pooled_output(pixels).unwrap()),
        );
    }
}

#[test]
fn siglip_vision_matches_hf_at_other_image_sizes() {
    let r = reference();
    let DualEncoder::Siglip(model) =
        load_dual_encoder(&repo("siglip-tiny"), Some(DType::F32), &Device::Cpu)
            .unwrap()
            .model
    else {
        panic!("siglip-tiny is a SigLIP");
    };
    for size in ["48x48", "24x40", "32x32"] {
        let key = format!("siglip-tiny.{size}");
        let pixels = &r[&format!("{key}.pixel_values")];
        let v = &model.vision_model;
        check(
            &r,
            &key,
            v.last_hidden_state(pixels).unwrap(),
            Some(v.pooled_output(pixels).unwrap()),
        );
    }
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
