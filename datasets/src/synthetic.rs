//! A seeded synthetic image-caption dataset: coloured shapes at positions on noisy backgrounds,
//! captioned like "a small red circle on the left".
//!
//! Every sample is a pure function of `(seed, index)`, so the stream is reproducible, can start
//! at any position (resume), and needs no files. Some colour–shape combinations can be held out
//! of the training split; the test split then holds only those, so zero-shot accuracy on it
//! measures composition of words never seen together in a caption.

use image::{Rgb, RgbImage};

pub const COLOURS: [(&str, [u8; 3]); 5] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [50, 80, 230]),
    ("yellow", [235, 215, 40]),
    ("purple", [150, 60, 190]),
];
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "cross"];
const SIZES: [&str; 2] = ["small", "large"];
const POSITIONS: [(&str, f32, f32); 5] = [
    ("on the left", 0.27, 0.5),
    ("on the right", 0.73, 0.5),
    ("at the top", 0.5, 0.27),
    ("at the bottom", 0.5, 0.73),
    ("in the middle", 0.5, 0.5),
];

/// Which samples a stream yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every combination except the held-out ones.
    Train,
    /// Only the held-out combinations.
    HeldOut,
}

/// One generated sample with its labels.
#[derive(Debug, Clone)]
pub struct ShapeSample {
    pub image: RgbImage,
    pub caption: String,
    pub colour: usize,
    pub shape: usize,
}

/// The generator: image size, seed and the held-out (colour, shape) pairs.
#[derive(Debug, Clone)]
pub struct Shapes {
    pub image_size: u32,
    pub seed: u64,
    pub held_out: Vec<(usize, usize)>,
}

impl Shapes {
    /// Holds out one shape per colour along a diagonal, so every colour and every shape is still
    /// seen in training, just never in these pairs (5 of the 20 combinations).
    pub fn with_diagonal_held_out(image_size: u32, seed: u64) -> Self {
        let held_out = (0..COLOURS.len()).map(|c| (c, c % SHAPES.len())).collect();
        Self {
            image_size,
            seed,
            held_out,
        }
    }

    /// The zero-shot class names, one per colour–shape combination, e.g. "red circle".
    pub fn class_names() -> Vec<String> {
        COLOURS
            .iter()
            .flat_map(|(c, _)| SHAPES.iter().map(move |s| format!("{c} {s}")))
            .collect()
    }

    /// The class index of a (colour, shape) pair in [`class_names`](Self::class_names).
    pub fn class_index(colour: usize, shape: usize) -> usize {
        colour * SHAPES.len() + shape
    }

    /// Prompt templates matching the caption grammar, for a prompt ensemble.
    pub fn templates() -> Vec<String> {
        SIZES
            .iter()
            .flat_map(|s| {
                POSITIONS
                    .iter()
                    .map(move |(p, _, _)| format!("a {s} {{}} {p}"))
            })
            .collect()
    }

    /// Sample `index` of `split`; a pure function of `(seed, split, index)`.
    pub fn sample(&self, split: Split, index: u64) -> ShapeSample {
        let mut rng =
            SplitMix::new(self.seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407) ^ split as u64);
        let (colour, shape) = loop {
            let c = rng.below(COLOURS.len());
            let s = rng.below(SHAPES.len());
            let held = self.held_out.contains(&(c, s));
            if held == (split == Split::HeldOut) {
                break (c, s);
            }
        };
        let size = rng.below(SIZES.len());
        let (position, px, py) = POSITIONS[rng.below(POSITIONS.len())];
        let n = self.image_size as f32;
        let radius = n * if size == 0 { 0.11 } else { 0.2 } * (0.9 + 0.2 * rng.unit());
        let cx = n * (px + 0.06 * (rng.unit() - 0.5));
        let cy = n * (py + 0.06 * (rng.unit() - 0.5));
        let base = 40.0 + 60.0 * rng.unit();
        let fg = COLOURS[colour].1;
        let mut image = RgbImage::new(self.image_size, self.image_size);
        for (x, y, px) in image.enumerate_pixels_mut() {
            let (fx, fy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            *px = if inside(shape, fx, fy, radius) {
                Rgb(fg)
            } else {
                let v = (base + 24.0 * (rng.unit() - 0.5)).clamp(0.0, 255.0) as u8;
                Rgb([v, v, v])
            };
        }
        let caption = format!(
            "a {} {} {} {}",
            SIZES[size], COLOURS[colour].0, SHAPES[shape], position
        );
        ShapeSample {
            image,
            caption,
            colour,
            shape,
        }
    }
}

/// Whether offset `(x, y)` from the centre lies inside shape `shape` of radius `r`.
fn inside(shape: usize, x: f32, y: f32, r: f32) -> bool {
    match shape {
        0 => x * x + y * y <= r * r,
        1 => x.abs() <= r * 0.85 && y.abs() <= r * 0.85,
        2 => {
            // Apex up: y from -r (top) to r (bottom), half-width growing linearly.
            (-r..=r).contains(&y) && x.abs() <= (y + r) * 0.5
        }
        _ => {
            let arm = r * 0.3;
            (x.abs() <= arm && y.abs() <= r) || (y.abs() <= arm && x.abs() <= r)
        }
    }
}

/// SplitMix64, local so the generator is independent of the trainer's RNG.
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64) -> Self {
        Self(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_reproducible_and_captions_describe_them() {
        let g = Shapes::with_diagonal_held_out(32, 3);
        let a = g.sample(Split::Train, 17);
        let b = g.sample(Split::Train, 17);
        assert_eq!(a.image, b.image);
        assert_eq!(a.caption, b.caption);
        assert!(a.caption.contains(COLOURS[a.colour].0) && a.caption.contains(SHAPES[a.shape]));
        assert_ne!(g.sample(Split::Train, 18).image, a.image);
    }

    #[test]
    fn held_out_pairs_never_appear_in_training_and_only_they_appear_in_test() {
        let g = Shapes::with_diagonal_held_out(16, 0);
        for i in 0..500 {
            let t = g.sample(Split::Train, i);
            assert!(!g.held_out.contains(&(t.colour, t.shape)));
            let h = g.sample(Split::HeldOut, i);
            assert!(g.held_out.contains(&(h.colour, h.shape)));
        }
        assert_eq!(Shapes::class_names().len(), 20);
        assert_eq!(
            Shapes::class_names()[Shapes::class_index(2, 1)],
            "blue square"
        );
    }
}
