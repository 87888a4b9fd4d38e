//! Multi-token prediction modules in the DeepSeek-V3 form (DeepSeek-AI 2024, §2.2): module `k`
//! predicts the token `k + 1` places ahead of each position. At position `i` it combines the
//! previous depth's representation `h^{k-1}_i` (the backbone's final hidden state for `k = 1`)
//! with the embedding of token `t_{i+k}`:
//!
//! `h'^k_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])` (embedding first, as the
//! released weights are laid out), `h^k = TRM_k(h'^k)` (one causal transformer block over the
//! sequence), `P^k_{i+k+1} = lm_head(shared_head.norm(h^k_i))`.
//!
//! The embedding and the output projection are the backbone's; each module has its own norms,
//! `eh_proj` and block, named `model.layers.{num_hidden_layers + k - 1}.*`.
//!
//! [`MtpDrafter`] uses the modules for self-speculative decoding: they draft a chain of
//! tokens, or a tree grown by confidence as EAGLE-2 grows one ([`MtpDraft`]), the backbone
//! verifies it in one pass, and greedy acceptance keeps the output identical to plain greedy
//! decoding.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::LlamaConfig;
use super::llama::{LayerKv, LlamaDecoderLayer, LlamaForCausalLM};
use super::medusa::top_k;
use super::speculative::{
    decode_until, Acceptance, DraftContext, DraftTree, DraftVocab, Drafter, SpeculativeOutput,
};
use crate::generation::{softmax, SamplingOptions};
use crate::layers::{AttentionMask, Linear, QuantizedWeights, RmsNorm};

/// One MTP module.
#[derive(Debug, Clone)]
pub struct MtpModule {
    enorm: RmsNorm,
    hnorm: RmsNorm,
    eh_proj: Linear,
    block: LlamaDecoderLayer,
    shared_norm: RmsNorm,
}

impl MtpModule {
    /// Builds the module stored under `vb` (`model.layers.{num_hidden_layers + k - 1}`).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Self::load(cfg, vb, &QuantizedWeights::default())
    }

    /// [`Self::new`] with the projections from `quantized` where it has them, laid out as it
    /// says (for decoding, or not).
    pub fn load(cfg: &LlamaConfig, vb: VarBuilder, quantized: &QuantizedWeights) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            enorm: RmsNorm::new(d, eps, vb.pp("enorm"))?,
            hnorm: RmsNorm::new(d, eps, vb.pp("hnorm"))?,
            eh_proj: quantized.linear(2 * d, d, false, vb.pp("eh_proj"))?,
            block: LlamaDecoderLayer::new(cfg, vb.clone(), quantized)?,
            shared_norm: RmsNorm::new(d, eps, vb.pp("shared_head").pp("norm"))?,
        })
    }

    /// `h^k` `[B, L, D]` from `h^{k-1}` `[B, L, D]` and the embeddings of the tokens `k` places
    /// ahead `[B, L, D]`, over the module's cached positions.
    pub fn forward(
        &self,
        prev_hidden: &Tensor,
        ahead_embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: &mut LayerKv,
    ) -> Result<Tensor> {
        let x = Tensor::cat(
            &[
                &self.enorm.forward(ahead_embeds)?,
                &self.hnorm.forward(prev_hidden)?,
            ],
            D::Minus1,
        )?;
        self.block
            .forward(&self.eh_proj.forward(&x)?, cos, sin, mask, cache)
    }

    /// The module's logits for `h^k`: the backbone's head (or a [`DraftVocab`] of it) after the
    /// module's own norm.
    pub fn logits(&self, hidden: &Tensor, lm_head: &dyn Module) -> Result<Tensor> {
        lm_head.forward(&self.shared_norm.forward(hidden)?)
    }
}

/// The MTP modules of a checkpoint, depth 1 first.
#[derive(Debug, Clone)]
pub struct MtpModules {
    pub modules: Vec<MtpModule>,
    /// The vocabulary the modules draft from, when restricted.
    draft_vocab: Option<DraftVocab>,
}

impl MtpModules {
    /// Builds `n` modules from a checkpoint's root `vb` (names `model.layers.{L + i}.*`).
    pub fn new(cfg: &LlamaConfig, n: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_projections(cfg, n, vb, &QuantizedWeights::default())
    }

    fn with_projections(
        cfg: &LlamaConfig,
        n: usize,
        vb: VarBuilder,
        quantized: &QuantizedWeights,
    ) -> Result<Self> {
        let layers = vb.pp("model").pp("layers");
        let modules = (0..n)
            .map(|i| MtpModule::load(cfg, layers.pp(cfg.num_hidden_layers + i), quantized))
            .collect::<Result<_>>()?;
        Ok(Self {
            modules,
            draft_vocab: None,
        })
    }

    /// The projections of `n` modules under `vb` quantized to `dtype`, by full name; those
    /// whose input width is not a whole number of blocks stay dense.
    fn quantize_projections(
        cfg: &LlamaConfig,
        n: usize,
        vb: &VarBuilder,
        dtype: GgmlDType,
    ) -> Result<QuantizedWeights> {
        let (d, heads, kv, head) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
        );
        let inter = cfg.intermediate_size;
        let shapes = [
            ("eh_proj", (d, 2 * d)),
            ("self_attn.q_proj", (heads * head, d)),
            ("self_attn.k_proj", (kv * head, d)),
            ("self_attn.v_proj", (kv * head, d)),
            ("self_attn.o_proj", (d, heads * head)),
            ("mlp.gate_proj", (inter, d)),
            ("mlp.up_proj", (inter, d)),
            ("mlp.down_proj", (d, inter)),
        ];
        let mut tensors = HashMap::new();
        for i in 0..n {
            let prefix = format!("model.layers.{}", cfg.num_hidden_layers + i);
            for (name, shape) in shapes {
                if !shape.1.is_multiple_of(dtype.block_size()) {
                    continue;
                }
                let weight = vb
                    .pp(&prefix)
                    .pp(name)
                    .get(shape, "weight")?
                    .to_dtype(DType::F32)?;
                tensors.insert(
                    format!("{prefix}.{name}.weight"),
                    Arc::new(QTensor::quantize(&weight, dtype)?),
                );
            }
        }
        Ok(QuantizedWeights::new(tensors))
    }

    /// The modules draft from the first `n` tokens of `lm_head` only ([`DraftVocab`]).
    pub fn with_draft_vocab(mut self, lm_head: &Linear, n: usize) -> Result<Self> {
        self.draft_vocab = Some(DraftVocab::new(lm_head, n)?);
        Ok(self)
    }

    /// What the modules' logits are projected by: the draft vocabulary's rows of `lm_head`
    /// (the logits then cover the tokens `0..n` only, the rest cannot be drafted), or all of
    /// `lm_head`.
    pub fn draft_head<'a>(&'a self, lm_head: &'a Linear) -> &'a Linear {
        match &self.draft_vocab {
            Some(vocab) => vocab.head(),
            None => lm_head,
        }
    }

    /// The `num_nextn_predict_layers` modules of a checkpoint (folder or hub id), laid out for
    /// decoding. With `quantize` (the backbone's own quantized type, for a GGUF one) their
    /// projections are quantized to it, as the backbone's are: drafting then reads a quarter
    /// of the f32 bytes (a SmolLM2 module is 4.2M parameters, 12% of the Q8_0 backbone's
    /// bytes in f32).
    pub fn load(
        repo: &crate::hub::ModelRepo,
        cfg: &LlamaConfig,
        dtype: DType,
        device: &Device,
        quantize: Option<GgmlDType>,
    ) -> crate::Result<Self> {
        use crate::error::CandleContext;
        if cfg.num_nextn_predict_layers == 0 {
            return Err(crate::Error::Invalid {
                path: repo.get("config.json")?,
                what: "Llama config",
                message: "num_nextn_predict_layers is 0: the checkpoint has no MTP modules".into(),
            });
        }
        let n = cfg.num_nextn_predict_layers;
        let weights = crate::weights::SafetensorsWeights::open(&repo.weight_files()?)?;
        let vb = weights.into_var_builder(dtype, device);
        let quantized = match quantize {
            Some(q) => Self::quantize_projections(cfg, n, &vb, q),
            None => Ok(QuantizedWeights::default()),
        }
        .context(|| format!("cannot quantize the MTP modules of {}", repo.describe()))?;
        Self::with_projections(cfg, n, vb, &quantized.for_decoding())
            .context(|| format!("cannot build the MTP modules of {}", repo.describe()))
    }

    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

/// A module's cache of keys and values and how many positions it holds.
#[derive(Default)]
struct ModuleCache {
    kv: LayerKv,
    len: usize,
}

impl ModuleCache {
    fn truncate(&mut self, len: usize) -> Result<()> {
        if len < self.len {
            self.kv.truncate(len);
            self.len = len;
        }
        Ok(())
    }
}

/// How [`MtpDrafter`] drafts from its modules' distributions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MtpDraft {
    /// One token per module (its argmax, or a draw when decoding samples): a chain.
    Chain,
    /// A tree as EAGLE-2 grows one (Li et al. 2024, §4): every depth expands the `top_k` most
    /// confident nodes of the depth before by their `top_k` most likely tokens (a node's
    /// confidence is the product of the modules' probabilities along its path), and the
    /// `max_nodes` most confident drafts are verified. Ranked drafts are point masses for
    /// speculative sampling.
    Tree { top_k: usize, max_nodes: usize },
}

/// A drafted node while the tree grows.
struct Candidate {
    parent: usize,
    token: u32,
    depth: usize,
    confidence: f32,
    q: Option<Vec<f32>>,
}

/// The MTP modules as a drafter ([`MtpDraft`]): module `k` drafts the tokens at depth `k`
/// under the root, from each depth-`k - 1` node it expands.
///
/// Module `k` at position `i` reads `h^{k-1}_i` and the embedding of `t_{i+k}`. It keeps a cache
/// of the positions whose inputs are all known (`i + k <= m` after `m` tokens); after them it
/// computes one row per drafted node `N` of depth `1..k`: position `m - k + depth(N)`, the
/// embedding of `N`'s token and module `k - 1`'s row of `N`'s parent, attending to the known
/// positions and to `N`'s ancestors. Its rows of depth `k - 1` give the next depth. Draft rows
/// are dropped after each round.
pub struct MtpDrafter<'a> {
    mtp: &'a MtpModules,
    shape: MtpDraft,
    /// `done[k]`: positions `1..=done[k]` (1-based: token `t_i` sits at rotary position
    /// `i - 1`) are permanently in module `k`'s cache.
    done: Vec<usize>,
    caches: Vec<ModuleCache>,
    /// `pending[k]` for `k >= 1`: module `k`'s outputs `[1, n, D]` that module `k + 1` has not
    /// read yet, from the position it caches next (`h^0`, the backbone's, comes with each
    /// draft's context). One row after a round that ran module `k + 1`; more after rounds that
    /// stopped before it.
    pending: Vec<Option<Tensor>>,
    /// Drafts whose confidence is below this are neither verified nor expanded, and a round
    /// stops at the first depth with none left: [`MtpDrafter::with_min_confidence`].
    min_confidence: f32,
}

impl<'a> MtpDrafter<'a> {
    /// A chain: one token per module.
    pub fn new(mtp: &'a MtpModules) -> Self {
        Self::with_shape(mtp, MtpDraft::Chain)
    }

    pub fn with_shape(mtp: &'a MtpModules, shape: MtpDraft) -> Self {
        let depth = mtp.len();
        Self {
            mtp,
            shape,
            done: vec![0; depth],
            caches: (0..depth).map(|_| ModuleCache::default()).collect(),
            pending: vec![None; depth.max(1)],
            min_confidence: 0.0,
        }
    }

    /// Drafts only what is likely enough to pay for itself, as EAGLE-2 grows its trees by
    /// confidence (Li et al. 2024, §4): a draft's confidence is the product of the modules'
    /// probabilities along its path (for a chain, of the drafted tokens), and drafts below
    /// `min_confidence` are dropped. When a depth keeps none, the modules after it do not run
    /// that round (they catch up on the positions later, in one pass), and with no draft at
    /// all the round is a plain decoding step. On a CPU, where verifying a draft and running a
    /// module each cost a share of a plain step, a draft accepted with probability `c` pays
    /// for itself when `c` exceeds that share. 0 (the default) keeps every draft.
    pub fn with_min_confidence(mut self, min_confidence: f32) -> Self {
        self.min_confidence = min_confidence;
        self
    }
}

impl Drafter for MtpDrafter<'_> {
    fn draft(&mut self, mut ctx: DraftContext<'_>) -> Result<DraftTree> {
        let (model, tokens) = (ctx.model, ctx.tokens);
        let m = tokens.len();
        let root = tokens[m - 1];
        let Some(hidden) = ctx.hidden else {
            return Ok(DraftTree::root(root));
        };
        let device: Device = hidden.device().clone();
        let depth = self.mtp.len();
        let mut nodes = vec![Candidate {
            parent: 0,
            token: root,
            depth: 0,
            confidence: 1.0,
            q: None,
        }];
        let mut frontier = vec![0usize];
        // `h^{k-1}` for module k: of positions `start_k..` (its known rows, then for k >= 2 the
        // position of its depth-1 rows), and of the nodes module k - 1 computed rows for.
        let mut src = hidden.clone();
        let mut src_nodes: Vec<(usize, Tensor)> = Vec::new();
        for k in 1..=depth {
            // Module k's rows of depth >= 1 sit at positions m - k + depth >= 1.
            if m < k.max(2) || frontier.is_empty() {
                break;
            }
            let k0 = k - 1;
            let module = &self.mtp.modules[k0];
            let mcache = &mut self.caches[k0];
            let start = self.done[k0] + 1;
            // Known rows: positions start..=last (empty when m == k).
            let last = m - k;
            let known = (last + 1).saturating_sub(start);
            let expected = known + usize::from(k > 1);
            if src.dim(1)? != expected {
                candle_core::bail!(
                    "MTP module {k}: {} inputs for {expected} positions from {start}",
                    src.dim(1)?
                );
            }
            if k > 1 {
                // The row after the known ones is not cached this round: module k reads it
                // again next time.
                self.pending[k0] = Some(src.narrow(1, known, 1)?);
            }
            // The nodes module k computes rows for: depth 1..k, ancestors of the frontier.
            let mut rows: Vec<usize> = Vec::new();
            if k > 1 {
                let mut wanted = vec![false; nodes.len()];
                for &f in &frontier {
                    let mut n = f;
                    while n != 0 && !wanted[n] {
                        wanted[n] = true;
                        n = nodes[n].parent;
                    }
                }
                rows = (1..nodes.len()).filter(|&n| wanted[n]).collect();
            }
            let mut h_rows = Vec::with_capacity(1 + rows.len());
            if known > 0 {
                h_rows.push(src.narrow(1, 0, known)?);
            }
            for &n in &rows {
                let parent = nodes[n].parent;
                h_rows.push(if parent == 0 {
                    src.narrow(1, known, 1)?
                } else {
                    let (_, row) =
                        src_nodes
                            .iter()
                            .find(|(p, _)| *p == parent)
                            .ok_or_else(|| {
                                candle_core::Error::Msg(format!(
                                    "MTP module {k}: no row of module {k0} for a draft's parent"
                                ))
                            })?;
                    row.clone()
                });
            }
            let hidden_in = Tensor::cat(&h_rows, 1)?;
            let ahead: Vec<u32> = (start..=last)
                .map(|i| tokens[i + k - 1])
                .chain(rows.iter().map(|&n| nodes[n].token))
                .collect();
            let positions: Vec<u32> = (start..=last)
                .map(|i| (i - 1) as u32)
                .chain(rows.iter().map(|&n| (m - k + nodes[n].depth - 1) as u32))
                .collect();
            let n = positions.len();
            let embeds = model.model.embed(&Tensor::new(vec![ahead], &device)?)?;
            let (cos, sin) = model.model.rotary_cos_sin(&positions, &device)?;
            let mask = if rows.is_empty() {
                if n > 1 {
                    AttentionMask::causal(mcache.len)
                } else {
                    AttentionMask::none()
                }
            } else {
                // Known rows are causal; a node's row sees them, its ancestors' and its own.
                let mut visible = vec![vec![false; n]; n];
                for (a, row) in visible.iter_mut().enumerate().take(known) {
                    row[..=a].fill(true);
                }
                for (r, &node) in rows.iter().enumerate() {
                    let row = &mut visible[known + r];
                    row[..known].fill(true);
                    for (j, &other) in rows.iter().enumerate() {
                        let mut a = node;
                        while a != 0 {
                            if a == other {
                                row[known + j] = true;
                                break;
                            }
                            a = nodes[a].parent;
                        }
                    }
                }
                LlamaForCausalLM::tree_mask(mcache.len, &visible)?
            };
            let out = module.forward(&hidden_in, &embeds, &cos, &sin, &mask, &mut mcache.kv)?;
            mcache.len += n;
            mcache.truncate(last)?;
            self.done[k0] = last;
            // The rows whose logits grow the next depth: the root's (module 1's last known
            // row) or the frontier's.
            let grow: Vec<usize> = if k == 1 {
                vec![known - 1]
            } else {
                frontier
                    .iter()
                    .map(|f| known + rows.iter().position(|r| r == f).unwrap_or(0))
                    .collect()
            };
            let parents = if k == 1 { vec![0] } else { frontier.clone() };
            let mut children = Vec::new();
            for (&row, &parent) in grow.iter().zip(&parents) {
                let logits = module
                    .logits(
                        &out.narrow(1, row, 1)?,
                        self.mtp.draft_head(model.lm_head()),
                    )?
                    .squeeze(0)?
                    .squeeze(0)?;
                match self.shape {
                    MtpDraft::Chain => {
                        let (token, q) = ctx.choose(&logits)?;
                        let p = match (&q, self.min_confidence > 0.0) {
                            (Some(q), _) => q[token as usize],
                            (None, true) => {
                                let row = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                                softmax(&row)[token as usize]
                            }
                            (None, false) => 1.0,
                        };
                        children.push(Candidate {
                            parent,
                            token,
                            depth: k,
                            confidence: nodes[parent].confidence * p,
                            q,
                        });
                    }
                    MtpDraft::Tree { top_k: width, .. } => {
                        let probs = softmax(&logits.to_dtype(DType::F32)?.to_vec1::<f32>()?);
                        for token in top_k(&probs, width) {
                            children.push(Candidate {
                                parent,
                                token: token as u32,
                                depth: k,
                                confidence: nodes[parent].confidence * probs[token],
                                q: None,
                            });
                        }
                    }
                }
            }
            children.retain(|c| c.confidence >= self.min_confidence);
            let first_child = nodes.len();
            nodes.extend(children);
            let mut next: Vec<usize> = (first_child..nodes.len()).collect();
            if let MtpDraft::Tree { top_k, .. } = self.shape {
                next.sort_by(|&a, &b| nodes[b].confidence.total_cmp(&nodes[a].confidence));
                next.truncate(top_k);
                next.sort_unstable();
            }
            frontier = next;
            // Module k + 1's inputs: the rows of module k it has not read, then this round's.
            src = match (&self.pending[k0 + 1..].first().cloned().flatten(), known) {
                (Some(p), 0) => p.clone(),
                (Some(p), _) => Tensor::cat(&[p, &out.narrow(1, 0, known)?], 1)?,
                (None, _) => out.narrow(1, 0, known)?,
            };
            if k < depth {
                // All of them wait for module k + 1 if it does not run this round.
                self.pending[k] = (src.dim(1)? > 0).then(|| src.clone());
            }
            src_nodes = rows
                .iter()
                .enumerate()
                .map(|(r, &node)| Ok((node, out.narrow(1, known + r, 1)?)))
                .collect::<Result<_>>()?;
        }
        // The most confident drafts (an ancestor is at least as confident as its children and
        // comes first, so the set is closed under parents), in the order they were drafted.
        let mut keep: Vec<usize> = (1..nodes.len()).collect();
        if let MtpDraft::Tree { max_nodes, .. } = self.shape {
            keep.sort_by(|&a, &b| {
                nodes[b]
                    .confidence
                    .total_cmp(&nodes[a].confidence)
                    .then(a.cmp(&b))
            });
            keep.truncate(max_nodes);
            keep.sort_unstable();
        }
        let mut tree = DraftTree::root(root);
        let mut index = vec![0usize; nodes.len()];
        for n in keep {
            let c = &mut nodes[n];
            index[n] = tree.push(index[c.parent], c.token, c.q.take());
        }
        Ok(tree)
    }
}

/// Self-speculative decoding through [`decode`] with the modules drafting a chain
/// ([`MtpDrafter`]); the backbone verifies the next token and the drafts in one causal pass,
/// and a prefix of the drafts is accepted with one more token of the backbone's after it.
/// Stops after `max_new_tokens` or a `stop` token.
///
/// - `sampling: None` (greedy): drafts are the modules' argmax and are accepted while they equal
///   the backbone's argmax. Token-identical to plain greedy decoding.
/// - `sampling: Some(..)`: drafts are drawn from the modules' distributions `q` and accepted by
///   speculative sampling against the backbone's `p`, both after the same temperature, top-k
///   and top-p. The output follows plain sampling's distribution exactly (the random draws
///   differ, so a seed gives other text than plain sampling).
pub fn mtp_generate(
    model: &LlamaForCausalLM,
    mtp: &MtpModules,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
    sampling: Option<&SamplingOptions>,
) -> Result<SpeculativeOutput> {
    let rule = sampling.map_or(Acceptance::Greedy, |s| Acceptance::Sample(*s));
    decode_until(
        model,
        &mut MtpDrafter::new(mtp),
        prompt,
        max_new_tokens,
        stop,
        &rule,
    )
}
