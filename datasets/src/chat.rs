//! Chat templates: a conversation rendered by the model's Jinja template, as HF's
//! `apply_chat_template(messages, add_generation_prompt=True)` renders it, and tokenized
//! without adding special tokens (the template writes them).
//!
//! The template comes from `tokenizer_config.json` (`chat_template`, a string or HF's list of
//! named templates, of which `default` is used) or a GGUF's `tokenizer.chat_template`. It is
//! rendered with minijinja under HF's settings: `trim_blocks`, `lstrip_blocks`, loop controls,
//! `raise_exception`, `tojson`, Python's string methods, and the special tokens (`bos_token`,
//! `eos_token`, `unk_token`, `pad_token`) as variables. HF's `strftime_now` is not defined:
//! templates that test `strftime_now is defined` take their fallback date.

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tokenize::TextTokenizer;

/// The most minijinja instructions a render may take.
const TEMPLATE_FUEL: u64 = 50_000_000;

/// A render may write this many bytes, plus [`RENDER_BYTES_PER_MESSAGE_BYTE`] per byte of the
/// messages.
const RENDER_BASE_BYTES: usize = 1 << 20;
const RENDER_BYTES_PER_MESSAGE_BYTE: usize = 16;

/// A writer that refuses to grow past `limit` bytes.
struct Bounded {
    text: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("the rendered text is too long"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template and the special tokens it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for errors.
    source: String,
    tokens: Value,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

/// The text of a special token as `tokenizer_config.json` writes it: a string or an
/// `AddedToken` object with `content`.
fn token_text(config: &Value, key: &str) -> Option<String> {
    let v = config.get(key)?;
    v.as_str()
        .or_else(|| v.get("content").and_then(Value::as_str))
        .map(str::to_string)
}

impl ChatTemplate {
    /// The template of `config` (a `tokenizer_config.json` value), or `None` when it has
    /// none; `source` names its file in errors.
    pub fn from_config(config: &Value, source: &str) -> Result<Option<Self>> {
        let template = match config.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            // HF's named templates: [{"name": "default", "template": "..."}, ...].
            Some(Value::Array(list)) => {
                let named = |name: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                        .and_then(|t| t.get("template").and_then(Value::as_str))
                };
                match named("default") {
                    Some(t) => t.to_string(),
                    None => {
                        return Err(Error::Invalid {
                            path: source.into(),
                            what: "chat template",
                            message: "chat_template is a list without a `default` template".into(),
                        })
                    }
                }
            }
            Some(other) => {
                return Err(Error::Invalid {
                    path: source.into(),
                    what: "chat template",
                    message: format!("chat_template is {other}, not a string"),
                })
            }
        };
        let mut tokens = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(t) = token_text(config, key) {
                tokens.insert(key.into(), t.into());
            }
        }
        Self::new(&template, source, Value::Object(tokens)).map(Some)
    }

    /// Compiles `template`; `tokens` holds the special-token variables.
    pub fn new(template: &str, source: &str, tokens: Value) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // A template that loops (near) forever is refused rather than run: chat templates
        // render in well under a million instructions.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| Error::Invalid {
                path: source.into(),
                what: "chat template",
                message: describe(&e),
            })?;
        Ok(Self {
            env,
            source: source.to_string(),
            tokens,
        })
    }

    /// The text of `messages` with the assistant's turn opened
    /// (`add_generation_prompt=True`).
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| self.render_error(&e))?;
        let mut ctx = self.tokens.clone();
        ctx["messages"] = serde_json::to_value(messages).unwrap_or(Value::Null);
        ctx["add_generation_prompt"] = true.into();
        ctx["tools"] = Value::Null;
        ctx["documents"] = Value::Null;
        // A template's text is its own plus the messages': far more than that is a template
        // that multiplies strings, refused before it fills the memory.
        let limit = RENDER_BASE_BYTES
            + RENDER_BYTES_PER_MESSAGE_BYTE
                * messages.iter().map(|m| m.content.len()).sum::<usize>();
        let mut out = Bounded {
            text: Vec::new(),
            limit,
            overflowed: false,
        };
        template.render_captured_to(&ctx, &mut out).map_err(|e| {
            if out.overflowed {
                Error::Invalid {
                    path: self.source.clone().into(),
                    what: "chat template",
                    message: format!("it renders more than {limit} bytes for these messages"),
                }
            } else {
                self.render_error(&e)
            }
        })?;
        String::from_utf8(out.text).map_err(|_| Error::Invalid {
            path: self.source.clone().into(),
            what: "chat template",
            message: "it renders text that is not UTF-8".into(),
        })
    }

    /// The token ids of `messages` rendered, without added special tokens (as HF's
    /// `apply_chat_template(tokenize=True)`).
    pub fn encode(&self, tokenizer: &TextTokenizer, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.render(messages)?;
        tokenizer.encode_plain(&text)
    }

    fn render_error(&self, e: &minijinja::Error) -> Error {
        Error::Invalid {
            path: self.source.clone().into(),
            what: "chat template",
            message: format!("it fails to render: {}", describe(e)),
        }
    }
}

/// A minijinja error with its cause chain and line.
fn describe(e: &minijinja::Error) -> String {
    let mut s = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (line {line})"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(t: &str) -> ChatTemplate {
        ChatTemplate::new(
            t,
            "test",
            serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"}),
        )
        .unwrap()
    }

    #[test]
    fn renders_hf_style_templates() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}\n{{ m['role'] + ': ' + m['content'].strip() }}\n{% endfor %}\n{% if add_generation_prompt %}assistant:{% endif %}",
        );
        let text = t
            .render(&[
                Message::new("user", "  hi  "),
                Message::new("assistant", "yo"),
            ])
            .unwrap();
        assert_eq!(text, "<s>user: hi\nassistant: yo\nassistant:");
    }

    #[test]
    fn a_template_that_multiplies_its_text_is_refused() {
        let t = template("{% for i in range(1000) %}{{ 'x' * 10000000 }}{% endfor %}");
        let err = t.render(&[Message::new("user", "hi")]).unwrap_err();
        assert!(err.to_string().contains("renders more than"), "{err}");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        let t = template("{{ raise_exception('no system role') }}");
        let err = t.render(&[]).unwrap_err().to_string();
        assert!(
            err.contains("no system role") && err.contains("test"),
            "{err}"
        );
        let err = ChatTemplate::new("{% for %}", "bad.json", Value::Null).unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");
        let forever = template(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        let err = forever.render(&[]).unwrap_err();
        assert!(err.to_string().contains("out of fuel"), "{err}");
    }
}
