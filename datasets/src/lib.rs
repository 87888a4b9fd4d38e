//! zoo-datasets: turning files into model inputs exactly as HF's processors do.
//!
//! - [`preprocess`]: `preprocessor_config.json`-driven image preprocessing
//!   ([`preprocess::ImageProcessor`]) and robust image decoding ([`preprocess::load_image`]).
//! - [`resample`]: Pillow-exact resizing, which HF's PIL-based processors rely on.
//! - [`tokenize`]: `tokenizer.json` tokenization with HF padding/truncation
//!   ([`tokenize::TextTokenizer`]), and the bundled CLIP BPE tokenizer.
//!
//! Errors ([`Error`]) name the file and the problem.

pub mod error;
pub mod preprocess;
pub mod resample;
pub mod tokenize;

pub use error::{Error, Result};
