//! The shared layers every model family is built from.
//!
//! Each layer is a struct with a `new(.., vb)` constructor whose `vb.pp(..)` paths follow the
//! HF checkpoint names, and a `forward`. Every layer is differentiable: none uses a Candle op
//! without a backward (CANDLE_NOTES.md), so the same code serves inference and training.

mod activation;
mod attention;
mod decode_attention;
pub mod dense_matmul;
pub mod dense_rows;
mod encoder;
mod fast_math;
mod fused_attention;
mod kv_cache;
mod linear;
mod mlp;
mod norm;
mod pooling;
mod position;
pub mod quantized_matmul;
mod resample;
mod vit;

pub use activation::Activation;
pub use attention::{
    attention, attention_backend, causal_mask, combine_masks, fused_is_faster, mask_min,
    naive_attention, padding_mask, repeat_kv, scaled_dot_product_attention, set_attention_backend,
    AttentionBackend, AttentionConfig, AttentionMask, MultiHeadAttention, QkvLayout,
    AUTO_FUSED_MIN_SCORES,
};
pub use decode_attention::{decode_attention, DECODE_MAX_QUERIES};
pub use encoder::{Encoder, EncoderConfig, EncoderLayer};
pub use fused_attention::{fused_attention, KeyVisibility, TreeMask, MAX_HEAD_DIM};
pub use kv_cache::KvBuffer;
pub use linear::{Linear, QuantizedWeights};
pub use mlp::Mlp;
pub use norm::{LayerNorm, RmsNorm};
pub use pooling::AttentionPoolingHead;
pub use position::{
    apply_rotary, default_inv_freq, rotary_cos_sin, sinusoidal_table, LearnedPositionEmbedding,
    RopeConfig, RopeScaling, RotaryEmbedding,
};
pub use resample::{interpolate, pixel_shuffle, pixel_unshuffle, resampling_matrix, Interpolation};
pub use vit::{ClassToken, PatchEmbedding, PositionTable, VitEmbeddings, VitEmbeddingsConfig};

/// The dtype to accumulate statistics in: f32 for half-precision inputs (as PyTorch does),
/// the input's own dtype otherwise.
pub fn upcast(dtype: candle_core::DType) -> candle_core::DType {
    match dtype {
        candle_core::DType::F16 | candle_core::DType::BF16 => candle_core::DType::F32,
        other => other,
    }
}
