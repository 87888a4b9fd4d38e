//! AdamW with f32 state that can be saved and restored, open_clip's weight-decay exclusions,
//! the cosine schedule with linear warmup, and gradient clipping by global norm.
//!
//! candle-nn's AdamW has no parameter groups, no clipping and private state (CANDLE_NOTES.md).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

/// Hyper-parameters, named as open_clip's flags.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// open_clip's defaults for ViT models.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
        }
    }
}

/// Whether a parameter is exempt from weight decay, as open_clip's `exclude`: anything of rank
/// < 2 (biases, norm gains, class embeddings, `logit_scale`, `logit_bias`), and embedding tables.
/// The patch embedding is a linear projection, so it keeps its decay.
pub fn exempt_from_decay(name: &str, rank: usize) -> bool {
    rank < 2
        || name.contains("logit_")
        || (name.contains("embedding") && !name.contains("patch_embedding"))
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    /// Multiplies the learning rate (PyTorch's per-group `lr`).
    lr_scale: f64,
    /// Updates this parameter has had (PyTorch's per-parameter `step`): one that gets no
    /// gradient for a while (a frozen warm-up stage) starts its bias correction when it does.
    steps: u64,
    m: Tensor,
    v: Tensor,
}

/// AdamW (Loshchilov & Hutter 2019) with decoupled weight decay, in PyTorch's formulation.
pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    step: u64,
}

impl AdamW {
    /// Optimises `vars` (name → variable); state starts at zero.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                // Separate buffers: the CPU step updates them in place.
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                Ok(Param {
                    decay: !exempt_from_decay(&name, var.rank()),
                    lr_scale: 1.0,
                    steps: 0,
                    name,
                    m: zeros()?,
                    v: zeros()?,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            config,
            step: 0,
        })
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Multiplies each parameter's learning rate by `scale(name)` (parameter groups with their
    /// own `lr`, as Medusa-2 gives its heads).
    pub fn scale_lr(&mut self, scale: impl Fn(&str) -> f64) {
        for p in &mut self.params {
            p.lr_scale = scale(&p.name);
        }
    }

    /// Names of the parameters that get weight decay.
    pub fn decayed(&self) -> Vec<&str> {
        self.params
            .iter()
            .filter(|p| p.decay)
            .map(|p| p.name.as_str())
            .collect()
    }

    /// One update with learning rate `lr` from (already clipped) gradients. Parameters
    /// without a gradient are left alone, moments and step count included.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            p.steps += 1;
            let t = p.steps as i32;
            let bc1 = 1.0 - c.beta1.powi(t);
            let bc2 = 1.0 - c.beta2.powi(t);
            let lr = lr * p.lr_scale;
            let decay = if p.decay { c.weight_decay } else { 0.0 };
            if fused::applies(&p.var, &p.m, &p.v, g) {
                fused::step(
                    p,
                    g,
                    fused::Hyper {
                        lr,
                        decay,
                        bc1,
                        bc2,
                        c,
                    },
                )?;
                continue;
            }
            let g = g.to_dtype(DType::F32)?;
            p.m = ((&p.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&p.m / bc1)? / ((&p.v / bc2)?.sqrt()? + c.eps)?)?;
            let mut w = p.var.as_tensor().to_dtype(DType::F32)?;
            if p.decay && c.weight_decay > 0.0 {
                w = (&w * (1.0 - lr * c.weight_decay))?;
            }
            let w = (w - (update * lr)?)?;
            p.var.set(&w.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// The moments and step counts as named tensors, for a checkpoint (copies: the CPU step
    /// updates the moments in place).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("exp_avg.{}", p.name), p.m.copy()?);
            out.insert(format!("exp_avg_sq.{}", p.name), p.v.copy()?);
            out.insert(
                format!("step.{}", p.name),
                Tensor::new(&[p.steps as i64], p.var.device())?,
            );
        }
        out.insert(
            "step".into(),
            Tensor::new(
                &[self.step as i64],
                self.params
                    .first()
                    .map_or(&candle_core::Device::Cpu, |p| p.var.device()),
            )?,
        );
        Ok(out)
    }

    /// Restores what [`state_tensors`](Self::state_tensors) saved.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for p in &mut self.params {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks `{k}`")))
            };
            let (m, v) = (
                get(format!("exp_avg.{}", p.name))?,
                get(format!("exp_avg_sq.{}", p.name))?,
            );
            if m.shape() != p.var.shape() {
                candle_core::bail!(
                    "optimizer state for `{}` has shape {:?}, the model {:?}",
                    p.name,
                    m.dims(),
                    p.var.dims()
                );
            }
            // Own copies: the CPU step updates them in place.
            p.m = m.to_device(p.var.device())?.copy()?;
            p.v = v.to_device(p.var.device())?.copy()?;
        }
        let count =
            |t: &Tensor| -> Result<u64> { Ok(t.flatten_all()?.to_vec1::<i64>()?[0] as u64) };
        let step = state
            .get("step")
            .ok_or_else(|| candle_core::Error::Msg("optimizer state lacks `step`".into()))?;
        self.step = count(step)?;
        for p in &mut self.params {
            // Checkpoints from before per-parameter counts: every parameter took every step.
            p.steps = match state.get(&format!("step.{}", p.name)) {
                Some(t) => count(t)?,
                None => self.step,
            };
        }
        Ok(())
    }
}

/// The AdamW update on the CPU as three in-place passes over contiguous f32 buffers, in
/// parallel: `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, then
/// `w ← w(1 − lr·λ) − lr·(m/bc₁)/(√(v/bc₂) + ε)`, the same arithmetic as the tensor-op path
/// (which runs elsewhere). The tensor ops allocated a fresh tensor per operation, about fifteen
/// full passes over every parameter per step, several of them single-threaded.
mod fused {
    use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
    use rayon::prelude::*;

    use super::{AdamWConfig, Param};

    const CHUNK: usize = 1 << 14;

    pub(super) struct Hyper {
        pub lr: f64,
        pub decay: f64,
        pub bc1: f64,
        pub bc2: f64,
        pub c: AdamWConfig,
    }

    pub(super) fn applies(var: &Var, m: &Tensor, v: &Tensor, g: &Tensor) -> bool {
        [var.as_tensor(), m, v, g]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
            && g.shape() == var.shape()
    }

    fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(x), Some((a, b))) => Ok(&x[a..b]),
            _ => candle_core::bail!("adamw: a contiguous f32 buffer was expected"),
        }
    }

    fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(x), Some((a, b))) => Ok(&mut x[a..b]),
            _ => candle_core::bail!("adamw: a contiguous f32 buffer was expected"),
        }
    }

    /// `x ← βx + (1−β)·g^power`.
    struct Moment {
        beta: f32,
        square: bool,
    }

    impl InplaceOp2 for Moment {
        fn name(&self) -> &'static str {
            "adamw-moment"
        }
        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<()> {
            let (x, g) = (slice_mut(s1, l1)?, slice(s2, l2)?);
            let (b, a) = (self.beta, 1.0 - self.beta);
            x.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .for_each(|(x, g)| {
                    for (x, &g) in x.iter_mut().zip(g) {
                        let g = if self.square { g * g } else { g };
                        *x = b * *x + a * g;
                    }
                });
            Ok(())
        }
    }

    /// `w ← w·keep − lr·(m/bc₁)/(√(v/bc₂) + ε)`.
    struct Update {
        keep: f32,
        lr: f32,
        bc1: f32,
        bc2: f32,
        eps: f32,
    }

    impl InplaceOp3 for Update {
        fn name(&self) -> &'static str {
            "adamw-update"
        }
        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<()> {
            let (w, m, v) = (slice_mut(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
            w.par_chunks_mut(CHUNK)
                .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
                .for_each(|(w, (m, v))| {
                    for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                        let update = (m / self.bc1) / ((v / self.bc2).sqrt() + self.eps);
                        *w = *w * self.keep - update * self.lr;
                    }
                });
            Ok(())
        }
    }

    pub(super) fn step(p: &mut Param, g: &Tensor, h: Hyper) -> Result<()> {
        p.m.inplace_op2(
            g,
            &Moment {
                beta: h.c.beta1 as f32,
                square: false,
            },
        )?;
        p.v.inplace_op2(
            g,
            &Moment {
                beta: h.c.beta2 as f32,
                square: true,
            },
        )?;
        p.var.as_tensor().inplace_op3(
            &p.m,
            &p.v,
            &Update {
                keep: (1.0 - h.lr * h.decay) as f32,
                lr: h.lr as f32,
                bc1: h.bc1 as f32,
                bc2: h.bc2 as f32,
                eps: h.c.eps as f32,
            },
        )
    }
}

/// The names of `vars` whose gradient in `grads` is missing or all zero: what a gradient-flow
/// check looks for (Candle's fused ops drop gradients silently).
pub fn without_gradient(vars: &[(String, Var)], grads: &GradStore) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for (name, var) in vars {
        let reached = match grads.get(var.as_tensor()) {
            Some(g) => {
                g.abs()?
                    .sum_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?
                    != 0.0
            }
            None => false,
        };
        if !reached {
            missing.push(name.clone());
        }
    }
    Ok(missing)
}

/// Collects the gradients of `vars` from a backward pass, by name.
pub fn named_grads(vars: &[(String, Var)], store: &GradStore) -> HashMap<String, Tensor> {
    vars.iter()
        .filter_map(|(n, v)| store.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
        .collect()
}

/// Adds `more` into `acc` (gradient accumulation).
pub fn accumulate(acc: &mut HashMap<String, Tensor>, more: HashMap<String, Tensor>) -> Result<()> {
    for (k, g) in more {
        let sum = match acc.remove(&k) {
            Some(a) => (a + g)?,
            None => g,
        };
        acc.insert(k, sum);
    }
    Ok(())
}

/// The global L2 norm of all gradients.
pub fn global_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (`clip_grad_norm_`). Returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// open_clip's `cosine_lr`: linear warmup from 0 to `base_lr` over `warmup` steps, then cosine
/// decay to 0 at `total` steps.
pub fn cosine_lr(step: u64, base_lr: f64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return base_lr * (step + 1) as f64 / warmup as f64;
    }
    let e = (step - warmup) as f64;
    let es = total.saturating_sub(warmup).max(1) as f64;
    0.5 * (1.0 + (std::f64::consts::PI * e / es).cos()) * base_lr
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn decay_exclusions_follow_open_clip() {
        assert!(exempt_from_decay(
            "text_model.encoder.layers.0.mlp.fc1.bias",
            1
        ));
        assert!(exempt_from_decay("logit_scale", 0));
        assert!(exempt_from_decay(
            "text_model.embeddings.token_embedding.weight",
            2
        ));
        assert!(!exempt_from_decay(
            "vision_model.embeddings.patch_embedding.weight",
            4
        ));
        assert!(!exempt_from_decay("visual_projection.weight", 2));
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((cosine_lr(0, 1.0, 10, 100) - 0.1).abs() < 1e-12);
        assert!((cosine_lr(9, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(10, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(55, 1.0, 10, 100) - 0.5).abs() < 1e-12);
        assert!(cosine_lr(100, 1.0, 10, 100).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_pytorch_on_one_parameter() {
        // torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2),
        // p = [1.0, -2.0], grads [0.5, -0.25] then [0.1, 0.3]:
        // after step 1: [0.88, -1.86]; after step 2: [0.781_738, -1.837_082_5].
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![("w.weight".into(), var.clone())],
            AdamWConfig {
                weight_decay: 0.2,
                ..Default::default()
            },
        )
        .unwrap();
        // Rank-1 parameters are exempt from decay by name; force decay for this check.
        opt.params[0].decay = true;
        for (g, expected) in [
            ([0.5f32, -0.25], [0.88f32, -1.86]),
            ([0.1, 0.3], [0.781_738, -1.837_082_5]),
        ] {
            let grads = HashMap::from([(
                "w.weight".to_string(),
                Tensor::new(&g, &Device::Cpu).unwrap(),
            )]);
            opt.step(&grads, 0.1).unwrap();
            let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
            for (a, b) in got.iter().zip(expected) {
                assert!((a - b).abs() < 1e-5, "{got:?} vs {expected:?}");
            }
        }
    }

    /// The in-place CPU step (f32) and the tensor-op step (taken for f64) agree over several
    /// steps with decay, and a checkpoint's moments do not move with later steps.
    #[test]
    fn the_in_place_cpu_step_equals_the_tensor_op_step() {
        let init: Vec<f32> = (0..5000).map(|i| ((i as f32) * 0.37).sin()).collect();
        let grad = |k: usize| -> Vec<f32> {
            (0..5000)
                .map(|i| ((i * (k + 3)) as f32 * 0.11).cos() * 0.1)
                .collect()
        };
        let w32 = Var::new(init.as_slice(), &Device::Cpu).unwrap();
        let w64 = Var::from_tensor(&w32.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut a = AdamW::new(vec![("p.weight".into(), w32.clone())], cfg).unwrap();
        let mut b = AdamW::new(vec![("p.weight".into(), w64.clone())], cfg).unwrap();
        a.params[0].decay = true;
        b.params[0].decay = true;
        let mut saved = None;
        for k in 0..4 {
            let g = Tensor::new(grad(k).as_slice(), &Device::Cpu).unwrap();
            a.step(&HashMap::from([("p.weight".to_string(), g.clone())]), 1e-2)
                .unwrap();
            b.step(&HashMap::from([("p.weight".to_string(), g)]), 1e-2)
                .unwrap();
            if k == 1 {
                saved = Some(a.state_tensors().unwrap());
            }
        }
        let diff = (w32.as_tensor().to_dtype(DType::F64).unwrap() - w64.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
        let saved = saved.unwrap();
        assert_ne!(
            saved["exp_avg.p.weight"].to_vec1::<f32>().unwrap(),
            a.params[0].m.to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn a_parameter_first_updated_late_gets_a_first_step_update_at_its_lr_scale() {
        // "late" gets no gradient for three steps (a frozen warm-up), then its first: as in
        // PyTorch, its bias correction starts then, so the update is lr · scale · sign(g).
        let early = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        let late = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![
                ("early".into(), early.clone()),
                ("late".into(), late.clone()),
            ],
            AdamWConfig::default(),
        )
        .unwrap();
        opt.scale_lr(|name| if name == "late" { 4.0 } else { 1.0 });
        let g = |x: f32| Tensor::new(&[x], &Device::Cpu).unwrap();
        for _ in 0..3 {
            opt.step(&HashMap::from([("early".to_string(), g(1.0))]), 0.01)
                .unwrap();
        }
        assert_eq!(late.as_tensor().to_vec1::<f32>().unwrap(), [0.0]);
        opt.step(
            &HashMap::from([("early".to_string(), g(1.0)), ("late".to_string(), g(0.5))]),
            0.01,
        )
        .unwrap();
        let moved = late.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((moved + 0.04).abs() < 1e-6, "{moved}");
        // The counts survive a checkpoint.
        let state = opt.state_tensors().unwrap();
        let mut again = AdamW::new(
            vec![
                ("early".into(), early.clone()),
                ("late".into(), late.clone()),
            ],
            AdamWConfig::default(),
        )
        .unwrap();
        again.load_state(&state).unwrap();
        assert_eq!(
            again.params.iter().map(|p| p.steps).collect::<Vec<_>>(),
            [4, 1]
        );
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = HashMap::from([
            (
                "a".to_string(),
                Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
            ),
        ]);
        assert!((clip_grad_norm(&mut g, 1.0).unwrap() - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }
}
