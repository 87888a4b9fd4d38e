//! What speculative decoders share: their output, and the rules that accept drafted tokens when
//! sampling.
//!
//! - [`TypicalAcceptance`] (Medusa, Cai et al. 2024, §2.3.1): a drafted token is accepted when
//!   the base model gives it a probability above `min(ε, δ·exp(−H))`, `H` the entropy of the
//!   base model's distribution at that place. It is not the base model's sampling distribution
//!   but a cheaper rule that keeps plausible continuations; FasterDecoding's defaults are
//!   `ε = 0.09` (`posterior_threshold`) and `δ = 0.3` (`posterior_alpha`).
//! - [`speculative_accept`] (Leviathan et al. 2023; Chen et al. 2023): a token drafted from `q`
//!   is kept with probability `min(1, p/q)`, else replaced by a draw from `norm(max(0, p − q))`.
//!   The tokens it emits follow the base model's own sampling distribution `p` exactly.

use crate::generation::SplitMix64;

/// The outcome of a speculative generation.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeculativeOutput {
    /// Prompt and new tokens.
    pub tokens: Vec<u32>,
    pub new_tokens: usize,
    /// Forward passes that produced tokens: Medusa's verifications; MTP's prefill (which gives
    /// the first token) and verifications. Plain decoding would take `new_tokens`.
    pub steps: usize,
    /// The tokens drafted at each step (Medusa: the chosen path after the root; MTP: the
    /// chain), for statistics and tests.
    pub drafts: Vec<Vec<u32>>,
    /// How many of each step's drafts were accepted.
    pub accepted: Vec<usize>,
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
    pub fn validate(&self) -> Result<(), String> {
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
