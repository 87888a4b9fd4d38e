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
//! [`mtp_generate`] uses the modules for self-speculative decoding: they draft a chain of
//! tokens, the backbone verifies the chain in one pass, and greedy acceptance keeps the output
//! identical to plain greedy decoding.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::LlamaConfig;
use super::llama::{KvCache, LayerKv, LlamaDecoderLayer, LlamaForCausalLM};
use super::speculative::{speculative_accept, SpeculativeOutput};
use crate::generation::{nucleus_probs, SamplingOptions, SplitMix64};
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

/// Picks tokens from rows of logits: the argmax, or a draw from the sampling distribution
/// (which it returns too).
struct Chooser {
    sampling: Option<(SamplingOptions, SplitMix64)>,
}

impl Chooser {
    fn new(sampling: Option<&SamplingOptions>) -> Self {
        Self {
            sampling: sampling.map(|s| (*s, SplitMix64::new(s.seed))),
        }
    }

    fn choose(&mut self, logits: &Tensor) -> Result<(u32, Option<Vec<f32>>)> {
        let logits = logits.to_dtype(DType::F32)?;
        Ok(match self.sampling.as_mut() {
            // On the device: only the index comes back.
            None => (logits.argmax(D::Minus1)?.to_scalar::<u32>()?, None),
            Some((s, rng)) => {
                let probs = nucleus_probs(&logits.to_vec1::<f32>()?, s);
                (rng.choose(&probs), Some(probs))
            }
        })
    }
}

/// Self-speculative decoding: after each verified step the modules draft one token each
/// (module `k` the `k`-th token after the next), the backbone verifies the next token and the
/// drafts in one causal pass, and a prefix of the drafts is accepted with one more token of the
/// backbone's after it. Stops after `max_new_tokens` or a `stop` token.
///
/// - `sampling: None` (greedy): drafts are the modules' argmax and are accepted while they equal
///   the backbone's argmax. Token-identical to plain greedy decoding.
/// - `sampling: Some(..)`: drafts are drawn from the modules' distributions `q` and accepted by
///   [`speculative_accept`] against the backbone's `p`, both after the same temperature, top-k
///   and top-p. The output follows plain sampling's distribution exactly (the random draws
///   differ, so a seed gives other text than plain sampling).
///
/// Each module keeps a cache of the positions whose inputs are all known tokens; positions that
/// depend on drafts are computed for the draft and then dropped.
pub fn mtp_generate(
    model: &LlamaForCausalLM,
    mtp: &MtpModules,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
    sampling: Option<&SamplingOptions>,
) -> Result<SpeculativeOutput> {
    if prompt.is_empty() {
        candle_core::bail!("MTP decoding needs a non-empty prompt");
    }
    if let Some(s) = sampling {
        if !(s.temperature > 0.0 && s.temperature.is_finite()) {
            candle_core::bail!(
                "sampling needs a positive temperature, got {}",
                s.temperature
            );
        }
    }
    let mut chooser = Chooser::new(sampling);
    let device: Device = model.model.embeddings().device().clone();
    let depth = mtp.len();
    let mut cache = KvCache::new();
    let prefill = model.forward(&Tensor::new(vec![prompt.to_vec()], &device)?, &mut cache)?;
    let mut tokens = prompt.to_vec();
    if max_new_tokens == 0 {
        return Ok(SpeculativeOutput {
            tokens,
            new_tokens: 0,
            steps: 0,
            drafts: Vec::new(),
            accepted: Vec::new(),
        });
    }
    let (first, _) = chooser.choose(&prefill.logits.get(0)?.get(prompt.len() - 1)?)?;
    tokens.push(first);
    let (mut new_tokens, mut steps) = (1, 1);
    let (mut rounds, mut accepted_counts) = (Vec::new(), Vec::new());
    if stop.contains(&first) || new_tokens == max_new_tokens {
        return Ok(SpeculativeOutput {
            tokens,
            new_tokens,
            steps,
            drafts: rounds,
            accepted: accepted_counts,
        });
    }
    // Positions are 1-based here: token t_i sits at rotary position i - 1.
    // `done[k]`: positions 1..=done[k] are permanently in module k's cache.
    let mut done = vec![0usize; depth];
    let mut caches: Vec<ModuleCache> = (0..depth).map(|_| ModuleCache::default()).collect();
    // `pending[k]`: h^k (h^0: the backbone's) of the positions module k + 1 has not yet cached,
    // `[1, n, D]`, in order.
    let mut pending: Vec<Option<Tensor>> = vec![None; depth.max(1)];
    pending[0] = Some(prefill.hidden.clone());

    while new_tokens < max_new_tokens {
        let m = tokens.len();
        let mut drafts: Vec<u32> = Vec::with_capacity(depth);
        let mut draft_probs: Vec<Option<Vec<f32>>> = Vec::with_capacity(depth);
        let mut next_pending: Vec<Option<Tensor>> = vec![None; depth.max(1)];
        let mut prev_out: Option<Tensor> = None;
        for (k0, (module, mcache)) in mtp.modules.iter().zip(caches.iter_mut()).enumerate() {
            let k = k0 + 1;
            let start = done[k0] + 1;
            let end = m - 1;
            let hidden_in = match (&pending[k0], &prev_out) {
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
            let (draft, q) = chooser.choose(
                &module
                    .logits(&last, model.lm_head())?
                    .squeeze(0)?
                    .squeeze(0)?,
            )?;
            drafts.push(draft);
            draft_probs.push(q);
            // Keep the positions whose inputs are all known: those with i + k <= m.
            let permanent = m.saturating_sub(k);
            mcache.truncate(permanent)?;
            // Module k + 1 next caches positions from m - k (its new `done` + 1) on; of those,
            // module k's permanent ones end at m - k.
            if k < depth && permanent >= start {
                next_pending[k] = Some(out.narrow(1, permanent - start, 1)?);
            }
            done[k0] = permanent;
            prev_out = Some(out);
        }

        rounds.push(drafts.clone());
        // Verify the next token and the drafts in one pass.
        let verify: Vec<u32> = std::iter::once(tokens[m - 1])
            .chain(drafts.iter().copied())
            .collect();
        let base = cache.len();
        let out = model.forward(&Tensor::new(vec![verify.clone()], &device)?, &mut cache)?;
        steps += 1;
        let rows = out.logits.squeeze(0)?;
        let (accepted, next) = match chooser.sampling.as_mut() {
            None => {
                let greedy: Vec<u32> = rows
                    .to_dtype(DType::F32)?
                    .argmax(D::Minus1)?
                    .to_vec1::<u32>()?;
                let accepted = drafts
                    .iter()
                    .zip(&greedy)
                    .take_while(|(d, g)| d == g)
                    .count();
                (accepted, greedy[accepted])
            }
            Some((s, rng)) => {
                let rows = rows.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let mut verdict = None;
                for (j, (&draft, q)) in drafts.iter().zip(&draft_probs).enumerate() {
                    let p = nucleus_probs(&rows[j], s);
                    let q = q.as_deref().unwrap_or(&p);
                    if let Some(token) = speculative_accept(&p, q, draft, rng) {
                        verdict = Some((j, token));
                        break;
                    }
                }
                match verdict {
                    Some(v) => v,
                    None => (depth, rng.choose(&nucleus_probs(&rows[depth], s))),
                }
            }
        };
        accepted_counts.push(accepted);
        cache.truncate(base + accepted + 1)?;
        next_pending[0] = Some(out.hidden.narrow(1, 0, accepted + 1)?);
        pending = next_pending;
        for &token in drafts[..accepted].iter().chain(std::iter::once(&next)) {
            tokens.push(token);
            new_tokens += 1;
            if stop.contains(&token) || new_tokens == max_new_tokens {
                return Ok(SpeculativeOutput {
                    tokens,
                    new_tokens,
                    steps,
                    drafts: rounds,
                    accepted: accepted_counts,
                });
            }
        }
    }
    Ok(SpeculativeOutput {
        tokens,
        new_tokens,
        steps,
        drafts: rounds,
        accepted: accepted_counts,
    })
}
