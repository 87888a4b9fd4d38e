//! The one decoding loop of the LLM family, and the rules it accepts drafted tokens by.
//!
//! [`decode`] runs plain, Medusa and MTP decoding alike: prefill, then rounds of propose
//! (a [`Drafter`] drafts a [`DraftTree`] after the last chosen token), verify (the backbone
//! scores the whole tree in one forward pass under a tree mask), accept (a walk from the root
//! keeps the drafted tokens the backbone's own choice agrees with, plus one token of the
//! backbone's after them), compact (the cache keeps the accepted path) and stop (stop tokens,
//! the length, or the caller). Every token is chosen from the backbone's scores after HF's
//! processors (repetition penalty, minimum length), with the sequence along the path, so
//! greedy speculative decoding is token-identical to plain greedy decoding with the same flags.
//! Plain decoding is the drafter that drafts nothing ([`NoDrafts`]).
//!
//! The acceptance rules ([`Acceptance`]):
//! - greedy: a drafted token is kept when it is the backbone's argmax there;
//! - sampling (Leviathan et al. 2023; Chen et al. 2023; SpecInfer's multi-draft form for
//!   trees): a token drafted from `q` is kept with probability `min(1, p/q)`, else the next
//!   sibling is tried against `norm(max(0, p − q))`, and when all are rejected the token is
//!   drawn from what is left. A ranked (not sampled) draft counts as drawn from a point mass.
//!   The tokens emitted follow the backbone's sampling distribution `p` exactly.
//! - [`TypicalAcceptance`] (Medusa, Cai et al. 2024, §2.3.1): a drafted token is accepted when
//!   the base model gives it a probability above `min(ε, δ·exp(−H))`, `H` the entropy of the
//!   base model's distribution at that place. It is not the base model's sampling distribution
//!   but a cheaper rule that keeps plausible continuations; FasterDecoding's defaults are
//!   `ε = 0.09` (`posterior_threshold`) and `δ = 0.3` (`posterior_alpha`).

use std::ops::ControlFlow;

use candle_core::{DType, Module, Result, Tensor, D};

use super::llama::{KvCache, LlamaForCausalLM};
use crate::generation::{
    argmax, nucleus_probs, process, GenerationConfig, SamplingOptions, SplitMix64, Strategy,
};
use crate::layers::{AttentionMask, Linear};

/// The outcome of a generation by [`decode`].
#[derive(Debug, Clone, PartialEq)]
pub struct SpeculativeOutput {
    /// Prompt and new tokens.
    pub tokens: Vec<u32>,
    pub new_tokens: usize,
    /// Verification forward passes (the prompt's prefill not counted). Plain decoding takes one
    /// per new token.
    pub steps: usize,
    /// The drafted tokens after the root of each step's tree along the path the walk took (the
    /// accepted ones, then the first children on from there), for statistics and tests.
    pub drafts: Vec<Vec<u32>>,
    /// How many of each step's drafts were accepted.
    pub accepted: Vec<usize>,
}

/// A drafter's vocabulary as FR-Spec (Zhao et al. 2025) restricts it: drafts are scored over
/// the `n` most frequent tokens only, so a draft head reads `n / vocab` of the vocabulary
/// projection, which is most of its cost (SmolLM2's 49 152 × 576 head is a fifth of the
/// model's weights). The frequency ranking is the vocabulary's own order: a BPE vocabulary
/// lists its tokens in the order their merges were learned, most frequent pair first, and a
/// SentencePiece one by score. Verification is the base model's over the whole vocabulary, so
/// the output is unchanged; a token outside the `n` cannot be drafted.
#[derive(Debug, Clone)]
pub struct DraftVocab {
    head: Linear,
    vocab: usize,
}

impl DraftVocab {
    /// The first `n` tokens of `lm_head`'s vocabulary.
    pub fn new(lm_head: &Linear, n: usize) -> Result<Self> {
        Ok(Self {
            head: lm_head.first_rows(n)?,
            vocab: lm_head.out_dim()?,
        })
    }

    /// The rows of the vocabulary projection for the draft vocabulary: logits over the
    /// tokens `0..n`, with none for the rest.
    pub fn head(&self) -> &Linear {
        &self.head
    }

    /// Tokens drafts are drawn from.
    pub fn tokens(&self) -> Result<usize> {
        self.head.out_dim()
    }
}

impl Module for DraftVocab {
    /// Logits `[.., vocab]` for `x` `[.., D]`: the draft vocabulary's scores, `-inf` after it.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let scored = self.head.forward(x)?;
        let mut rest = scored.dims().to_vec();
        let last = rest.len() - 1;
        rest[last] = self.vocab - rest[last];
        if rest[last] == 0 {
            return Ok(scored);
        }
        let hidden =
            Tensor::full(f32::NEG_INFINITY, rest, scored.device())?.to_dtype(scored.dtype())?;
        Tensor::cat(&[&scored, &hidden], last)
    }
}

impl SpeculativeOutput {
    /// New tokens per verification step, the bonus token included.
    pub fn mean_accepted(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.new_tokens as f64 / self.steps as f64
        }
    }
}

/// Drafted tokens to verify in one forward pass. Node 0 is the root: the last chosen token,
/// not yet in the cache. Every other node continues its parent, which comes before it.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftTree {
    pub tokens: Vec<u32>,
    /// Each node's parent (`parents[0]` is 0).
    pub parents: Vec<usize>,
    /// The distribution a node's token was drawn from, when the drafter sampled it; `None` for
    /// the root and for ranked drafts (a point mass for speculative sampling).
    pub q: Vec<Option<Vec<f32>>>,
}

impl DraftTree {
    /// A tree of the root alone: plain decoding's round.
    pub fn root(token: u32) -> Self {
        Self {
            tokens: vec![token],
            parents: vec![0],
            q: vec![None],
        }
    }

    /// Adds `token` under `parent`, returning its node.
    pub fn push(&mut self, parent: usize, token: u32, q: Option<Vec<f32>>) -> usize {
        assert!(
            parent < self.tokens.len(),
            "a draft's parent comes before it"
        );
        self.tokens.push(token);
        self.parents.push(parent);
        self.q.push(q);
        self.tokens.len() - 1
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Each node's depth (the root's is 0).
    pub fn depths(&self) -> Vec<usize> {
        let mut depth = vec![0; self.len()];
        for i in 1..self.len() {
            depth[i] = depth[self.parents[i]] + 1;
        }
        depth
    }

    /// The children of `node`, in order.
    pub fn children(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        (1..self.len()).filter(move |&i| self.parents[i] == node)
    }

    /// Every node continues the one before it.
    pub fn is_chain(&self) -> bool {
        (1..self.len()).all(|i| self.parents[i] == i - 1)
    }

    /// `visible[i][j]`: node `i` attends to node `j` (itself and its ancestors).
    pub fn visible(&self) -> Vec<Vec<bool>> {
        let n = self.len();
        let mut visible = vec![vec![false; n]; n];
        for (i, row) in visible.iter_mut().enumerate() {
            let mut j = i;
            loop {
                row[j] = true;
                if j == 0 {
                    break;
                }
                j = self.parents[j];
            }
        }
        visible
    }

    /// The nodes from the root to `node`.
    fn path_to(&self, node: usize) -> Vec<usize> {
        let mut path = vec![node];
        let mut j = node;
        while j != 0 {
            j = self.parents[j];
            path.push(j);
        }
        path.reverse();
        path
    }
}

/// What a drafter sees before each verification.
pub struct DraftContext<'a> {
    pub model: &'a LlamaForCausalLM,
    /// The prompt and the tokens chosen so far; the last (the root) is not in the cache.
    pub tokens: &'a [u32],
    /// The backbone's final hidden states `[1, n, D]` of the tokens that entered the cache
    /// since the last draft, in order: the prompt but its last token, then each accepted path.
    /// `None` when none did (a one-token prompt).
    pub hidden: Option<&'a Tensor>,
    sampling: Option<&'a SamplingOptions>,
    rng: &'a mut SplitMix64,
}

impl<'a> DraftContext<'a> {
    /// The context of a greedy round (drafters choose argmaxes), for driving a drafter outside
    /// [`decode`].
    pub fn greedy(
        model: &'a LlamaForCausalLM,
        tokens: &'a [u32],
        hidden: Option<&'a Tensor>,
        rng: &'a mut SplitMix64,
    ) -> Self {
        Self {
            model,
            tokens,
            hidden,
            sampling: None,
            rng,
        }
    }

    /// A draft from one row of logits `[vocab]`: the argmax, or when decoding samples, a draw
    /// from the same sampling distribution (returned too, for speculative sampling).
    pub fn choose(&mut self, logits: &Tensor) -> Result<(u32, Option<Vec<f32>>)> {
        let logits = logits.to_dtype(DType::F32)?;
        Ok(match self.sampling {
            // On the device: only the index comes back.
            None => (logits.argmax(D::Minus1)?.to_scalar::<u32>()?, None),
            Some(s) => {
                let probs = nucleus_probs(&logits.to_vec1::<f32>()?, s);
                (self.rng.choose(&probs), Some(probs))
            }
        })
    }
}

/// Proposes the tokens after the root for the backbone to verify.
pub trait Drafter {
    /// The tree to verify after `ctx.tokens`, rooted at its last token.
    fn draft(&mut self, ctx: DraftContext<'_>) -> Result<DraftTree>;
}

/// Plain decoding: nothing drafted, one token per forward pass.
pub struct NoDrafts;

impl Drafter for NoDrafts {
    fn draft(&mut self, ctx: DraftContext<'_>) -> Result<DraftTree> {
        Ok(DraftTree::root(*ctx.tokens.last().unwrap_or(&0)))
    }
}

/// How tokens are chosen and drafts accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Acceptance {
    /// The argmax; a draft is kept when it is the argmax.
    Greedy,
    /// Sampling with HF's warpers; drafts by speculative sampling.
    Sample(SamplingOptions),
    /// Medusa's typical acceptance and typical sampling.
    Typical(TypicalAcceptance),
}

impl Acceptance {
    /// Greedy or sampling as `cfg` says; beam search has no speculative form.
    pub fn of(cfg: &GenerationConfig) -> Result<Self> {
        Ok(match cfg.strategy {
            Strategy::Greedy => Self::Greedy,
            Strategy::Sample(s) => Self::Sample(s),
            Strategy::Beam(b) if b.num_beams <= 1 => Self::Greedy,
            Strategy::Beam(_) => {
                candle_core::bail!("beam search cannot be decoded with drafts")
            }
        })
    }

    fn validate(&self, cfg: &GenerationConfig) -> Result<()> {
        if cfg.repetition_penalty <= 0.0 || !cfg.repetition_penalty.is_finite() {
            candle_core::bail!(
                "repetition_penalty must be a positive number, got {}",
                cfg.repetition_penalty
            );
        }
        match self {
            Self::Greedy => {}
            Self::Sample(s) => {
                if !(s.temperature > 0.0 && s.temperature.is_finite()) {
                    candle_core::bail!("temperature must be positive, got {}", s.temperature);
                }
                if !(s.top_p > 0.0 && s.top_p <= 1.0) {
                    candle_core::bail!("top_p must be in (0, 1], got {}", s.top_p);
                }
            }
            Self::Typical(t) => t.validate().map_err(candle_core::Error::msg)?,
        }
        Ok(())
    }

    fn seed(&self) -> u64 {
        match self {
            Self::Greedy => 0,
            Self::Sample(s) => s.seed,
            Self::Typical(t) => t.seed,
        }
    }
}

/// The backbone's verdict on one verified tree: the accepted nodes from the root, and the token
/// chosen after the last of them.
struct Verdict {
    path: Vec<usize>,
    next: u32,
}

/// One verification's scores on the host, fetched per node as the walk needs them, with HF's
/// processors applied along each node's path.
struct Scores<'a> {
    logits: &'a Tensor,
    tree: &'a DraftTree,
    depths: Vec<usize>,
    tokens: &'a [u32],
    new_tokens: usize,
    cfg: &'a GenerationConfig,
}

impl Scores<'_> {
    /// Node `node`'s scores for the token after it.
    fn row(&self, node: usize) -> Result<Vec<f32>> {
        let mut scores = self
            .logits
            .get(node)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        // The sequence along the path, which only the repetition penalty reads.
        let mut seq = Vec::new();
        if self.cfg.repetition_penalty != 1.0 {
            seq.extend_from_slice(self.tokens);
            let path = self.tree.path_to(node);
            seq.extend(path[1..].iter().map(|&k| self.tree.tokens[k]));
        }
        process(
            &mut scores,
            &seq,
            self.new_tokens + self.depths[node],
            self.cfg,
        );
        Ok(scores)
    }
}

/// Accepts drafts of `tree` from the backbone's `scores`.
fn accept(
    tree: &DraftTree,
    scores: &Scores<'_>,
    rule: &Acceptance,
    rng: &mut SplitMix64,
) -> Result<Verdict> {
    let mut path = vec![0];
    let mut node = 0;
    match rule {
        Acceptance::Greedy => loop {
            let token = argmax(&scores.row(node)?);
            match tree.children(node).find(|&c| tree.tokens[c] == token) {
                Some(child) => {
                    path.push(child);
                    node = child;
                }
                None => return Ok(Verdict { path, next: token }),
            }
        },
        Acceptance::Sample(s) => loop {
            let mut p = nucleus_probs(&scores.row(node)?, s);
            let mut kept = None;
            for child in tree.children(node) {
                let d = tree.tokens[child] as usize;
                let q = tree.q[child].as_deref();
                let (pd, qd) = (
                    f64::from(p.get(d).copied().unwrap_or(0.0)),
                    q.map_or(1.0, |q| f64::from(q.get(d).copied().unwrap_or(0.0))),
                );
                if qd > 0.0 && rng.next_f64() * qd < pd {
                    kept = Some(child);
                    break;
                }
                // Rejected: the rest of the mass, p − q, renormalised.
                match q {
                    Some(q) => p
                        .iter_mut()
                        .zip(q)
                        .for_each(|(a, &b)| *a = (*a - b).max(0.0)),
                    None => {
                        if let Some(a) = p.get_mut(d) {
                            *a = 0.0
                        }
                    }
                }
                let total: f32 = p.iter().sum();
                if total <= 0.0 {
                    // p = q up to rounding: nothing is left to correct.
                    p = nucleus_probs(&scores.row(node)?, s);
                } else {
                    p.iter_mut().for_each(|a| *a /= total);
                }
            }
            match kept {
                Some(child) => {
                    path.push(child);
                    node = child;
                }
                None => {
                    return Ok(Verdict {
                        path,
                        next: rng.choose(&p),
                    })
                }
            }
        },
        Acceptance::Typical(t) => {
            // Each node's distribution and threshold, computed once.
            let judged: Vec<(Vec<f32>, f32)> = (0..tree.len())
                .map(|k| {
                    let probs = t.probs(&scores.row(k)?);
                    let threshold = t.threshold(&probs);
                    Ok((probs, threshold))
                })
                .collect::<Result<_>>()?;
            // The longest accepted path; ties go to the higher summed log-likelihood, then to
            // the earlier node.
            let mut best: Vec<(usize, f32)> = vec![(0, 0.0); tree.len()];
            let mut ok = vec![false; tree.len()];
            ok[0] = true;
            let mut end = 0;
            for k in 1..tree.len() {
                let parent = tree.parents[k];
                if !ok[parent] {
                    continue;
                }
                let (probs, threshold) = &judged[parent];
                let p = probs.get(tree.tokens[k] as usize).copied().unwrap_or(0.0);
                if p > *threshold {
                    ok[k] = true;
                    best[k] = (best[parent].0 + 1, best[parent].1 + p.ln());
                    let (len, score) = best[k];
                    if len > best[end].0 || (len == best[end].0 && score > best[end].1) {
                        end = k;
                    }
                }
            }
            let path = tree.path_to(end);
            let next = t.sample(&judged[end].0, rng);
            Ok(Verdict { path, next })
        }
    }
}

/// [`decode`] to `max_new_tokens` or a `stop` token, with no other processors and nothing
/// watching the tokens: what [`super::medusa_generate`] and [`super::mtp_generate`] run.
pub fn decode_until(
    model: &LlamaForCausalLM,
    drafter: &mut dyn Drafter,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
    rule: &Acceptance,
) -> Result<SpeculativeOutput> {
    let cfg = GenerationConfig {
        max_new_tokens,
        stop_tokens: stop.to_vec(),
        ..Default::default()
    };
    decode(model, drafter, prompt, &cfg, rule, &mut |_| {
        Ok(ControlFlow::Continue(()))
    })
}

/// Decodes after `prompt` with `model`, `drafter` proposing tokens and `rule` choosing and
/// accepting them, under `cfg`'s lengths, stop tokens and processors (its strategy is not read:
/// `rule` replaces it). `on_token` sees every new token in order and may stop the generation.
pub fn decode(
    model: &LlamaForCausalLM,
    drafter: &mut dyn Drafter,
    prompt: &[u32],
    cfg: &GenerationConfig,
    rule: &Acceptance,
    on_token: &mut dyn FnMut(u32) -> Result<ControlFlow<()>>,
) -> Result<SpeculativeOutput> {
    if prompt.is_empty() {
        candle_core::bail!("decoding needs a non-empty prompt");
    }
    rule.validate(cfg)?;
    let mut out = SpeculativeOutput {
        tokens: prompt.to_vec(),
        new_tokens: 0,
        steps: 0,
        drafts: Vec::new(),
        accepted: Vec::new(),
    };
    if cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let device = model.model.embeddings().device().clone();
    let sampling = match rule {
        Acceptance::Sample(s) => Some(s),
        _ => None,
    };
    let mut rng = SplitMix64::new(rule.seed());
    let mut cache = KvCache::new();
    // Prefill: every prompt token but the last, which is the first round's root.
    let n = prompt.len();
    let mut hidden = if n > 1 {
        let positions: Vec<u32> = (0..n as u32 - 1).collect();
        let ids = Tensor::new(vec![prompt[..n - 1].to_vec()], &device)?;
        let mask = AttentionMask::causal(0);
        Some(
            model
                .model
                .forward_at(&ids, &positions, &mask, &mut cache)?,
        )
    } else {
        None
    };
    loop {
        let tree = drafter.draft(DraftContext {
            model,
            tokens: &out.tokens,
            hidden: hidden.as_ref(),
            sampling,
            rng: &mut rng,
        })?;
        if tree.tokens.first() != out.tokens.last() {
            candle_core::bail!("a drafted tree must be rooted at the last chosen token");
        }
        // Verify the whole tree in one pass.
        let base = cache.len();
        let ids = Tensor::new(vec![tree.tokens.clone()], &device)?;
        let verified = if tree.is_chain() {
            model.forward(&ids, &mut cache)?
        } else {
            let positions: Vec<u32> = tree.depths().iter().map(|&d| (base + d) as u32).collect();
            let mask = LlamaForCausalLM::tree_mask(base, &tree.visible())?;
            model.forward_at(&ids, &positions, &mask, &mut cache)?
        };
        out.steps += 1;
        let logits = verified.logits.squeeze(0)?;
        let scores = Scores {
            logits: &logits,
            tree: &tree,
            depths: tree.depths(),
            tokens: &out.tokens,
            new_tokens: out.new_tokens,
            cfg,
        };
        let Verdict { path, next } = accept(&tree, &scores, rule, &mut rng)?;
        // Statistics: the accepted drafts, then the first children on from there.
        let mut walked: Vec<u32> = path[1..].iter().map(|&k| tree.tokens[k]).collect();
        let mut tip = *path.last().unwrap_or(&0);
        while let Some(child) = tree.children(tip).next() {
            walked.push(tree.tokens[child]);
            tip = child;
        }
        out.drafts.push(walked);
        out.accepted.push(path.len() - 1);
        // Compact: the cache keeps the accepted path.
        let kept: Vec<usize> = path.iter().map(|&k| base + k).collect();
        cache.keep(base, &kept)?;
        let rows: Vec<u32> = path.iter().map(|&k| k as u32).collect();
        hidden = Some(
            verified
                .hidden
                .index_select(&Tensor::new(rows, &device)?, 1)?,
        );
        // Emit the accepted drafts and the backbone's token after them.
        let emitted = path[1..].iter().map(|&k| tree.tokens[k]).chain([next]);
        for token in emitted.collect::<Vec<_>>() {
            out.tokens.push(token);
            out.new_tokens += 1;
            let flow = on_token(token)?;
            if flow.is_break()
                || cfg.stop_tokens.contains(&token)
                || out.new_tokens >= cfg.max_new_tokens
            {
                return Ok(out);
            }
        }
    }
}

/// Medusa's typical acceptance, and the typical sampling of the base model's own token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TypicalAcceptance {
    /// Divides the logits before the softmax.
    pub temperature: f32,
    /// ε: the hard probability threshold (FasterDecoding `posterior_threshold`).
    pub posterior_threshold: f32,
    /// δ: scales the entropy-dependent threshold `δ·exp(−H)` (FasterDecoding `posterior_alpha`).
    pub posterior_alpha: f32,
    /// Seed of the stream that samples the base model's tokens.
    pub seed: u64,
}

impl Default for TypicalAcceptance {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            posterior_threshold: 0.09,
            posterior_alpha: 0.3,
            seed: 0,
        }
    }
}

impl TypicalAcceptance {
    /// Checks the settings, with a message naming the bad one.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "typical acceptance needs a positive temperature, got {}",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.posterior_threshold) {
            return Err(format!(
                "the posterior threshold ε must lie in [0, 1], got {}",
                self.posterior_threshold
            ));
        }
        if !(self.posterior_alpha >= 0.0 && self.posterior_alpha.is_finite()) {
            return Err(format!(
                "the posterior alpha δ must be non-negative, got {}",
                self.posterior_alpha
            ));
        }
        Ok(())
    }

    /// The base model's distribution at this temperature, from one row of logits.
    pub fn probs(&self, logits: &[f32]) -> Vec<f32> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = logits
            .iter()
            .map(|&v| ((v - max) / self.temperature).exp())
            .collect();
        let sum: f32 = e.iter().sum();
        e.into_iter().map(|v| v / sum).collect()
    }

    /// `min(ε, δ·exp(−H(probs)))`, with FasterDecoding's entropy `−Σ p·ln(p + 1e-5)`.
    pub fn threshold(&self, probs: &[f32]) -> f32 {
        let entropy: f32 = -probs.iter().map(|&p| p * (p + 1e-5).ln()).sum::<f32>();
        self.posterior_threshold
            .min((-entropy).exp() * self.posterior_alpha)
    }

    /// Typical sampling of one token: tokens below the threshold are dropped and the rest
    /// drawn in proportion to their probability. The most likely token always stays.
    pub fn sample(&self, probs: &[f32], rng: &mut SplitMix64) -> u32 {
        let threshold = self.threshold(probs);
        let best = crate::generation::argmax(probs) as usize;
        let kept: Vec<f32> = probs
            .iter()
            .enumerate()
            .map(|(i, &p)| if p >= threshold || i == best { p } else { 0.0 })
            .collect();
        rng.choose(&kept)
    }
}

/// One step of speculative sampling: `draft` was drawn from `q`; returns `None` when it is
/// accepted, else the token drawn in its place from `norm(max(0, p − q))`. Together the two
/// outcomes draw exactly from `p`.
pub fn speculative_accept(p: &[f32], q: &[f32], draft: u32, rng: &mut SplitMix64) -> Option<u32> {
    let d = draft as usize;
    let (pd, qd) = (f64::from(p[d]), f64::from(q[d]));
    if qd <= 0.0 || rng.next_f64() * qd < pd {
        return None;
    }
    let residual: Vec<f32> = p.iter().zip(q).map(|(&a, &b)| (a - b).max(0.0)).collect();
    if residual.iter().all(|&r| r <= 0.0) {
        // p = q up to rounding: nothing is left to correct.
        return Some(rng.choose(p));
    }
    Some(rng.choose(&residual))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first token the walk emits over trees of point-mass and sampled drafts, counted.
    fn first_tokens(p: &[f32], q: &[f32], kinds: &[&str], n: usize) -> Vec<f64> {
        let logits: Vec<f32> = p.iter().map(|&x| x.max(1e-30).ln()).collect();
        let v = p.len();
        let rows = Tensor::new(vec![logits; 1 + kinds.len()], &candle_core::Device::Cpu).unwrap();
        let cfg = GenerationConfig::default();
        let s = SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        };
        let rule = Acceptance::Sample(s);
        let mut rng = SplitMix64::new(11);
        let mut counts = vec![0usize; v];
        for trial in 0..n {
            let mut tree = DraftTree::root(0);
            for (i, kind) in kinds.iter().enumerate() {
                match *kind {
                    // Ranked drafts: tokens 1, 3, ... in turn.
                    "point" => tree.push(0, ((2 * i + 1 + trial) % v) as u32, None),
                    _ => {
                        let d = rng.choose(q);
                        tree.push(0, d, Some(q.to_vec()))
                    }
                };
            }
            let scores = Scores {
                logits: &rows,
                tree: &tree,
                depths: tree.depths(),
                tokens: &[0],
                new_tokens: 0,
                cfg: &cfg,
            };
            let verdict = accept(&tree, &scores, &rule, &mut rng).unwrap();
            let first = match verdict.path.get(1) {
                Some(&k) => tree.tokens[k],
                None => verdict.next,
            };
            counts[first as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    /// Whatever the drafts, the first token the walk emits is distributed as the backbone's
    /// `p`: one sampled draft, two sampled siblings (SpecInfer's multi-draft rule), two ranked
    /// siblings, and a ranked and a sampled one.
    #[test]
    fn the_walk_samples_the_backbones_distribution_over_any_drafts() {
        let p = [0.45f32, 0.25, 0.15, 0.1, 0.05];
        let q = [0.05f32, 0.1, 0.5, 0.05, 0.3];
        for kinds in [
            &["sampled"][..],
            &["sampled", "sampled"],
            &["point", "point"],
            &["point", "sampled"],
        ] {
            let freq = first_tokens(&p, &q, kinds, 100_000);
            for (x, (&f, &want)) in freq.iter().zip(&p).enumerate() {
                assert!(
                    (f - f64::from(want)).abs() < 0.006,
                    "{kinds:?}: token {x} at {f}, p = {want}"
                );
            }
        }
    }

    /// The accepted-or-replaced token is distributed as `p`, whatever `q` drafted it: exactly
    /// (summing over drafts) and empirically.
    #[test]
    fn speculative_acceptance_draws_from_the_target_distribution() {
        let p = [0.5f32, 0.3, 0.15, 0.05, 0.0];
        let q = [0.1f32, 0.2, 0.3, 0.0, 0.4];
        // Exact: P(x) = q(x)·min(1, p(x)/q(x)) + P(reject)·residual(x).
        let accept: Vec<f64> = p
            .iter()
            .zip(&q)
            .map(|(&a, &b)| f64::from(a.min(b)))
            .collect();
        let rejected = 1.0 - accept.iter().sum::<f64>();
        let residual: Vec<f64> = p
            .iter()
            .zip(&q)
            .map(|(&a, &b)| f64::from((a - b).max(0.0)))
            .collect();
        let norm: f64 = residual.iter().sum();
        for x in 0..p.len() {
            let total = accept[x] + rejected * residual[x] / norm;
            assert!((total - f64::from(p[x])).abs() < 1e-6, "{x}: {total}");
        }
        // Empirical, through the generator.
        let mut rng = SplitMix64::new(7);
        let n = 200_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            let draft = rng.choose(&q);
            let token = speculative_accept(&p, &q, draft, &mut rng).unwrap_or(draft);
            counts[token as usize] += 1;
        }
        for x in 0..p.len() {
            let freq = counts[x] as f64 / n as f64;
            assert!(
                (freq - f64::from(p[x])).abs() < 0.005,
                "{x}: {freq} vs {}",
                p[x]
            );
        }
        assert_eq!(counts[4], 0, "a token p rules out was emitted");
    }

    #[test]
    fn typical_threshold_is_the_smaller_of_epsilon_and_the_entropy_term() {
        let t = TypicalAcceptance {
            temperature: 1.0,
            ..Default::default()
        };
        // A certain distribution: H ≈ 0, so δ·exp(−H) ≈ 0.3 and ε = 0.09 wins.
        assert!((t.threshold(&[1.0, 0.0, 0.0]) - 0.09).abs() < 1e-4);
        // Uniform over 100: H = ln 100, δ/100 = 0.003.
        let uniform = vec![0.01f32; 100];
        let h: f32 = -100.0 * 0.01 * (0.01f32 + 1e-5).ln();
        assert!((t.threshold(&uniform) - 0.3 * (-h).exp()).abs() < 1e-7);
        // Typical sampling never draws a token below the threshold.
        let probs = t.probs(&[4.0, 3.9, 0.0, -1.0, -2.0]);
        let threshold = t.threshold(&probs);
        let mut rng = SplitMix64::new(1);
        for _ in 0..1000 {
            let token = t.sample(&probs, &mut rng) as usize;
            assert!(probs[token] >= threshold, "{token}");
        }
    }

    #[test]
    fn bad_typical_settings_are_named() {
        let bad = TypicalAcceptance {
            temperature: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("temperature"));
        let bad = TypicalAcceptance {
            posterior_threshold: 2.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("ε"));
    }
}
