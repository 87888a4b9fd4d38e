//! zoo-trainers: objectives, optimizer, the training loop, and the evaluation functions the
//! loop and the CLI share.
//!
//! - [`pipeline::DualEncoderPipeline`]: a CLIP/SigLIP model with its tokenizer and image
//!   processor, embedding texts and images as HF's processors + model would.
//! - [`zeroshot`]: prompt-ensemble zero-shot classifiers and top-k scoring.
//! - [`caption_metrics`]: BLEU-1..4 and CIDEr-D with pycocoevalcap's PTB tokenization, and the
//!   prediction/reference files `zoo eval caption` reads.

pub mod blip_caption;
pub mod blip_pretrain;
pub mod capfilt;
pub mod caption_metrics;
pub mod checkpoint;
pub mod contrastive;
pub mod data;
pub mod error;
pub mod eval;
pub mod lm;
pub mod loss;
pub mod medusa;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod plot;
pub mod precision;
pub mod rng;
pub mod templates;
pub mod train;
pub mod zeroshot;

pub use error::{Error, Result};
