//! The LLM family: a Llama-architecture backbone in HF layout (`LlamaForCausalLM`, and Qwen2's
//! variant), built from the shared layers, returning hidden states and logits for every
//! position, with a KV cache that can be rolled back and compacted for speculative decoding;
//! and Medusa heads with tree-based speculative decoding.

pub mod config;
pub mod llama;
pub mod medusa;

pub use config::LlamaConfig;
pub use llama::{CausalLmOutput, KvCache, LlamaForCausalLM, LlamaModel, LlamaStep};
pub use medusa::{medusa_generate, MedusaHeads, MedusaTree, SpeculativeOutput};
