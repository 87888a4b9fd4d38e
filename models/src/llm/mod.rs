//! The LLM family: a Llama-architecture backbone in HF layout (`LlamaForCausalLM`, and Qwen2's
//! variant), built from the shared layers, returning hidden states and logits for every
//! position, with a KV cache that can be rolled back and compacted for speculative decoding;
//! Medusa heads with tree-based speculative decoding, and DeepSeek-V3-style MTP modules with
//! self-speculative decoding. Checkpoints come in HF layout or as llama.cpp GGUF files
//! ([`LlmSource`]), whose quantized projections run quantized.

pub mod config;
pub mod gguf;
pub mod llama;
pub mod medusa;
pub mod mtp;
pub mod source;
pub mod speculative;

pub use config::LlamaConfig;
pub use gguf::GgufLlama;
pub use llama::{CausalLmOutput, KvCache, LlamaForCausalLM, LlamaModel, LlamaStep};
pub use medusa::{medusa_generate, AutoTree, HeadAccuracy, MedusaDrafter, MedusaHeads, MedusaTree};
pub use mtp::{mtp_generate, MtpDraft, MtpDrafter, MtpModule, MtpModules};
pub use source::LlmSource;
pub use speculative::{
    decode, decode_until, speculative_accept, Acceptance, DraftContext, DraftTree, DraftVocab,
    Drafter, NoDrafts, SpeculativeOutput, TypicalAcceptance,
};
