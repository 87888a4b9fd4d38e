//! Image resizing that reproduces Pillow's `Image.resize` on 8-bit images bit for bit.
//!
//! HF's PIL-based image processors resize through Pillow, so matching their numbers means
//! matching Pillow's algorithm (`libImaging/Resample.c`): a separable convolution whose kernel
//! support widens with the downscale factor (antialiasing), coefficients normalised per output
//! pixel and rounded to 22-bit fixed point, a horizontal pass then a vertical pass, each rounded
//! and clipped to 8 bits.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Pillow's resampling filters, deserialised from their integer codes in
/// `preprocessor_config.json` (`resample: 3` is bicubic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Resample {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl TryFrom<u8> for Resample {
    type Error = String;
    fn try_from(code: u8) -> Result<Self, String> {
        Ok(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            other => return Err(format!("unknown PIL resample code {other} (expected 0-5)")),
        })
    }
}

impl From<Resample> for u8 {
    fn from(r: Resample) -> u8 {
        match r {
            Resample::Nearest => 0,
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        }
    }
}

impl Resample {
    /// The filter's support radius at scale 1.
    fn support(self) -> f64 {
        match self {
            Self::Nearest | Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Nearest | Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let px = x * std::f64::consts::PI;
                    px.sin() / px * (0.54 + 0.46 * px.cos())
                }
            }
            Self::Bicubic => {
                // Keys' cubic convolution with a = -0.5, as Pillow uses.
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = x * std::f64::consts::PI;
        px.sin() / px
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index, and fixed-point weights over the following inputs.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`.
fn coefficients(in_size: usize, out_size: usize, filter: Resample) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let raw: Vec<f64> = (0..n)
            .map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) / filterscale))
            .collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                }
            })
            .collect();
        bounds.push((xmin, n));
        weights.push(fixed);
    }
    Coefficients { bounds, weights }
}

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image to `width`×`height` exactly as Pillow's `Image.resize` does.
pub fn resize_rgb(src: &RgbImage, width: u32, height: u32, filter: Resample) -> RgbImage {
    let (w, h) = (src.width() as usize, src.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    if (w, h) == (ow, oh) {
        return src.clone();
    }
    if filter == Resample::Nearest {
        return resize_nearest(src, width, height);
    }
    let horiz = coefficients(w, ow, filter);
    let vert = coefficients(h, oh, filter);
    let data = src.as_raw();

    // Horizontal pass over just the rows the vertical pass reads, as Pillow does.
    let (row_first, row_last) = if h != oh {
        let first = vert.bounds[0].0;
        let (lmin, ln) = vert.bounds[oh - 1];
        (first, lmin + ln)
    } else {
        (0, h)
    };
    let rows = row_last - row_first;
    let mut temp = vec![0u8; rows * ow * 3];
    if w != ow {
        for y in 0..rows {
            let src_row = &data[(y + row_first) * w * 3..(y + row_first + 1) * w * 3];
            let dst_row = &mut temp[y * ow * 3..(y + 1) * ow * 3];
            for (xx, ((xmin, n), k)) in horiz.bounds.iter().zip(&horiz.weights).enumerate() {
                for c in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kw) in k.iter().enumerate().take(*n) {
                        acc += i64::from(src_row[(xmin + i) * 3 + c]) * i64::from(kw);
                    }
                    dst_row[xx * 3 + c] = clip8(acc);
                }
            }
        }
    } else {
        temp.copy_from_slice(&data[row_first * w * 3..row_last * w * 3]);
    }

    if h == oh {
        return RgbImage::from_raw(width, height, temp).expect("buffer has width*height*3 bytes");
    }
    let mut out = vec![0u8; oh * ow * 3];
    for (yy, ((ymin, n), k)) in vert.bounds.iter().zip(&vert.weights).enumerate() {
        let ymin = ymin - row_first;
        for x in 0..ow * 3 {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (i, &kw) in k.iter().enumerate().take(*n) {
                acc += i64::from(temp[(ymin + i) * ow * 3 + x]) * i64::from(kw);
            }
            out[yy * ow * 3 + x] = clip8(acc);
        }
    }
    RgbImage::from_raw(width, height, out).expect("buffer has width*height*3 bytes")
}

/// Pillow's nearest-neighbour resize: the source pixel under each output pixel's centre.
fn resize_nearest(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let sx = f64::from(src.width()) / f64::from(width);
    let sy = f64::from(src.height()) / f64::from(height);
    RgbImage::from_fn(width, height, |x, y| {
        let ix = (((f64::from(x) + 0.5) * sx) as u32).min(src.width() - 1);
        let iy = (((f64::from(y) + 0.5) * sy) as u32).min(src.height() - 1);
        *src.get_pixel(ix, iy)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_weights_sum_to_one_in_fixed_point() {
        let c = coefficients(512, 224, Resample::Bicubic);
        for k in &c.weights {
            let sum: i64 = k.iter().map(|&w| i64::from(w)).sum();
            assert!(
                (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                "{sum}"
            );
        }
    }

    #[test]
    fn upscaling_a_constant_image_keeps_it_constant() {
        let img = RgbImage::from_pixel(7, 5, image::Rgb([10, 200, 77]));
        for f in [
            Resample::Bilinear,
            Resample::Bicubic,
            Resample::Lanczos,
            Resample::Nearest,
        ] {
            let out = resize_rgb(&img, 19, 13, f);
            assert!(out.pixels().all(|p| p.0 == [10, 200, 77]), "{f:?}");
        }
    }

    #[test]
    fn resample_codes_follow_pil() {
        assert_eq!(Resample::try_from(3).unwrap(), Resample::Bicubic);
        assert_eq!(Resample::try_from(2).unwrap(), Resample::Bilinear);
        assert!(Resample::try_from(9).is_err());
    }
}
