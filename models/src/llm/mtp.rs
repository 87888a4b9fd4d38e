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
//! tokens, the backbone verifies the chain in one pass, and greedy acceptance keeps the output
//! identical to plain greedy decoding.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::LlamaConfig;
use super::llama::{LayerKv, LlamaDecoderLayer, LlamaForCausalLM};
use super::speculative::{
    decode_until, Acceptance, DraftContext, DraftTree, Drafter, SpeculativeOutput,
};
use crate::generation::SamplingOptions;
use crate::layers::{AttentionMask, Linear, RmsNorm};

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
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            enorm: RmsNorm::new(d, eps, vb.pp("enorm"))?,
            hnorm: RmsNorm::new(d, eps, vb.pp("hnorm"))?,
            eh_proj: Linear::new(2 * d, d, false, vb.pp("eh_proj"))?,
            block: LlamaDecoderLayer::new(cfg, vb.clone(), &Default::default())?,
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

    /// The module's logits for `h^k`: the backbone's head after the module's own norm.
    pub fn logits(&self, hidden: &Tensor, lm_head: &Linear) -> Result<Tensor> {
        lm_head.forward(&self.shared_norm.forward(hidden)?)
    }
}

/// The MTP modules of a checkpoint, depth 1 first.
#[derive(Debug, Clone)]
pub struct MtpModules {
    pub modules: Vec<MtpModule>,
}

impl MtpModules {
    /// Builds `n` modules from a checkpoint's root `vb` (names `model.layers.{L + i}.*`).
    pub fn new(cfg: &LlamaConfig, n: usize, vb: VarBuilder) -> Result<Self> {
        let layers = vb.pp("model").pp("layers");
        let modules = (0..n)
            .map(|i| MtpModule::new(cfg, layers.pp(cfg.num_hidden_layers + i)))
            .collect::<Result<_>>()?;
        Ok(Self { modules })
    }

    /// The `num_nextn_predict_layers` modules of a checkpoint (folder or hub id).
    pub fn load(
        repo: &crate::hub::ModelRepo,
        cfg: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        use crate::error::CandleContext;
        if cfg.num_nextn_predict_layers == 0 {
            return Err(crate::Error::Invalid {
                path: repo.get("config.json")?,
                what: "Llama config",
                message: "num_nextn_predict_layers is 0: the checkpoint has no MTP modules".into(),
            });
        }
        let weights = crate::weights::SafetensorsWeights::open(&repo.weight_files()?)?;
        Self::new(
            cfg,
            cfg.num_nextn_predict_layers,
            weights.into_var_builder(dtype, device),
        )
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

/// The MTP modules as a drafter: after each verified step the modules draft one token each
/// (module `k` the `k`-th token after the next), a chain under the root.
///
/// Each module keeps a cache of the positions whose inputs are all known tokens; positions that
/// depend on drafts are computed for the draft and then dropped.
pub struct MtpDrafter<'a> {
    mtp: &'a MtpModules,
    /// `done[k]`: positions `1..=done[k]` (1-based: token `t_i` sits at rotary position
    /// `i - 1`) are permanently in module `k`'s cache.
    done: Vec<usize>,
    caches: Vec<ModuleCache>,
    /// `pending[k]` for `k >= 1`: `h^k` of the positions module `k + 1` has not yet cached,
    /// `[1, n, D]`, in order (`h^0`, the backbone's, comes with each draft's context).
    pending: Vec<Option<Tensor>>,
}

impl<'a> MtpDrafter<'a> {
    pub fn new(mtp: &'a MtpModules) -> Self {
        let depth = mtp.len();
        Self {
            mtp,
            done: vec![0; depth],
            caches: (0..depth).map(|_| ModuleCache::default()).collect(),
            pending: vec![None; depth.max(1)],
        }
    }
}

impl Drafter for MtpDrafter<'_> {
    fn draft(&mut self, mut ctx: DraftContext<'_>) -> Result<DraftTree> {
        let (model, tokens) = (ctx.model, ctx.tokens);
        let m = tokens.len();
        let mut chain = DraftTree::root(tokens[m - 1]);
        let Some(hidden) = ctx.hidden else {
            return Ok(chain);
        };
        let device: Device = hidden.device().clone();
        let depth = self.mtp.len();
        self.pending[0] = Some(hidden.clone());
        let mut drafts: Vec<u32> = Vec::with_capacity(depth);
        let mut next_pending: Vec<Option<Tensor>> = vec![None; depth.max(1)];
        let mut prev_out: Option<Tensor> = None;
        for (k0, (module, mcache)) in self
            .mtp
            .modules
            .iter()
            .zip(self.caches.iter_mut())
            .enumerate()
        {
            let k = k0 + 1;
            let start = self.done[k0] + 1;
            let end = m - 1;
            let hidden_in = match (&self.pending[k0], &prev_out) {
                (Some(p), Some(o)) if k > 1 => Tensor::cat(&[p, o], 1)?,
                (None, Some(o)) if k > 1 => o.clone(),
                (Some(p), _) => p.clone(),
                _ => candle_core::bail!("MTP module {k} has no input"),
            };
            if hidden_in.dim(1)? != end + 1 - start {
                candle_core::bail!(
                    "MTP module {k}: {} inputs for positions {start}..={end}",
                    hidden_in.dim(1)?
                );
            }
            let ahead: Vec<u32> = (start..=end)
                .map(|i| {
                    let j = i + k;
                    if j <= m {
                        tokens[j - 1]
                    } else {
                        drafts[j - m - 1]
                    }
                })
                .collect();
            let embeds = model.model.embed(&Tensor::new(vec![ahead], &device)?)?;
            let positions: Vec<u32> = (start..=end).map(|i| (i - 1) as u32).collect();
            let (cos, sin) = model.model.rotary_cos_sin(&positions, &device)?;
            let n = positions.len();
            let mask = if n > 1 {
                AttentionMask::causal(mcache.len)
            } else {
                AttentionMask::none()
            };
            let out = module.forward(&hidden_in, &embeds, &cos, &sin, &mask, &mut mcache.kv)?;
            mcache.len += n;
            let last = out.narrow(1, n - 1, 1)?;
            let (draft, q) = ctx.choose(
                &module
                    .logits(&last, model.lm_head())?
                    .squeeze(0)?
                    .squeeze(0)?,
            )?;
            drafts.push(draft);
            chain.push(k0, draft, q);
            // Keep the positions whose inputs are all known: those with i + k <= m.
            let permanent = m.saturating_sub(k);
            mcache.truncate(permanent)?;
            // Module k + 1 next caches positions from m - k (its new `done` + 1) on; of those,
            // module k's permanent ones end at m - k.
            if k < depth && permanent >= start {
                next_pending[k] = Some(out.narrow(1, permanent - start, 1)?);
            }
            self.done[k0] = permanent;
            prev_out = Some(out);
        }
        self.pending = next_pending;
        Ok(chain)
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
