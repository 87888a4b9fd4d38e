//! Interpolation and pixel (un)shuffle against PyTorch (`scripts/make_resample_fixtures.py`,
//! torch 2.15, f64): `F.interpolate` outputs and input gradients for nearest, bilinear and
//! bicubic, `align_corners` both ways, sizes up, down, mixed, equal and 1×1; and
//! `pixel_shuffle` / `pixel_unshuffle`, which invert each other.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use zoo_models::layers::{interpolate, pixel_shuffle, pixel_unshuffle, Interpolation};

fn fixture() -> HashMap<String, Tensor> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/resample.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn interpolation_and_its_gradient_match_pytorch() {
    let f = fixture();
    let modes = [
        ("nearest", Interpolation::Nearest),
        (
            "bilinear.centers",
            Interpolation::Bilinear {
                align_corners: false,
            },
        ),
        (
            "bilinear.corners",
            Interpolation::Bilinear {
                align_corners: true,
            },
        ),
        (
            "bicubic.centers",
            Interpolation::Bicubic {
                align_corners: false,
            },
        ),
        (
            "bicubic.corners",
            Interpolation::Bicubic {
                align_corners: true,
            },
        ),
    ];
    for (name, mode) in modes {
        for size in ["up", "down", "mixed", "same", "one"] {
            let key = format!("{name}.{size}");
            let want = &f[&format!("{key}.out")];
            let (_, _, h, w) = want.dims4().unwrap();
            let x = Var::from_tensor(&f["x"]).unwrap();
            let y = interpolate(x.as_tensor(), h, w, mode).unwrap();
            let d = max_diff(&y, want);
            assert!(d < 1e-12, "{key}: output differs by {d}");
            let grads = (y * &f[&format!("{key}.upstream")])
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let d = max_diff(
                grads.get(x.as_tensor()).unwrap(),
                &f[&format!("{key}.grad")],
            );
            assert!(d < 1e-12, "{key}: gradient differs by {d}");
        }
    }
}

#[test]
fn pixel_shuffle_and_unshuffle_match_pytorch_and_invert_each_other() {
    let f = fixture();
    let s = pixel_shuffle(&f["shuffle.in"], 2).unwrap();
    assert_eq!(max_diff(&s, &f["shuffle.out"]), 0.0);
    let u = pixel_unshuffle(&f["unshuffle.in"], 2).unwrap();
    assert_eq!(max_diff(&u, &f["unshuffle.out"]), 0.0);
    let back = pixel_shuffle(&u, 2).unwrap();
    assert_eq!(max_diff(&back, &f["unshuffle.in"]), 0.0);
    assert!(pixel_shuffle(&f["unshuffle.in"], 3).is_err());
    assert!(pixel_unshuffle(&f["shuffle.in"], 5).is_err());
}
