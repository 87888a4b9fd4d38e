//! HF-exact image preprocessing driven by `preprocessor_config.json`.
//!
//! Follows HF's PIL-based processors (`CLIPImageProcessor`, `SiglipImageProcessor`,
//! `BlipImageProcessor`): convert to RGB, resize with Pillow's filters (see [`crate::resample`]),
//! center-crop, rescale by `1/255`, normalise with the mean and std, and lay out as `[3, H, W]`.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::resample::{resize_rgb, Resample};

/// The most pixels a preprocessed image may have (8192 × 8192): its f32 values take 768 MiB.
/// A configured size above it is refused when the config is read, and an image whose
/// shortest-edge resize would exceed it (a 1 × 100 000 strip, say) is refused as it is
/// preprocessed, instead of allocating without bound.
pub const MAX_OUTPUT_PIXELS: usize = 1 << 26;

/// OpenAI CLIP's normalisation, HF's default for CLIP processors.
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// What `size` asks the resize to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Scale so the shorter side has this length, keeping the aspect ratio (CLIP).
    ShortestEdge(usize),
    /// Exactly this size (SigLIP, BLIP).
    Exact { height: usize, width: usize },
}

/// The fields of `preprocessor_config.json` the PIL-based processors use.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub size: ResizeTarget,
    pub resample: Resample,
    pub do_center_crop: bool,
    /// `(height, width)`.
    pub crop_size: (usize, usize),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

#[derive(Deserialize)]
struct RawConfig {
    image_processor_type: Option<String>,
    feature_extractor_type: Option<String>,
    do_convert_rgb: Option<bool>,
    do_resize: Option<bool>,
    size: Option<Value>,
    resample: Option<Resample>,
    do_center_crop: Option<bool>,
    crop_size: Option<Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Value>,
    image_std: Option<Value>,
}

impl ImageProcessorConfig {
    /// The same processing for `n × n` model inputs (a model run at another resolution, its
    /// position table interpolated): a shortest-edge resize goes to `n`, an exact resize to
    /// `n × n`, and the center crop to `n × n`, as HF's `size` / `crop_size` overrides do.
    pub fn with_image_size(mut self, n: usize) -> Self {
        self.size = match self.size {
            ResizeTarget::ShortestEdge(_) => ResizeTarget::ShortestEdge(n),
            ResizeTarget::Exact { .. } => ResizeTarget::Exact {
                height: n,
                width: n,
            },
        };
        self.crop_size = (n, n);
        self
    }

    /// Reads `preprocessor_config.json`, filling missing fields with the defaults of the
    /// processor class it names (CLIP's when it names none).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|message| Error::Invalid {
            path: path.to_path_buf(),
            what: "preprocessor config",
            message,
        })
    }

    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let kind = raw
            .image_processor_type
            .or(raw.feature_extractor_type)
            .unwrap_or_else(|| "CLIPImageProcessor".into());
        // HF's `get_size_dict`: an integer `size` means the shortest edge for CLIP, a square
        // otherwise.
        let clip_like = kind.starts_with("CLIP");
        let (default_size, default_mean, default_std, default_crop) = if clip_like {
            (
                ResizeTarget::ShortestEdge(224),
                OPENAI_CLIP_MEAN,
                OPENAI_CLIP_STD,
                true,
            )
        } else if kind.starts_with("Siglip") {
            (
                ResizeTarget::Exact {
                    height: 224,
                    width: 224,
                },
                [0.5; 3],
                [0.5; 3],
                false,
            )
        } else {
            (
                ResizeTarget::Exact {
                    height: 384,
                    width: 384,
                },
                OPENAI_CLIP_MEAN,
                OPENAI_CLIP_STD,
                false,
            )
        };
        let size = match raw.size {
            Some(v) => parse_size(&v, !clip_like)?,
            None => default_size,
        };
        let crop_size = match raw.crop_size {
            Some(v) => match parse_size(&v, true)? {
                ResizeTarget::Exact { height, width } => (height, width),
                ResizeTarget::ShortestEdge(s) => (s, s),
            },
            None => (224, 224),
        };
        Ok(Self {
            do_convert_rgb: raw.do_convert_rgb.unwrap_or(true),
            do_resize: raw.do_resize.unwrap_or(true),
            size,
            resample: raw.resample.unwrap_or(Resample::Bicubic),
            do_center_crop: raw.do_center_crop.unwrap_or(default_crop),
            crop_size,
            do_rescale: raw.do_rescale.unwrap_or(true),
            rescale_factor: raw.rescale_factor.unwrap_or(1.0 / 255.0),
            do_normalize: raw.do_normalize.unwrap_or(true),
            image_mean: parse_triplet(raw.image_mean.as_ref(), default_mean)?,
            image_std: parse_triplet(raw.image_std.as_ref(), default_std)?,
        })
    }

    /// The `(height, width)` of the output for an input of `(height, width)`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        if self.do_center_crop {
            return self.crop_size;
        }
        if self.do_resize {
            return resize_output_size(self.size, height, width);
        }
        (height, width)
    }
}

fn parse_size(v: &Value, default_to_square: bool) -> std::result::Result<ResizeTarget, String> {
    let target = parse_size_unchecked(v, default_to_square)?;
    let (height, width) = match target {
        ResizeTarget::ShortestEdge(s) => (s, s),
        ResizeTarget::Exact { height, width } => (height, width),
    };
    if height == 0 || width == 0 || height.saturating_mul(width) > MAX_OUTPUT_PIXELS {
        return Err(format!(
            "`size` {v} must be at least 1 pixel and at most {MAX_OUTPUT_PIXELS} pixels in all"
        ));
    }
    Ok(target)
}

fn parse_size_unchecked(
    v: &Value,
    default_to_square: bool,
) -> std::result::Result<ResizeTarget, String> {
    let get = |k: &str| v.get(k).and_then(Value::as_u64).map(|n| n as usize);
    if let Some(n) = v.as_u64() {
        let n = n as usize;
        return Ok(if default_to_square {
            ResizeTarget::Exact {
                height: n,
                width: n,
            }
        } else {
            ResizeTarget::ShortestEdge(n)
        });
    }
    if let Some(s) = get("shortest_edge") {
        return Ok(ResizeTarget::ShortestEdge(s));
    }
    match (get("height"), get("width")) {
        (Some(height), Some(width)) => Ok(ResizeTarget::Exact { height, width }),
        _ => Err(format!(
            "`size` {v} has neither shortest_edge nor height and width"
        )),
    }
}

fn parse_triplet(v: Option<&Value>, default: [f32; 3]) -> std::result::Result<[f32; 3], String> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x.as_f64().ok_or("image_mean/std must be numbers")? as f32;
            }
            Ok(out)
        }
        Some(other) => Err(format!("expected 3 channel values, got {other}")),
    }
}

/// HF's `get_resize_output_image_size` (with `default_to_square=False` for the shortest edge).
fn resize_output_size(target: ResizeTarget, height: usize, width: usize) -> (usize, usize) {
    match target {
        ResizeTarget::Exact { height, width } => (height, width),
        ResizeTarget::ShortestEdge(s) => {
            let (short, long) = if width <= height {
                (width, height)
            } else {
                (height, width)
            };
            let new_long = (s as f64 * long as f64 / short as f64) as usize;
            if width <= height {
                (new_long, s)
            } else {
                (s, new_long)
            }
        }
    }
}

/// Decodes an image file. Grayscale, RGBA, 16-bit and CMYK inputs all decode; the result is
/// converted to 8-bit RGB as PIL's `convert("RGB")` does (alpha dropped, gray replicated), except
/// that 16-bit samples are scaled to 8 bits instead of clipped. Truncated files are refused, as
/// Pillow refuses them by default (see [`decode_image`]).
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_image(&bytes).map_err(|message| Error::Image {
        path: path.to_path_buf(),
        message,
    })
}

/// Decodes image bytes in any format the `image` crate reads with our features, within its
/// default memory limits (512 MiB per decode). A JPEG whose entropy-coded data ends before its
/// end-of-image marker is an error, "image file is truncated" as Pillow says (its
/// `LOAD_TRUNCATED_IMAGES` is off by default): the decoder would otherwise fill the missing
/// rows with grey. Other formats' decoders refuse truncated data themselves.
pub fn decode_image(bytes: &[u8]) -> std::result::Result<DynamicImage, String> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        return Err("image file is truncated (the JPEG data ends before its end marker)".into());
    }
    reader.decode().map_err(|e| e.to_string())
}

/// Whether a JPEG reaches its end-of-image marker: the marker segments are walked by their
/// lengths up to the first start-of-scan (so an EXIF thumbnail's own markers are skipped), and
/// the scan data after it must contain `FF D9`, which entropy-coded data cannot (a coded `FF`
/// byte is followed by `00`).
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    const SOI: u8 = 0xD8;
    const SOS: u8 = 0xDA;
    const EOI: u8 = 0xD9;
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != SOI {
        return false;
    }
    let mut i = 2;
    loop {
        // Fill bytes (0xFF runs) may precede a marker.
        while bytes.get(i) == Some(&0xFF) && bytes.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (bytes.get(i), bytes.get(i + 1)) else {
            return false;
        };
        match marker {
            EOI => return true,
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD7 => i += 2,
            _ => {
                let Some(len) = bytes
                    .get(i + 2..i + 4)
                    .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                else {
                    return false;
                };
                if len < 2 {
                    return false;
                }
                if marker == SOS {
                    let scan = bytes.get(i + 2 + len..).unwrap_or_default();
                    return scan.windows(2).any(|w| w == [0xFF, EOI]);
                }
                i += 2 + len;
            }
        }
    }
}

/// A configured image processor.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub config: ImageProcessorConfig,
}

impl ImageProcessor {
    pub fn new(config: ImageProcessorConfig) -> Self {
        Self { config }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(Self::new(ImageProcessorConfig::from_file(path)?))
    }

    /// Resize and crop, in 8-bit RGB as HF does before rescaling. An image that would resize
    /// to more than [`MAX_OUTPUT_PIXELS`] is refused.
    pub fn resize_and_crop(&self, image: &DynamicImage) -> std::result::Result<RgbImage, String> {
        let cfg = &self.config;
        let (height, width) = (image.height() as usize, image.width() as usize);
        if height == 0 || width == 0 {
            return Err(format!("the image is {width}x{height} pixels"));
        }
        let mut rgb = image.to_rgb8();
        if cfg.do_resize {
            let (h, w) = resize_output_size(cfg.size, height, width);
            if h == 0 || w == 0 || h.saturating_mul(w) > MAX_OUTPUT_PIXELS {
                return Err(format!(
                    "a {width}x{height} image would resize to {w}x{h} pixels (at least 1 and at \
                     most {MAX_OUTPUT_PIXELS} in all are allowed)"
                ));
            }
            rgb = resize_rgb(&rgb, w as u32, h as u32, cfg.resample);
        }
        if cfg.do_center_crop {
            rgb = center_crop(&rgb, cfg.crop_size.0, cfg.crop_size.1);
        }
        Ok(rgb)
    }

    /// Preprocesses one image into `[3, H, W]` values, channel-major.
    pub fn preprocess(
        &self,
        image: &DynamicImage,
    ) -> std::result::Result<(Vec<f32>, usize, usize), String> {
        let rgb = self.resize_and_crop(image)?;
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        Ok((normalize(&rgb, &self.config), h, w))
    }

    /// Loads and preprocesses images into one `[N, 3, H, W]` f32 tensor. Errors name the file.
    pub fn load_batch<P: AsRef<Path>>(&self, paths: &[P], device: &Device) -> Result<Tensor> {
        let mut data = Vec::new();
        let mut dims: Option<(usize, usize)> = None;
        for path in paths {
            let path = path.as_ref();
            let img = load_image(path)?;
            let (values, h, w) = self.preprocess(&img).map_err(|message| Error::Image {
                path: path.to_path_buf(),
                message,
            })?;
            match dims {
                Some(d) if d != (h, w) => {
                    return Err(Error::Image {
                        path: path.to_path_buf(),
                        message: format!(
                            "preprocesses to {h}x{w} but earlier images gave {}x{}; set a fixed size or crop",
                            d.0, d.1
                        ),
                    })
                }
                _ => dims = Some((h, w)),
            }
            data.extend(values);
        }
        let (h, w) = dims.unwrap_or(self.config.crop_size);
        Ok(Tensor::from_vec(data, (paths.len(), 3, h, w), device)?)
    }
}

/// Rescales and normalises 8-bit RGB into `[3, H, W]` channel-major f32 values: HF rescales in
/// f64 and casts to f32, then normalises in f32.
pub fn normalize(rgb: &RgbImage, cfg: &ImageProcessorConfig) -> Vec<f32> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let scale = if cfg.do_rescale {
        cfg.rescale_factor
    } else {
        1.0
    };
    let mut out = vec![0f32; 3 * h * w];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            let mut v = (f64::from(px.0[c]) * scale) as f32;
            if cfg.do_normalize {
                v = (v - cfg.image_mean[c]) / cfg.image_std[c];
            }
            out[c * h * w + i] = v;
        }
    }
    out
}

/// HF's `center_crop`: `top = (H - h) // 2`, `left = (W - w) // 2`, zero-padding where the image
/// is smaller than the crop.
fn center_crop(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    let (ih, iw) = (img.height() as i64, img.width() as i64);
    let top = (ih - height as i64).div_euclid(2);
    let left = (iw - width as i64).div_euclid(2);
    RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let (sx, sy) = (left + i64::from(x), top + i64::from(y));
        if (0..iw).contains(&sx) && (0..ih).contains(&sy) {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_size_is_shortest_edge_for_clip_and_square_otherwise() {
        let clip = ImageProcessorConfig::from_json(
            r#"{"size": 224, "crop_size": 224, "feature_extractor_type": "CLIPFeatureExtractor"}"#,
        )
        .unwrap();
        assert_eq!(clip.size, ResizeTarget::ShortestEdge(224));
        assert_eq!(clip.crop_size, (224, 224));
        let siglip = ImageProcessorConfig::from_json(
            r#"{"size": 256, "image_processor_type": "SiglipImageProcessor"}"#,
        )
        .unwrap();
        assert_eq!(
            siglip.size,
            ResizeTarget::Exact {
                height: 256,
                width: 256
            }
        );
        assert!(!siglip.do_center_crop);
        assert_eq!(siglip.image_mean, [0.5; 3]);
    }

    #[test]
    fn shortest_edge_keeps_aspect_ratio_with_truncation() {
        assert_eq!(
            resize_output_size(ResizeTarget::ShortestEdge(224), 300, 451),
            (224, 336)
        );
        assert_eq!(
            resize_output_size(ResizeTarget::ShortestEdge(224), 451, 300),
            (336, 224)
        );
    }

    #[test]
    fn bad_size_is_reported() {
        let err = ImageProcessorConfig::from_json(r#"{"size": {"longest_edge": 3}}"#).unwrap_err();
        assert!(err.contains("shortest_edge"), "{err}");
    }
}
