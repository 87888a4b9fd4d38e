//! zoo-trainers: objectives, optimizer, the training loop, and the evaluation functions the
//! loop and the CLI share.
//!
//! - [`pipeline::DualEncoderPipeline`]: a CLIP/SigLIP model with its tokenizer and image
//!   processor, embedding texts and images as HF's processors + model would.
//! - [`zeroshot`]: prompt-ensemble zero-shot classifiers and top-k scoring.

pub mod error;
pub mod pipeline;
pub mod zeroshot;

pub use error::{Error, Result};
