//! Causal language-model training (`zoo train lm`) and perplexity (`zoo eval lm`).
//!
//! A corpus of text files (`.txt`, one document each) or JSONL (`{"text": ...}` per line) is
//! tokenized, every document ended with the eos token, and the stream packed into fixed-length
//! sequences (GPT-2's packing); JSONL chats (`"prompt"` beside `"text"`) take a row each
//! instead, their replies alone the targets. Each epoch visits the rows in a seeded order. The model is
//! a Llama-architecture [`LlamaForCausalLM`] whose weights are variables named as in the HF
//! checkpoint: a preset from scratch, or an HF folder to fine-tune. It saves in HF layout with
//! its tokenizer, loadable by `zoo generate` and HF transformers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde_json::json;
use zoo_datasets::tokenize::TextTokenizer;
use zoo_models::hub::ModelRepo;
use zoo_models::llm::{KvCache, LlamaConfig, LlamaForCausalLM, LlmSource, MtpModules};
use zoo_models::weights::SafetensorsWeights;

use crate::checkpoint;
use crate::data::DataPosition;
use crate::error::{Error, Result};
use crate::model::save_hf_folder;
use crate::optim::AdamWConfig;
use crate::precision::Precision;
use crate::rng::Rng;
use crate::train::{initial_state, run_task, Task, TrainConfig, TrainState};

/// The tokenizer of an LLM checkpoint: `tokenizer.json` (and `tokenizer_config.json`) of an
/// HF one, the `tokenizer.ggml.*` metadata of a GGUF.
pub fn llm_tokenizer(source: &LlmSource) -> Result<TextTokenizer> {
    Ok(match source {
        LlmSource::Hf { repo, .. } => TextTokenizer::from_files(
            &repo.get("tokenizer.json")?,
            repo.get_optional("tokenizer_config.json")?.as_deref(),
        )?,
        LlmSource::Gguf(g) => TextTokenizer::from_gguf(&g.content().metadata, g.path())?,
    })
}

/// The presets `zoo train lm` can start from scratch.
pub const PRESETS: &str = "llama-tiny, llama-small";

/// Standard deviation of initial weights (HF's `initializer_range`).
const INIT_STD: f64 = 0.02;

/// A preset's config for a tokenizer of `vocab_size` tokens with `<pad>` 0, `<s>` 1, `</s>` 2
/// (the trained BPE's), or the given ids.
pub fn preset_config(name: &str, vocab_size: usize, bos: u32, eos: u32) -> Result<LlamaConfig> {
    let json = match name {
        "llama-tiny" => json!({
            "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 128,
            "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": true, "hidden_act": "silu",
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 0,
        }),
        // 8 layers of width 512 (about 24M parameters besides the embedding): small enough to
        // train on two cores, large enough that a decoding step reads more weights than
        // it computes with.
        "llama-small" => json!({
            "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 512,
            "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 4, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": true, "hidden_act": "silu",
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 0,
        }),
        other => {
            return Err(Error::Input(format!(
                "unknown LM preset `{other}`; presets: {PRESETS}, or give an HF LlamaForCausalLM \
                 folder or hub id"
            )))
        }
    };
    serde_json::from_value(json).map_err(|e| Error::Input(format!("preset {name}: {e}")))
}

/// A Llama whose weights are trainable variables, with its MTP modules when the config has
/// `num_nextn_predict_layers`.
pub struct TrainableLlama {
    pub model: LlamaForCausalLM,
    pub mtp: Option<MtpModules>,
    pub config: LlamaConfig,
    pub varmap: VarMap,
    pub tokenizer: TextTokenizer,
    pub device: Device,
}

impl TrainableLlama {
    /// A preset with weights N(0, 0.02²) (norms 1), seeded.
    pub fn from_preset(
        name: &str,
        tokenizer: TextTokenizer,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let token = |t: &str, default: u32| tokenizer.token_to_id(t).unwrap_or(default);
        let config = preset_config(
            name,
            tokenizer.vocab_size(),
            token("<s>", 1),
            token("</s>", 2),
        )?;
        let mut rng = Rng::new(seed);
        let varmap = VarMap::new();
        {
            let mut data = lock(&varmap)?;
            for (name, shape) in parameter_shapes(&config)? {
                let t = initial_tensor(&name, &shape, &mut rng, device)?;
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        Self::assemble(config, varmap, tokenizer, device)
    }

    /// Every parameter of an HF `LlamaForCausalLM` folder or hub id, or of a GGUF file
    /// (dequantized), as a variable.
    pub fn from_pretrained(spec: &str, device: &Device) -> Result<Self> {
        let source = LlmSource::open(spec, None)?;
        let config = source.config().clone();
        let vb = match &source {
            LlmSource::Hf { repo, .. } => SafetensorsWeights::open(&repo.weight_files()?)?
                .into_var_builder(DType::F32, device),
            LlmSource::Gguf(g) => {
                let (dense, _) = g.weights(Some(DType::F32), device)?;
                VarBuilder::from_tensors(dense, DType::F32, device)
            }
        };
        let varmap = VarMap::new();
        {
            let mut data = lock(&varmap)?;
            for (name, shape) in parameter_shapes(&config)? {
                let t = vb.get(shape, &name).map_err(|e| {
                    Error::Input(format!(
                        "{} does not fit its Llama config: {e}",
                        source.describe()
                    ))
                })?;
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        let tokenizer = llm_tokenizer(&source)?;
        Self::assemble(config, varmap, tokenizer, device)
    }

    fn assemble(
        config: LlamaConfig,
        varmap: VarMap,
        tokenizer: TextTokenizer,
        device: &Device,
    ) -> Result<Self> {
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(Error::Input(format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = LlamaForCausalLM::new(&config, vb.clone())?;
        let mtp = match config.num_nextn_predict_layers {
            0 => None,
            n => Some(MtpModules::new(&config, n, vb)?),
        };
        Ok(Self {
            model,
            mtp,
            config,
            varmap,
            tokenizer,
            device: device.clone(),
        })
    }

    /// Every variable, sorted by name; only the MTP modules' with `mtp_only`.
    pub fn trainable_vars(&self, mtp_only: bool) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<(String, Var)> = data
            .iter()
            .filter(|(n, _)| !mtp_only || self.is_mtp_parameter(n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Whether `name` belongs to an MTP module (`model.layers.{i >= num_hidden_layers}`).
    pub fn is_mtp_parameter(&self, name: &str) -> bool {
        name.strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i >= self.config.num_hidden_layers)
    }

    /// Adds `depth` freshly initialised MTP modules (seeded), unless the model has them already.
    /// With `from_last_layer` (a pretrained backbone) each module's transformer block and norms
    /// start as copies of the backbone's last decoder layer and its `shared_head.norm` as the
    /// final norm, and `eh_proj` passes the (normed) hidden state through (its hidden half the
    /// identity, its embedding half fresh), so that only the new token's path starts from
    /// scratch. On SmolLM2 (2 modules, 320 steps of `scripts/train_smollm2_speculative.sh`'s MTP
    /// phase) module 1's loss over steps 157–176 was 3.72 against 4.12 with a fresh `eh_proj`.
    pub fn add_mtp(self, depth: usize, seed: u64, from_last_layer: bool) -> Result<Self> {
        match self.config.num_nextn_predict_layers {
            0 => {}
            n if n == depth => return Ok(self),
            n => {
                return Err(Error::Input(format!(
                    "the model has {n} MTP modules; --mtp-depth {depth} differs"
                )))
            }
        }
        let mut config = self.config.clone();
        config.num_nextn_predict_layers = depth;
        let mut rng = Rng::derive(seed, 0x3a7);
        {
            let mut data = lock(&self.varmap)?;
            let layers = self.config.num_hidden_layers;
            for (name, shape) in parameter_shapes(&config)? {
                if data.contains_key(&name) {
                    continue;
                }
                let mut t = initial_tensor(&name, &shape, &mut rng, &self.device)?;
                if from_last_layer && name.ends_with(".eh_proj.weight") {
                    // `[embedding; hidden] → d`: the hidden half starts as the identity, so
                    // that the copied block first reads the backbone's (normed) hidden state.
                    let d = shape.dims()[0];
                    let eye = Tensor::eye(d, t.dtype(), &self.device)?;
                    t = Tensor::cat(&[&t.narrow(1, 0, d)?, &eye], 1)?;
                }
                let copied = from_last_layer
                    .then(|| last_layer_source(&name, layers))
                    .flatten()
                    .and_then(|source| data.get(&source))
                    .filter(|v| v.dims() == shape.dims())
                    .map(|v| v.as_tensor().copy())
                    .transpose()?;
                data.insert(name, Var::from_tensor(&copied.unwrap_or(t))?);
            }
        }
        Self::assemble(config, self.varmap, self.tokenizer, &self.device)
    }

    /// The LM loss and, per MTP depth `k`, the loss of module `k` predicting token `i + k + 1`
    /// at every position `i` (DeepSeek-V3's `L^k_MTP`), on `ids` `[B, T]`. With
    /// `detach_backbone` the modules read the backbone's hidden states without a gradient into
    /// it; `weights` and `draft_vocab` as in [`Self::mtp_losses`] (the weights for the LM loss
    /// too).
    pub fn losses(
        &self,
        ids: &Tensor,
        detach_backbone: bool,
        weights: Option<&Tensor>,
        draft_vocab: Option<usize>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let out = self.model.forward(ids, &mut KvCache::new())?;
        let main = next_token_loss(&out.logits, ids, weights)?;
        let hidden = if detach_backbone {
            out.hidden.detach()
        } else {
            out.hidden
        };
        Ok((main, self.mtp_losses(ids, hidden, weights, draft_vocab)?))
    }

    /// The backbone's final hidden states `[B, T, D]` of `ids`, outside any training graph:
    /// what MTP modules trained on a frozen backbone read.
    pub fn frozen_hidden(&self, ids: &Tensor) -> Result<Tensor> {
        frozen_hidden(&self.model, ids)
    }

    /// Per MTP depth `k`, the loss of module `k` on `ids` `[B, T]` from the backbone's final
    /// `hidden` states `[B, T, D]` (see [`Self::losses`]); none without modules. With
    /// `weights` `[B, T]` only the targets of weight 1 count (a chat's replies); with
    /// `draft_vocab` the modules score the first that many tokens only, and targets outside
    /// them do not count.
    pub fn mtp_losses(
        &self,
        ids: &Tensor,
        mut hidden: Tensor,
        weights: Option<&Tensor>,
        draft_vocab: Option<usize>,
    ) -> Result<Vec<Tensor>> {
        let mut depth_losses = Vec::new();
        let Some(mtp) = &self.mtp else {
            return Ok(depth_losses);
        };
        let lm_head = match draft_vocab {
            Some(n) => self
                .model
                .lm_head()
                .first_rows(n)
                .map_err(|e| Error::Input(format!("--draft-vocab {n}: {e}")))?,
            None => self.model.lm_head().clone(),
        };
        let (_, t) = ids.dims2()?;
        for (k0, module) in mtp.modules.iter().enumerate() {
            let k = k0 + 1;
            if t < k + 2 {
                return Err(Error::Input(format!(
                    "sequences of {t} tokens are too short for MTP depth {k}"
                )));
            }
            let n = t - k;
            let positions: Vec<u32> = (0..n as u32).collect();
            let (cos, sin) = self.model.model.rotary_cos_sin(&positions, &self.device)?;
            let ahead = self.model.model.embed(&ids.narrow(1, k, n)?)?;
            hidden = module.forward(
                &hidden.narrow(1, 0, n)?,
                &ahead,
                &cos,
                &sin,
                &zoo_models::layers::AttentionMask::causal(0),
                &mut Default::default(),
            )?;
            let logits = module.logits(&hidden.narrow(1, 0, n - 1)?, &lm_head)?;
            let (b, _, v) = logits.dims3()?;
            let targets = ids
                .narrow(1, k + 1, n - 1)?
                .flatten_all()?
                .to_dtype(DType::U32)?;
            let weights = weights
                .map(|w| w.narrow(1, k + 1, n - 1)?.flatten_all())
                .transpose()?;
            depth_losses.push(crate::loss::scored_cross_entropy(
                &logits.reshape((b * (n - 1), v))?.to_dtype(DType::F32)?,
                &targets,
                weights.as_ref(),
            )?);
        }
        Ok(depth_losses)
    }

    /// The id that ends every document.
    pub fn eos(&self) -> Result<u32> {
        self.config
            .eos_token_ids()
            .first()
            .copied()
            .ok_or_else(|| Error::Input("the model config has no eos_token_id".into()))
    }

    /// Mean next-token cross-entropy of `ids` `[B, L]` (every position predicts the next).
    pub fn lm_loss(&self, ids: &Tensor) -> Result<Tensor> {
        let out = self.model.forward(ids, &mut KvCache::new())?;
        next_token_loss(&out.logits, ids, None)
    }

    /// HF's `config.json`: `LlamaForCausalLM`.
    pub fn hf_config(&self) -> serde_json::Value {
        let mut cfg = serde_json::to_value(&self.config).unwrap_or_default();
        cfg["architectures"] = json!(["LlamaForCausalLM"]);
        cfg["torch_dtype"] = "float32".into();
        cfg
    }

    /// Writes the model in HF layout into `dir`: `config.json`, `generation_config.json`,
    /// `model.safetensors` (without the tied `lm_head`), the tokenizer.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let tensors = crate::model::varmap_tensors(&self.varmap)?;
        save_hf_folder(
            &tensors,
            dir,
            &self.hf_config(),
            None,
            &self.tokenizer,
            Some(self.config.max_position_embeddings),
        )?;
        let generation = json!({
            "bos_token_id": self.config.bos_token_id,
            "eos_token_id": self.config.eos_token_id,
            "pad_token_id": self.config.pad_token_id,
        });
        let path = dir.join("generation_config.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&generation).unwrap_or_default(),
        )
        .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))
    }
}

/// The backbone parameter an MTP module's parameter `name` starts from: the same one of the
/// last decoder layer (`layers - 1`), or the final norm for `shared_head.norm`; `None` for the
/// module's own (`enorm`, `hnorm`, `eh_proj`).
fn last_layer_source(name: &str, layers: usize) -> Option<String> {
    let rest = name.strip_prefix("model.layers.")?;
    let (index, suffix) = rest.split_once('.')?;
    if index.parse::<usize>().ok()? < layers {
        return None;
    }
    match suffix {
        "shared_head.norm.weight" => Some("model.norm.weight".into()),
        s if s.starts_with("self_attn.")
            || s.starts_with("mlp.")
            || s.ends_with("layernorm.weight") =>
        {
            Some(format!("model.layers.{}.{s}", layers - 1))
        }
        _ => None,
    }
}

/// HF's Llama initialisation: norms 1, biases 0, other weights N(0, 0.02²).
fn initial_tensor(name: &str, shape: &Shape, rng: &mut Rng, device: &Device) -> Result<Tensor> {
    Ok(if name.ends_with("norm.weight") {
        Tensor::ones(shape, DType::F32, device)?
    } else if name.ends_with("bias") {
        Tensor::zeros(shape, DType::F32, device)?
    } else {
        rng.normal_tensor(shape, INIT_STD, device)?
    })
}

/// Mean cross-entropy of `logits` `[B, L, V]` at positions `0..L-1` against `ids[:, 1..]`;
/// with `weights` `[B, L]` (f32) only the targets of weight 1 count (a chat's replies).
pub fn next_token_loss(logits: &Tensor, ids: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    let (b, l, v) = logits.dims3()?;
    let logits = logits.narrow(1, 0, l - 1)?.reshape((b * (l - 1), v))?;
    let targets = ids
        .narrow(1, 1, l - 1)?
        .flatten_all()?
        .to_dtype(DType::U32)?;
    let logits = logits.to_dtype(DType::F32)?;
    Ok(match weights {
        Some(w) => crate::loss::weighted_cross_entropy(
            &logits,
            &targets,
            &w.narrow(1, 1, l - 1)?.flatten_all()?,
        )?,
        None => crate::loss::cross_entropy(&logits, &targets)?,
    })
}

fn lock(varmap: &VarMap) -> Result<std::sync::MutexGuard<'_, HashMap<String, Var>>> {
    varmap
        .data()
        .lock()
        .map_err(|_| Error::Input("poisoned varmap".into()))
}

/// The name and shape of every parameter of `config`'s model, sorted (a tied `lm_head` is the
/// embedding table and has no entry).
pub fn parameter_shapes(config: &LlamaConfig) -> Result<Vec<(String, Shape)>> {
    let probe = VarMap::new();
    let vb = VarBuilder::from_varmap(&probe, DType::F32, &Device::Cpu);
    LlamaForCausalLM::new(config, vb.clone())?;
    if config.num_nextn_predict_layers > 0 {
        MtpModules::new(config, config.num_nextn_predict_layers, vb)?;
    }
    let mut specs: Vec<(String, Shape)> = lock(&probe)?
        .iter()
        .map(|(n, v)| (n.clone(), v.shape().clone()))
        .collect();
    specs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(specs)
}

/// A JSONL line's chat: the rendered `prompt` its text starts with, and whether the reply
/// `ended` with eos (`"ended": true`; then the eos after it is a target too).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTurn {
    pub prompt: String,
    pub ended: bool,
}

/// Documents read from text and JSONL files, and how many JSONL lines were skipped.
pub struct Corpus {
    pub documents: Vec<String>,
    /// Per document, where it is a chat (JSONL `prompt`, as `zoo train medusa --self-distill
    /// --chat` writes its conversations), its prompt: only the rest is a target.
    pub chats: Vec<Option<ChatTurn>>,
    pub skipped: usize,
}

impl Corpus {
    /// Reads `paths`: `.jsonl` files hold one `{"text": ...}` per line, optionally with the
    /// `"prompt"` the text starts with and `"ended"` (malformed lines, lines without a string
    /// `text`, and lines whose text does not start with their prompt are skipped and counted);
    /// any other file is one document.
    pub fn read(paths: &[PathBuf]) -> Result<Self> {
        Self::read_split(paths, false)
    }

    /// Prompts: as [`Self::read`], but every non-empty line of a file other than `.jsonl` is one
    /// document.
    pub fn read_prompts(paths: &[PathBuf]) -> Result<Self> {
        Self::read_split(paths, true)
    }

    fn read_split(paths: &[PathBuf], by_line: bool) -> Result<Self> {
        let mut documents = Vec::new();
        let mut chats = Vec::new();
        let mut skipped = 0;
        for path in paths {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Input(format!("cannot read {}: {e}", path.display())))?;
            if path.extension().is_some_and(|e| e == "jsonl") {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let value = serde_json::from_str::<serde_json::Value>(line).ok();
                    let doc = value.as_ref().and_then(|v| v["text"].as_str());
                    let prompt = value.as_ref().map(|v| &v["prompt"]);
                    let ended = value.as_ref().map(|v| &v["ended"]);
                    match (doc, prompt, ended) {
                        (Some(doc), None | Some(serde_json::Value::Null), _) if !doc.is_empty() => {
                            documents.push(doc.to_string());
                            chats.push(None);
                        }
                        (
                            Some(doc),
                            Some(serde_json::Value::String(p)),
                            Some(serde_json::Value::Null | serde_json::Value::Bool(_)),
                        ) if doc.len() > p.len() && doc.starts_with(p.as_str()) => {
                            documents.push(doc.to_string());
                            chats.push(Some(ChatTurn {
                                prompt: p.clone(),
                                ended: ended.and_then(serde_json::Value::as_bool) == Some(true),
                            }));
                        }
                        _ => skipped += 1,
                    }
                }
            } else if by_line {
                documents.extend(
                    text.lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(str::to_string),
                );
            } else if !text.trim().is_empty() {
                documents.push(text);
            }
            chats.resize(documents.len(), None);
        }
        if documents.is_empty() {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            return Err(Error::Input(format!(
                "no documents in {} ({skipped} lines skipped)",
                names.join(", ")
            )));
        }
        Ok(Self {
            documents,
            chats,
            skipped,
        })
    }

    /// The corpus as one token stream: each document tokenized (with the tokenizer's special
    /// tokens) and followed by `eos`.
    pub fn tokens(&self, tokenizer: &TextTokenizer, eos: u32) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for doc in &self.documents {
            ids.extend(tokenizer.encode(doc)?);
            ids.push(eos);
        }
        Ok(ids)
    }

    /// The corpus packed into sequences of `seq_len` tokens ([`Self::tokens`]). Chats (JSONL
    /// lines with a prompt) take a row each instead ([`PackedSequences::conversations`]), after
    /// the packed rows of the other documents: only the tokens after the prompt are targets,
    /// with the eos after them where the reply `ended`. A chat whose tokens do not start with
    /// its prompt's, or that has no target within `seq_len`, is left out; the count of those
    /// comes back with the sequences.
    pub fn pack(
        &self,
        tokenizer: &TextTokenizer,
        eos: u32,
        seq_len: usize,
        seed: u64,
    ) -> Result<(PackedSequences, usize)> {
        if self.chats.iter().all(Option::is_none) {
            return Ok((
                PackedSequences::new(&self.tokens(tokenizer, eos)?, seq_len, seed)?,
                0,
            ));
        }
        let (mut stream, mut chats, mut dropped) = (Vec::new(), Vec::new(), 0);
        for (doc, chat) in self.documents.iter().zip(&self.chats) {
            let mut tokens = tokenizer.encode(doc)?;
            let Some(chat) = chat else {
                stream.extend(tokens);
                stream.push(eos);
                continue;
            };
            let prompt = tokenizer.encode(&chat.prompt)?;
            if !tokens.starts_with(&prompt) || tokens.len() == prompt.len() {
                dropped += 1;
                continue;
            }
            let mut scored = vec![false; prompt.len()];
            scored.resize(tokens.len(), true);
            scored.push(chat.ended);
            tokens.push(eos);
            chats.push((tokens, scored));
        }
        let rows = stream
            .chunks_exact(seq_len)
            .map(|c| (c.to_vec(), vec![true; seq_len]))
            .chain(chats)
            .collect();
        let (data, cut) = PackedSequences::conversations(rows, seq_len, eos, seed)?;
        Ok((data, dropped + cut))
    }
}

/// A batch of packed sequences.
pub struct Batch {
    /// Token ids `[B, L]`.
    pub ids: Tensor,
    /// The target weights `[B, L]` (f32, 1 for a target and 0 elsewhere), where not every
    /// token is one (a chat's replies).
    pub weights: Option<Tensor>,
    /// Which sequences of the data the rows are.
    pub rows: Vec<usize>,
}

/// A frozen backbone's hidden states per training sequence, computed at first use and kept:
/// heads and modules trained on a frozen model need its forward pass of every sequence once,
/// not at every visit, as EAGLE precomputes its features. Kept only where every sequence's
/// states fit in [`KeptHidden::BUDGET`].
pub(crate) struct KeptHidden {
    states: Vec<Option<Tensor>>,
}

impl KeptHidden {
    /// Bytes the kept states may take.
    const BUDGET: usize = 2 << 30;

    /// For the sequences of `data`, with states `width` wide; `None` beyond the budget.
    pub(crate) fn for_data(data: &PackedSequences, width: usize) -> Option<Self> {
        let per_sequence = data.sequences.first().map_or(0, Vec::len) * width * 4;
        (data.len().saturating_mul(per_sequence) <= Self::BUDGET).then(|| Self {
            states: vec![None; data.len()],
        })
    }

    /// The states `[B, L, D]` of `batch`, whose sequences not kept yet `compute` gives from
    /// their ids `[N, L]` together.
    pub(crate) fn states(
        &mut self,
        batch: &Batch,
        data: &PackedSequences,
        compute: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut missing: Vec<usize> = batch
            .rows
            .iter()
            .copied()
            .filter(|&r| self.states[r].is_none())
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            let ids: Vec<Vec<u32>> = missing.iter().map(|&r| data.sequences[r].clone()).collect();
            let hidden = compute(&Tensor::new(ids, batch.ids.device())?)?;
            for (i, &r) in missing.iter().enumerate() {
                self.states[r] = Some(hidden.get(i)?.contiguous()?);
            }
        }
        let rows = batch
            .rows
            .iter()
            .map(|&r| {
                self.states[r]
                    .clone()
                    .ok_or_else(|| Error::Input(format!("no hidden states for sequence {r}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}

/// The final-norm hidden states `[B, L, D]` of `ids` `[B, L]` by `model`, without its logits
/// and outside any training graph.
pub fn frozen_hidden(model: &LlamaForCausalLM, ids: &Tensor) -> Result<Tensor> {
    let positions: Vec<u32> = (0..ids.dim(1)? as u32).collect();
    Ok(model
        .model
        .forward_at(
            ids,
            &positions,
            &zoo_models::layers::AttentionMask::causal(0),
            &mut KvCache::new(),
        )?
        .detach())
}

/// The token stream cut into sequences of `seq_len` tokens (the tail shorter than a sequence is
/// dropped), or one conversation per row ([`Self::conversations`]), visited in a seeded order
/// per epoch.
pub struct PackedSequences {
    sequences: Vec<Vec<u32>>,
    /// Which tokens are scored as targets, per sequence (a chat's replies); `None`: all.
    scored: Option<Vec<Vec<bool>>>,
    seed: u64,
}

impl PackedSequences {
    pub fn new(tokens: &[u32], seq_len: usize, seed: u64) -> Result<Self> {
        if seq_len < 2 {
            return Err(Error::Input("--seq-len must be at least 2".into()));
        }
        let sequences: Vec<Vec<u32>> = tokens.chunks_exact(seq_len).map(<[u32]>::to_vec).collect();
        if sequences.is_empty() {
            return Err(Error::Input(format!(
                "the corpus has {} tokens, fewer than one sequence of --seq-len {seq_len}",
                tokens.len()
            )));
        }
        Ok(Self {
            sequences,
            scored: None,
            seed,
        })
    }

    /// One row per conversation, as FasterDecoding pads each of its conversations: a chat's
    /// prompt and reply keep their whole context, never cut across rows nor sharing one with
    /// another conversation (whose hidden states would then differ from decoding's). Each row
    /// is cut to `seq_len` tokens and padded to it with `pad`; `scored[i]` says whether its
    /// token `i` is a target (a reply's, not the prompt and the template around it), and the
    /// padding never is. Rows left without a target are dropped, and counted.
    pub fn conversations(
        rows: Vec<(Vec<u32>, Vec<bool>)>,
        seq_len: usize,
        pad: u32,
        seed: u64,
    ) -> Result<(Self, usize)> {
        if seq_len < 2 {
            return Err(Error::Input("--seq-len must be at least 2".into()));
        }
        let (mut sequences, mut scored, mut dropped) = (Vec::new(), Vec::new(), 0);
        for (mut ids, mut flags) in rows {
            if flags.len() != ids.len() {
                return Err(Error::Input(format!(
                    "{} target flags for {} tokens",
                    flags.len(),
                    ids.len()
                )));
            }
            ids.truncate(seq_len);
            flags.truncate(seq_len);
            // Position 0 is never a target (nothing predicts it).
            if !flags.iter().skip(1).any(|&f| f) {
                dropped += 1;
                continue;
            }
            ids.resize(seq_len, pad);
            flags.resize(seq_len, false);
            sequences.push(ids);
            scored.push(flags);
        }
        if sequences.is_empty() {
            return Err(Error::Input(format!(
                "no conversation has a target within --seq-len {seq_len} tokens"
            )));
        }
        Ok((
            Self {
                sequences,
                scored: Some(scored),
                seed,
            },
            dropped,
        ))
    }

    /// Sequences made elsewhere (self-distillation's generations), all of one length.
    pub fn from_sequences(sequences: Vec<Vec<u32>>, seed: u64) -> Result<Self> {
        let len = sequences.first().map_or(0, Vec::len);
        if len < 2 || sequences.iter().any(|s| s.len() != len) {
            return Err(Error::Input(
                "packed sequences must be non-empty, of one length of at least 2 tokens".into(),
            ));
        }
        Ok(Self {
            sequences,
            scored: None,
            seed,
        })
    }

    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    pub fn sequences(&self) -> &[Vec<u32>] {
        &self.sequences
    }

    /// Which tokens of each sequence are targets, where not all are.
    pub fn scored(&self) -> Option<&[Vec<bool>]> {
        self.scored.as_deref()
    }

    /// The first `n` sequences (all where fewer), with their target flags.
    pub fn first(&self, n: usize) -> Self {
        let n = n.min(self.len());
        Self {
            sequences: self.sequences[..n].to_vec(),
            scored: self.scored.as_ref().map(|s| s[..n].to_vec()),
            seed: self.seed,
        }
    }

    /// The order of epoch `epoch`.
    fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.sequences.len()).collect();
        Rng::derive(self.seed, 0x1a_0000 + epoch).shuffle(&mut order);
        order
    }

    /// `batch` sequences from `position` on, and the position after them.
    pub fn batch(
        &self,
        position: DataPosition,
        batch: usize,
        device: &Device,
    ) -> Result<(Batch, DataPosition)> {
        let (rows, pos) = self.rows(position, batch);
        let ids: Vec<Vec<u32>> = rows.iter().map(|&r| self.sequences[r].clone()).collect();
        let weights = self
            .scored
            .as_ref()
            .map(|scored| target_weights(rows.iter().map(|&r| &scored[r][..]), device))
            .transpose()?;
        let batch = Batch {
            ids: Tensor::new(ids, device)?,
            weights,
            rows,
        };
        Ok((batch, pos))
    }

    /// The sequences `batch` rows from `position` on take, and the position after them.
    fn rows(&self, position: DataPosition, batch: usize) -> (Vec<usize>, DataPosition) {
        let mut pos = position;
        let mut order = self.order(pos.epoch);
        let mut rows = Vec::with_capacity(batch);
        while rows.len() < batch {
            if pos.records as usize >= order.len() {
                pos.epoch += 1;
                pos.records = 0;
                order = self.order(pos.epoch);
            }
            rows.push(order[pos.records as usize]);
            pos.records += 1;
            pos.samples += 1;
        }
        (rows, pos)
    }
}

/// Target flags of equal-length rows as f32 weights `[B, L]`.
fn target_weights<'a>(rows: impl Iterator<Item = &'a [bool]>, device: &Device) -> Result<Tensor> {
    let rows: Vec<Vec<f32>> = rows
        .map(|r| r.iter().map(|&t| f32::from(u8::from(t))).collect())
        .collect();
    Ok(Tensor::new(rows, device)?)
}

/// Perplexity `exp(mean next-token cross-entropy)` of `model` over `sequences`, in batches.
pub fn perplexity(
    model: &LlamaForCausalLM,
    sequences: &[Vec<u32>],
    device: &Device,
) -> Result<f64> {
    perplexity_after(model, sequences, None, device, 0)
}

/// [`perplexity`] scoring only the tokens after the first `context + 1` of each sequence
/// (their predictions still see the whole sequence before them), and with `scored` (one flag
/// per token, [`PackedSequences::scored`]) only the flagged ones among them: a chat's replies.
/// llama.cpp's `llama-perplexity` scores the second half of each window: `context = len / 2`.
pub fn perplexity_after(
    model: &LlamaForCausalLM,
    sequences: &[Vec<u32>],
    scored: Option<&[Vec<bool>]>,
    device: &Device,
    context: usize,
) -> Result<f64> {
    let (mut total, mut count) = (0.0, 0usize);
    for (c, chunk) in sequences.chunks(8).enumerate() {
        let ids = Tensor::new(chunk.to_vec(), device)?;
        let out = model.forward(&ids, &mut KvCache::new())?;
        let (b, l, _) = out.logits.dims3()?;
        if context + 1 >= l {
            return Err(Error::Input(format!(
                "sequences of {l} tokens leave nothing to score after {context}"
            )));
        }
        let n = l - context;
        let flags = scored.map(|s| &s[c * 8..c * 8 + chunk.len()]);
        let (weights, targets) = match flags {
            Some(rows) => (
                Some(target_weights(rows.iter().map(|r| &r[context..]), device)?),
                rows.iter()
                    .map(|r| r[context + 1..].iter().filter(|&&f| f).count())
                    .sum(),
            ),
            None => (None, b * (n - 1)),
        };
        let loss = next_token_loss(
            &out.logits.narrow(1, context, n)?,
            &ids.narrow(1, context, n)?,
            weights.as_ref(),
        )?
        .to_scalar::<f32>()?;
        total += f64::from(loss) * targets as f64;
        count += targets;
    }
    Ok((total / count.max(1) as f64).exp())
}

/// A draft vocabulary of the first `n` of a model's `vocab` tokens (`--draft-vocab`).
pub fn check_draft_vocab(n: usize, vocab: usize) -> Result<()> {
    if n == 0 || n > vocab {
        return Err(Error::Input(format!(
            "--draft-vocab {n}: the model's vocabulary has {vocab} tokens"
        )));
    }
    Ok(())
}

/// DeepSeek-V3-style multi-token prediction on top of the LM loss.
#[derive(Debug, Clone, Copy)]
pub struct MtpSettings {
    /// Modules (depths) to train; added to a model without them.
    pub depth: usize,
    /// The loss is `L_main + λ / D · Σ_k L^k_MTP` (DeepSeek-V3: 0.3, later 0.1).
    pub lambda: f64,
    /// Train only the modules, on the frozen backbone's hidden states (`λ / D · Σ_k L^k`).
    pub freeze_backbone: bool,
    /// The modules learn to draft from the first this many tokens of the vocabulary (the
    /// draft vocabulary of `zoo generate --draft-vocab`); targets outside it are not scored.
    pub draft_vocab: Option<usize>,
}

/// Causal LM training on packed sequences, optionally with MTP modules.
pub struct LmTask {
    pub model: TrainableLlama,
    data: PackedSequences,
    /// The frozen backbone's hidden states per sequence, where they are kept.
    frozen: Option<KeptHidden>,
    position: DataPosition,
    batch_size: usize,
    pub val: Option<PackedSequences>,
    mtp: Option<MtpSettings>,
    precision: Precision,
    /// Per-depth MTP losses summed over the step's micro-batches, and their count.
    sums: (Vec<f64>, usize),
    last: Vec<(String, f64)>,
}

impl LmTask {
    /// The frozen backbone's hidden states of `batch`, kept ones where they are.
    fn frozen_hidden(&mut self, batch: &Batch) -> Result<Tensor> {
        let model = &self.model.model;
        match &mut self.frozen {
            Some(kept) => kept.states(batch, &self.data, |ids| frozen_hidden(model, ids)),
            None => frozen_hidden(model, &batch.ids),
        }
    }
}

impl Task for LmTask {
    type Batch = Batch;

    fn next_batch(&mut self) -> Result<Batch> {
        let (batch, pos) = self
            .data
            .batch(self.position, self.batch_size, &self.model.device)?;
        self.position = pos;
        Ok(batch)
    }

    fn data_position(&self) -> DataPosition {
        self.position
    }

    fn batch_size(&self, batch: &Batch) -> usize {
        batch.rows.len()
    }

    fn loss(&mut self, batch: &Batch) -> Result<Tensor> {
        let ids = &batch.ids;
        let Some(mtp) = self.mtp else {
            // Under mixed precision a half-precision copy built from the f32 variables (see
            // `crate::precision`); the loss is taken in f32.
            let m = &self.model;
            let model = self
                .precision
                .compute_model(&m.model, &m.varmap, &m.device, |vb| {
                    LlamaForCausalLM::new(&m.config, vb)
                })?;
            let out = model.forward(ids, &mut KvCache::new())?;
            return next_token_loss(&out.logits, ids, batch.weights.as_ref());
        };
        // On a frozen backbone only the modules' losses count, and its hidden states are the
        // same at every visit of a sequence.
        let scored = batch.weights.as_ref();
        let (main, depths) = if mtp.freeze_backbone {
            let hidden = self.frozen_hidden(batch)?;
            (
                None,
                self.model
                    .mtp_losses(ids, hidden, scored, mtp.draft_vocab)?,
            )
        } else {
            let (main, depths) = self.model.losses(ids, false, scored, mtp.draft_vocab)?;
            (Some(main), depths)
        };
        self.sums.0.resize(depths.len(), 0.0);
        let mut sum: Option<Tensor> = None;
        for (i, loss) in depths.iter().enumerate() {
            self.sums.0[i] += f64::from(loss.to_scalar::<f32>()?);
            sum = Some(match sum {
                Some(s) => (s + loss)?,
                None => loss.clone(),
            });
        }
        self.sums.1 += 1;
        let sum = sum.ok_or_else(|| Error::Input("the model has no MTP modules".into()))?;
        let weighted = (sum * (mtp.lambda / depths.len() as f64))?;
        Ok(match main {
            Some(main) => (main + weighted)?,
            None => weighted,
        })
    }

    fn after_step(&mut self) -> Result<()> {
        let n = self.sums.1.max(1) as f64;
        self.last = self
            .sums
            .0
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("mtp{}_loss", i + 1), s / n))
            .collect();
        self.sums = (Vec::new(), 0);
        Ok(())
    }

    fn mixed_precision(&self) -> bool {
        self.mtp.is_none()
    }

    fn step_metrics(&self) -> Result<Vec<(String, f64)>> {
        Ok(self.last.clone())
    }

    fn evaluate(&mut self, _output: &Path, _step: u64) -> Result<Vec<(String, f64)>> {
        match &self.val {
            Some(val) => Ok(vec![(
                "val_perplexity".into(),
                perplexity_after(
                    &self.model.model,
                    val.sequences(),
                    val.scored(),
                    &self.model.device,
                    0,
                )?,
            )]),
            None => Ok(Vec::new()),
        }
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.model.save_hf(dir)
    }
}

/// Where the model of an LM run comes from.
#[derive(Debug, Clone)]
pub enum ModelSpec {
    Preset(String),
    Pretrained(String),
}

/// Where the tokenizer of a preset comes from.
#[derive(Debug, Clone)]
pub enum TokenizerSpec {
    /// Train a byte-level BPE of this many tokens on the training corpus.
    Train { vocab_size: usize },
    /// A folder or hub id with `tokenizer.json`.
    Load(String),
}

/// Everything an LM run needs.
pub struct RunConfig {
    pub model: ModelSpec,
    pub tokenizer: TokenizerSpec,
    pub seq_len: usize,
    pub train: TrainConfig,
    pub batch_size: usize,
    pub optimizer: AdamWConfig,
    pub resume: Option<PathBuf>,
    pub device: Device,
    /// `zoo train mtp`: train MTP modules with (or on top of) the LM.
    pub mtp: Option<MtpSettings>,
    /// Train this many epochs over the packed corpus instead of `train.steps`.
    pub epochs: Option<u64>,
}

pub struct RunSummary {
    pub state: TrainState,
    pub task: LmTask,
    pub final_dir: PathBuf,
    /// JSONL lines skipped while reading the corpora.
    pub skipped: usize,
}

/// Builds the model (preset with a loaded or trained tokenizer, pretrained, or resumed), packs
/// the corpus, and trains with the shared loop.
pub fn run(
    config: RunConfig,
    train_files: &[PathBuf],
    val_files: Option<&[PathBuf]>,
) -> Result<RunSummary> {
    let corpus = Corpus::read(train_files)?;
    let resume_dir = config
        .resume
        .as_deref()
        .map(checkpoint::resolve)
        .transpose()?;
    let seed = config.train.seed;
    let model = match (&resume_dir, &config.model) {
        (Some(dir), _) => TrainableLlama::from_pretrained(&dir.to_string_lossy(), &config.device)?,
        (None, ModelSpec::Pretrained(spec)) => {
            TrainableLlama::from_pretrained(spec, &config.device)?
        }
        (None, ModelSpec::Preset(name)) => {
            let tokenizer = match &config.tokenizer {
                TokenizerSpec::Train { vocab_size } => {
                    TextTokenizer::train_bpe(corpus.documents.iter(), *vocab_size)?
                }
                TokenizerSpec::Load(spec) => {
                    let repo = ModelRepo::open(spec)?;
                    TextTokenizer::from_files(
                        &repo.get("tokenizer.json")?,
                        repo.get_optional("tokenizer_config.json")?.as_deref(),
                    )?
                }
            };
            TrainableLlama::from_preset(name, tokenizer, seed, &config.device)?
        }
    };
    if config.seq_len > model.config.max_position_embeddings {
        return Err(Error::Input(format!(
            "--seq-len {} exceeds the model's max_position_embeddings {}",
            config.seq_len, model.config.max_position_embeddings
        )));
    }
    let model = match config.mtp {
        Some(mtp) if mtp.depth == 0 => {
            return Err(Error::Input("--mtp-depth must be at least 1".into()))
        }
        // A pretrained backbone lends its last layer to new modules.
        Some(mtp) => model.add_mtp(
            mtp.depth,
            seed,
            matches!(config.model, ModelSpec::Pretrained(_)),
        )?,
        None => model,
    };
    if let Some(n) = config.mtp.and_then(|m| m.draft_vocab) {
        check_draft_vocab(n, model.config.vocab_size)?;
    }
    let eos = model.eos()?;
    let (data, dropped) = corpus.pack(&model.tokenizer, eos, config.seq_len, seed)?;
    let (val, val_skipped) = match val_files {
        Some(files) => {
            let val = Corpus::read(files)?;
            let (seqs, val_dropped) = val.pack(&model.tokenizer, eos, config.seq_len, seed)?;
            (Some(seqs), val.skipped + val_dropped)
        }
        None => (None, 0),
    };
    let train = match config.epochs {
        Some(epochs) => config
            .train
            .for_epochs(epochs, data.len() as u64, config.batch_size),
        None => config.train.clone(),
    };
    let state = initial_state(resume_dir.as_deref(), seed)?;
    let vars = model.trainable_vars(config.mtp.is_some_and(|m| m.freeze_backbone));
    // The frozen backbone's hidden states of every sequence, where they fit.
    let frozen = config
        .mtp
        .filter(|m| m.freeze_backbone)
        .and_then(|_| KeptHidden::for_data(&data, model.config.hidden_size));
    let mut task = LmTask {
        model,
        data,
        frozen,
        position: state.data,
        batch_size: config.batch_size,
        val,
        mtp: config.mtp,
        precision: config.train.precision,
        sums: (Vec::new(), 0),
        last: Vec::new(),
    };
    let state = run_task(
        &mut task,
        &vars,
        config.optimizer,
        &train,
        resume_dir.as_deref(),
        state,
        &config.device,
    )?;
    Ok(RunSummary {
        state,
        task,
        final_dir: train.output.join("final"),
        skipped: corpus.skipped + dropped + val_skipped,
    })
}
