//! Contrastive objectives as small pure functions over embeddings, as open_clip's `loss.py`.
//!
//! All are built from ops with a backward: `log_softmax`, `gather`, `minimum`, `exp`, `log`.

use candle_core::{Result, Tensor, D};

/// Mean cross-entropy of `logits` `[N, C]` against class indices `targets` `[N]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

/// Cross-entropy of `logits` `[N, C]` against `targets` `[N]` (u32), weighted per row by
/// `weights` `[N]` (f32) and divided by their sum: rows of weight 0 are not targets. A batch
/// without any target has loss 0.
pub fn weighted_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let total = weights.sum_all()?.to_scalar::<f32>()?.max(1.0);
    ((picked * weights)?.sum_all()? / f64::from(total))?.neg()
}

/// Cross-entropy of `logits` `[N, C]` that score only the first `C` tokens of a vocabulary (a
/// draft vocabulary, or all of it) against `targets` `[N]` (u32) anywhere in it, weighted per
/// row by `weights` `[N]` (f32) where given. A row whose target is not among the `C` counts as
/// weight 0: no draft from those logits can propose it. With every target scored and no
/// weights this is [`cross_entropy`], else [`weighted_cross_entropy`].
pub fn scored_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let c = logits.dim(1)?;
    let ids = targets.to_vec1::<u32>()?;
    let outside = ids.iter().any(|&t| t as usize >= c);
    let weights = match (weights, outside) {
        (None, false) => return cross_entropy(logits, targets),
        (Some(w), false) => return weighted_cross_entropy(logits, targets, w),
        (Some(w), true) => w.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
        (None, true) => vec![1.0; ids.len()],
    };
    let (ids, weights): (Vec<u32>, Vec<f32>) = ids
        .into_iter()
        .zip(weights)
        .map(|(t, w)| if t as usize >= c { (0, 0.0) } else { (t, w) })
        .unzip();
    let device = logits.device();
    weighted_cross_entropy(
        logits,
        &Tensor::new(ids, device)?,
        &Tensor::new(weights, device)?,
    )
}

/// Numerically stable `log σ(x) = min(x, 0) − log(1 + e^{−|x|})`. Candle's
/// `binary_cross_entropy_with_logit` takes `log(sigmoid(x))`, which is −∞ for large negative x.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_abs = x.abs()?.neg()?;
    x.minimum(0.0)? - (neg_abs.exp()? + 1.0)?.log()?
}

/// CLIP's symmetric InfoNCE loss (Radford et al. 2021, Fig. 3): cross-entropy of
/// `exp(logit_scale) · img · txtᵀ` against the diagonal, averaged over both directions.
///
/// `image_embeds` and `text_embeds` are L2-normalised `[N, D]`; `logit_scale` is the learnable
/// log temperature (scalar).
pub fn clip_loss(
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    logit_scale: &Tensor,
) -> Result<Tensor> {
    let n = image_embeds.dim(0)?;
    let logits_per_image = image_embeds
        .matmul(&text_embeds.t()?)?
        .broadcast_mul(&logit_scale.exp()?)?;
    let targets = Tensor::arange(0u32, n as u32, image_embeds.device())?;
    let a = cross_entropy(&logits_per_image, &targets)?;
    let b = cross_entropy(&logits_per_image.t()?, &targets)?;
    (a + b)? / 2.0
}

/// SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Algorithm 1):
/// `−Σᵢⱼ log σ(zᵢⱼ · (exp(t) · xᵢ·yⱼ + b)) / N` with `zᵢⱼ = 1` on the diagonal and −1 elsewhere.
pub fn siglip_loss(
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
) -> Result<Tensor> {
    siglip_block(image_embeds, text_embeds, logit_scale, logit_bias, 0)?
        / image_embeds.dim(0)? as f64
}

/// [`siglip_loss`] computed over blocks of `chunk` texts, so the full `N × N` logit matrix is never
/// built: memory is `N × chunk`. The value and the gradients equal the unchunked loss (it is a
/// sum over pairs), as big_vision's chunked variant.
pub fn siglip_loss_chunked(
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let n = text_embeds.dim(0)?;
    let chunk = chunk.max(1);
    let mut total: Option<Tensor> = None;
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let block = siglip_block(
            image_embeds,
            &text_embeds.narrow(0, start, len)?,
            logit_scale,
            logit_bias,
            start,
        )?;
        total = Some(match total {
            Some(t) => (t + block)?,
            None => block,
        });
    }
    match total {
        Some(t) => t / image_embeds.dim(0)? as f64,
        None => candle_core::bail!("siglip loss over an empty batch"),
    }
}

/// `−Σ log σ(z · logits)` for all images against the texts `offset..offset + M`.
fn siglip_block(
    image_embeds: &Tensor,
    texts: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
    offset: usize,
) -> Result<Tensor> {
    let (n, m) = (image_embeds.dim(0)?, texts.dim(0)?);
    let logits = image_embeds
        .matmul(&texts.t()?)?
        .broadcast_mul(&logit_scale.exp()?)?
        .broadcast_add(logit_bias)?;
    // z = +1 where image i is paired with text offset + j, −1 elsewhere.
    let signs: Vec<f32> = (0..n)
        .flat_map(|i| (0..m).map(move |j| if i == offset + j { 1.0 } else { -1.0 }))
        .collect();
    let z = Tensor::from_vec(signs, (n, m), image_embeds.device())?.to_dtype(logits.dtype())?;
    log_sigmoid(&(logits * z)?)?.sum_all()?.neg()
}

/// The initial learnable temperature and bias of each objective, from the papers.
pub mod init {
    /// CLIP: `log(1/0.07)`.
    pub const CLIP_LOGIT_SCALE: f64 = 2.659_260_036_932_778;
    /// SigLIP: `log(10)` and −10.
    pub const SIGLIP_LOGIT_SCALE: f64 = std::f64::consts::LN_10;
    pub const SIGLIP_LOGIT_BIAS: f64 = -10.0;
    /// The learnable log-scale is clamped to `log(100)` after each step (CLIP §2.5).
    pub const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092;
}
