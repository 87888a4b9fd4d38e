//! Training readiness of the shared layers and the dual encoders: every trainable parameter
//! receives a non-zero gradient (Candle's fused ops silently drop them), and each layer's
//! backward agrees with central finite differences.

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use zoo_models::contrastive::{DualEncoder, DualEncoderConfig};
use zoo_models::layers::{
    Activation, AttentionConfig, AttentionMask, LayerNorm, MultiHeadAttention, PatchEmbedding,
    QkvLayout, RmsNorm, RotaryEmbedding,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Builds a model whose every weight is a `Var` initialised from the fixture checkpoint.
fn trainable(name: &str) -> (DualEncoder, VarMap) {
    let dir = fixture(name);
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().to_string();
            if file.starts_with("model") && file.ends_with(".safetensors") {
                for (k, t) in candle_core::safetensors::load(&path, &Device::Cpu).unwrap() {
                    data.insert(k, Var::from_tensor(&t).unwrap());
                }
            }
        }
    }
    let cfg = DualEncoderConfig::from_file(&dir.join("config.json")).unwrap();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    (DualEncoder::new(&cfg, vb).unwrap(), varmap)
}

fn assert_every_parameter_gets_gradient(name: &str, use_mask: bool) {
    let (model, varmap) = trainable(name);
    let r =
        candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    let mask = use_mask.then(|| r["attention_mask"].clone());
    let out = model
        .forward(&r["pixel_values"], &r["input_ids"], mask.as_ref())
        .unwrap();
    // A loss that depends on every logit with distinct weights.
    let (n, m) = out.logits_per_image.dims2().unwrap();
    let w = Tensor::arange(1f32, (n * m + 1) as f32, &Device::Cpu)
        .unwrap()
        .reshape((n, m))
        .unwrap();
    let loss = (out.logits_per_image * w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut missing = Vec::new();
    for (name, var) in data.iter() {
        let ok = grads
            .get(var.as_tensor())
            .map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            })
            .unwrap_or(false);
        if !ok {
            missing.push(name.clone());
        }
    }
    missing.sort();
    assert!(
        missing.is_empty(),
        "{name}: no gradient reached {missing:?}"
    );
    assert!(
        data.len() > 30,
        "{name}: only {} parameters were built",
        data.len()
    );
}

#[test]
fn every_clip_parameter_receives_a_gradient() {
    assert_every_parameter_gets_gradient("clip-tiny-argmax", true);
    assert_every_parameter_gets_gradient("clip-tiny-eos", true);
}

#[test]
fn every_siglip_parameter_receives_a_gradient() {
    assert_every_parameter_gets_gradient("siglip-tiny", false);
}

/// Compares the gradient of `sum(f(x) · r)` (fixed pseudo-random `r`) with central differences.
fn check_grad(name: &str, x: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
    let x = x.to_dtype(DType::F64).unwrap();
    let probe_shape = f(&x).shape().clone();
    let count = probe_shape.elem_count();
    let r: Vec<f64> = (0..count)
        .map(|i| ((i * 7919 % 13) as f64 - 6.0) / 6.0)
        .collect();
    let r = Tensor::from_vec(r, probe_shape, &Device::Cpu).unwrap();
    let loss = |x: &Tensor| (f(x) * &r).unwrap().sum_all().unwrap();

    let var = Var::from_tensor(&x).unwrap();
    let grads = loss(var.as_tensor()).backward().unwrap();
    let analytic: Vec<f64> = grads
        .get(var.as_tensor())
        .expect("no gradient")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();

    let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-6;
    for i in (0..flat.len()).step_by((flat.len() / 24).max(1)) {
        let eval = |delta: f64| {
            let mut v = flat.clone();
            v[i] += delta;
            let xt = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
            loss(&xt).to_scalar::<f64>().unwrap()
        };
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let diff = (numeric - analytic[i]).abs();
        assert!(
            diff < 1e-5 * (1.0 + numeric.abs()),
            "{name}: d/dx[{i}] analytic {} vs numeric {numeric}",
            analytic[i]
        );
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A small deterministic generator; candle's CPU RNG cannot be seeded.
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn vb_from(tensors: Vec<(&str, Tensor)>) -> VarBuilder<'static> {
    let map = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    VarBuilder::from_tensors(map, DType::F64, &Device::Cpu)
}

#[test]
fn activations_backward_matches_finite_differences() {
    let x = randn(&[4, 5], 1).affine(3.0, 0.1).unwrap();
    for act in [
        Activation::QuickGelu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Silu,
        Activation::Relu,
    ] {
        check_grad(&format!("{act:?}"), &x, |x| act.forward(x).unwrap());
    }
}

#[test]
fn norms_backward_matches_finite_differences() {
    let x = randn(&[3, 8], 2);
    let ln = LayerNorm::new(
        8,
        1e-5,
        vb_from(vec![("weight", randn(&[8], 3)), ("bias", randn(&[8], 4))]),
    )
    .unwrap();
    check_grad("layer_norm", &x, |x| ln.forward(x).unwrap());
    let rms = RmsNorm::new(8, 1e-6, vb_from(vec![("weight", randn(&[8], 5))])).unwrap();
    check_grad("rms_norm", &x, |x| rms.forward(x).unwrap());
}

#[test]
fn attention_with_masks_backward_matches_finite_differences() {
    let (d, heads) = (8, 2);
    for layout in [
        QkvLayout::QKV_PROJ,
        QkvLayout::Fused("qkv"),
        QkvLayout::InProj,
    ] {
        let mut ws = vec![
            ("out_proj.weight", randn(&[d, d], 10)),
            ("out_proj.bias", randn(&[d], 11)),
        ];
        match layout {
            QkvLayout::Separate { .. } => {
                for (i, n) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    ws.push((
                        Box::leak(format!("{n}.weight").into_boxed_str()),
                        randn(&[d, d], 20 + i as u64),
                    ));
                    ws.push((
                        Box::leak(format!("{n}.bias").into_boxed_str()),
                        randn(&[d], 30 + i as u64),
                    ));
                }
            }
            QkvLayout::Fused(_) => {
                ws.push(("qkv.weight", randn(&[3 * d, d], 40)));
                ws.push(("qkv.bias", randn(&[3 * d], 41)));
            }
            QkvLayout::InProj => {
                ws.push(("in_proj_weight", randn(&[3 * d, d], 50)));
                ws.push(("in_proj_bias", randn(&[3 * d], 51)));
            }
        }
        let cfg = AttentionConfig {
            layout,
            ..AttentionConfig::clip_style(d, heads)
        };
        let attn = MultiHeadAttention::new(&cfg, vb_from(ws)).unwrap();
        let x = randn(&[2, 5, d], 60);
        let am = Tensor::new(&[[1i64, 1, 1, 1, 0], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
        let mask = AttentionMask::causal(0).with_padding(Some(&am));
        check_grad(&format!("attention {layout:?}"), &x, |x| {
            attn.forward(x, &mask).unwrap()
        });
        let kv = randn(&[2, 3, d], 61);
        check_grad(&format!("cross attention {layout:?}"), &x, |x| {
            attn.forward_cross(x, &kv, &AttentionMask::none()).unwrap()
        });
    }
}

#[test]
fn rope_and_patch_embedding_backward_match_finite_differences() {
    let rope = RotaryEmbedding::new(8, 16, 10000.0, &Device::Cpu).unwrap();
    let pos = Tensor::new(&[0u32, 3, 5], &Device::Cpu).unwrap();
    check_grad("rope", &randn(&[1, 2, 3, 8], 70), |x| {
        rope.apply(x, &pos).unwrap()
    });

    let patch = PatchEmbedding::new(
        3,
        6,
        4,
        true,
        vb_from(vec![
            ("weight", randn(&[6, 3, 4, 4], 71)),
            ("bias", randn(&[6], 72)),
        ]),
    )
    .unwrap();
    // Non-square input whose width is not a multiple of the patch.
    check_grad("patch_embedding", &randn(&[2, 3, 8, 13], 73), |x| {
        patch.forward(x).unwrap()
    });
}
