//! The fused attention kernel against the naive one: outputs within 1e-5 and gradients within
//! float rounding, over causal (with and without a cache offset) and padding masks, rows that
//! see no key, grouped-query attention, head widths up to 256, block-straddling lengths, and
//! f16; gradients also against central finite differences. Then the backend switch inside the
//! models.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zoo_models::layers::{
    attention_backend, fused_attention, naive_attention, set_attention_backend, AttentionBackend,
    AttentionConfig, AttentionMask, KeyVisibility, MultiHeadAttention,
};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
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

/// One attention problem.
#[derive(Clone)]
struct Case {
    name: &'static str,
    b: usize,
    h: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    d: usize,
    causal: Option<usize>,
    /// Kept keys per batch row: `(first, last)` exclusive, the rest padding.
    keep: Option<Vec<(usize, usize)>>,
}

impl Case {
    fn keep_tensor(&self) -> Option<Tensor> {
        self.keep.as_ref().map(|rows| {
            let data: Vec<u32> = rows
                .iter()
                .flat_map(|&(a, z)| (0..self.lk).map(move |j| u32::from(a <= j && j < z)))
                .collect();
            Tensor::from_vec(data, (self.b, self.lk), &Device::Cpu).unwrap()
        })
    }

    fn mask(&self) -> AttentionMask {
        let mask = match self.causal {
            Some(offset) => AttentionMask::causal(offset),
            None => AttentionMask::none(),
        };
        mask.with_padding(self.keep_tensor().as_ref())
    }

    fn visibility(&self) -> KeyVisibility {
        KeyVisibility {
            causal_offset: self.causal,
            keep: self.keep_tensor().map(|t| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<u32>()
                    .unwrap()
                    .into_iter()
                    .map(|x| x != 0)
                    .collect()
            }),
            tree: None,
        }
    }

    fn inputs(&self, seed: u64) -> (Tensor, Tensor, Tensor) {
        (
            randn(&[self.b, self.h, self.lq, self.d], seed),
            randn(&[self.b, self.hkv, self.lk, self.d], seed + 1),
            randn(&[self.b, self.hkv, self.lk, self.d], seed + 2),
        )
    }

    /// `[B, Lq]`: 1 for a query that sees at least one key, 0 for a blind one. Blind rows'
    /// outputs do not depend on q or k, but the naive path's autograd gives them gradients
    /// through the masked scores, so the comparisons with it leave those rows out of the loss.
    fn seeing(&self) -> Tensor {
        let vis = self.visibility();
        let data: Vec<f32> = (0..self.b)
            .flat_map(|b| {
                let vis = &vis;
                (0..self.lq).map(move |i| {
                    let limit = vis
                        .causal_offset
                        .map_or(self.lk, |o| (o + i + 1).min(self.lk));
                    let sees =
                        (0..limit).any(|j| vis.keep.as_ref().is_none_or(|k| k[b * self.lk + j]));
                    f32::from(u8::from(sees))
                })
            })
            .collect();
        Tensor::from_vec(data, (self.b, self.lq), &Device::Cpu).unwrap()
    }

    fn scale(&self) -> f64 {
        (self.d as f64).powf(-0.5)
    }
}

fn cases() -> Vec<Case> {
    let base = Case {
        name: "plain",
        b: 2,
        h: 2,
        hkv: 2,
        lq: 37,
        lk: 37,
        d: 16,
        causal: None,
        keep: None,
    };
    vec![
        base.clone(),
        Case {
            name: "causal, two query and three key blocks",
            lq: 150,
            lk: 150,
            d: 32,
            causal: Some(0),
            b: 1,
            ..base.clone()
        },
        Case {
            name: "causal after 130 cached tokens (decoding)",
            lq: 5,
            lk: 135,
            causal: Some(130),
            ..base.clone()
        },
        Case {
            name: "cross-attention, more keys than queries",
            lq: 9,
            lk: 200,
            d: 64,
            ..base.clone()
        },
        Case {
            name: "right padding",
            keep: Some(vec![(0, 30), (0, 11)]),
            ..base.clone()
        },
        Case {
            name: "left padding under a causal mask (blind rows)",
            causal: Some(0),
            keep: Some(vec![(0, 37), (6, 37)]),
            ..base.clone()
        },
        Case {
            name: "a fully padded row",
            keep: Some(vec![(0, 37), (0, 0)]),
            ..base.clone()
        },
        Case {
            name: "grouped-query, 6 heads over 2",
            h: 6,
            hkv: 2,
            lq: 70,
            lk: 70,
            causal: Some(0),
            ..base.clone()
        },
        Case {
            name: "multi-query, 4 heads over 1",
            h: 4,
            hkv: 1,
            ..base.clone()
        },
        Case {
            name: "head width 80",
            d: 80,
            causal: Some(0),
            ..base.clone()
        },
        Case {
            name: "head width 256",
            d: 256,
            b: 1,
            lq: 20,
            lk: 140,
            ..base.clone()
        },
    ]
}

#[test]
fn forward_matches_naive_within_1e_5() {
    for (i, case) in cases().iter().enumerate() {
        let (q, k, v) = case.inputs(10 * i as u64);
        let fused = fused_attention(&q, &k, &v, case.scale(), case.visibility()).unwrap();
        let naive = naive_attention(&q, &k, &v, case.scale(), &case.mask()).unwrap();
        assert_eq!(fused.dims(), naive.dims(), "{}", case.name);
        let diff = max_abs_diff(&fused, &naive);
        assert!(diff < 1e-5, "{}: max |fused - naive| = {diff:e}", case.name);
    }
}

/// `Σ out ∘ w` for fixed random `w`, so every output element carries a distinct gradient.
fn weighted_sum(out: &Tensor, seed: u64) -> Tensor {
    weighted_sum_over(out, seed, None)
}

/// [`weighted_sum`] with `w` zero on the query rows where `rows` `[B, Lq]` is 0.
fn weighted_sum_over(out: &Tensor, seed: u64, rows: Option<&Tensor>) -> Tensor {
    let mut w = randn(out.dims(), seed);
    if let Some(rows) = rows {
        let (b, lq) = rows.dims2().unwrap();
        w = w
            .broadcast_mul(&rows.reshape((b, 1, lq, 1)).unwrap())
            .unwrap();
    }
    let w = w.to_dtype(out.dtype()).unwrap();
    (out * w)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
}

type Grads = (Tensor, Tensor, Tensor);

fn gradients(
    (q, k, v): &(Tensor, Tensor, Tensor),
    rows: Option<&Tensor>,
    attend: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
) -> Grads {
    let (q, k, v) = (
        Var::from_tensor(q).unwrap(),
        Var::from_tensor(k).unwrap(),
        Var::from_tensor(v).unwrap(),
    );
    let loss = weighted_sum_over(&attend(&q, &k, &v), 99, rows);
    let g = loss.backward().unwrap();
    let get = |x: &Var| g.get(x).expect("a gradient").clone();
    (get(&q), get(&k), get(&v))
}

#[test]
fn backward_matches_naive_autograd() {
    for (i, case) in cases().iter().enumerate() {
        let inputs = case.inputs(10 * i as u64 + 3);
        let rows = case.seeing();
        let fused = gradients(&inputs, Some(&rows), |q, k, v| {
            fused_attention(q, k, v, case.scale(), case.visibility()).unwrap()
        });
        let naive = gradients(&inputs, Some(&rows), |q, k, v| {
            naive_attention(q, k, v, case.scale(), &case.mask()).unwrap()
        });
        for (what, a, b) in [
            ("dq", &fused.0, &naive.0),
            ("dk", &fused.1, &naive.1),
            ("dv", &fused.2, &naive.2),
        ] {
            assert_eq!(a.dims(), b.dims());
            let diff = max_abs_diff(a, b);
            assert!(
                diff < 2e-5,
                "{} {what}: max |fused - naive| = {diff:e}",
                case.name
            );
        }
    }
}

/// Central differences of the loss in f64 arithmetic over f32 inputs, at a few coordinates of
/// each input, with blind rows (left padding under the causal mask) in the loss.
#[test]
fn backward_matches_finite_differences() {
    let case = Case {
        name: "causal, grouped-query, padded",
        b: 2,
        h: 4,
        hkv: 2,
        lq: 19,
        lk: 19,
        d: 8,
        causal: Some(0),
        keep: Some(vec![(0, 19), (3, 19)]),
    };
    let inputs = case.inputs(7);
    let (dq, dk, dv) = gradients(&inputs, None, |q, k, v| {
        fused_attention(q, k, v, case.scale(), case.visibility()).unwrap()
    });
    let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
        let out = fused_attention(q, k, v, case.scale(), case.visibility()).unwrap();
        let w = randn(out.dims(), 99);
        (out.to_dtype(DType::F64).unwrap() * w.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let eps = 1e-2f32;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
        let base = [&inputs.0, &inputs.1, &inputs.2][which];
        let flat = base.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let analytic = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for _ in 0..12 {
            let at = rng.random_range(0..flat.len());
            let shifted = |delta: f32| {
                let mut x = flat.clone();
                x[at] += delta;
                let x = Tensor::from_vec(x, base.dims(), &Device::Cpu).unwrap();
                let mut args = [inputs.0.clone(), inputs.1.clone(), inputs.2.clone()];
                args[which] = x;
                loss(&args[0], &args[1], &args[2])
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * f64::from(eps));
            let err = (numeric - f64::from(analytic[at])).abs();
            assert!(
                err < 2e-3 * (1.0 + numeric.abs()),
                "input {which} at {at}: analytic {} numeric {numeric}",
                analytic[at]
            );
        }
    }
}

#[test]
fn f16_matches_naive_in_f32() {
    for (i, case) in cases().iter().enumerate().take(8) {
        let (q, k, v) = case.inputs(10 * i as u64 + 5);
        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let (qh, kh, vh) = (half(&q), half(&k), half(&v));
        let up = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let fused = fused_attention(&qh, &kh, &vh, case.scale(), case.visibility()).unwrap();
        assert_eq!(fused.dtype(), DType::F16);
        // The reference: naive attention in f32 on the same (rounded) inputs.
        let naive =
            naive_attention(&up(&qh), &up(&kh), &up(&vh), case.scale(), &case.mask()).unwrap();
        let diff = max_abs_diff(&fused, &naive);
        assert!(diff < 1e-3, "{}: f16 max diff {diff:e}", case.name);
        let rows = case.seeing();
        let fused_g = gradients(
            &(qh.clone(), kh.clone(), vh.clone()),
            Some(&rows),
            |q, k, v| fused_attention(q, k, v, case.scale(), case.visibility()).unwrap(),
        );
        let naive_g = gradients(&(up(&qh), up(&kh), up(&vh)), Some(&rows), |q, k, v| {
            naive_attention(q, k, v, case.scale(), &case.mask()).unwrap()
        });
        for (a, b) in [
            (&fused_g.0, &naive_g.0),
            (&fused_g.1, &naive_g.1),
            (&fused_g.2, &naive_g.2),
        ] {
            assert_eq!(a.dtype(), DType::F16);
            let diff = max_abs_diff(a, b);
            assert!(diff < 5e-3, "{}: f16 gradient diff {diff:e}", case.name);
        }
    }
}

#[test]
fn unsupported_inputs_are_errors() {
    let q = randn(&[1, 3, 4, 8], 1);
    let k = randn(&[1, 2, 4, 8], 2);
    let err = fused_attention(&q, &k, &k, 1.0, KeyVisibility::default()).unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
    let wide = randn(&[1, 1, 4, 300], 3);
    assert!(fused_attention(&wide, &wide, &wide, 1.0, KeyVisibility::default()).is_err());
    // No keys at all: a zero output, as softmax over nothing times nothing.
    let none = Tensor::zeros((1, 1, 0, 8), DType::F32, &Device::Cpu).unwrap();
    let q3 = randn(&[1, 1, 3, 8], 5);
    let out = fused_attention(&q3, &none, &none, 1.0, KeyVisibility::default()).unwrap();
    assert_eq!(out.dims(), [1, 1, 3, 8]);
    assert_eq!(max_abs_diff(&out, &q3.zeros_like().unwrap()), 0.0);
    let f64q = randn(&[1, 1, 4, 8], 4).to_dtype(DType::F64).unwrap();
    let err = fused_attention(&f64q, &f64q, &f64q, 1.0, KeyVisibility::default()).unwrap_err();
    assert!(err.to_string().contains("f32 or f16"), "{err}");
}

/// The process-wide switch routes a model's attention through the fused kernel: the same module
/// gives the same outputs and input gradients under both backends. (The only test in this
/// binary that touches the switch.)
#[test]
fn backend_switch_reaches_the_shared_attention_layer() {
    assert_eq!(attention_backend(), AttentionBackend::Auto);
    let d = 32;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut weights = std::collections::HashMap::new();
    for name in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        let w: Vec<f32> = (0..d * d).map(|_| rng.random_range(-0.3..0.3)).collect();
        weights.insert(
            format!("{name}.weight"),
            Tensor::from_vec(w, (d, d), &Device::Cpu).unwrap(),
        );
        weights.insert(format!("{name}.bias"), randn(&[d], 4));
    }
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let attn = MultiHeadAttention::new(&AttentionConfig::clip_style(d, 4), vb).unwrap();
    let x = randn(&[2, 40, d], 8);
    let keep: Vec<u32> = (0..80).map(|i| u32::from(i < 40 || i - 40 < 29)).collect();
    let am = Tensor::from_vec(keep, (2, 40), &Device::Cpu).unwrap();
    let mask = AttentionMask::causal(0).with_padding(Some(&am));
    let run = |backend| {
        set_attention_backend(backend);
        let xv = Var::from_tensor(&x).unwrap();
        let out = attn.forward(&xv, &mask).unwrap();
        let g = weighted_sum(&out, 1).backward().unwrap();
        (out, g.get(&xv).unwrap().clone())
    };
    let (naive, naive_dx) = run(AttentionBackend::Naive);
    let (fused, fused_dx) = run(AttentionBackend::Fused);
    set_attention_backend(AttentionBackend::Auto);
    assert!(max_abs_diff(&naive, &fused) < 1e-5);
    assert!(max_abs_diff(&naive_dx, &fused_dx) < 1e-5);
    assert!("fused".parse::<AttentionBackend>().unwrap() == AttentionBackend::Fused);
    assert!("flash".parse::<AttentionBackend>().is_err());
}
