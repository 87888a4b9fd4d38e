//! Resolution changes on `[B, C, H, W]` tensors, all differentiable: PixelShuffle and
//! PixelUnshuffle as reshapes and permutes, and interpolation (nearest, bilinear, bicubic, with
//! `align_corners` either way) as two matmuls with fixed resampling matrices,
//! `y = R_h · x · R_wᵀ`. Candle's own `upsample_bilinear2d` has no backward; a matmul has one,
//! and the matrices follow PyTorch's `F.interpolate` index and weight rules exactly.

use candle_core::{DType, Device, Result, Tensor};

/// How [`interpolate`] computes each output pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// PyTorch's `"nearest"`: source index `floor(dst · in / out)`.
    Nearest,
    /// `"bilinear"`.
    Bilinear { align_corners: bool },
    /// `"bicubic"`: Keys' cubic convolution with `A = −0.75`, edge pixels repeated.
    Bicubic { align_corners: bool },
}

/// PyTorch's cubic convolution constant.
const CUBIC_A: f64 = -0.75;

/// `area_pixel_compute_source_index`: where output pixel `dst` samples the input.
fn source_index(dst: usize, input: usize, output: usize, align_corners: bool, cubic: bool) -> f64 {
    if align_corners {
        let scale = if output > 1 {
            (input as f64 - 1.0) / (output as f64 - 1.0)
        } else {
            0.0
        };
        scale * dst as f64
    } else {
        let src = input as f64 / output as f64 * (dst as f64 + 0.5) - 0.5;
        if !cubic && src < 0.0 {
            0.0
        } else {
            src
        }
    }
}

/// Keys' cubic convolution weights of the four taps around a fractional offset `t`.
fn cubic_weights(t: f64) -> [f64; 4] {
    let a = CUBIC_A;
    let near = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// The `[output, input]` matrix that resamples one axis.
pub fn resampling_matrix(
    input: usize,
    output: usize,
    mode: Interpolation,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    if input == 0 || output == 0 {
        candle_core::bail!("cannot resample between {input} and {output} pixels");
    }
    let mut m = vec![0f64; output * input];
    for dst in 0..output {
        let row = &mut m[dst * input..(dst + 1) * input];
        match mode {
            Interpolation::Nearest => {
                // In f32, as PyTorch computes the nearest index.
                let scale = input as f32 / output as f32;
                let src = ((dst as f32 * scale).floor() as usize).min(input - 1);
                row[src] = 1.0;
            }
            Interpolation::Bilinear { align_corners } => {
                let src = source_index(dst, input, output, align_corners, false);
                let i0 = src.floor() as usize;
                let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
                let l1 = (src - i0 as f64).clamp(0.0, 1.0);
                row[i0.min(input - 1)] += 1.0 - l1;
                row[i1.min(input - 1)] += l1;
            }
            Interpolation::Bicubic { align_corners } => {
                let src = source_index(dst, input, output, align_corners, true);
                let base = src.floor();
                let weights = cubic_weights(src - base);
                for (k, w) in weights.iter().enumerate() {
                    let i = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
                    row[i] += w;
                }
            }
        }
    }
    Tensor::from_vec(m, (output, input), device)?.to_dtype(dtype)
}

/// `F.interpolate(x, size=(height, width), mode=...)` for `x` `[B, C, H, W]`.
pub fn interpolate(x: &Tensor, height: usize, width: usize, mode: Interpolation) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let rw = resampling_matrix(w, width, mode, x.dtype(), x.device())?;
    let rh = resampling_matrix(h, height, mode, x.dtype(), x.device())?;
    let y = x.broadcast_matmul(&rw.t()?)?;
    rh.broadcast_matmul(&y)
}

/// `F.pixel_shuffle`: `[B, C·r², H, W]` → `[B, C, H·r, W·r]`.
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if r == 0 || c % (r * r) != 0 {
        candle_core::bail!("pixel_shuffle: {c} channels are not a multiple of {r}²");
    }
    let c = c / (r * r);
    x.reshape((b, c, r, r, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .contiguous()?
        .reshape((b, c, h * r, w * r))
}

/// `F.pixel_unshuffle`: `[B, C, H·r, W·r]` → `[B, C·r², H, W]`.
pub fn pixel_unshuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, hr, wr) = x.dims4()?;
    if r == 0 || hr % r != 0 || wr % r != 0 {
        candle_core::bail!("pixel_unshuffle: {hr}×{wr} is not divisible by {r}");
    }
    let (h, w) = (hr / r, wr / r);
    x.reshape((b, c, h, r, w, r))?
        .permute((0, 1, 3, 5, 2, 4))?
        .contiguous()?
        .reshape((b, c * r * r, h, w))
}
