//! Our preprocessing against HF's PIL-based image processors (transformers 4.57.1, Pillow 13)
//! on real photos from scikit-image and on odd formats, from `scripts/make_fixtures.py`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use zoo_datasets::preprocess::{load_image, ImageProcessor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Mean and max absolute difference (normalised units) between ours and HF's for each image.
fn compare(processor: &str, images: &[&str]) -> Vec<(String, f32, f32)> {
    let dir = fixtures().join("preprocess").join(processor);
    let proc = ImageProcessor::from_file(&dir.join("preprocessor_config.json")).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    images
        .iter()
        .map(|name| {
            let img = load_image(&fixtures().join("images").join(name)).unwrap();
            let (values, h, w) = proc.preprocess(&img).unwrap();
            let ours = Tensor::from_vec(values, (3, h, w), &Device::Cpu).unwrap();
            let theirs = reference[*name].to_dtype(DType::F32).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "{processor}/{name}: shape");
            let diff = (ours - theirs).unwrap().abs().unwrap();
            let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
            let max = diff
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            (name.to_string(), mean, max)
        })
        .collect()
}

fn assert_close(processor: &str, images: &[&str], mean_tol: f32) {
    for (name, mean, max) in compare(processor, images) {
        eprintln!("{processor}/{name}: mean abs {mean:.2e}, max abs {max:.2e}");
        assert!(
            mean < mean_tol,
            "{processor}/{name}: mean abs diff {mean} (max {max})"
        );
    }
}

#[test]
fn clip_bicubic_shortest_edge_and_center_crop_match_hf_on_real_photos() {
    // astronaut is 512x512, chelsea 451x300: both a square and a non-square downscale.
    assert_close("clip224", &["astronaut.png", "chelsea.png"], 0.01);
}

#[test]
fn siglip_exact_resize_matches_hf_on_real_photos() {
    assert_close("siglip224", &["astronaut.png", "chelsea.png"], 0.01);
}

#[test]
fn bilinear_with_non_square_crop_matches_hf() {
    assert_close("bilinear", &["astronaut.png", "chelsea.png"], 0.01);
}

#[test]
fn upscaling_grayscale_rgba_and_cmyk_inputs_match_hf() {
    // small.png is 90x60 and is upscaled to 224; gray/rgba/cmyk are derived from it.
    assert_close(
        "clip224",
        &["small.png", "gray.png", "rgba.png", "cmyk.jpg"],
        0.01,
    );
}

#[test]
fn sixteen_bit_png_is_scaled_not_clipped() {
    // Pillow clips 16-bit gray to 255 when converting to RGB; we scale, so a 16-bit image
    // preprocesses like its 8-bit source (gray16 = gray8 * 257).
    let proc =
        ImageProcessor::from_file(&fixtures().join("preprocess/clip224/preprocessor_config.json"))
            .unwrap();
    let eight = proc
        .preprocess(&load_image(&fixtures().join("images/gray.png")).unwrap())
        .unwrap()
        .0;
    let sixteen = proc
        .preprocess(&load_image(&fixtures().join("images/gray16.png")).unwrap())
        .unwrap()
        .0;
    let max = eight
        .iter()
        .zip(&sixteen)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-6, "16-bit and 8-bit differ by {max}");
}

#[test]
fn undecodable_image_error_names_the_file() {
    let path = fixtures().join("images/broken.png");
    let err = load_image(&path).unwrap_err().to_string();
    assert!(err.contains("broken.png"), "{err}");
    let missing = load_image(&fixtures().join("images/nope.png"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope.png"), "{missing}");
}
