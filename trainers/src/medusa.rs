//! Medusa training (`zoo train medusa`), as Cai et al. 2024 (§2.2) and FasterDecoding's
//! training recipes do it. Head `k` (1-based) reads the backbone's last hidden state at
//! position `t` and is scored against token `t + k + 1` with cross-entropy weighted
//! `λ_k = 0.8^k`.
//!
//! - **Medusa-1**: the backbone is frozen and only the heads learn. Heads are saved in
//!   FasterDecoding's layout (`medusa_lm_head.safetensors`, `config.json`).
//! - **Medusa-2** ([`Medusa2`]): the backbone learns too, with the loss
//!   `L_LM + λ₀ · Σ_k λ_k L_k` (λ₀ = 0.2), the heads at a multiple of the learning rate (4×),
//!   after a heads-only warm-up stage so that untrained heads do not disturb the backbone. The
//!   saved folder is the HF backbone whose `config.json` also names the heads, with
//!   `medusa_lm_head.safetensors` beside `model.safetensors`: it is both `--model` and
//!   `--medusa` for `zoo generate`.
//! - **Self-distillation** ([`SelfDistill`]): the training sequences are the backbone's own
//!   continuations of prompts cut from the corpus, or its replies to chat prompts rendered by
//!   its chat template ([`distill_chat`], FasterDecoding's `data_generation`), so heads learn
//!   what the model will generate rather than what the corpus says. Under
//!   Medusa-2 the LM loss becomes the KL divergence from the original backbone's
//!   distribution, which keeps the model's behaviour.
//!
//! As FasterDecoding initialises them, each ResBlock starts as the identity (zero weight and
//! bias) and each head's vocabulary projection as a copy of the backbone's `lm_head`, so every
//! head starts out predicting the next token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use serde_json::json;
use zoo_datasets::chat::Message;
use zoo_models::generation::{generate, GenerationConfig, SamplingOptions, Strategy};
use zoo_models::layers::Linear;
use zoo_models::llm::medusa::{MedusaConfig, TOPK};
use zoo_models::llm::{HeadAccuracy, KvCache, LlamaForCausalLM, LlamaStep, LlmSource, MedusaHeads};

use crate::checkpoint;
use crate::data::DataPosition;
use crate::error::{Error, Result};
use crate::lm::{
    check_draft_vocab, frozen_hidden, next_token_loss, Batch, Corpus, KeptHidden, PackedSequences,
    TrainableLlama,
};
use crate::loss::scored_cross_entropy;
use crate::optim::AdamWConfig;
use crate::train::{initial_state, run_task, Task, TrainConfig, TrainState};

/// Medusa's per-head loss decay: head `k` weighs `0.8^k`.
pub const HEAD_DECAY: f64 = 0.8;

/// Trainable Medusa heads over a frozen backbone.
pub struct TrainableMedusa {
    pub heads: MedusaHeads,
    pub config: MedusaConfig,
    pub varmap: VarMap,
    /// Where the backbone came from, written as `base_model_name_or_path`.
    pub base_model: String,
    /// The heads learn and are measured on the first this many tokens of the vocabulary only
    /// (the draft vocabulary of `zoo generate --draft-vocab`), all of it when `None`.
    pub draft_vocab: Option<usize>,
}

impl TrainableMedusa {
    /// `config.medusa_num_heads` new heads for `backbone`: identity ResBlocks and a copy of the
    /// backbone's `lm_head` as each head's projection, or, with `shared_lm_head`, no projection
    /// of their own: the heads read the backbone's frozen `lm_head` (FasterDecoding's
    /// "version 2" layout, a ResBlock's worth of weights per head).
    pub fn new(
        config: MedusaConfig,
        backbone: &LlamaForCausalLM,
        base_model: &str,
        shared_lm_head: bool,
    ) -> Result<Self> {
        let (d, v) = (backbone.config.hidden_size, backbone.config.vocab_size);
        let device = backbone.model.embeddings().device().clone();
        let lm_head = backbone.lm_head().weight()?.to_dtype(DType::F32)?;
        let varmap = VarMap::new();
        {
            let mut data = lock(&varmap)?;
            for i in 0..config.medusa_num_heads {
                for j in 0..config.medusa_num_layers {
                    data.insert(
                        format!("{i}.{j}.linear.weight"),
                        Var::zeros((d, d), DType::F32, &device)?,
                    );
                    data.insert(
                        format!("{i}.{j}.linear.bias"),
                        Var::zeros(d, DType::F32, &device)?,
                    );
                }
                if shared_lm_head {
                    continue;
                }
                let out = Var::from_tensor(&lm_head.copy()?)?;
                if out.dims() != [v, d] {
                    return Err(Error::Input(format!(
                        "the backbone's lm_head is {:?}, expected [{v}, {d}]",
                        out.dims()
                    )));
                }
                data.insert(format!("{i}.{}.weight", config.medusa_num_layers), out);
            }
        }
        Self::assemble(config, varmap, backbone, base_model)
    }

    /// Heads saved by [`Self::save`] (or any FasterDecoding folder), as variables.
    pub fn load(dir: &Path, backbone: &LlamaForCausalLM, base_model: &str) -> Result<Self> {
        let config: MedusaConfig =
            zoo_models::hub::read_json(&dir.join("config.json"), "Medusa config")?;
        let device = backbone.model.embeddings().device().clone();
        let path = dir.join("medusa_lm_head.safetensors");
        let tensors = candle_core::safetensors::load(&path, &device)
            .map_err(|e| Error::Input(format!("cannot read {}: {e}", path.display())))?;
        let varmap = VarMap::new();
        {
            let mut data = lock(&varmap)?;
            for (name, t) in tensors {
                data.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
            }
        }
        Self::assemble(config, varmap, backbone, base_model)
    }

    fn assemble(
        config: MedusaConfig,
        varmap: VarMap,
        backbone: &LlamaForCausalLM,
        base_model: &str,
    ) -> Result<Self> {
        let device = backbone.model.embeddings().device().clone();
        let heads = MedusaHeads::new(
            &config,
            backbone.config.hidden_size,
            backbone.config.vocab_size,
            VarBuilder::from_varmap(&varmap, DType::F32, &device),
        )?;
        Ok(Self {
            heads,
            config,
            varmap,
            base_model: base_model.to_string(),
            draft_vocab: None,
        })
    }

    /// Trains and measures the heads on the first `n` tokens of the vocabulary: what they
    /// draft from under `--draft-vocab n`. Targets outside it are not scored (no draft can
    /// propose them) and count as misses in [`Self::rank_hits`].
    pub fn with_draft_vocab(mut self, n: usize, backbone: &LlamaForCausalLM) -> Result<Self> {
        check_draft_vocab(n, backbone.config.vocab_size)?;
        self.draft_vocab = Some(n);
        Ok(self)
    }

    /// Head `i`'s logits over the draft vocabulary (or the whole one) for `hidden`: the first
    /// rows of its own projection, or of the backbone's `lm_head` that it shares.
    fn draft_logits(&self, i: usize, hidden: &Tensor, lm_head: &Linear) -> Result<Tensor> {
        let head = &self.heads.heads[i];
        let Some(n) = self.draft_vocab else {
            return Ok(head.forward(hidden, lm_head)?);
        };
        let projection = head.projection().unwrap_or(lm_head).first_rows(n)?;
        Ok(candle_core::Module::forward(
            &projection,
            &head.features(hidden)?,
        )?)
    }

    /// Every variable, sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Each head's mean cross-entropy on `ids` `[B, L]`: head `k` at position `t` against token
    /// `t + k + 1`, from the backbone's `hidden` `[B, L, D]`. With `weights` `[B, L]` (f32) only
    /// the targets of weight 1 count (a chat's replies), each head's mean taken over them.
    pub fn head_losses(
        &self,
        backbone: &LlamaForCausalLM,
        hidden: &Tensor,
        ids: &Tensor,
        weights: Option<&Tensor>,
    ) -> Result<Vec<Tensor>> {
        let l = ids.dim(1)?;
        let mut losses = Vec::new();
        for i in 0..self.heads.heads.len() {
            let k = i + 1;
            if l <= k + 1 {
                return Err(Error::Input(format!(
                    "sequences of {l} tokens are too short for Medusa head {k}"
                )));
            }
            let n = l - k - 1;
            let h = hidden.narrow(1, 0, n)?;
            let logits = self.draft_logits(i, &h, backbone.lm_head())?;
            let (b, _, v) = logits.dims3()?;
            let logits = logits.reshape((b * n, v))?.to_dtype(DType::F32)?;
            let targets = ids
                .narrow(1, k + 1, n)?
                .flatten_all()?
                .to_dtype(DType::U32)?;
            let weights = weights
                .map(|w| w.narrow(1, k + 1, n)?.flatten_all())
                .transpose()?;
            losses.push(scored_cross_entropy(&logits, &targets, weights.as_ref())?);
        }
        Ok(losses)
    }

    /// Each head's hits per rank below [`TOPK`] and the positions scored, on `ids` `[B, L]`
    /// with the backbone's final `hidden` states: head `k` (1-based) at position `t` is right
    /// at rank `r` when its `r`-th likeliest token is `ids[t + k + 1]`. With `scored` (one flag
    /// per token of `ids`) only the targets flagged count: a chat's replies, where decoding
    /// drafts, and not the template and prompt, which would flatter the heads.
    pub fn rank_hits(
        &self,
        backbone: &LlamaForCausalLM,
        hidden: &Tensor,
        ids: &Tensor,
        scored: Option<&[Vec<bool>]>,
    ) -> Result<Vec<(Vec<usize>, usize)>> {
        let l = ids.dim(1)?;
        let mut out = Vec::new();
        for i in 0..self.heads.heads.len() {
            let k = i + 1;
            if l <= k + 1 {
                break;
            }
            let n = l - k - 1;
            let logits = self.draft_logits(i, &hidden.narrow(1, 0, n)?, backbone.lm_head())?;
            let (b, _, v) = logits.dims3()?;
            let logits = logits.reshape((b * n, v))?.to_dtype(DType::F32)?;
            let targets = ids
                .narrow(1, k + 1, n)?
                .flatten_all()?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?;
            // A target outside the draft vocabulary is a miss at every rank.
            let outside: Vec<bool> = targets.iter().map(|&t| t as usize >= v).collect();
            let targets = Tensor::new(
                targets
                    .iter()
                    .map(|&t| t.min(v as u32 - 1))
                    .collect::<Vec<_>>(),
                logits.device(),
            )?;
            let target = logits.gather(&targets.unsqueeze(1)?, 1)?;
            // The rank: how many tokens score above the target.
            let ranks: Vec<u32> = logits
                .broadcast_gt(&target)?
                .to_dtype(DType::U32)?
                .sum(1)?
                .to_vec1::<u32>()?
                .into_iter()
                .zip(outside)
                .map(|(r, out)| if out { u32::MAX } else { r })
                .collect();
            let counted: Vec<bool> = match scored {
                Some(rows) => rows
                    .iter()
                    .flat_map(|row| row[k + 1..k + 1 + n].iter().copied())
                    .collect(),
                None => vec![true; ranks.len()],
            };
            if counted.len() != ranks.len() {
                return Err(Error::Input(format!(
                    "{} target flags for {} positions",
                    counted.len(),
                    ranks.len()
                )));
            }
            let mut hits = vec![0usize; TOPK];
            let mut positions = 0;
            for (r, _) in ranks.into_iter().zip(counted).filter(|(_, c)| *c) {
                positions += 1;
                if let Some(h) = hits.get_mut(r as usize) {
                    *h += 1;
                }
            }
            out.push((hits, positions));
        }
        Ok(out)
    }

    /// Writes `medusa_lm_head.safetensors` and `config.json` into `dir`. With `base_config`
    /// (Medusa-2, where `dir` holds the backbone too) the heads' fields join that config.
    pub fn save(&self, dir: &Path, base_config: Option<serde_json::Value>) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Input(format!("cannot create {}: {e}", dir.display())))?;
        let tensors = crate::model::varmap_tensors(&self.varmap)?;
        zoo_models::weights::save_safetensors_atomic(
            &tensors,
            &dir.join("medusa_lm_head.safetensors"),
        )?;
        let mut config = base_config.unwrap_or_else(|| json!({}));
        config["medusa_num_heads"] = self.config.medusa_num_heads.into();
        config["medusa_num_layers"] = self.config.medusa_num_layers.into();
        config["base_model_name_or_path"] = self.base_model.clone().into();
        let path = dir.join("config.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&config).unwrap_or_default(),
        )
        .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))
    }
}

fn lock(varmap: &VarMap) -> Result<std::sync::MutexGuard<'_, HashMap<String, Var>>> {
    varmap
        .data()
        .lock()
        .map_err(|_| Error::Input("poisoned varmap".into()))
}

/// Medusa-2's joint training (FasterDecoding's `medusa_heads_coefficient`,
/// `medusa_lr_multiplier`, and a `medusa_only_heads` first stage).
#[derive(Debug, Clone, Copy)]
pub struct Medusa2 {
    /// λ₀: the weight of the heads' loss next to the LM loss (FasterDecoding: 0.2).
    pub heads_coefficient: f64,
    /// The heads' learning rate over the backbone's (FasterDecoding: 4).
    pub heads_lr_multiplier: f64,
    /// Steps that train the heads alone, on the frozen backbone, before joint training.
    pub heads_warmup_steps: u64,
}

impl Default for Medusa2 {
    fn default() -> Self {
        Self {
            heads_coefficient: 0.2,
            heads_lr_multiplier: 4.0,
            heads_warmup_steps: 0,
        }
    }
}

/// Self-distillation: train on the backbone's own continuations.
#[derive(Debug, Clone, Copy)]
pub struct SelfDistill {
    /// Tokens of each corpus sequence kept as the prompt; the backbone writes the rest.
    pub prompt_len: usize,
    /// Sampling temperature of the generations (FasterDecoding's `data_generation`: 0.3); 0
    /// generates greedily.
    pub temperature: f32,
    /// Generate at most this many sequences (all of the corpus's when `None`); with `chat`,
    /// this many conversations.
    pub max_sequences: Option<usize>,
    /// Every corpus document is one user turn of a chat instead ([`distill_chat`]).
    pub chat: bool,
}

/// The name of head parameter `name` among the optimizer's variables.
const HEAD_PREFIX: &str = "medusa_head.";

/// The LM under the heads. One per run, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Backbone {
    /// Medusa-1: plain tensors, read-only (no gradient graph, contiguous inference weights).
    Frozen {
        model: LlamaForCausalLM,
        tokenizer: zoo_datasets::tokenize::TextTokenizer,
    },
    /// Medusa-2: every weight a variable.
    Joint(TrainableLlama),
}

impl Backbone {
    pub fn model(&self) -> &LlamaForCausalLM {
        match self {
            Self::Frozen { model, .. } => model,
            Self::Joint(t) => &t.model,
        }
    }

    pub fn tokenizer(&self) -> &zoo_datasets::tokenize::TextTokenizer {
        match self {
            Self::Frozen { tokenizer, .. } => tokenizer,
            Self::Joint(t) => &t.tokenizer,
        }
    }
}

/// Medusa training on packed sequences.
pub struct MedusaTask {
    pub backbone: Backbone,
    pub heads: TrainableMedusa,
    joint: Option<Medusa2>,
    /// Medusa-2 with self-distillation: the original backbone, the LM loss's teacher.
    teacher: Option<LlamaForCausalLM>,
    data: PackedSequences,
    position: DataPosition,
    batch_size: usize,
    device: Device,
    /// Optimizer steps taken (for the warm-up stage).
    step: u64,
    /// Per-head losses and the LM loss summed over the current step's micro-batches, and their
    /// count.
    sums: (Vec<f64>, f64, usize),
    last: Vec<(String, f64)>,
    /// Sequences the heads' accuracy is measured on at every save, and what they are.
    accuracy_data: (PackedSequences, &'static str),
    /// The frozen backbone's hidden states per training sequence (Medusa-1), where kept.
    kept: Option<KeptHidden>,
}

impl MedusaTask {
    /// The heads' top-k accuracy on [`Self::accuracy_data`].
    fn accuracy(&self) -> Result<HeadAccuracy> {
        let (data, kind) = &self.accuracy_data;
        let mut totals: Vec<(Vec<usize>, usize)> = Vec::new();
        for (c, chunk) in data.sequences().chunks(ACCURACY_BATCH).enumerate() {
            let scored = data
                .scored()
                .map(|s| &s[c * ACCURACY_BATCH..c * ACCURACY_BATCH + chunk.len()]);
            let ids = Tensor::new(chunk.to_vec(), &self.device)?;
            let hidden = frozen_hidden(self.backbone.model(), &ids)?;
            let hits = self
                .heads
                .rank_hits(self.backbone.model(), &hidden, &ids, scored)?;
            totals.resize(hits.len(), (vec![0; TOPK], 0));
            for (t, (h, n)) in totals.iter_mut().zip(hits) {
                t.0.iter_mut().zip(&h).for_each(|(a, b)| *a += b);
                t.1 += n;
            }
        }
        Ok(HeadAccuracy {
            heads: totals
                .iter()
                .map(|(h, n)| h.iter().map(|&c| c as f64 / (*n).max(1) as f64).collect())
                .collect(),
            positions: totals.first().map_or(0, |t| t.1),
            data: kind.to_string(),
            draft_vocab: self.heads.draft_vocab,
        })
    }

    /// Whether this step trains the backbone too.
    fn joint_now(&self) -> Option<Medusa2> {
        self.joint.filter(|j| self.step >= j.heads_warmup_steps)
    }
}

impl Task for MedusaTask {
    type Batch = Batch;

    fn next_batch(&mut self) -> Result<Batch> {
        let (batch, pos) = self
            .data
            .batch(self.position, self.batch_size, &self.device)?;
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
        let (ids, weights) = (&batch.ids, batch.weights.as_ref());
        let joint = self.joint_now();
        // Medusa-1 reads the frozen backbone's hidden states only (kept ones where they are);
        // Medusa-2's warm-up reads them apart from the backbone, which trains later.
        let (hidden, logits) = match (&self.backbone, joint) {
            (Backbone::Frozen { model, .. }, _) => {
                let hidden = match &mut self.kept {
                    Some(kept) => {
                        kept.states(batch, &self.data, |ids| frozen_hidden(model, ids))?
                    }
                    None => frozen_hidden(model, ids)?,
                };
                (hidden, None)
            }
            (Backbone::Joint(b), None) => (frozen_hidden(&b.model, ids)?, None),
            (Backbone::Joint(b), Some(_)) => {
                let out = b.model.forward(ids, &mut KvCache::new())?;
                (out.hidden, Some(out.logits))
            }
        };
        let losses = self
            .heads
            .head_losses(self.backbone.model(), &hidden, ids, weights)?;
        self.sums.0.resize(losses.len(), 0.0);
        let mut heads: Option<Tensor> = None;
        for (i, loss) in losses.iter().enumerate() {
            self.sums.0[i] += f64::from(loss.to_scalar::<f32>()?);
            let weighted = (loss * HEAD_DECAY.powi(i as i32 + 1))?;
            heads = Some(match heads {
                Some(t) => (t + weighted)?,
                None => weighted,
            });
        }
        self.sums.2 += 1;
        let heads = heads.ok_or_else(|| Error::Input("no Medusa heads to train".into()))?;
        let (Some(joint), Some(logits)) = (joint, logits) else {
            return Ok(heads);
        };
        let lm = match &self.teacher {
            Some(teacher) => {
                let target = teacher.forward(ids, &mut KvCache::new())?.logits.detach();
                kl_from_teacher(&target, &logits, weights)?
            }
            None => next_token_loss(&logits, ids, weights)?,
        };
        self.sums.1 += f64::from(lm.to_scalar::<f32>()?);
        Ok((lm + (heads * joint.heads_coefficient)?)?)
    }

    fn after_step(&mut self) -> Result<()> {
        let n = self.sums.2.max(1) as f64;
        let mut last: Vec<(String, f64)> = self
            .sums
            .0
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("medusa{}_loss", i + 1), s / n))
            .collect();
        if self.joint_now().is_some() {
            let name = if self.teacher.is_some() {
                "lm_kl"
            } else {
                "lm_loss"
            };
            last.push((name.into(), self.sums.1 / n));
        }
        self.last = last;
        self.sums = (Vec::new(), 0.0, 0);
        self.step += 1;
        Ok(())
    }

    fn step_metrics(&self) -> Result<Vec<(String, f64)>> {
        Ok(self.last.clone())
    }

    fn evaluate(&mut self, _output: &Path, _step: u64) -> Result<Vec<(String, f64)>> {
        Ok(Vec::new())
    }

    /// Medusa-1: the heads' folder. Medusa-2: the backbone's HF folder with the heads in it.
    fn save_model(&self, dir: &Path) -> Result<()> {
        match &self.backbone {
            Backbone::Frozen { .. } => self.heads.save(dir, None)?,
            Backbone::Joint(backbone) => {
                backbone.save_hf(dir)?;
                self.heads.save(dir, Some(backbone.hf_config()))?
            }
        }
        // What `--medusa-choices auto` sizes its tree by.
        let accuracy = serde_json::to_vec_pretty(&self.accuracy()?)
            .map_err(|e| Error::Input(format!("cannot write the heads' accuracy: {e}")))?;
        let path = dir.join(HeadAccuracy::FILE);
        std::fs::write(&path, accuracy)
            .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))
    }

    fn lr_scale(&self, name: &str) -> f64 {
        match self.joint {
            Some(j) if name.starts_with(HEAD_PREFIX) => j.heads_lr_multiplier,
            _ => 1.0,
        }
    }
}

/// Mean over positions `0..L-1` of `KL(softmax(teacher) ‖ softmax(student))`, logits
/// `[B, L, V]` (FasterDecoding's self-distillation loss: summed over the vocabulary, averaged
/// over positions); with `weights` `[B, L]` (f32) only the positions whose next token has
/// weight 1 count (a chat's replies, not its prompt nor the padding).
pub fn kl_from_teacher(
    teacher: &Tensor,
    student: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, l, v) = student.dims3()?;
    let rows = |t: &Tensor| -> Result<Tensor> {
        Ok(t.narrow(1, 0, l - 1)?
            .reshape((b * (l - 1), v))?
            .to_dtype(DType::F32)?)
    };
    let log_p = candle_nn::ops::log_softmax(&rows(teacher)?, D::Minus1)?;
    let log_q = candle_nn::ops::log_softmax(&rows(student)?, D::Minus1)?;
    let kl = (log_p.exp()? * (log_p - log_q)?)?.sum(D::Minus1)?;
    match weights {
        Some(w) => {
            let w = w.narrow(1, 1, l - 1)?.flatten_all()?;
            let total = w.sum_all()?.to_scalar::<f32>()?.max(1.0);
            Ok(((kl * w)?.sum_all()? / f64::from(total))?)
        }
        None => Ok(kl.mean_all()?),
    }
}

/// The backbone's own continuations of the first `prompt_len` tokens of each sequence, as
/// sequences of the same length, generated in batches (sampled at `temperature` with `seed`,
/// or greedily at 0; eos does not stop them, as the packed corpus runs on past it).
pub fn self_distill(
    model: &LlamaForCausalLM,
    data: &PackedSequences,
    settings: &SelfDistill,
    seed: u64,
) -> Result<PackedSequences> {
    let seq_len = data.sequences().first().map_or(0, Vec::len);
    if settings.prompt_len == 0 || settings.prompt_len >= seq_len {
        return Err(Error::Input(format!(
            "the self-distillation prompt length {} must lie in 1..{seq_len} (--seq-len)",
            settings.prompt_len
        )));
    }
    let count = settings
        .max_sequences
        .map_or(data.len(), |n| n.min(data.len()));
    let mut out = Vec::with_capacity(count);
    for (i, chunk) in data.sequences()[..count].chunks(16).enumerate() {
        let starts: Vec<Vec<u32>> = chunk
            .iter()
            .map(|s| s[..settings.prompt_len].to_vec())
            .collect();
        let cfg = GenerationConfig {
            max_new_tokens: seq_len - settings.prompt_len,
            strategy: distill_strategy(settings, seed.wrapping_add(i as u64)),
            ..GenerationConfig::default()
        };
        let mut step = LlamaStep {
            model,
            cache: KvCache::new(),
        };
        out.extend(generate(&mut step, starts, &cfg)?);
    }
    PackedSequences::from_sequences(out, seed)
}

/// Chat self-distillation, as FasterDecoding's `data_generation` regenerates ShareGPT's
/// assistant turns: every prompt is one user turn, rendered by the backbone's chat template
/// (HF's `apply_chat_template(add_generation_prompt=True)`), and the backbone writes the reply,
/// until eos or `seq_len` tokens in all. Prompts of one rendered length are generated together,
/// 16 at a time. Each conversation is one row of `seq_len` tokens (padded with eos,
/// [`PackedSequences::conversations`]), with the replies flagged as the targets; their texts
/// (without the final eos) are returned too, each with its rendered prompt's text.
pub fn distill_chat(
    model: &LlamaForCausalLM,
    tokenizer: &zoo_datasets::tokenize::TextTokenizer,
    prompts: &[String],
    settings: &SelfDistill,
    seq_len: usize,
    seed: u64,
) -> Result<(PackedSequences, Vec<Generation>)> {
    let template = tokenizer.chat_template()?.ok_or_else(|| {
        Error::Input(
            "--chat self-distillation needs a chat template, and the backbone's tokenizer has \
             none (tokenizer_config.json chat_template or GGUF tokenizer.chat_template)"
                .into(),
        )
    })?;
    let stops = model.config.eos_token_ids();
    let Some(&eos) = stops.first() else {
        return Err(Error::Input(
            "the backbone config has no eos_token_id".into(),
        ));
    };
    let count = settings
        .max_sequences
        .map_or(prompts.len(), |n| n.min(prompts.len()));
    let mut rendered = Vec::with_capacity(count);
    for prompt in &prompts[..count] {
        let ids = template.encode(tokenizer, &[Message::new("user", prompt.trim())])?;
        // A reply needs room for at least one token.
        if ids.len() < seq_len {
            rendered.push(ids);
        }
    }
    if rendered.is_empty() {
        return Err(Error::Input(format!(
            "every chat prompt renders to {seq_len} tokens or more (--seq-len)"
        )));
    }
    let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, ids) in rendered.iter().enumerate() {
        by_len.entry(ids.len()).or_default().push(i);
    }
    let mut replies = vec![Vec::new(); rendered.len()];
    let mut batch = 0u64;
    for (&len, members) in &by_len {
        for chunk in members.chunks(16) {
            let cfg = GenerationConfig {
                max_new_tokens: seq_len - len,
                stop_tokens: stops.clone(),
                pad_token: eos,
                strategy: distill_strategy(settings, seed.wrapping_add(batch)),
                ..GenerationConfig::default()
            };
            batch += 1;
            let mut step = LlamaStep {
                model,
                cache: KvCache::new(),
            };
            let starts = chunk.iter().map(|&i| rendered[i].clone()).collect();
            for (&i, row) in chunk.iter().zip(generate(&mut step, starts, &cfg)?) {
                let new = &row[len..];
                let end = new
                    .iter()
                    .position(|t| stops.contains(t))
                    .map_or(new.len(), |p| p + 1);
                replies[i] = new[..end].to_vec();
            }
        }
    }
    let mut rows = Vec::with_capacity(rendered.len());
    let mut texts = Vec::with_capacity(rendered.len());
    for (prompt, reply) in rendered.iter().zip(&replies) {
        let mut conversation = prompt.clone();
        conversation.extend(reply);
        // The eos closing the conversation is the reply's (a target) where the model wrote it;
        // a reply that ran out of room fills its row.
        let ended = conversation.last().is_some_and(|t| stops.contains(t));
        if ended {
            conversation.pop();
        }
        let mut scored = vec![false; prompt.len()];
        scored.resize(conversation.len(), true);
        texts.push(Generation {
            text: decode(tokenizer, &conversation)?,
            prompt: Some(decode(tokenizer, prompt)?),
            ended,
        });
        if ended {
            conversation.push(eos);
            scored.push(true);
        }
        rows.push((conversation, scored));
    }
    // Every conversation has a reply token within seq_len: none is dropped.
    let (data, dropped) = PackedSequences::conversations(rows, seq_len, eos, seed)?;
    debug_assert_eq!(dropped, 0);
    Ok((data, texts))
}

/// Sampling at the self-distillation temperature, or greedy at 0.
fn distill_strategy(settings: &SelfDistill, seed: u64) -> Strategy {
    if settings.temperature > 0.0 {
        Strategy::Sample(SamplingOptions {
            temperature: settings.temperature,
            top_k: 0,
            top_p: 1.0,
            seed,
        })
    } else {
        Strategy::Greedy
    }
}

/// Everything a Medusa run needs.
pub struct RunConfig {
    /// The backbone: an HF `LlamaForCausalLM` folder or hub id (with its tokenizer).
    pub model: String,
    pub num_heads: usize,
    pub num_layers: usize,
    /// New heads read the backbone's `lm_head` instead of a copy of their own.
    pub shared_lm_head: bool,
    /// Train and measure the heads on the first this many tokens of the vocabulary
    /// ([`TrainableMedusa::with_draft_vocab`]).
    pub draft_vocab: Option<usize>,
    pub seq_len: usize,
    pub train: TrainConfig,
    pub batch_size: usize,
    pub optimizer: AdamWConfig,
    pub resume: Option<PathBuf>,
    pub device: Device,
    /// Medusa-2; Medusa-1 when `None`.
    pub joint: Option<Medusa2>,
    pub self_distill: Option<SelfDistill>,
    /// Train this many epochs over the (packed or generated) sequences instead of
    /// `train.steps`.
    pub epochs: Option<u64>,
}

pub struct RunSummary {
    pub state: TrainState,
    pub task: MedusaTask,
    pub final_dir: PathBuf,
    /// JSONL lines skipped while reading the corpora.
    pub skipped: usize,
}

/// Loads the backbone, packs the corpus with its tokenizer (or has the backbone write it), and
/// trains with the shared loop.
/// Sequences the heads' accuracy is measured on, at most.
const ACCURACY_SEQUENCES: usize = 64;
/// Sequences per forward pass when measuring it.
const ACCURACY_BATCH: usize = 4;

/// `val_files`: held-out text for the heads' accuracy; without it, the first training
/// sequences stand in.
pub fn run(
    config: RunConfig,
    train_files: &[PathBuf],
    val_files: Option<&[PathBuf]>,
) -> Result<RunSummary> {
    let resume_dir = config
        .resume
        .as_deref()
        .map(checkpoint::resolve)
        .transpose()?;
    // The original LM: an HF checkpoint or a GGUF file, dequantized to f32.
    let original = LlmSource::open(&config.model, None)?;
    let load_original = || original.load_model(Some(DType::F32), &config.device);
    // Medusa-2 checkpoints hold the trained backbone; Medusa-1 ones only the heads.
    let backbone = match (&resume_dir, config.joint) {
        (_, None) => Backbone::Frozen {
            model: load_original()?,
            tokenizer: crate::lm::llm_tokenizer(&original)?,
        },
        (Some(dir), Some(_)) => Backbone::Joint(TrainableLlama::from_pretrained(
            &dir.to_string_lossy(),
            &config.device,
        )?),
        (None, Some(_)) => Backbone::Joint(TrainableLlama::from_pretrained(
            &config.model,
            &config.device,
        )?),
    };
    let eos = backbone
        .model()
        .config
        .eos_token_ids()
        .first()
        .copied()
        .ok_or_else(|| Error::Input("the backbone config has no eos_token_id".into()))?;
    let limit = backbone.model().config.max_position_embeddings;
    if config.seq_len > limit {
        return Err(Error::Input(format!(
            "--seq-len {} exceeds the model's max_position_embeddings {limit}",
            config.seq_len
        )));
    }
    // Before self-distillation's minutes of generation.
    if let Some(n) = config.draft_vocab {
        check_draft_vocab(n, backbone.model().config.vocab_size)?;
    }
    let chat = config.self_distill.is_some_and(|s| s.chat);
    let corpus = if chat {
        Corpus::read_prompts(train_files)?
    } else {
        Corpus::read(train_files)?
    };
    let seed = config.train.seed;
    let tokenizer = backbone.tokenizer();
    // JSONL documents with a prompt (a conversation written before) score their replies only.
    let mut skipped = corpus.skipped;
    let mut pack = |corpus: &Corpus| -> Result<PackedSequences> {
        let (data, dropped) = corpus.pack(tokenizer, eos, config.seq_len, seed)?;
        skipped += dropped;
        Ok(data)
    };
    // Medusa-2's frozen copy of the original LM: the LM loss's teacher under self-distillation.
    let teacher = match (&config.self_distill, config.joint) {
        (Some(_), Some(_)) => Some(load_original()?),
        _ => None,
    };
    // The original LM writes the data: Medusa-1's frozen backbone, or Medusa-2's teacher (its
    // backbone moves on, also when resuming).
    let writer = teacher.as_ref().unwrap_or(backbone.model());
    let data = match &config.self_distill {
        None => pack(&corpus)?,
        Some(settings) if settings.chat => {
            let (data, texts) = distill_chat(
                writer,
                tokenizer,
                &corpus.documents,
                settings,
                config.seq_len,
                seed,
            )?;
            write_generations(&config.train.output, &texts)?;
            data
        }
        Some(settings) => {
            let data = self_distill(writer, &pack(&corpus)?, settings, seed)?;
            let texts = data
                .sequences()
                .iter()
                .map(|seq| {
                    Ok(Generation {
                        text: decode(tokenizer, seq)?,
                        prompt: None,
                        ended: false,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            write_generations(&config.train.output, &texts)?;
            data
        }
    };
    let train = match config.epochs {
        Some(epochs) => config
            .train
            .for_epochs(epochs, data.len() as u64, config.batch_size),
        None => config.train.clone(),
    };
    let heads = match &resume_dir {
        Some(dir) => TrainableMedusa::load(dir, backbone.model(), &config.model)?,
        None => TrainableMedusa::new(
            MedusaConfig {
                medusa_num_heads: config.num_heads,
                medusa_num_layers: config.num_layers,
            },
            backbone.model(),
            &config.model,
            config.shared_lm_head,
        )?,
    };
    let heads = match config.draft_vocab {
        Some(n) => heads.with_draft_vocab(n, backbone.model())?,
        None => heads,
    };
    let state = initial_state(resume_dir.as_deref(), seed)?;
    let mut vars: Vec<(String, Var)> = heads
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| (format!("{HEAD_PREFIX}{n}"), v))
        .collect();
    if let Backbone::Joint(b) = &backbone {
        vars.extend(b.trainable_vars(false));
    }
    let first = |d: &PackedSequences| d.first(ACCURACY_SEQUENCES);
    // Under chat self-distillation the held-out prompts get the backbone's replies too.
    let accuracy_data = match (val_files, &config.self_distill) {
        (Some(files), Some(settings)) if settings.chat => {
            let settings = SelfDistill {
                max_sequences: Some(ACCURACY_SEQUENCES * 2),
                ..*settings
            };
            let prompts = Corpus::read_prompts(files)?;
            skipped += prompts.skipped;
            let prompts = prompts.documents;
            let (val, _) =
                distill_chat(writer, tokenizer, &prompts, &settings, config.seq_len, seed)?;
            (first(&val), "validation")
        }
        (Some(files), _) => {
            let val = Corpus::read(files)?;
            let data = first(&pack(&val)?);
            skipped += val.skipped;
            (data, "validation")
        }
        (None, _) => (first(&data), "training"),
    };
    let kept = match &backbone {
        Backbone::Frozen { model, .. } => KeptHidden::for_data(&data, model.config.hidden_size),
        Backbone::Joint(_) => None,
    };
    let mut task = MedusaTask {
        kept,
        backbone,
        heads,
        joint: config.joint,
        teacher,
        data,
        position: state.data,
        batch_size: config.batch_size,
        device: config.device.clone(),
        step: state.step,
        sums: (Vec::new(), 0.0, 0),
        last: Vec::new(),
        accuracy_data,
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
        skipped,
    })
}

/// A self-distilled sequence's text, and for a chat the rendered prompt it starts with and
/// whether the reply ended with eos (which the text leaves out).
pub struct Generation {
    pub text: String,
    pub prompt: Option<String>,
    pub ended: bool,
}

/// Token ids as text, special tokens kept.
fn decode(tokenizer: &zoo_datasets::tokenize::TextTokenizer, ids: &[u32]) -> Result<String> {
    tokenizer
        .inner()
        .decode(ids, false)
        .map_err(|e| Error::Input(format!("cannot decode a generation: {e}")))
}

/// Writes the self-distilled sequences as `self_distill.jsonl` (`{"text": ...}` per line, as
/// FasterDecoding's `data_generation` writes them, with a chat's rendered `"prompt"` and
/// whether its reply `"ended"` with eos: `zoo train mtp|lm|medusa` then score the replies
/// only) into `output`, for inspection and reuse.
fn write_generations(output: &Path, texts: &[Generation]) -> Result<()> {
    std::fs::create_dir_all(output)
        .map_err(|e| Error::Input(format!("cannot create {}: {e}", output.display())))?;
    let mut lines = String::new();
    for g in texts {
        let line = match &g.prompt {
            Some(prompt) => json!({ "text": g.text, "prompt": prompt, "ended": g.ended }),
            None => json!({ "text": g.text }),
        };
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    let path = output.join("self_distill.jsonl");
    std::fs::write(&path, lines)
        .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))
}
