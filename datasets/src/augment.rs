//! Training-time augmentation: torchvision's `RandomResizedCrop` as open_clip configures it
//! (scale 0.9–1.0, aspect ratio 3/4–4/3, bicubic), followed by the model's normalisation.

use image::RgbImage;

use crate::preprocess::ImageProcessorConfig;
use crate::resample::{resize_rgb, Resample};

/// open_clip's default crop scale range for training.
pub const DEFAULT_SCALE: (f64, f64) = (0.9, 1.0);

/// A source of uniform numbers in `[0, 1)`, so callers bring their own seeded RNG.
pub trait Uniform {
    fn uniform(&mut self) -> f64;
}

/// `(top, left, height, width)` of a random crop, as torchvision's `RandomResizedCrop.get_params`:
/// ten tries at a random area fraction and log-uniform aspect ratio, then a centre crop with the
/// ratio clamped.
pub fn random_resized_crop_box(
    height: u32,
    width: u32,
    scale: (f64, f64),
    rng: &mut impl Uniform,
) -> (u32, u32, u32, u32) {
    let (h, w) = (f64::from(height), f64::from(width));
    let area = h * w;
    let (lr0, lr1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * (scale.0 + (scale.1 - scale.0) * rng.uniform());
        let ratio = (lr0 + (lr1 - lr0) * rng.uniform()).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= w && ch <= h {
            let top = ((h - ch + 1.0) * rng.uniform()).floor().min(h - ch);
            let left = ((w - cw + 1.0) * rng.uniform()).floor().min(w - cw);
            return (top as u32, left as u32, ch as u32, cw as u32);
        }
    }
    let ratio = w / h;
    let (ch, cw) = if ratio < 3.0 / 4.0 {
        ((w / (3.0 / 4.0)).round(), w)
    } else if ratio > 4.0 / 3.0 {
        (h, (h * 4.0 / 3.0).round())
    } else {
        (h, w)
    };
    (
        ((h - ch) / 2.0) as u32,
        ((w - cw) / 2.0) as u32,
        ch as u32,
        cw as u32,
    )
}

/// Random-resized-crops `image` to the processor's output size and normalises it, giving
/// `[3, S, S]` channel-major values.
pub fn augment(
    image: &RgbImage,
    processor: &ImageProcessorConfig,
    scale: (f64, f64),
    rng: &mut impl Uniform,
) -> Result<(Vec<f32>, usize, usize), String> {
    let (out_h, out_w) = processor.output_size(image.height() as usize, image.width() as usize);
    if image.width() == 0
        || image.height() == 0
        || out_h == 0
        || out_w == 0
        || out_h.saturating_mul(out_w) > crate::preprocess::MAX_OUTPUT_PIXELS
    {
        return Err(format!(
            "a {}x{} image would resize to {out_w}x{out_h} pixels (at least 1 and at most {} in \
             all are allowed)",
            image.width(),
            image.height(),
            crate::preprocess::MAX_OUTPUT_PIXELS
        ));
    }
    let (top, left, ch, cw) = random_resized_crop_box(image.height(), image.width(), scale, rng);
    let crop = image::imageops::crop_imm(image, left, top, cw, ch).to_image();
    let resized = resize_rgb(&crop, out_w as u32, out_h as u32, Resample::Bicubic);
    let values = crate::preprocess::normalize(&resized, processor);
    Ok((values, out_h, out_w))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Vec<f64>, usize);
    impl Uniform for Fixed {
        fn uniform(&mut self) -> f64 {
            self.1 += 1;
            self.0[(self.1 - 1) % self.0.len()]
        }
    }

    #[test]
    fn crops_cover_at_least_the_minimum_scale() {
        let mut rng = Fixed(vec![0.0, 0.5, 0.3, 0.9, 0.99, 0.01], 0);
        for _ in 0..20 {
            let (top, left, h, w) = random_resized_crop_box(60, 90, DEFAULT_SCALE, &mut rng);
            assert!(top + h <= 60 && left + w <= 90);
            assert!(f64::from(h * w) >= 0.85 * 5400.0, "{h}x{w}");
        }
    }
}
