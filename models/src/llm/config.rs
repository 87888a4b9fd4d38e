//! HF's `LlamaConfig` / `Qwen2Config` as read from `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use crate::generation::TokenIds;
use crate::hub::read_json;
use crate::layers::{Activation, RopeConfig, RopeScaling};

/// `model_type`s this backbone loads.
pub const SUPPORTED: &str = "llama, qwen2";

/// HF's `rope_scaling` dictionary (`rope_type`, or the legacy `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScalingJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

/// A Llama-architecture decoder: `LlamaForCausalLM`, or Qwen2's layout of it (biases on q, k
/// and v only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScalingJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama: biases on q, k, v and o.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// DeepSeek-V3's multi-token-prediction modules, stored after the decoder layers as
    /// `model.layers.{num_hidden_layers + i}`.
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    /// Qwen2's sliding window; only full attention is implemented.
    #[serde(default)]
    pub use_sliding_window: bool,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_act() -> Activation {
    Activation::Silu
}
fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}

impl LlamaConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let cfg: Self = read_json(path, "Llama config")?;
        let invalid = |message: String| crate::Error::Invalid {
            path: path.to_path_buf(),
            what: "Llama config",
            message,
        };
        if !["llama", "qwen2"].contains(&cfg.model_type.as_str()) {
            return Err(crate::Error::UnknownModelType {
                path: path.to_path_buf(),
                model_type: cfg.model_type.clone(),
                supported: SUPPORTED,
            });
        }
        if cfg.use_sliding_window {
            return Err(invalid(
                "use_sliding_window is true; only full attention is implemented".into(),
            ));
        }
        cfg.rope().map_err(invalid)?;
        Ok(cfg)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Biases of (q, k, v) and of o: Llama's `attention_bias` sets all four, Qwen2 has them on
    /// q, k and v only.
    pub fn attention_biases(&self) -> (bool, bool) {
        match self.model_type.as_str() {
            "qwen2" => (true, false),
            _ => (self.attention_bias, self.attention_bias),
        }
    }

    /// Refuses, before it starts, a generation of up to `max_new_tokens` after `prompt_len`
    /// tokens that would run past `max_position_embeddings`, or whose KV cache (f32, every
    /// layer) would not fit in memory. The error names the flag and the limit.
    pub fn check_generation_length(
        &self,
        prompt_len: usize,
        max_new_tokens: usize,
    ) -> std::result::Result<(), String> {
        let limit = self.max_position_embeddings;
        let total = prompt_len.saturating_add(max_new_tokens);
        if total > limit {
            return Err(format!(
                "--max-new-tokens {max_new_tokens} after a prompt of {prompt_len} tokens reaches \
                 position {total}, past the model's max_position_embeddings {limit}: ask for at \
                 most {} new tokens",
                limit.saturating_sub(prompt_len)
            ));
        }
        let kv_bytes = 2.0
            * self.num_hidden_layers as f64
            * (self.num_kv_heads() * self.head_dim()) as f64
            * total as f64
            * 4.0;
        crate::device::ensure_fits_in_memory(
            &format!("--max-new-tokens {max_new_tokens} (the KV cache)"),
            kv_bytes,
        )
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// The RoPE settings, from `rope_theta`, `head_dim`, `partial_rotary_factor` and
    /// `rope_scaling`.
    pub fn rope(&self) -> Result<RopeConfig, String> {
        let dim = (self.head_dim() as f64 * self.partial_rotary_factor.unwrap_or(1.0)) as usize;
        let scaling = match &self.rope_scaling {
            None => RopeScaling::Default,
            Some(s) => {
                let kind = s
                    .rope_type
                    .as_deref()
                    .or(s.legacy_type.as_deref())
                    .unwrap_or("default");
                let factor = || {
                    s.factor
                        .ok_or_else(|| format!("rope_scaling `{kind}` needs `factor`"))
                };
                match kind {
                    "default" => RopeScaling::Default,
                    "linear" => RopeScaling::Linear { factor: factor()? },
                    "dynamic" => RopeScaling::Dynamic { factor: factor()? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: factor()?,
                        low_freq_factor: s
                            .low_freq_factor
                            .ok_or("rope_scaling `llama3` needs `low_freq_factor`")?,
                        high_freq_factor: s
                            .high_freq_factor
                            .ok_or("rope_scaling `llama3` needs `high_freq_factor`")?,
                        original_max_position_embeddings: s
                            .original_max_position_embeddings
                            .ok_or(
                                "rope_scaling `llama3` needs `original_max_position_embeddings`",
                            )?,
                    },
                    "yarn" => RopeScaling::Yarn {
                        factor: factor()?,
                        original_max_position_embeddings: s
                            .original_max_position_embeddings
                            .unwrap_or(self.max_position_embeddings),
                        attention_factor: s.attention_factor,
                        beta_fast: s.beta_fast.unwrap_or(32.0),
                        beta_slow: s.beta_slow.unwrap_or(1.0),
                        mscale: s.mscale,
                        mscale_all_dim: s.mscale_all_dim,
                        truncate: s.truncate.unwrap_or(true),
                    },
                    other => {
                        return Err(format!(
                            "rope_scaling type `{other}` is not supported (default, linear, \
                             dynamic, llama3, yarn are)"
                        ))
                    }
                }
            }
        };
        Ok(RopeConfig {
            dim,
            base: self.rope_theta,
            max_position_embeddings: self.max_position_embeddings,
            scaling,
        })
    }
}
