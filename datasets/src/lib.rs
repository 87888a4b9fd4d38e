//! zoo-datasets: turning files into model inputs exactly as HF's processors do.
//!
//! - [`augment`]: open_clip's training augmentation (RandomResizedCrop, then normalisation).
//! - [`preprocess`]: `preprocessor_config.json`-driven image preprocessing
//!   ([`preprocess::ImageProcessor`]) and robust image decoding ([`preprocess::load_image`]).
//! - [`resample`]: Pillow-exact resizing, which HF's PIL-based processors rely on.
//! - [`synthetic`]: the seeded coloured-shapes image-caption generator used by `zoo demo`.
//! - [`tokenize`]: `tokenizer.json` tokenization with HF padding/truncation
//!   ([`tokenize::TextTokenizer`]), and the bundled CLIP BPE tokenizer.
//! - [`chat`]: chat templates rendered as HF's `apply_chat_template` does.
//! - [`gguf_tokenizer`]: the tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes.
//! - [`sources`]: image-caption sources (CSV/TSV, JSONL, WebDataset tar shards, ImageFolder)
//!   that skip and count bad samples, and seeded shuffling.
//!
//! Errors ([`Error`]) name the file and the problem.

pub mod augment;
pub mod chat;
pub mod error;
pub mod gguf_tokenizer;
pub mod preprocess;
pub mod resample;
pub mod sources;
pub mod synthetic;
pub mod tokenize;

pub use error::{Error, Result};
