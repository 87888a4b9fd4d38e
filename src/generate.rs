//! `zoo generate`: text generation with a Llama-architecture causal LM (HF
//! `LlamaForCausalLM.generate`): greedy by default, or sampling; stops at eos. With Medusa
//! heads or MTP modules it decodes speculatively.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use serde_json::json;
use zoo_datasets::chat::Message;
use zoo_datasets::tokenize::TextTokenizer;
use zoo_models::generation::{GenerationConfig, SamplingOptions, Strategy};
use zoo_models::hub::ModelRepo;
use zoo_models::llm::{
    decode, Acceptance, Drafter, HeadAccuracy, LlamaConfig, MedusaDrafter, MedusaHeads, MedusaTree,
    MtpDraft, MtpDrafter, MtpModules, NoDrafts, TypicalAcceptance,
};

use crate::common::{LlmArgs, LoadedLlm};
use crate::flags;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: LlmArgs,
    /// The text to continue (tokenized with the checkpoint's tokenizer, special tokens added as
    /// HF's tokenizer adds them, or for a GGUF as its `add_bos_token` says).
    #[arg(long)]
    pub prompt: String,
    /// The prompt is one user turn of a chat, rendered by the model's chat template (HF's
    /// `apply_chat_template(add_generation_prompt=True)`).
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a system turn before the user's.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[command(flatten)]
    pub decoding: DecodingArgs,
    /// Print {"text", "token_ids", "new_tokens", "steps", "mean_accepted", "tokens_per_s"}.
    #[arg(long)]
    pub json: bool,
}

/// How to decode: lengths, sampling, and speculative decoding (shared by `zoo generate` and
/// `zoo chat`).
#[derive(Args, Debug, Clone)]
pub struct DecodingArgs {
    /// Most new tokens. Default: the checkpoint's generation_config.json, else HF's
    /// `max_length` of 20 tokens including the prompt.
    #[arg(long, value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub max_new_tokens: Option<usize>,
    /// eos cannot end the generation before this many new tokens.
    #[arg(long, allow_negative_numbers = true)]
    pub min_new_tokens: Option<usize>,
    /// Sampling temperature (turns sampling on).
    #[arg(long, value_parser = flags::positive::<f32>, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Sampling: keep only the k most likely tokens (0: all); turns sampling on.
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely tokens up to this mass; turns sampling on.
    #[arg(long, value_parser = flags::mass::<f32>, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Seed of the sampling random stream.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// HF's repetition penalty (1: off).
    #[arg(long, value_parser = flags::positive::<f32>, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// Stop when the new text contains this string (repeatable), as HF's `stop_strings`: the
    /// output keeps it.
    #[arg(long = "stop", value_name = "TEXT", value_parser = flags::non_empty)]
    pub stop: Vec<String>,
    /// Speculative decoding with the FasterDecoding Medusa heads in this folder (config.json
    /// and medusa_lm_head.safetensors or .pt). Greedy: token-identical to plain greedy decoding;
    /// sampling: typical acceptance, or exact speculative sampling with --acceptance exact.
    #[arg(long)]
    pub medusa: Option<PathBuf>,
    /// How sampled drafts are accepted with --medusa or --mtp: `typical` (Medusa's typical
    /// acceptance; the default with --medusa) or `exact` (speculative sampling, distributed
    /// exactly as plain sampling; the default with --mtp).
    #[arg(long, value_enum)]
    pub acceptance: Option<AcceptanceArg>,
    /// Typical acceptance: ε, the hard probability threshold (FasterDecoding's
    /// `posterior_threshold`; default 0.09).
    #[arg(long, value_parser = flags::unit_interval::<f32>, allow_negative_numbers = true)]
    pub posterior_threshold: Option<f32>,
    /// Typical acceptance: δ, the scale of the entropy-dependent threshold δ·exp(−H)
    /// (FasterDecoding's `posterior_alpha`; default 0.3).
    #[arg(long, value_parser = flags::non_negative::<f32>, allow_negative_numbers = true)]
    pub posterior_alpha: Option<f32>,
    /// The Medusa tree: a JSON list of paths of top-k ranks, or `auto`: the tree that
    /// maximises expected tokens/s from the heads' measured accuracy (`medusa_accuracy.json`,
    /// written by zoo train medusa) and this machine's verification cost, measured at start.
    /// Default: mc_sim_7b_63, cut to the checkpoint's number of heads.
    #[arg(long, value_parser = parse_choices)]
    pub medusa_choices: Option<Choices>,
    /// Self-speculative decoding with DeepSeek-V3-style MTP modules: the checkpoint's own
    /// (`num_nextn_predict_layers`), or with a value, those of a folder trained for this base
    /// (`zoo train mtp`'s output), as a GGUF base needs. Greedy: token-identical to plain greedy
    /// decoding; with sampling flags: speculative sampling, distributed exactly as plain
    /// sampling.
    #[arg(long, value_name = "DIR", num_args = 0..=1, conflicts_with = "medusa")]
    pub mtp: Option<Option<PathBuf>>,
    #[command(flatten)]
    pub mtp_tree: MtpTreeArgs,
    #[command(flatten)]
    pub draft_vocab: DraftVocabArgs,
}

/// The drafters' vocabulary (`zoo generate`, `zoo chat`, `zoo bench generate`).
#[derive(Args, Debug, Clone, Default)]
pub struct DraftVocabArgs {
    /// With --medusa or --mtp: draft from the first N tokens of the vocabulary only, FR-Spec's
    /// frequency-ranked draft vocabulary (a BPE vocabulary lists its tokens in merge order, the
    /// most frequent first). The heads' vocabulary projection then costs N/vocab of the full
    /// one; verification still scores every token, so the output is unchanged.
    #[arg(long, value_name = "N", value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub draft_vocab: Option<usize>,
}

/// How the MTP modules draft (`zoo generate`, `zoo chat`, `zoo bench generate`).
#[derive(Args, Debug, Clone, Default)]
pub struct MtpTreeArgs {
    /// With --mtp: draft a tree of up to N tokens instead of a chain, grown by confidence as
    /// EAGLE-2 grows one: each depth expands the --mtp-top-k most confident drafts by their
    /// --mtp-top-k likeliest tokens, and the N most confident drafts are verified.
    #[arg(long, value_name = "N", requires = "mtp", value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub mtp_tree: Option<usize>,
    /// With --mtp-tree: drafts expanded per depth, and tokens per expanded draft.
    #[arg(long, value_name = "K", default_value_t = 4, requires = "mtp_tree", value_parser = flags::count::<usize>, allow_negative_numbers = true)]
    pub mtp_top_k: usize,
    /// With --mtp: verify and expand only drafts whose confidence (the product of the modules'
    /// probabilities along the draft) is at least P, as EAGLE-2 cuts its trees; a round with
    /// none left is a plain step, and the modules past the last kept depth skip it. 0 keeps
    /// every draft. On a CPU a draft costs a share of a plain step to verify (SmolLM2 on 2
    /// cores: 8-52%, more for smaller types), and the modules about a tenth; of the floors
    /// from 0 to 0.6 tried there, 0.4-0.6 did best (within the noise), hence 0.5.
    #[arg(long, value_name = "P", default_value_t = 0.5, requires = "mtp", value_parser = flags::unit_interval::<f32>, allow_negative_numbers = true)]
    pub mtp_min_confidence: f32,
}

impl MtpTreeArgs {
    pub fn shape(&self) -> MtpDraft {
        match self.mtp_tree {
            Some(max_nodes) => MtpDraft::Tree {
                top_k: self.mtp_top_k,
                max_nodes,
            },
            None => MtpDraft::Chain,
        }
    }

    /// The drafter these flags describe, over `mtp`.
    pub fn drafter<'a>(&self, mtp: &'a MtpModules) -> MtpDrafter<'a> {
        MtpDrafter::with_shape(mtp, self.shape()).with_min_confidence(self.mtp_min_confidence)
    }
}

/// `--medusa-choices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choices {
    Auto,
    File(PathBuf),
}

pub fn parse_choices(s: &str) -> std::result::Result<Choices, String> {
    Ok(match s {
        "auto" => Choices::Auto,
        path => Choices::File(path.into()),
    })
}

/// `--acceptance`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptanceArg {
    Typical,
    Exact,
}

/// A decoder built from [`DecodingArgs`] for one loaded model: the speculative heads or
/// modules loaded once, and the checks done once.
pub struct Decoder<'a> {
    llm: &'a LoadedLlm,
    args: DecodingArgs,
    medusa: Option<(MedusaHeads, MedusaTree)>,
    mtp: Option<MtpModules>,
    /// Typical acceptance instead of the strategy's own rule.
    typical: Option<TypicalAcceptance>,
}

/// One decoded sequence.
pub struct Decoded {
    /// The prompt and the new tokens.
    pub row: Vec<u32>,
    /// Forward passes of the model after the prompt's.
    pub steps: usize,
    pub seconds: f64,
}

impl DecodingArgs {
    fn sampling(&self) -> bool {
        self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some()
    }

    pub fn decoder<'a>(&self, llm: &'a LoadedLlm) -> Result<Decoder<'a>> {
        if self.medusa_choices.is_some() && self.medusa.is_none() {
            bail!("--medusa-choices needs --medusa");
        }
        let speculative = self.medusa.is_some() || self.mtp.is_some();
        if self.draft_vocab.draft_vocab.is_some() && !speculative {
            bail!("--draft-vocab sets what --medusa or --mtp drafts from: give one of them");
        }
        if self.acceptance.is_some() && !(speculative && self.sampling()) {
            bail!(
                "--acceptance chooses how sampled drafts are accepted: it needs --medusa or \
                 --mtp, and sampling (--temperature, --top-k or --top-p)"
            );
        }
        let default = if self.medusa.is_some() {
            AcceptanceArg::Typical
        } else {
            AcceptanceArg::Exact
        };
        let typical_rule = speculative
            && self.sampling()
            && self.acceptance.unwrap_or(default) == AcceptanceArg::Typical;
        for (flag, given) in [
            ("--posterior-threshold", self.posterior_threshold.is_some()),
            ("--posterior-alpha", self.posterior_alpha.is_some()),
        ] {
            if given && !typical_rule {
                bail!(
                    "{flag} sets typical acceptance, which needs --medusa (or --mtp with \
                     --acceptance typical) and --temperature"
                );
            }
        }
        if typical_rule && (self.top_k.is_some() || self.top_p.is_some()) {
            bail!(
                "typical acceptance has no top-k or top-p: use --temperature with \
                 --posterior-threshold and --posterior-alpha, or --acceptance exact for \
                 speculative sampling with --top-k and --top-p"
            );
        }
        let typical = if typical_rule {
            let typical = TypicalAcceptance {
                temperature: self.temperature.unwrap_or(1.0),
                posterior_threshold: self.posterior_threshold.unwrap_or(0.09),
                posterior_alpha: self.posterior_alpha.unwrap_or(0.3),
                seed: self.seed,
            };
            typical.validate().map_err(anyhow::Error::msg)?;
            Some(typical)
        } else {
            None
        };
        let mtp = self
            .mtp
            .as_ref()
            .map(|dir| load_mtp(llm, dir.as_deref(), &self.draft_vocab))
            .transpose()?;
        let medusa = self
            .medusa
            .as_deref()
            .map(|dir| load_medusa(llm, dir, self.medusa_choices.as_ref(), &self.draft_vocab))
            .transpose()?;
        if let Some((heads, tree)) = &medusa {
            MedusaDrafter::new(heads, tree)?;
        }
        Ok(Decoder {
            llm,
            args: self.clone(),
            medusa,
            mtp,
            typical,
        })
    }
}

impl Decoder<'_> {
    /// The generation settings for a prompt of `prompt_len` tokens. A default length (the
    /// checkpoint's generation_config.json or HF's) stops at the model's positions; a length
    /// asked for with --max-new-tokens is refused past them.
    fn config(&self, prompt_len: usize) -> Result<GenerationConfig> {
        let (args, hf, model) = (&self.args, &self.llm.generation, &self.llm.model);
        let eos = self.llm.eos();
        let room = model
            .config
            .max_position_embeddings
            .saturating_sub(prompt_len);
        let cfg = GenerationConfig {
            max_new_tokens: args
                .max_new_tokens
                .unwrap_or_else(|| hf.max_new_tokens(prompt_len).min(room)),
            min_new_tokens: args
                .min_new_tokens
                .unwrap_or_else(|| hf.min_new_tokens(prompt_len)),
            pad_token: hf
                .pad_token_id
                .or(model.config.pad_token_id)
                .or(eos.first().copied())
                .unwrap_or(0),
            stop_tokens: eos,
            repetition_penalty: args
                .repetition_penalty
                .or(hf.repetition_penalty)
                .unwrap_or(1.0),
            strategy: if args.sampling() {
                Strategy::Sample(SamplingOptions {
                    temperature: args.temperature.unwrap_or(1.0),
                    top_k: args.top_k.unwrap_or(50),
                    top_p: args.top_p.unwrap_or(1.0),
                    seed: args.seed,
                })
            } else {
                Strategy::Greedy
            },
        };
        model
            .config
            .check_generation_length(prompt_len, cfg.max_new_tokens)
            .map_err(anyhow::Error::msg)?;
        if cfg.min_new_tokens > cfg.max_new_tokens {
            bail!(
                "--min-new-tokens {} is more than --max-new-tokens {}",
                cfg.min_new_tokens,
                cfg.max_new_tokens
            );
        }
        Ok(cfg)
    }

    /// Decodes after `prompt` through the one decoding loop ([`decode`]), calling `on_token`
    /// for each new token as it is chosen (with Medusa or MTP, a verification step's accepted
    /// tokens one after another). Stops at eos, the length, or a --stop string.
    pub fn decode(
        &self,
        prompt: &[u32],
        on_token: &mut dyn FnMut(u32) -> Result<()>,
    ) -> Result<Decoded> {
        if prompt.is_empty() {
            bail!("the prompt is empty after tokenization");
        }
        let cfg = self.config(prompt.len())?;
        let rule = match &self.typical {
            Some(t) => Acceptance::Typical(*t),
            None => Acceptance::of(&cfg)?,
        };
        let mut drafter: Box<dyn Drafter + '_> = match (&self.medusa, &self.mtp) {
            (_, Some(mtp)) => Box::new(self.args.mtp_tree.drafter(mtp)),
            (Some((heads, tree)), None) => Box::new(MedusaDrafter::new(heads, tree)?),
            (None, None) => Box::new(NoDrafts),
        };
        let mut stops = StopStrings::new(&self.args.stop);
        let mut new = Vec::new();
        let mut failure = None;
        let start = Instant::now();
        let out = decode(
            &self.llm.model,
            drafter.as_mut(),
            prompt,
            &cfg,
            &rule,
            &mut |token| {
                new.push(token);
                if let Err(e) = on_token(token) {
                    failure = Some(e);
                    return Ok(ControlFlow::Break(()));
                }
                Ok(if stops.hit(&self.llm.tokenizer, &new) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                })
            },
        );
        if let Some(e) = failure {
            return Err(e);
        }
        let out = out.context("generation failed")?;
        Ok(Decoded {
            row: out.tokens,
            steps: out.steps,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// `--stop` strings, looked for in the text of the new tokens as each one comes.
struct StopStrings<'a> {
    stops: &'a [String],
    /// Bytes of text already searched.
    searched: usize,
}

impl<'a> StopStrings<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self { stops, searched: 0 }
    }

    /// Whether the text of `new` now holds a stop string.
    fn hit(&mut self, tokenizer: &TextTokenizer, new: &[u32]) -> bool {
        if self.stops.is_empty() {
            return false;
        }
        let Ok(text) = tokenizer.inner().decode(new, false) else {
            return false;
        };
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.searched.saturating_sub(longest);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        self.searched = text.len();
        self.stops.iter().any(|s| text[from..].contains(s.as_str()))
    }
}

/// The MTP modules for `llm`'s backbone: its checkpoint's own, or those of the checkpoint in
/// `dir`, whose backbone must have the same shape (the modules use its embedding and
/// `lm_head`, and are named after its layer count).
pub fn load_mtp(
    llm: &LoadedLlm,
    dir: Option<&std::path::Path>,
    vocab: &DraftVocabArgs,
) -> Result<MtpModules> {
    let modules = load_mtp_modules(llm, dir)?;
    Ok(match vocab.draft_vocab {
        Some(n) => modules
            .with_draft_vocab(llm.model.lm_head(), n)
            .with_context(|| format!("--draft-vocab {n}"))?,
        None => modules,
    })
}

fn load_mtp_modules(llm: &LoadedLlm, dir: Option<&std::path::Path>) -> Result<MtpModules> {
    let model = &llm.model;
    let dtype = model.model.embeddings().dtype();
    // Beside a quantized backbone the modules are quantized as its output projection is.
    let quantize = model.lm_head().quantized_dtype();
    let Some(dir) = dir else {
        let repo = llm.source.repo().with_context(|| {
            format!(
                "{} is a GGUF file, which holds no MTP modules: give --mtp DIR, a folder of \
                 modules trained for it (zoo train mtp --model {0})",
                llm.source.describe()
            )
        })?;
        return Ok(MtpModules::load(
            repo,
            &model.config,
            dtype,
            &llm.device,
            quantize,
        )?);
    };
    let spec = dir.to_string_lossy();
    let repo = ModelRepo::open(&spec)?;
    let config_path = repo.get("config.json")?;
    let cfg = LlamaConfig::from_file(&config_path)?;
    let base = &model.config;
    let keys = [
        ("hidden_size", cfg.hidden_size, base.hidden_size),
        (
            "intermediate_size",
            cfg.intermediate_size,
            base.intermediate_size,
        ),
        (
            "num_hidden_layers",
            cfg.num_hidden_layers,
            base.num_hidden_layers,
        ),
        (
            "num_attention_heads",
            cfg.num_attention_heads,
            base.num_attention_heads,
        ),
        (
            "num_key_value_heads",
            cfg.num_kv_heads(),
            base.num_kv_heads(),
        ),
        ("head_dim", cfg.head_dim(), base.head_dim()),
        ("vocab_size", cfg.vocab_size, base.vocab_size),
    ];
    for (key, theirs, ours) in keys {
        if theirs != ours {
            bail!(
                "{}: {key} is {theirs}, but the base model {} has {ours}; these MTP modules \
                 were made for another model",
                config_path.display(),
                llm.source.describe()
            );
        }
    }
    Ok(MtpModules::load(&repo, &cfg, dtype, &llm.device, quantize)?)
}

/// The Medusa heads in `dir` for `llm`'s backbone, and the tree from `choices` (default:
/// `mc_sim_7b_63` cut to the heads).
pub fn load_medusa(
    llm: &LoadedLlm,
    dir: &std::path::Path,
    choices: Option<&Choices>,
    vocab: &DraftVocabArgs,
) -> Result<(MedusaHeads, MedusaTree)> {
    let model = &llm.model;
    let heads = MedusaHeads::load(
        dir,
        model.config.hidden_size,
        model.config.vocab_size,
        model.model.embeddings().dtype(),
        &llm.device,
    )?;
    let heads = match vocab.draft_vocab {
        Some(n) => heads
            .with_draft_vocab(model.lm_head(), n)
            .with_context(|| format!("--draft-vocab {n}"))?,
        None => heads,
    };
    let tree = match choices {
        Some(Choices::File(path)) => MedusaTree::from_file(path)?,
        Some(Choices::Auto) => auto_tree(llm, dir, &heads)?,
        None => MedusaTree::mc_sim_7b_63_for(heads.heads.len()),
    };
    Ok((heads, tree))
}

/// Verification sizes measured for `--medusa-choices auto`, and the context before them.
const AUTO_SIZES: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];
const AUTO_CONTEXT: usize = 64;

/// `--medusa-choices auto`: the tree of at most 63 nodes with the most expected tokens per
/// second, from the heads' accuracy in `dir` and the costs measured here: verifying 1..64
/// tokens, and the heads' own pass over one hidden state, which every drafting step adds.
fn auto_tree(llm: &LoadedLlm, dir: &std::path::Path, heads: &MedusaHeads) -> Result<MedusaTree> {
    let mut acc = HeadAccuracy::load(dir)?;
    acc.heads.truncate(heads.heads.len());
    let model = &llm.model;
    let room = model.config.max_position_embeddings;
    let context = AUTO_CONTEXT.min(room.saturating_sub(64).max(1));
    let sizes: Vec<usize> = AUTO_SIZES
        .iter()
        .copied()
        .filter(|&k| context + k <= room)
        .collect();
    let costs = crate::bench::verify::verify_costs(model, &llm.device, context, &sizes, 5)?;
    let hidden = Tensor::zeros(
        (1, 1, model.config.hidden_size),
        model.model.embeddings().dtype(),
        &llm.device,
    )?;
    let drafting_ms = 1e3
        * crate::bench::median_seconds(1, 3, || {
            for logits in heads.forward(&hidden, model.lm_head())? {
                logits.flatten_all()?.get(0)?.to_scalar::<f32>()?;
            }
            Ok(())
        })?;
    // Linear between the measured sizes, flat past the last; a step with drafts also runs the
    // heads.
    let verify = |n: usize| -> f64 {
        let mut prev = costs[0];
        for &(k, ms) in &costs {
            if n <= k {
                if k == prev.0 {
                    return ms;
                }
                let t = (n - prev.0) as f64 / (k - prev.0) as f64;
                return prev.1 + t * (ms - prev.1);
            }
            prev = (k, ms);
        }
        prev.1 * n as f64 / prev.0 as f64
    };
    let cost = |n: usize| verify(n) + if n > 1 { drafting_ms } else { 0.0 };
    let max_nodes = sizes.last().copied().unwrap_or(1).saturating_sub(1).max(1);
    let (tree, chosen) = MedusaTree::auto(&acc, &cost, max_nodes)
        .map_err(|e| anyhow::anyhow!("--medusa-choices auto for {}: {e}", dir.display()))?;
    eprintln!(
        "medusa-choices auto: {} nodes, {:.2} expected tokens per step, {:.2}x plain decoding's \
         rate by the measured costs (one token {:.1} ms, the heads {:.1} ms; {} accuracy over {} \
         positions)",
        chosen.nodes,
        chosen.tokens_per_step,
        chosen.speedup,
        costs[0].1,
        drafting_ms,
        acc.data,
        acc.positions
    );
    if chosen.speedup < 1.0 {
        eprintln!("medusa-choices auto: these heads cost more than they save here");
    }
    Ok(tree)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let llm = args.model.load()?;
    let decoder = args.decoding.decoder(&llm)?;
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &args.prompt));
        llm.chat_ids(&messages)?
    } else {
        llm.tokenizer.encode(&args.prompt)?
    };
    let Decoded {
        row,
        steps,
        seconds,
    } = decoder.decode(&prompt, &mut |_| Ok(()))?;
    let new = &row[prompt.len()..];
    let new_tokens = new.len();
    let text = llm
        .tokenizer
        .inner()
        .decode(new, true)
        .map_err(|e| anyhow::anyhow!("cannot decode the generation: {e}"))?;
    if args.json {
        let value = json!({
            "text": text,
            "token_ids": row,
            "new_tokens": new_tokens,
            "steps": steps,
            "mean_accepted": if steps == 0 { 0.0 } else { new_tokens as f64 / steps as f64 },
            "tokens_per_s": new_tokens as f64 / seconds.max(1e-9),
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        if args.chat {
            outln!("{text}")?;
        } else {
            outln!("{}{text}", args.prompt)?;
        }
        eprintln!(
            "{new_tokens} new tokens in {seconds:.2} s ({:.1} tokens/s)",
            new_tokens as f64 / seconds.max(1e-9)
        );
    }
    Ok(())
}
