//! Medusa (Cai et al. 2024): extra decoding heads on the backbone's last hidden state, head `k`
//! predicting the token `k + 1` places after the next one, and tree-based speculative decoding
//! that verifies a tree of their top candidates in one forward pass.
//!
//! Heads load from FasterDecoding's layouts: `medusa_lm_head.safetensors` (or `.pt`, read by
//! candle's pickle reader, which never executes code) with `{i}.{j}.linear.weight/bias` for
//! the ResBlocks and `{i}.{layers}.weight` for the head's own vocabulary projection; when the
//! latter is absent, the head shares the base model's `lm_head` (the "version 2" layout).
//! `config.json` gives `medusa_num_heads` and `medusa_num_layers`.
//!
//! The tree comes from `medusa_choices`: each choice is a path of top-k ranks, one per head
//! (`[0, 1]`: the best token of head 0, then the second best of head 1). [`MedusaTree`] holds
//! the attention mask, position ids, tree indices and retrieval paths that FasterDecoding's
//! `generate_medusa_buffers` builds.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::llama::LlamaForCausalLM;
use super::speculative::{
    decode_until, Acceptance, DraftContext, DraftTree, DraftVocab, Drafter, SpeculativeOutput,
    TypicalAcceptance,
};
use crate::error::CandleContext;
use crate::layers::Linear;

/// Candidates taken from each head (FasterDecoding's `TOPK`); tree choices index below it.
pub const TOPK: usize = 10;

/// FasterDecoding's `mc_sim_7b_63` tree (`medusa/model/medusa_choices.py`, Apache-2.0): 63
/// paths over 4 heads, found by simulation to maximise the expected acceptance of Vicuna-7B's
/// heads.
pub const MC_SIM_7B_63: &[&[usize]] = &[
    &[0],
    &[0, 0],
    &[1],
    &[0, 1],
    &[2],
    &[0, 0, 0],
    &[1, 0],
    &[0, 2],
    &[3],
    &[0, 3],
    &[4],
    &[0, 4],
    &[2, 0],
    &[0, 5],
    &[0, 0, 1],
    &[5],
    &[0, 6],
    &[6],
    &[0, 7],
    &[0, 1, 0],
    &[1, 1],
    &[7],
    &[0, 8],
    &[0, 0, 2],
    &[3, 0],
    &[0, 9],
    &[8],
    &[9],
    &[1, 0, 0],
    &[0, 2, 0],
    &[1, 2],
    &[0, 0, 3],
    &[4, 0],
    &[2, 1],
    &[0, 0, 4],
    &[0, 0, 5],
    &[0, 0, 0, 0],
    &[0, 1, 1],
    &[0, 0, 6],
    &[0, 3, 0],
    &[5, 0],
    &[1, 3],
    &[0, 0, 7],
    &[0, 0, 8],
    &[0, 0, 9],
    &[6, 0],
    &[0, 4, 0],
    &[1, 4],
    &[7, 0],
    &[0, 1, 2],
    &[2, 0, 0],
    &[3, 1],
    &[2, 2],
    &[8, 0],
    &[0, 5, 0],
    &[1, 5],
    &[1, 0, 1],
    &[0, 2, 1],
    &[9, 0],
    &[0, 6, 0],
    &[0, 0, 0, 1],
    &[1, 6],
    &[0, 7, 0],
];

/// The Medusa heads' `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct MedusaConfig {
    pub medusa_num_heads: usize,
    #[serde(default = "one")]
    pub medusa_num_layers: usize,
}

fn one() -> usize {
    1
}

/// One head: `medusa_num_layers` ResBlocks `x + SiLU(W x + b)`, then a vocabulary projection.
#[derive(Debug, Clone)]
pub struct MedusaHead {
    blocks: Vec<Linear>,
    /// `None`: the base model's `lm_head`.
    out: Option<Linear>,
    /// The head's own projection cut to a draft vocabulary.
    draft_out: Option<DraftVocab>,
}

impl MedusaHead {
    /// The head's logits for `hidden` `[.., D]`; `lm_head` projects when the head has no
    /// projection of its own.
    pub fn forward(&self, hidden: &Tensor, lm_head: &dyn Module) -> Result<Tensor> {
        let x = self.features(hidden)?;
        match &self.out {
            Some(out) => out.forward(&x),
            None => lm_head.forward(&x),
        }
    }

    /// The head's own vocabulary projection; `None` where it reads the base model's `lm_head`.
    pub fn projection(&self) -> Option<&Linear> {
        self.out.as_ref()
    }

    /// The ResBlocks' output `[.., D]`, before the vocabulary projection.
    pub fn features(&self, hidden: &Tensor) -> Result<Tensor> {
        let mut x = hidden.clone();
        for block in &self.blocks {
            x = (&x + block.forward(&x)?.silu()?)?;
        }
        Ok(x)
    }
}

/// All heads of a Medusa checkpoint.
#[derive(Debug, Clone)]
pub struct MedusaHeads {
    pub heads: Vec<MedusaHead>,
    /// The vocabulary the heads that share `lm_head` draft from, when restricted.
    draft_vocab: Option<DraftVocab>,
}

impl MedusaHeads {
    /// Builds `config.medusa_num_heads` heads from `vb` (names `{i}.{j}.linear.*`,
    /// `{i}.{layers}.weight`).
    pub fn new(config: &MedusaConfig, hidden: usize, vocab: usize, vb: VarBuilder) -> Result<Self> {
        let layers = config.medusa_num_layers;
        let heads = (0..config.medusa_num_heads)
            .map(|i| {
                let vb = vb.pp(i);
                let blocks = (0..layers)
                    .map(|j| Linear::new(hidden, hidden, true, vb.pp(j).pp("linear")))
                    .collect::<Result<Vec<_>>>()?;
                let out = if vb.contains_tensor(&format!("{layers}.weight")) {
                    Some(Linear::new(hidden, vocab, false, vb.pp(layers))?)
                } else {
                    None
                };
                Ok(MedusaHead {
                    blocks,
                    out,
                    draft_out: None,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            heads,
            draft_vocab: None,
        })
    }

    /// Every head drafts from the first `n` tokens only ([`DraftVocab`]): the heads that share
    /// the base model's `lm_head` through the first `n` rows of it, the others through the
    /// first `n` rows of their own projection.
    pub fn with_draft_vocab(mut self, lm_head: &Linear, n: usize) -> Result<Self> {
        self.draft_vocab = Some(DraftVocab::new(lm_head, n)?);
        for head in &mut self.heads {
            head.draft_out = head
                .out
                .as_ref()
                .map(|out| DraftVocab::new(out, n))
                .transpose()?;
        }
        Ok(self)
    }

    /// Loads a FasterDecoding Medusa folder: `config.json` and `medusa_lm_head.safetensors`
    /// (or `medusa_lm_head.pt`), for a base model of width `hidden` and vocabulary `vocab`.
    pub fn load(
        dir: &Path,
        hidden: usize,
        vocab: usize,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        if !dir.is_dir() {
            return Err(crate::Error::MissingFolder(dir.to_path_buf()));
        }
        let config: MedusaConfig =
            crate::hub::read_json(&dir.join("config.json"), "Medusa config")?;
        let safetensors = dir.join("medusa_lm_head.safetensors");
        let pickle = dir.join("medusa_lm_head.pt");
        let tensors: std::collections::HashMap<String, Tensor> = if safetensors.is_file() {
            candle_core::safetensors::load(&safetensors, device)
                .context(|| format!("cannot read {}", safetensors.display()))?
        } else if pickle.is_file() {
            candle_core::pickle::read_all(&pickle)
                .context(|| format!("cannot read {}", pickle.display()))?
                .into_iter()
                .collect()
        } else {
            return Err(crate::Error::MissingFile {
                folder: dir.display().to_string(),
                file: "medusa_lm_head.safetensors (or medusa_lm_head.pt)".into(),
            });
        };
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(device)?.to_dtype(dtype)?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()
            .context(|| format!("cannot load the Medusa heads of {}", dir.display()))?;
        Self::new(
            &config,
            hidden,
            vocab,
            VarBuilder::from_tensors(tensors, dtype, device),
        )
        .context(|| {
            format!(
                "{} does not hold {} Medusa heads of {} layers for hidden size {hidden}",
                dir.display(),
                config.medusa_num_heads,
                config.medusa_num_layers
            )
        })
    }

    /// Each head's logits `[.., vocab]` for `hidden` `[.., D]`. The heads that read the base
    /// model's `lm_head` are projected by it together, as rows of one product: one pass over
    /// its weights (the vocabulary projection is most of a head's cost) instead of one per head.
    /// With a draft vocabulary, those heads score its tokens only (`-inf` elsewhere).
    pub fn forward(&self, hidden: &Tensor, lm_head: &Linear) -> Result<Vec<Tensor>> {
        let shared_head: &dyn Module = match &self.draft_vocab {
            Some(vocab) => vocab,
            None => lm_head,
        };
        let mut logits: Vec<Option<Tensor>> = vec![None; self.heads.len()];
        let mut shared = Vec::new();
        for (i, head) in self.heads.iter().enumerate() {
            let x = head.features(hidden)?;
            match (&head.draft_out, &head.out) {
                (Some(draft), _) => logits[i] = Some(draft.forward(&x)?),
                (None, Some(out)) => logits[i] = Some(out.forward(&x)?),
                (None, None) => shared.push((i, x)),
            }
        }
        if !shared.is_empty() {
            let features: Vec<&Tensor> = shared.iter().map(|(_, x)| x).collect();
            let projected = shared_head.forward(&Tensor::stack(&features, 0)?)?;
            for (k, (i, _)) in shared.iter().enumerate() {
                logits[*i] = Some(projected.get(k)?);
            }
        }
        Ok(logits.into_iter().flatten().collect())
    }
}

/// The verification tree of a set of `medusa_choices`, as FasterDecoding's
/// `generate_medusa_buffers` lays it out. Node 0 is the root (the base model's own next token);
/// node `k > 0` is the `k`-th choice after sorting by (length, path).
#[derive(Debug, Clone, PartialEq)]
pub struct MedusaTree {
    /// `visible[k][j]`: node `k` attends to node `j` (itself, the root and its ancestors).
    pub visible: Vec<Vec<bool>>,
    /// Index of each node's token in `[root, head 0's top-k, head 1's top-k, ...]`.
    pub tree_indices: Vec<usize>,
    /// Depth of each node (root 0), added to the position of the next token.
    pub position_ids: Vec<usize>,
    /// Root-to-leaf node paths, covering every node; FasterDecoding's `retrieve_indices`
    /// without its padding.
    pub paths: Vec<Vec<usize>>,
    /// Each node's parent (the root's is 0); a parent comes before its children.
    pub parents: Vec<usize>,
}

impl MedusaTree {
    /// Builds the tree; every choice must have its prefixes among the choices, and ranks below
    /// [`TOPK`].
    pub fn new(choices: &[Vec<usize>]) -> std::result::Result<Self, String> {
        let mut sorted: Vec<Vec<usize>> = choices.to_vec();
        sorted.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
        sorted.dedup();
        if sorted.is_empty() || sorted[0].is_empty() {
            return Err("medusa_choices must be non-empty paths".into());
        }
        let node_of = |path: &[usize]| sorted.iter().position(|c| c == path).map(|i| i + 1);
        let n = sorted.len() + 1;
        let mut visible = vec![vec![false; n]; n];
        let mut tree_indices = vec![0; n];
        let mut position_ids = vec![0; n];
        let mut parents = vec![0; n];
        visible[0][0] = true;
        for (i, path) in sorted.iter().enumerate() {
            let k = i + 1;
            if let Some(&rank) = path.iter().find(|&&r| r >= TOPK) {
                return Err(format!(
                    "medusa choice {path:?}: rank {rank} is not below {TOPK}"
                ));
            }
            visible[k][0] = true;
            visible[k][k] = true;
            for d in 1..path.len() {
                let ancestor = node_of(&path[..d]).ok_or_else(|| {
                    format!("medusa choice {path:?} lacks its prefix {:?}", &path[..d])
                })?;
                visible[k][ancestor] = true;
                parents[k] = ancestor;
            }
            let depth = path.len();
            tree_indices[k] = path[depth - 1] + TOPK * (depth - 1) + 1;
            position_ids[k] = depth;
        }
        // Longest paths first (reverse sorted order), skipping any already covered as a prefix.
        let mut covered: Vec<&[usize]> = Vec::new();
        let mut paths = Vec::new();
        for path in sorted.iter().rev() {
            if covered.contains(&path.as_slice()) {
                continue;
            }
            let mut nodes = vec![0];
            for d in 1..=path.len() {
                nodes.push(node_of(&path[..d]).unwrap_or(0));
                covered.push(&path[..d]);
            }
            paths.push(nodes);
        }
        Ok(Self {
            visible,
            tree_indices,
            position_ids,
            paths,
            parents,
        })
    }

    /// The built-in `mc_sim_7b_63` tree.
    pub fn mc_sim_7b_63() -> Self {
        let choices: Vec<Vec<usize>> = MC_SIM_7B_63.iter().map(|c| c.to_vec()).collect();
        Self::new(&choices).expect("mc_sim_7b_63 is a valid tree")
    }

    /// `mc_sim_7b_63` cut to the paths of at most `heads` heads (its choices are closed under
    /// prefixes, so the cut is a tree): the default for a checkpoint with fewer than its 4.
    pub fn mc_sim_7b_63_for(heads: usize) -> Self {
        let choices: Vec<Vec<usize>> = MC_SIM_7B_63
            .iter()
            .filter(|c| c.len() <= heads.max(1))
            .map(|c| c.to_vec())
            .collect();
        Self::new(&choices).expect("a prefix-closed cut of mc_sim_7b_63 is a valid tree")
    }

    /// Reads `medusa_choices` from a JSON file: a list of paths.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let choices: Vec<Vec<usize>> = crate::hub::read_json(path, "medusa_choices")?;
        Self::new(&choices).map_err(|message| crate::Error::Invalid {
            path: path.to_path_buf(),
            what: "medusa_choices",
            message,
        })
    }

    /// The deepest path's length in heads.
    pub fn depth(&self) -> usize {
        self.position_ids.iter().copied().max().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.tree_indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree_indices.is_empty()
    }
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub(crate) fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let order = |&a: &usize, &b: &usize| values[b].total_cmp(&values[a]).then(a.cmp(&b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

/// How often each head's top candidates are right, measured on held-out text by
/// `zoo train medusa` and saved beside the heads as [`HeadAccuracy::FILE`]: `heads[h][r]` is
/// the fraction of positions where head `h`'s rank-`r` candidate is the token `h + 2` places
/// ahead (the one after the base model's next token, for head 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadAccuracy {
    pub heads: Vec<Vec<f64>>,
    /// Positions scored per head (the first head's count).
    pub positions: usize,
    /// Where the positions came from: `validation` or `training` text.
    pub data: String,
    /// The heads drafted from the first this many tokens of the vocabulary when measured (and
    /// trained): `zoo train medusa --draft-vocab`. Targets outside it count as misses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_vocab: Option<usize>,
}

impl HeadAccuracy {
    pub const FILE: &'static str = "medusa_accuracy.json";

    /// The record in a heads folder.
    pub fn load(dir: &Path) -> crate::Result<Self> {
        let path = dir.join(Self::FILE);
        if !path.is_file() {
            return Err(crate::Error::MissingFile {
                folder: dir.display().to_string(),
                file: format!(
                    "{} (the heads' measured accuracy, which zoo train medusa writes; \
                     --medusa-choices auto needs it)",
                    Self::FILE
                ),
            });
        }
        let acc: Self = crate::hub::read_json(&path, "Medusa head accuracy")?;
        let bad = acc
            .heads
            .iter()
            .any(|h| h.is_empty() || h.iter().any(|a| !(0.0..=1.0).contains(a)));
        if acc.heads.is_empty() || bad {
            return Err(crate::Error::Invalid {
                path,
                what: "Medusa head accuracy",
                message: "heads must be non-empty lists of accuracies in [0, 1]".into(),
            });
        }
        Ok(acc)
    }
}

/// What [`MedusaTree::auto`] chose, for the user.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoTree {
    /// Drafted nodes (the root not counted).
    pub nodes: usize,
    /// Expected new tokens per verification step: 1 plus each node's chance of acceptance.
    pub tokens_per_step: f64,
    /// `tokens_per_step` over the cost of verifying the tree, relative to one plain step.
    pub speedup: f64,
}

impl MedusaTree {
    /// The tree that maximises expected tokens per second for heads of accuracy `acc` on a
    /// machine where verifying `n` tokens costs `cost(n)` (any unit; `cost(1)` is a plain
    /// step). A node's chance of acceptance is the product of its ranks' accuracies along its
    /// path (the heads taken as independent, as the Medusa paper sizes its trees); for each
    /// size the best tree adds the likeliest nodes first, which keeps it closed under
    /// prefixes. Up to `max_nodes` drafted nodes, at most one level per head.
    pub fn auto(
        acc: &HeadAccuracy,
        cost: &dyn Fn(usize) -> f64,
        max_nodes: usize,
    ) -> std::result::Result<(Self, AutoTree), String> {
        let depth = acc.heads.len();
        let ranks = |h: usize| acc.heads[h].len().min(TOPK);
        // Chosen paths with their probabilities, and the frontier of their children.
        let mut chosen: Vec<(Vec<usize>, f64)> = Vec::new();
        let mut frontier: Vec<(Vec<usize>, f64)> =
            (0..ranks(0)).map(|r| (vec![r], acc.heads[0][r])).collect();
        let base = cost(1);
        let mut best = (0, 1.0, 1.0);
        let mut expected = 1.0;
        while chosen.len() < max_nodes {
            let Some(i) = (0..frontier.len())
                .max_by(|&a, &b| frontier[a].1.total_cmp(&frontier[b].1).then(b.cmp(&a)))
            else {
                break;
            };
            let (path, p) = frontier.swap_remove(i);
            if path.len() < depth {
                let h = path.len();
                for r in 0..ranks(h) {
                    let mut child = path.clone();
                    child.push(r);
                    frontier.push((child, p * acc.heads[h][r]));
                }
            }
            chosen.push((path, p));
            expected += p;
            let speedup = expected / (cost(chosen.len() + 1) / base);
            if speedup > best.2 {
                best = (chosen.len(), expected, speedup);
            }
        }
        // At least one node, so that the heads are used at all.
        let chosen = &chosen[..best.0.max(1).min(chosen.len())];
        let choices: Vec<Vec<usize>> = chosen.iter().map(|(c, _)| c.clone()).collect();
        let tree = Self::new(&choices)?;
        let tokens_per_step = 1.0 + chosen.iter().map(|c| c.1).sum::<f64>();
        let stats = AutoTree {
            nodes: choices.len(),
            tokens_per_step,
            speedup: tokens_per_step / (cost(choices.len() + 1) / base),
        };
        Ok((tree, stats))
    }
}

/// Medusa's drafter: the base model's next token as the root, and the heads' top candidates
/// on its hidden state laid out as `tree`.
pub struct MedusaDrafter<'a> {
    heads: &'a MedusaHeads,
    tree: &'a MedusaTree,
}

impl<'a> MedusaDrafter<'a> {
    /// Refuses a tree deeper than the heads.
    pub fn new(heads: &'a MedusaHeads, tree: &'a MedusaTree) -> Result<Self> {
        if tree.depth() > heads.heads.len() {
            candle_core::bail!(
                "the Medusa tree is {} deep but the checkpoint has {} heads; use a tree of at \
                 most {} levels",
                tree.depth(),
                heads.heads.len(),
                heads.heads.len()
            );
        }
        Ok(Self { heads, tree })
    }
}

impl Drafter for MedusaDrafter<'_> {
    fn draft(&mut self, ctx: DraftContext<'_>) -> Result<DraftTree> {
        let root = *ctx.tokens.last().unwrap_or(&0);
        let mut draft = DraftTree::root(root);
        let Some(hidden) = ctx.hidden else {
            return Ok(draft);
        };
        // The hidden state whose logits chose the root.
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        let mut flat = vec![root];
        for head_logits in self.heads.forward(&last, ctx.model.lm_head())? {
            let values = head_logits
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            flat.extend(top_k(&values, TOPK).into_iter().map(|t| t as u32));
        }
        for k in 1..self.tree.len() {
            draft.push(self.tree.parents[k], flat[self.tree.tree_indices[k]], None);
        }
        Ok(draft)
    }
}

/// Medusa decoding of `prompt` through [`decode`]: at each step the base model's next token
/// and the heads' top candidates form `tree`, verified in one forward pass; the longest path
/// the base model accepts is kept, with the base model's next token after it, and the cache is
/// compacted to that path. Stops after `max_new_tokens` or a `stop` token.
///
/// - `typical: None` (greedy): a drafted token is accepted when it is the base model's argmax
///   there. The output is token-identical to plain greedy decoding.
/// - `typical: Some(..)`: the base model's token is drawn by typical sampling, and drafted
///   tokens pass [`TypicalAcceptance`]; of the longest accepted paths, the most likely one is
///   kept (FasterDecoding's `evaluate_posterior`).
pub fn medusa_generate(
    model: &LlamaForCausalLM,
    heads: &MedusaHeads,
    tree: &MedusaTree,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
    typical: Option<&TypicalAcceptance>,
) -> Result<SpeculativeOutput> {
    let rule = typical.map_or(Acceptance::Greedy, |t| Acceptance::Typical(*t));
    let mut drafter = MedusaDrafter::new(heads, tree)?;
    decode_until(model, &mut drafter, prompt, max_new_tokens, stop, &rule)
}

#[cfg(test)]
mod tree_tests {
    use super::*;

    fn accuracy(heads: Vec<Vec<f64>>) -> HeadAccuracy {
        HeadAccuracy {
            heads,
            positions: 100,
            data: "validation".into(),
            draft_vocab: None,
        }
    }

    /// Free verification takes every node it may; costly verification only the sure ones;
    /// the likeliest nodes come first and every path's prefix is in the tree.
    #[test]
    fn the_auto_tree_follows_accuracy_and_verification_cost() {
        let acc = accuracy(vec![vec![0.6, 0.2, 0.1], vec![0.5, 0.2], vec![0.4]]);
        let (free, stats) = MedusaTree::auto(&acc, &|_| 1.0, 64).unwrap();
        // 3 + 3·2 + 3·2·1 paths.
        assert_eq!(stats.nodes, 15);
        assert_eq!(free.depth(), 3);
        let all: f64 = [0.6, 0.2, 0.1]
            .iter()
            .map(|a| a * (1.0 + 0.7 + 0.7 * 0.4))
            .sum();
        assert!(
            (stats.tokens_per_step - 1.0 - all).abs() < 1e-9,
            "{stats:?}"
        );
        // Each extra token costs as much as a step: only nodes likelier than ... none pay.
        let (_, linear) = MedusaTree::auto(&acc, &|n| n as f64, 64).unwrap();
        assert_eq!(linear.nodes, 1);
        // A flat curve up to 4 tokens, then steep: the 3 likeliest nodes.
        let (tree, knee) =
            MedusaTree::auto(&acc, &|n| if n <= 4 { 1.0 } else { n as f64 }, 64).unwrap();
        assert_eq!(knee.nodes, 3);
        let expected = MedusaTree::new(&[vec![0], vec![0, 0], vec![1]]).unwrap();
        assert_eq!(tree, expected);
        assert!((knee.tokens_per_step - (1.0 + 0.6 + 0.3 + 0.2)).abs() < 1e-9);
        // The size bound holds.
        let (_, small) = MedusaTree::auto(&acc, &|_| 1.0, 5).unwrap();
        assert_eq!(small.nodes, 5);
    }

    #[test]
    fn the_default_tree_is_cut_to_the_heads() {
        assert_eq!(MedusaTree::mc_sim_7b_63_for(4), MedusaTree::mc_sim_7b_63());
        for heads in 1..=3 {
            let tree = MedusaTree::mc_sim_7b_63_for(heads);
            assert_eq!(tree.depth(), heads);
            let kept = MC_SIM_7B_63.iter().filter(|c| c.len() <= heads).count();
            assert_eq!(tree.len(), kept + 1, "{heads} heads");
        }
    }
}
