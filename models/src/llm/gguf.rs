//! Llama-architecture checkpoints in llama.cpp's GGUF format: the config from the `llama.*`
//! (or `qwen2.*`) metadata, the tensors renamed to HF's names, and the rows of q and k put
//! back in HF's order.
//!
//! llama.cpp's converter permutes the q and k rows of each head from HF's "two halves" RoPE
//! layout to interleaved pairs (`convert_hf_to_gguf.py`, `LlamaModel.permute`): HF row
//! `h·d + t·d/2 + j` is stored at `h·d + 2j + t`. [`GgufLlama::tensors`] undoes it row by row
//! (quantized rows move as whole blocks), as HF's GGUF loader does, so the model runs with the
//! same rotary code as an HF checkpoint. Qwen2 GGUFs are not permuted.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::{LlamaConfig, RopeScalingJson, TokenIds};
use crate::error::{Error, Result};
use crate::layers::{Activation, QuantizedWeights};

/// `general.architecture` values this loader reads.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, qwen2";

/// GGUF tensor types the CPU runs quantized.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, \
                                   Q4_K, Q5_K, Q6_K";

/// The fewest tensors a layer has: two norms, q/k/v/o and the gated MLP's three.
const TENSORS_PER_LAYER: usize = 9;

/// An opened GGUF checkpoint of a Llama-architecture model.
pub struct GgufLlama {
    path: PathBuf,
    content: Content,
    pub config: LlamaConfig,
    /// Whether q and k rows are in llama.cpp's interleaved order (the `llama` architecture).
    permuted: bool,
}

impl std::fmt::Debug for GgufLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufLlama")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish()
    }
}

/// Whether `path` names a GGUF file by its extension.
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl GgufLlama {
    /// Reads the header and metadata of `path` and builds the config; checks every tensor the
    /// config implies is there with the shape it implies.
    pub fn open(path: &Path) -> Result<Self> {
        let invalid = |message: String| Error::Invalid {
            path: path.to_path_buf(),
            what: "GGUF checkpoint",
            message,
        };
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = crate::gguf::read_content(&mut BufReader::new(file)).map_err(invalid)?;
        Self::from_content(path, content)
    }

    /// A checkpoint from an already read header; `path` is where its tensors are read from
    /// by [`Self::tensors`] (and names the file in errors).
    pub fn from_content(path: &Path, content: Content) -> Result<Self> {
        let invalid = |message: String| Error::Invalid {
            path: path.to_path_buf(),
            what: "GGUF checkpoint",
            message,
        };
        let meta = Metadata(&content.metadata);
        let arch = meta.string("general.architecture").map_err(invalid)?;
        if !["llama", "qwen2"].contains(&arch.as_str()) {
            return Err(Error::UnknownModelType {
                path: path.to_path_buf(),
                model_type: arch,
                supported: SUPPORTED_ARCHITECTURES,
            });
        }
        let config = config_from_metadata(&arch, &content).map_err(invalid)?;
        config.rope().map_err(invalid)?;
        let this = Self {
            path: path.to_path_buf(),
            permuted: arch == "llama",
            content,
            config,
        };
        this.check_tensors().map_err(invalid)?;
        Ok(this)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header: metadata (the tokenizer's among it) and the tensor table.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// The (GGUF name, HF name, shape `[rows, cols]` or `[n]`) of every tensor the config
    /// implies.
    fn expected(&self) -> Vec<(String, String, Vec<usize>)> {
        let c = &self.config;
        let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim(),
            c.num_kv_heads() * c.head_dim(),
        );
        let (qkv_bias, o_bias) = c.attention_biases();
        let mut out = vec![
            (
                "token_embd.weight",
                "model.embed_tokens.weight".into(),
                vec![v, d],
            ),
            ("output_norm.weight", "model.norm.weight".into(), vec![d]),
        ]
        .into_iter()
        .map(|(g, h, s)| (g.to_string(), h, s))
        .collect::<Vec<_>>();
        if !c.tie_word_embeddings {
            out.push(("output.weight".into(), "lm_head.weight".into(), vec![v, d]));
        }
        for i in 0..c.num_hidden_layers {
            let hf = |s: &str| format!("model.layers.{i}.{s}");
            let gg = |s: &str| format!("blk.{i}.{s}");
            let mut add = |g: &str, h: &str, shape: Vec<usize>| out.push((gg(g), hf(h), shape));
            add("attn_norm.weight", "input_layernorm.weight", vec![d]);
            add("attn_q.weight", "self_attn.q_proj.weight", vec![q, d]);
            add("attn_k.weight", "self_attn.k_proj.weight", vec![kv, d]);
            add("attn_v.weight", "self_attn.v_proj.weight", vec![kv, d]);
            add("attn_output.weight", "self_attn.o_proj.weight", vec![d, q]);
            if qkv_bias {
                add("attn_q.bias", "self_attn.q_proj.bias", vec![q]);
                add("attn_k.bias", "self_attn.k_proj.bias", vec![kv]);
                add("attn_v.bias", "self_attn.v_proj.bias", vec![kv]);
            }
            if o_bias {
                add("attn_output.bias", "self_attn.o_proj.bias", vec![d]);
            }
            add(
                "ffn_norm.weight",
                "post_attention_layernorm.weight",
                vec![d],
            );
            add("ffn_gate.weight", "mlp.gate_proj.weight", vec![f, d]);
            add("ffn_up.weight", "mlp.up_proj.weight", vec![f, d]);
            add("ffn_down.weight", "mlp.down_proj.weight", vec![d, f]);
        }
        out
    }

    fn check_tensors(&self) -> std::result::Result<(), String> {
        for (name, _, shape) in self.expected() {
            let info = self
                .content
                .tensor_infos
                .get(&name)
                .ok_or_else(|| format!("tensor {name} is missing (the metadata implies it)"))?;
            let stored = info.shape.dims();
            if stored != shape.as_slice() {
                return Err(format!(
                    "tensor {name} has shape {stored:?} where the metadata implies {shape:?}"
                ));
            }
            if !supported_type(info.ggml_dtype) {
                return Err(format!(
                    "tensor {name} is of type {:?}, which is not supported ({SUPPORTED_TYPES} are)",
                    info.ggml_dtype
                ));
            }
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(
                "it has rope_freqs.weight (Llama 3.1 RoPE factors), which is not \
                        supported yet"
                    .into(),
            );
        }
        Ok(())
    }

    /// Every tensor under its HF name, in its GGUF type, with q and k rows in HF's order.
    pub fn tensors(&self, device: &Device) -> Result<HashMap<String, QTensor>> {
        let file = File::open(&self.path).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })?;
        self.read_tensors(&mut BufReader::new(file), device)
    }

    /// [`Self::tensors`] from `reader`, which holds the file's bytes.
    pub fn read_tensors<R: std::io::Read + std::io::Seek>(
        &self,
        reader: &mut R,
        device: &Device,
    ) -> Result<HashMap<String, QTensor>> {
        let invalid = |message: String| Error::Invalid {
            path: self.path.clone(),
            what: "GGUF checkpoint",
            message,
        };
        let c = &self.config;
        let mut out = HashMap::new();
        for (name, hf, _) in self.expected() {
            let t =
                crate::gguf::read_tensor(&self.content, reader, &name, device).map_err(invalid)?;
            let heads = if name.contains("attn_q.") {
                Some(c.num_attention_heads)
            } else if name.contains("attn_k.") {
                Some(c.num_kv_heads())
            } else {
                None
            };
            let t = match heads {
                Some(h) if self.permuted => unpermute_rows(&t, h, device)
                    .map_err(|e| invalid(format!("tensor {name}: {e}")))?,
                _ => t,
            };
            out.insert(hf, t);
        }
        Ok(out)
    }

    /// The weights for [`super::LlamaForCausalLM::load_weights`]: with `dtype`, every tensor
    /// dequantized to it; without, the projections (and a tied head) stay quantized and the
    /// rest is dequantized to f32.
    pub fn weights(
        &self,
        dtype: Option<DType>,
        device: &Device,
    ) -> Result<(HashMap<String, Tensor>, QuantizedWeights)> {
        let context = |e: candle_core::Error| Error::Candle {
            context: format!("cannot dequantize {}", self.path.display()),
            source: e,
        };
        let mut dense = HashMap::new();
        let mut quantized = HashMap::new();
        for (name, t) in self.tensors(device)? {
            let is_float = matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            let keep = dtype.is_none() && t.rank() == 2 && !is_float;
            if keep {
                if name == "model.embed_tokens.weight" {
                    // Looked up as rows (dense); multiplied quantized as a tied head.
                    dense.insert(name.clone(), t.dequantize(device).map_err(context)?);
                }
                quantized.insert(name, Arc::new(t));
            } else {
                let x = t.dequantize(device).map_err(context)?;
                let x = x.to_dtype(dtype.unwrap_or(DType::F32)).map_err(context)?;
                dense.insert(name, x);
            }
        }
        Ok((dense, QuantizedWeights::new(quantized)))
    }
}

fn supported_type(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

/// Puts the rows of a q or k weight (or bias) from llama.cpp's interleaved order back into
/// HF's: for each of `heads` heads of `d` rows, HF row `t·d/2 + j` is stored row `2j + t`.
fn unpermute_rows(t: &QTensor, heads: usize, device: &Device) -> candle_core::Result<QTensor> {
    let dims = t.shape().dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("{rows} rows cannot be split into {heads} heads of pairs");
    }
    let d = rows / heads;
    let data = t.data()?;
    let row_bytes = data.len() / rows;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for t_ in 0..2 {
            for j in 0..d / 2 {
                let hf = h * d + t_ * (d / 2) + j;
                let stored = h * d + 2 * j + t_;
                out[hf * row_bytes..(hf + 1) * row_bytes]
                    .copy_from_slice(&data[stored * row_bytes..(stored + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), device, t.dtype())?;
    QTensor::new(storage, dims)
}

/// Typed reads of GGUF metadata; errors name the key.
struct Metadata<'a>(&'a HashMap<String, Value>);

impl Metadata<'_> {
    fn get(&self, key: &str) -> std::result::Result<&Value, String> {
        self.0
            .get(key)
            .ok_or_else(|| format!("metadata key {key} is missing"))
    }

    fn string(&self, key: &str) -> std::result::Result<String, String> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|_| format!("metadata key {key} is not a string"))
    }

    fn uint(&self, key: &str) -> std::result::Result<u64, String> {
        let v = self.get(key)?;
        let n = match v {
            Value::U8(n) => Some(u64::from(*n)),
            Value::U16(n) => Some(u64::from(*n)),
            Value::U32(n) => Some(u64::from(*n)),
            Value::U64(n) => Some(*n),
            Value::I8(n) => u64::try_from(*n).ok(),
            Value::I16(n) => u64::try_from(*n).ok(),
            Value::I32(n) => u64::try_from(*n).ok(),
            Value::I64(n) => u64::try_from(*n).ok(),
            _ => None,
        };
        n.ok_or_else(|| format!("metadata key {key} is {v:?}, not a non-negative integer"))
    }

    /// A count that must fit in memory-sized arithmetic: at most 2^31.
    fn count(&self, key: &str) -> std::result::Result<usize, String> {
        let n = self.uint(key)?;
        if n > 1 << 31 {
            return Err(format!("metadata key {key} is {n}, too large"));
        }
        Ok(n as usize)
    }

    fn optional_count(&self, key: &str) -> std::result::Result<Option<usize>, String> {
        if self.0.contains_key(key) {
            self.count(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn optional_float(&self, key: &str) -> std::result::Result<Option<f64>, String> {
        let Some(v) = self.0.get(key) else {
            return Ok(None);
        };
        let x = match v {
            Value::F32(x) => f64::from(*x),
            Value::F64(x) => *x,
            _ => return Err(format!("metadata key {key} is {v:?}, not a float")),
        };
        if !x.is_finite() {
            return Err(format!("metadata key {key} is {x}"));
        }
        Ok(Some(x))
    }
}

/// The HF config a GGUF's `{arch}.*` metadata describes, as HF's GGUF loader builds it:
/// context length, width, layers, heads, KV heads, RoPE base, dimension and scaling, RMS eps,
/// vocabulary; the head tied when there is no `output.weight`; bos/eos/pad from
/// `tokenizer.ggml.*`.
fn config_from_metadata(arch: &str, content: &Content) -> std::result::Result<LlamaConfig, String> {
    let meta = Metadata(&content.metadata);
    let key = |k: &str| format!("{arch}.{k}");
    let hidden_size = meta.count(&key("embedding_length"))?;
    let num_attention_heads = meta.count(&key("attention.head_count"))?;
    if hidden_size == 0 || num_attention_heads == 0 {
        return Err(format!(
            "{} is {hidden_size} and {} is {num_attention_heads}: neither may be 0",
            key("embedding_length"),
            key("attention.head_count")
        ));
    }
    let num_kv_heads = meta
        .optional_count(&key("attention.head_count_kv"))?
        .unwrap_or(num_attention_heads);
    if num_kv_heads == 0 || !num_attention_heads.is_multiple_of(num_kv_heads) {
        return Err(format!(
            "{} {num_kv_heads} does not divide {} {num_attention_heads}",
            key("attention.head_count_kv"),
            key("attention.head_count")
        ));
    }
    let head_dim = meta
        .optional_count(&key("attention.key_length"))?
        .unwrap_or(hidden_size / num_attention_heads);
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(format!(
            "the head width {head_dim} is not a positive even number"
        ));
    }
    let rope_dim = meta
        .optional_count(&key("rope.dimension_count"))?
        .unwrap_or(head_dim);
    if rope_dim == 0 || rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
        return Err(format!(
            "{} {rope_dim} is not an even number up to the head width {head_dim}",
            key("rope.dimension_count")
        ));
    }
    let vocab_size = match meta.optional_count(&key("vocab_size"))? {
        Some(n) => n,
        None => match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or("neither the vocabulary size nor token_embd.weight is there")?,
        },
    };
    let max_position_embeddings = meta.count(&key("context_length"))?;
    if max_position_embeddings == 0 {
        return Err(format!("{} is 0", key("context_length")));
    }
    let scaling_type = match content.metadata.get(&key("rope.scaling.type")) {
        Some(_) => Some(meta.string(&key("rope.scaling.type"))?),
        None => None,
    };
    let factor = meta
        .optional_float(&key("rope.scaling.factor"))?
        .or(meta.optional_float(&key("rope.scale_linear"))?);
    let rope_scaling = match (scaling_type.as_deref(), factor) {
        (None | Some("none"), None) | (Some("none"), _) => None,
        (None, Some(1.0)) => None,
        (kind, Some(f)) => Some(RopeScalingJson {
            rope_type: Some(kind.unwrap_or("linear").to_string()),
            legacy_type: None,
            factor: Some(f),
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: meta
                .optional_count(&key("rope.scaling.original_context_length"))?,
            attention_factor: None,
            beta_fast: None,
            beta_slow: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: None,
        }),
        (Some(kind), None) => {
            return Err(format!(
                "{} is {kind} but {} is missing",
                key("rope.scaling.type"),
                key("rope.scaling.factor")
            ))
        }
    };
    let token = |k: &str| -> std::result::Result<Option<u32>, String> {
        let k = format!("tokenizer.ggml.{k}");
        match meta.optional_count(&k)? {
            Some(id) if id >= vocab_size => Err(format!(
                "metadata key {k} is {id}, outside the vocabulary of {vocab_size}"
            )),
            Some(id) => Ok(Some(id as u32)),
            None => Ok(None),
        }
    };
    let intermediate_size = meta.count(&key("feed_forward_length"))?;
    // Each layer holds at least its nine tensors: a block count the tensor table cannot back
    // is refused before the expected names are listed.
    let num_hidden_layers = meta.count(&key("block_count"))?;
    let tensors = content.tensor_infos.len();
    if num_hidden_layers.saturating_mul(TENSORS_PER_LAYER) > tensors {
        return Err(format!(
            "metadata key {} is {num_hidden_layers}, but the file holds only {tensors} tensors \
             ({TENSORS_PER_LAYER} per layer at least)",
            key("block_count")
        ));
    }
    Ok(LlamaConfig {
        model_type: arch.to_string(),
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: Some(num_kv_heads),
        head_dim: Some(head_dim),
        hidden_act: Activation::Silu,
        max_position_embeddings,
        rms_norm_eps: meta
            .optional_float(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope_theta: meta
            .optional_float(&key("rope.freq_base"))?
            .unwrap_or(10000.0),
        rope_scaling,
        partial_rotary_factor: (rope_dim != head_dim).then(|| rope_dim as f64 / head_dim as f64),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: arch == "llama" && content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        mlp_bias: false,
        bos_token_id: token("bos_token_id")?,
        eos_token_id: token("eos_token_id")?.map(TokenIds::One),
        pad_token_id: token("padding_token_id")?,
        num_nextn_predict_layers: 0,
        use_sliding_window: false,
    })
}
