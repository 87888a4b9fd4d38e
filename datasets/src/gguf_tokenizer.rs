//! The tokenizer a GGUF file carries in its `tokenizer.ggml.*` metadata, rebuilt as a
//! `tokenizers` tokenizer (`tokenizer.json`) with its `tokenizer_config.json`: bos, eos, pad,
//! unk and the chat template.
//!
//! Two kinds, as `tokenizer.ggml.model` names them:
//! - `gpt2`: byte-level BPE from `tokens` and `merges`, pre-tokenized as llama.cpp does for
//!   `tokenizer.ggml.pre` (the regexes of `llama-vocab.cpp`).
//! - `llama`: SentencePiece pieces with `scores`, as BPE over the merges the scores imply
//!   (HF's `GGUFTokenizerSkeleton` builds them the same way), byte fallback, and `▁` for
//!   spaces with a leading one when `tokenizer.ggml.add_space_prefix` (default true) says so.
//!
//! Control tokens (`token_type` 3) are special tokens. bos (and eos) are added to every text
//! only as `tokenizer.ggml.add_bos_token` (`add_eos_token`) says, as llama.cpp does; HF 4.57's
//! GGUF loader prepends bos regardless.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map, Value as Json};

use crate::error::{Error, Result};
use crate::tokenize::TextTokenizer;

/// `tokenizer.ggml.pre` values with a pre-tokenizer here.
pub const SUPPORTED_PRE: &str = "default, gpt2, gpt-2, smollm, llama-bpe, llama3, smaug-bpe, qwen2";

const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl TextTokenizer {
    /// The tokenizer of a GGUF file's metadata; `path` names the file in errors.
    pub fn from_gguf(metadata: &HashMap<String, Value>, path: &Path) -> Result<Self> {
        let (tokenizer, config) = tokenizer_json(metadata).map_err(|message| Error::Invalid {
            path: path.to_path_buf(),
            what: "GGUF tokenizer",
            message,
        })?;
        let bytes = serde_json::to_vec(&tokenizer).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut this = Self::from_bytes(&bytes, &config).map_err(|e| Error::Invalid {
            path: path.to_path_buf(),
            what: "GGUF tokenizer",
            message: e.to_string(),
        })?;
        this.config_source = format!("{} (tokenizer.chat_template)", path.display());
        Ok(this)
    }
}

struct Meta<'a>(&'a HashMap<String, Value>);

impl Meta<'_> {
    fn string(&self, key: &str) -> std::result::Result<Option<String>, String> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(format!("metadata key {key} is {v:?}, not a string")),
        }
    }

    fn bool(&self, key: &str) -> std::result::Result<Option<bool>, String> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(format!("metadata key {key} is {v:?}, not a bool")),
        }
    }

    fn array(&self, key: &str) -> std::result::Result<Option<&Vec<Value>>, String> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(format!(
                "metadata key {key} is a {:?}, not an array",
                v.value_type()
            )),
        }
    }

    fn strings(&self, key: &str) -> std::result::Result<Option<Vec<String>>, String> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!("{key}[{i}] is {other:?}, not a string")),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Some)
    }

    fn id(&self, key: &str, vocab: usize) -> std::result::Result<Option<u32>, String> {
        let Some(v) = self.0.get(key) else {
            return Ok(None);
        };
        let id = integer(v).ok_or_else(|| format!("metadata key {key} is {v:?}, not an id"))?;
        if id < 0 || id as usize >= vocab {
            return Err(format!(
                "metadata key {key} is {id}, outside the vocabulary of {vocab} tokens"
            ));
        }
        Ok(Some(id as u32))
    }
}

fn integer(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(n) => i64::from(*n),
        Value::I8(n) => i64::from(*n),
        Value::U16(n) => i64::from(*n),
        Value::I16(n) => i64::from(*n),
        Value::U32(n) => i64::from(*n),
        Value::I32(n) => i64::from(*n),
        Value::U64(n) => i64::try_from(*n).ok()?,
        Value::I64(n) => *n,
        _ => return None,
    })
}

/// `tokenizer.json` and `tokenizer_config.json` as values.
fn tokenizer_json(metadata: &HashMap<String, Value>) -> std::result::Result<(Json, Json), String> {
    let meta = Meta(metadata);
    let kind = meta
        .string("tokenizer.ggml.model")?
        .ok_or("metadata key tokenizer.ggml.model is missing: the file carries no tokenizer")?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or("metadata key tokenizer.ggml.tokens is missing")?;
    if tokens.is_empty() {
        return Err("tokenizer.ggml.tokens is empty".into());
    }
    let n = tokens.len();
    let token_type: Vec<i64> = match meta.array("tokenizer.ggml.token_type")? {
        Some(types) if types.len() == n => types
            .iter()
            .map(|v| integer(v).ok_or_else(|| format!("tokenizer.ggml.token_type holds {v:?}")))
            .collect::<std::result::Result<_, _>>()?,
        Some(types) => {
            return Err(format!(
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                types.len()
            ))
        }
        None => Vec::new(),
    };
    let bos = meta.id("tokenizer.ggml.bos_token_id", n)?;
    let eos = meta.id("tokenizer.ggml.eos_token_id", n)?;
    let unk = meta.id("tokenizer.ggml.unknown_token_id", n)?;
    let pad = meta.id("tokenizer.ggml.padding_token_id", n)?;
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let add_space_prefix = meta
        .bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);

    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), i.into());
    }
    let (merges, normalizer, pre_tokenizer, decoder) = match kind.as_str() {
        "gpt2" => {
            let merges = meta.strings("tokenizer.ggml.merges")?.ok_or(
                "metadata key tokenizer.ggml.merges is missing (a gpt2 tokenizer needs it)",
            )?;
            let merges = merges
                .iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| json!([a, b]))
                        .ok_or_else(|| format!("tokenizer.ggml.merges holds {m:?}, not `a b`"))
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let pre = meta
                .string("tokenizer.ggml.pre")?
                .unwrap_or_else(|| "default".into());
            let pre_tokenizer = byte_level_pre_tokenizer(&pre)?;
            let decoder = json!({"type": "ByteLevel", "add_prefix_space": true,
                                 "trim_offsets": true, "use_regex": true});
            (merges, Json::Null, pre_tokenizer, decoder)
        }
        "llama" => {
            let merges = match meta.strings("tokenizer.ggml.merges")? {
                Some(m) => m
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| json!([a, b]))
                            .ok_or_else(|| format!("tokenizer.ggml.merges holds {m:?}"))
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?,
                None => {
                    let scores = scores(&meta, n)?;
                    merges_from_scores(&tokens, &scores)
                        .into_iter()
                        .map(|(a, b)| json!([a, b]))
                        .collect()
                }
            };
            let mut normalizers = Vec::new();
            if add_space_prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            normalizers.push(json!({"type": "Replace", "pattern": {"String": " "},
                                    "content": "\u{2581}"}));
            let mut decoders = vec![
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            ];
            if add_space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            (
                merges,
                json!({"type": "Sequence", "normalizers": normalizers}),
                Json::Null,
                json!({"type": "Sequence", "decoders": decoders}),
            )
        }
        other => {
            return Err(format!(
                "tokenizer.ggml.model `{other}` is not supported (gpt2 and llama are)"
            ))
        }
    };

    // Control tokens are special, matched before the model splits text.
    let special_ids: Vec<usize> = if token_type.is_empty() {
        [unk, bos, eos]
            .into_iter()
            .flatten()
            .map(|i| i as usize)
            .collect()
    } else {
        (0..n).filter(|&i| token_type[i] == 3).collect()
    };
    let mut seen = HashSet::new();
    let added: Vec<Json> = special_ids
        .into_iter()
        .filter(|&i| seen.insert(tokens[i].clone()))
        .map(|i| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();

    let name = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
    let post_processor = template(&name(bos), bos, add_bos, &name(eos), eos, add_eos)?;
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": name(unk),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        }
    });
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": false,
    });
    for (key, id) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ] {
        if let Some(t) = name(id) {
            config[key] = t.into();
        }
    }
    if let Some(template) = meta.string("tokenizer.chat_template")? {
        config["chat_template"] = template.into();
    }
    Ok((tokenizer, config))
}

fn scores(meta: &Meta, n: usize) -> std::result::Result<Vec<f64>, String> {
    let scores = meta
        .array("tokenizer.ggml.scores")?
        .ok_or("a llama tokenizer without tokenizer.ggml.merges needs tokenizer.ggml.scores")?;
    if scores.len() != n {
        return Err(format!(
            "tokenizer.ggml.scores has {} entries for {n} tokens",
            scores.len()
        ));
    }
    scores
        .iter()
        .map(|v| match v {
            Value::F32(x) if x.is_finite() => Ok(f64::from(*x)),
            Value::F64(x) if x.is_finite() => Ok(*x),
            other => Err(format!("tokenizer.ggml.scores holds {other:?}")),
        })
        .collect()
}

/// The merges SentencePiece scores imply, as HF's `GGUFTokenizerSkeleton` derives them: for
/// each piece, every split into two pieces of the vocabulary (ordered by the halves' scores,
/// highest first), and all of them ordered by the merged piece's score, highest first (a
/// stable sort).
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    // A dict from piece to score: a repeated piece keeps its first place and its last score.
    let mut score: HashMap<&str, f64> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (t, &s) in tokens.iter().zip(scores) {
        if score.insert(t.as_str(), s).is_none() {
            order.push(t.as_str());
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for piece in order {
        let piece_score = score[piece];
        let mut local: Vec<(&str, &str, f64)> = piece
            .char_indices()
            .skip(1)
            .map(|(i, _)| piece.split_at(i))
            .filter(|(l, r)| score.contains_key(l) && score.contains_key(r))
            .map(|(l, r)| (l, r, piece_score))
            .collect();
        local.sort_by(|a, b| {
            (score[b.0], score[b.1])
                .partial_cmp(&(score[a.0], score[a.1]))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// The byte-level pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre`.
fn byte_level_pre_tokenizer(pre: &str) -> std::result::Result<Json, String> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let split = |regex: &str| {
        json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
               "invert": false})
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // llama.cpp's `\p{N}` then the GPT-2 regex: digits one by one.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
            split(REGEX_LLAMA3), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(REGEX_QWEN2), byte_level(false)]}),
        other => {
            return Err(format!(
                "tokenizer.ggml.pre `{other}` is not supported ({SUPPORTED_PRE} are)"
            ))
        }
    })
}

/// A `TemplateProcessing` adding bos and/or eos, or none.
fn template(
    bos: &Option<String>,
    bos_id: Option<u32>,
    add_bos: bool,
    eos: &Option<String>,
    eos_id: Option<u32>,
    add_eos: bool,
) -> std::result::Result<Json, String> {
    let mut specials = Map::new();
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut piece = |name: &Option<String>, id: Option<u32>, what: &str| {
        let (Some(name), Some(id)) = (name, id) else {
            return Err(format!(
                "tokenizer.ggml.add_{what}_token is true but tokenizer.ggml.{what}_token_id is \
                 missing"
            ));
        };
        specials.insert(
            name.clone(),
            json!({"id": name, "ids": [id], "tokens": [name]}),
        );
        Ok(name.clone())
    };
    let bos = if add_bos {
        Some(piece(bos, bos_id, "bos")?)
    } else {
        None
    };
    let eos = if add_eos {
        Some(piece(eos, eos_id, "eos")?)
    } else {
        None
    };
    if bos.is_none() && eos.is_none() {
        return Ok(Json::Null);
    }
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        let special = |t: &String| json!({"SpecialToken": {"id": t, "type_id": type_id}});
        let part: Vec<Json> = bos
            .iter()
            .map(special)
            .chain([json!({"Sequence": {"id": seq, "type_id": type_id}})])
            .chain(eos.iter().map(special))
            .collect();
        if seq == "A" {
            single.extend(part.clone());
        }
        pair.extend(part);
    }
    Ok(
        json!({"type": "TemplateProcessing", "single": single, "pair": pair,
              "special_tokens": specials}),
    )
}
