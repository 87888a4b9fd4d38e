//! What several model tests share.

use zoo_models::generation::{generate, GenerationConfig};
use zoo_models::llm::{KvCache, LlamaForCausalLM, LlamaStep};

/// Plain greedy decoding of `prompt` under `cfg` through the shared generation loop: the
/// reference every speculative decoder's greedy output must equal.
pub fn plain_greedy(model: &LlamaForCausalLM, prompt: &[u32], cfg: &GenerationConfig) -> Vec<u32> {
    let mut step = LlamaStep {
        model,
        cache: KvCache::new(),
    };
    generate(&mut step, vec![prompt.to_vec()], cfg)
        .unwrap()
        .remove(0)
}
