//! The contrastive losses against open_clip's `ClipLoss` / `SigLipLoss` (values and gradients,
//! from `scripts/make_loss_fixtures.py`), and the chunked SigLIP loss against the full one.

use candle_core::{DType, Device, Tensor, Var};
use zoo_trainers::loss::{clip_loss, log_sigmoid, siglip_loss, siglip_loss_chunked};

fn reference() -> std::collections::HashMap<String, Tensor> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/losses.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.flatten_all().unwrap() - b.flatten_all().unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn scalar(v: f64) -> Var {
    Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn clip_loss_and_gradients_match_open_clip() {
    let r = reference();
    let img = Var::from_tensor(&r["image_embeds"]).unwrap();
    let txt = Var::from_tensor(&r["text_embeds"]).unwrap();
    let scale = scalar(2.659260036932778);
    let loss = clip_loss(&img, &txt, &scale).unwrap();
    assert!(max_abs(&loss, &r["clip_loss"]) < 1e-10);
    let g = loss.backward().unwrap();
    assert!(max_abs(g.get(&img).unwrap(), &r["clip_grad_image"]) < 1e-10);
    assert!(max_abs(g.get(&txt).unwrap(), &r["clip_grad_text"]) < 1e-10);
    assert!(max_abs(g.get(&scale).unwrap(), &r["clip_grad_scale"]) < 1e-10);
}

#[test]
fn siglip_loss_and_gradients_match_open_clip() {
    let r = reference();
    let img = Var::from_tensor(&r["image_embeds"]).unwrap();
    let txt = Var::from_tensor(&r["text_embeds"]).unwrap();
    let (scale, bias) = (scalar(std::f64::consts::LN_10), scalar(-2.0));
    let loss = siglip_loss(&img, &txt, &scale, &bias).unwrap();
    assert!(max_abs(&loss, &r["siglip_loss"]) < 1e-10, "{loss}");
    let g = loss.backward().unwrap();
    assert!(max_abs(g.get(&img).unwrap(), &r["siglip_grad_image"]) < 1e-10);
    assert!(max_abs(g.get(&txt).unwrap(), &r["siglip_grad_text"]) < 1e-10);
    assert!(max_abs(g.get(&scale).unwrap(), &r["siglip_grad_scale"]) < 1e-10);
    assert!(max_abs(g.get(&bias).unwrap(), &r["siglip_grad_bias"]) < 1e-10);
}

#[test]
fn chunked_siglip_loss_equals_the_full_loss_in_value_and_gradient() {
    let r = reference();
    let img = Var::from_tensor(&r["image_embeds"]).unwrap();
    let txt = Var::from_tensor(&r["text_embeds"]).unwrap();
    let (scale, bias) = (scalar(2.3), scalar(-2.0));
    let full = siglip_loss(&img, &txt, &scale, &bias).unwrap();
    let gf = full.backward().unwrap();
    for chunk in [1, 4, 6, 100] {
        let part = siglip_loss_chunked(&img, &txt, &scale, &bias, chunk).unwrap();
        assert!(max_abs(&part, &full) < 1e-12, "chunk {chunk}");
        let gp = part.backward().unwrap();
        for v in [&img, &txt, &scale, &bias] {
            assert!(
                max_abs(gp.get(v).unwrap(), gf.get(v).unwrap()) < 1e-12,
                "chunk {chunk}"
            );
        }
    }
}

#[test]
fn log_sigmoid_is_finite_for_extreme_logits() {
    let x = Tensor::new(&[-1000f32, -30.0, 0.0, 30.0, 1000.0], &Device::Cpu).unwrap();
    let y: Vec<f32> = log_sigmoid(&x).unwrap().to_vec1().unwrap();
    assert_eq!(y[0], -1000.0);
    assert!((y[2] + std::f32::consts::LN_2).abs() < 1e-6);
    assert!(y[4] == 0.0 && y.iter().all(|v| v.is_finite()));
    let v = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
    let g: Vec<f64> = log_sigmoid(&v)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(&v)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(g.iter().all(|v| v.is_finite()) && (g[0] - 1.0).abs() < 1e-12 && g[4].abs() < 1e-12);
}

/// `scored_cross_entropy` over logits of a draft vocabulary (the first C tokens): rows whose
/// target lies outside it do not count, weights pick the rest, and with every target inside
/// and no weights it is the plain mean.
#[test]
fn scored_cross_entropy_leaves_out_targets_outside_the_scored_tokens() {
    use zoo_trainers::loss::{cross_entropy, scored_cross_entropy, weighted_cross_entropy};
    let dev = Device::Cpu;
    let logits = Tensor::new(
        &[
            [0.5f32, -1.0, 2.0],
            [1.5, 0.25, -0.5],
            [-2.0, 1.0, 0.0],
            [0.0, 3.0, 1.0],
        ],
        &dev,
    )
    .unwrap();
    let scalar = |t: Tensor| t.to_scalar::<f32>().unwrap();
    let inside = Tensor::new(&[2u32, 0, 1, 1], &dev).unwrap();
    assert_eq!(
        scalar(scored_cross_entropy(&logits, &inside, None).unwrap()),
        scalar(cross_entropy(&logits, &inside).unwrap())
    );
    // Targets 3 and 7 are outside the 3 scored tokens: rows 1 and 3 drop out.
    let mixed = Tensor::new(&[2u32, 7, 1, 3], &dev).unwrap();
    let rows = Tensor::new(&[0u32, 2], &dev).unwrap();
    let kept = logits.index_select(&rows, 0).unwrap();
    let want = scalar(cross_entropy(&kept, &Tensor::new(&[2u32, 1], &dev).unwrap()).unwrap());
    let got = scalar(scored_cross_entropy(&logits, &mixed, None).unwrap());
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // Weights drop row 0 as well: row 2 alone.
    let w = Tensor::new(&[0f32, 1.0, 1.0, 1.0], &dev).unwrap();
    let want = scalar(
        weighted_cross_entropy(
            &logits,
            &Tensor::new(&[2u32, 0, 1, 0], &dev).unwrap(),
            &Tensor::new(&[0f32, 0.0, 1.0, 0.0], &dev).unwrap(),
        )
        .unwrap(),
    );
    let got = scalar(scored_cross_entropy(&logits, &mixed, Some(&w)).unwrap());
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
}
