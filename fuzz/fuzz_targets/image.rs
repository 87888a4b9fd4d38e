//! Image decoding plus preprocessing: the bytes of an image file through `decode_image` (with
//! the truncation check), then HF's CLIP and SigLIP/BLIP preprocessing and the training
//! augmentation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zoo_datasets::augment::{augment, Uniform, DEFAULT_SCALE};
use zoo_datasets::preprocess::{decode_image, ImageProcessor, ImageProcessorConfig};

struct Fixed(f64);
impl Uniform for Fixed {
    fn uniform(&mut self) -> f64 {
        self.0 = (self.0 + 0.37) % 1.0;
        self.0
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(image) = decode_image(data) else {
        return;
    };
    for config in [
        r#"{"size": 32, "crop_size": 32, "feature_extractor_type": "CLIPFeatureExtractor"}"#,
        r#"{"size": {"height": 24, "width": 40}, "image_processor_type": "SiglipImageProcessor"}"#,
    ] {
        let config = ImageProcessorConfig::from_json(config).expect("valid config");
        let processor = ImageProcessor::new(config.clone());
        let _ = processor.preprocess(&image);
        let _ = augment(&image.to_rgb8(), &config, DEFAULT_SCALE, &mut Fixed(0.1));
    }
});
