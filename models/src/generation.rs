//! Model-agnostic decoding, as HF transformers' `generate` does it (4.57.1): greedy search, beam
//! search and nucleus sampling, with the repetition-penalty and minimum-length logits
//! processors, stop tokens and padding of finished rows.
//!
//! A model takes part through [`StepModel`]: given the sequences so far it returns next-token
//! logits, and it keeps whatever per-row state it needs (a KV cache, encoder states), which
//! beam search rearranges through [`StepModel::reorder`]. Decoding runs on the host in f32 over
//! one row of logits at a time; the model's forward pass is the expensive part.

use std::path::Path;

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// A decoder that produces next-token logits for a batch of rows.
pub trait StepModel {
    /// Logits `[R, vocab]` of the token after each of the `R` sequences in `rows`. All rows
    /// have the same length; the last `new` tokens of each have not been passed before (on the
    /// first call, the whole row). A cached model feeds only those; an uncached one may re-run
    /// the whole row.
    fn next_logits(&mut self, rows: &[Vec<u32>], new: usize) -> Result<Tensor>;

    /// Rearranges per-row state so that row `i` continues old row `indices[i]`. The number of
    /// rows may change: beam search widens `B` rows to `B * num_beams` before its first step.
    fn reorder(&mut self, indices: &[usize]) -> Result<()>;
}

/// When beam search stops (HF `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// HF's default `False`: stop once `num_beams` hypotheses are finished and the best running
    /// beam, scored at its current length, cannot beat the worst of them.
    #[default]
    Heuristic,
    /// HF's `True`: stop as soon as `num_beams` hypotheses are finished.
    Always,
    /// HF's `"never"`: as `Heuristic`, but a positive length penalty assumes the running beams
    /// could grow to the maximum length.
    Never,
}

/// Beam-search settings (HF `num_beams`, `length_penalty`, `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamOptions {
    pub num_beams: usize,
    /// Finished hypotheses score `sum(log p) / generated_len ^ length_penalty`.
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
}

impl Default for BeamOptions {
    fn default() -> Self {
        Self {
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
        }
    }
}

/// Sampling settings (HF `do_sample=True` with `temperature`, `top_k`, `top_p`). The random
/// stream is ours ([`SplitMix64`]), so samples are reproducible per seed but differ from torch's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 turns it off. HF's default is 50.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    Greedy,
    Beam(BeamOptions),
    Sample(SamplingOptions),
}

/// What to generate and when to stop, in new tokens (HF `max_new_tokens`, `min_new_tokens`).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// Stop tokens cannot be chosen before this many new tokens (HF's
    /// `MinNewTokensLengthLogitsProcessor`).
    pub min_new_tokens: usize,
    /// A row ends when it produces one of these (HF `eos_token_id`).
    pub stop_tokens: Vec<u32>,
    /// Written after a row has ended while others go on.
    pub pad_token: u32,
    /// HF's `repetition_penalty`; 1.0 turns it off.
    pub repetition_penalty: f32,
    pub strategy: Strategy,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            min_new_tokens: 0,
            stop_tokens: Vec::new(),
            pad_token: 0,
            repetition_penalty: 1.0,
            strategy: Strategy::Greedy,
        }
    }
}

/// The fields of a checkpoint's HF `generation_config.json` that set decoding defaults. HF's
/// lengths come in two kinds: `max_length` / `min_length` count the whole sequence, start
/// tokens included, `max_new_tokens` / `min_new_tokens` only what is generated.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HfGenerationConfig {
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    pub max_length: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub min_length: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub num_beams: Option<usize>,
    pub length_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// A token id or a list of them, as HF configs write `eos_token_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

impl HfGenerationConfig {
    /// Reads `generation_config.json`; errors name the file.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        crate::hub::read_json(path, "generation config")
    }

    /// New tokens allowed after `start_len` start tokens: `max_new_tokens`, else what
    /// `max_length` leaves, with HF's default `max_length` of 20.
    pub fn max_new_tokens(&self, start_len: usize) -> usize {
        self.max_new_tokens
            .unwrap_or_else(|| self.max_length.unwrap_or(20).saturating_sub(start_len))
    }

    /// New tokens before a stop token may end a row: `min_new_tokens`, else what `min_length`
    /// asks beyond the start tokens.
    pub fn min_new_tokens(&self, start_len: usize) -> usize {
        self.min_new_tokens
            .unwrap_or_else(|| self.min_length.unwrap_or(0).saturating_sub(start_len))
    }
}

/// Continues every row of `starts` (all of one length) and returns the full sequences, as HF
/// `generate` returns them: the start tokens, then the new ones; rows that stopped early are
/// padded to the longest.
pub fn generate(
    model: &mut impl StepModel,
    starts: Vec<Vec<u32>>,
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<u32>>> {
    generate_streaming(model, starts, cfg, &mut |_, _| Ok(()))
}

/// [`generate`], calling `on_token(row, token)` for every token as it is chosen (greedy and
/// sampling; beam search calls it for the winning beam's tokens at the end).
pub fn generate_streaming(
    model: &mut impl StepModel,
    starts: Vec<Vec<u32>>,
    cfg: &GenerationConfig,
    on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    let prompt_len = starts.first().map_or(0, Vec::len);
    if starts.iter().any(|r| r.len() != prompt_len) {
        candle_core::bail!("generation needs start sequences of one length (no padded prompts)");
    }
    if prompt_len == 0 {
        candle_core::bail!("generation needs at least one start token per row");
    }
    if cfg.repetition_penalty <= 0.0 || !cfg.repetition_penalty.is_finite() {
        candle_core::bail!(
            "repetition_penalty must be a positive number, got {}",
            cfg.repetition_penalty
        );
    }
    if cfg.max_new_tokens == 0 {
        return Ok(starts);
    }
    match cfg.strategy {
        Strategy::Greedy => sample_or_greedy(model, starts, cfg, None, on_token),
        Strategy::Sample(s) => {
            if s.temperature <= 0.0 || !s.temperature.is_finite() {
                candle_core::bail!("temperature must be positive, got {}", s.temperature);
            }
            if !(s.top_p > 0.0 && s.top_p <= 1.0) {
                candle_core::bail!("top_p must be in (0, 1], got {}", s.top_p);
            }
            sample_or_greedy(model, starts, cfg, Some(s), on_token)
        }
        Strategy::Beam(b) if b.num_beams <= 1 => {
            sample_or_greedy(model, starts, cfg, None, on_token)
        }
        Strategy::Beam(b) => {
            let rows = beam_search(model, starts, cfg, &b)?;
            for (i, row) in rows.iter().enumerate() {
                for &t in &row[prompt_len..] {
                    on_token(i, t)?;
                }
            }
            Ok(rows)
        }
    }
}

/// The logits of every row as host vectors.
fn host_logits(model: &mut impl StepModel, rows: &[Vec<u32>], new: usize) -> Result<Vec<Vec<f32>>> {
    let logits = model.next_logits(rows, new)?;
    let (r, _) = logits.dims2()?;
    if r != rows.len() {
        candle_core::bail!(
            "the model returned {r} rows of logits for {} rows",
            rows.len()
        );
    }
    logits.to_dtype(DType::F32)?.to_vec2::<f32>()
}

/// HF's `RepetitionPenaltyLogitsProcessor`: the score of every token already in `seq` is
/// divided by `penalty` when positive and multiplied by it when negative.
pub fn apply_repetition_penalty(scores: &mut [f32], seq: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &t in seq {
        let t = t as usize;
        if t < scores.len() && !seen[t] {
            seen[t] = true;
            let s = scores[t];
            scores[t] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// The processors HF applies to every strategy's scores: repetition penalty over `seq` (the
/// sequence so far), then no stop token while `new_len` (the new tokens so far) is below
/// `min_new_tokens`.
pub fn process(scores: &mut [f32], seq: &[u32], new_len: usize, cfg: &GenerationConfig) {
    apply_repetition_penalty(scores, seq, cfg.repetition_penalty);
    if new_len < cfg.min_new_tokens {
        for &t in &cfg.stop_tokens {
            if let Some(s) = scores.get_mut(t as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

/// HF's `_sample` loop: greedy (argmax) or sampled tokens, one per row per step.
fn sample_or_greedy(
    model: &mut impl StepModel,
    mut rows: Vec<Vec<u32>>,
    cfg: &GenerationConfig,
    sampling: Option<SamplingOptions>,
    on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    let prompt_len = rows[0].len();
    let mut rng = sampling.map(|s| SplitMix64::new(s.seed));
    let mut done = vec![false; rows.len()];
    let mut new = prompt_len;
    for step in 0..cfg.max_new_tokens {
        let logits = host_logits(model, &rows, new)?;
        for (i, mut scores) in logits.into_iter().enumerate() {
            let token = if done[i] {
                cfg.pad_token
            } else {
                process(&mut scores, &rows[i], step, cfg);
                match (&sampling, rng.as_mut()) {
                    (Some(s), Some(rng)) => {
                        let probs = nucleus_probs(&scores, s);
                        rng.choose(&probs)
                    }
                    _ => argmax(&scores),
                }
            };
            if !done[i] {
                on_token(i, token)?;
            }
            if cfg.stop_tokens.contains(&token) {
                done[i] = true;
            }
            rows[i].push(token);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        new = 1;
    }
    Ok(rows)
}

/// The first index of the largest value, as `torch.argmax`.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The sampling distribution after HF's warpers in their order: temperature, top-k
/// (`TopKLogitsWarper`: drop scores below the k-th largest), top-p (`TopPLogitsWarper`: sort
/// ascending and drop tokens whose cumulative probability is at most `1 - top_p`, always
/// keeping the most likely), then softmax.
pub fn nucleus_probs(scores: &[f32], s: &SamplingOptions) -> Vec<f32> {
    let mut x: Vec<f32> = if s.temperature == 1.0 {
        scores.to_vec()
    } else {
        scores.iter().map(|v| v / s.temperature).collect()
    };
    if s.top_k > 0 && s.top_k < x.len() {
        let mut sorted = x.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[s.top_k - 1];
        for v in x.iter_mut() {
            if *v < kth {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    if s.top_p < 1.0 {
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
        let sorted: Vec<f32> = order.iter().map(|&i| x[i]).collect();
        let probs = softmax(&sorted);
        let mut cum = 0f32;
        let last = order.len() - 1;
        for (rank, (&i, p)) in order.iter().zip(probs).enumerate() {
            cum += p;
            if cum <= 1.0 - s.top_p && rank != last {
                x[i] = f32::NEG_INFINITY;
            }
        }
    }
    softmax(&x)
}

/// `exp(x - max) / Σ exp(x - max)` over a row of logits.
pub(crate) fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// `log_softmax` in f32, as torch computes it: `x - max - log(sum(exp(x - max)))`.
fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
    let lse = sum.ln();
    x.iter().map(|v| v - max - lse).collect()
}

/// SplitMix64 (Steele et al. 2014): a small, seedable generator for sampling.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// An index drawn with the given (normalised) probabilities; zero-probability indices are
    /// never drawn.
    pub fn choose(&mut self, probs: &[f32]) -> u32 {
        let total: f64 = probs.iter().map(|&p| f64::from(p)).sum();
        let target = self.next_f64() * total;
        let mut cum = 0f64;
        let mut last = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p <= 0.0 {
                continue;
            }
            cum += f64::from(p);
            last = i;
            if target < cum {
                return i as u32;
            }
        }
        last as u32
    }
}

/// HF adds this to scores it rules out, rather than `-inf`, so that sums stay finite.
const RULED_OUT: f32 = -1.0e9;

/// One hypothesis of one batch item.
#[derive(Debug, Clone)]
struct Hyp {
    tokens: Vec<u32>,
    score: f32,
    finished: bool,
}

/// The indices of the `k` largest scores, largest first; ties keep the earlier index.
fn top_indices(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order.truncate(k);
    order
}

/// HF's beam search (`GenerationMixin._beam_search` of transformers 4.57.1), batch item by
/// batch item: beams are scored by their summed log-probabilities; at each step the best
/// `max(2, 1 + n_stop) * K` continuations are taken, the top `K` of those that end (a stop
/// token, or the length limit) compete for the `K` finished slots with score
/// `sum_logprobs / generated_len ^ length_penalty`, and the best `K` that go on are the next
/// running beams. Returns each item's best finished hypothesis.
fn beam_search(
    model: &mut impl StepModel,
    starts: Vec<Vec<u32>>,
    cfg: &GenerationConfig,
    opts: &BeamOptions,
) -> Result<Vec<Vec<u32>>> {
    let k = opts.num_beams;
    let batch = starts.len();
    let prompt_len = starts[0].len();
    let max_length = prompt_len + cfg.max_new_tokens;
    let keep = 2.max(1 + cfg.stop_tokens.len()) * k;
    // Every item starts as K copies of its start, only the first of which is live.
    let widen: Vec<usize> = (0..batch * k).map(|i| i / k).collect();
    model.reorder(&widen)?;
    let mut running: Vec<Vec<Hyp>> = starts
        .iter()
        .map(|s| {
            (0..k)
                .map(|j| Hyp {
                    tokens: s.clone(),
                    score: if j == 0 { 0.0 } else { RULED_OUT },
                    finished: false,
                })
                .collect()
        })
        .collect();
    let mut finished: Vec<Vec<Hyp>> = starts
        .iter()
        .map(|s| {
            vec![
                Hyp {
                    tokens: s.clone(),
                    score: RULED_OUT,
                    finished: false,
                };
                k
            ]
        })
        .collect();
    let mut improvable = vec![true; batch];
    let mut cur_len = prompt_len;
    let mut new = prompt_len;
    loop {
        let flat: Vec<Vec<u32>> = running
            .iter()
            .flat_map(|beams| beams.iter().map(|h| h.tokens.clone()))
            .collect();
        let logits = host_logits(model, &flat, new)?;
        let vocab = logits[0].len();
        if vocab * k < keep {
            candle_core::bail!("beam search needs a vocabulary of at least {keep} tokens");
        }
        let full_after = cur_len + 1 >= max_length;
        let mut parents = Vec::with_capacity(batch * k);
        let mut all_hit = true;
        for b in 0..batch {
            // Accumulated log-probabilities of every (beam, token) continuation.
            let mut acc = Vec::with_capacity(k * vocab);
            for (j, beam) in running[b].iter().enumerate() {
                let mut lp = log_softmax(&logits[b * k + j]);
                process(&mut lp, &beam.tokens, cur_len - prompt_len, cfg);
                acc.extend(lp.into_iter().map(|v| v + beam.score));
            }
            let cands: Vec<(usize, u32, f32, bool)> = top_indices(&acc, keep)
                .into_iter()
                .map(|i| {
                    let token = (i % vocab) as u32;
                    let hit = full_after || cfg.stop_tokens.contains(&token);
                    (i / vocab, token, acc[i], hit)
                })
                .collect();
            all_hit &= cands.iter().all(|c| c.3);
            let extend = |beam: usize, token: u32| {
                let mut t = running[b][beam].tokens.clone();
                t.push(token);
                t
            };

            // The best K continuations that do not end go on.
            let go_on: Vec<f32> = cands
                .iter()
                .map(|c| c.2 + if c.3 { RULED_OUT } else { 0.0 })
                .collect();
            let next: Vec<Hyp> = top_indices(&go_on, k)
                .into_iter()
                .map(|i| {
                    parents.push(b * k + cands[i].0);
                    Hyp {
                        tokens: extend(cands[i].0, cands[i].1),
                        score: go_on[i],
                        finished: false,
                    }
                })
                .collect();

            // Those of the top K that end compete for the finished slots.
            let norm = ((cur_len + 1 - prompt_len) as f64).powf(f64::from(opts.length_penalty));
            let all_done = finished[b].iter().all(|h| h.finished);
            let mut merged = finished[b].clone();
            for (rank, &(beam, token, score, hit)) in cands.iter().enumerate() {
                let just_finished = hit && rank < k;
                let mut s = score / norm as f32;
                if all_done && opts.early_stopping == EarlyStopping::Always {
                    s += RULED_OUT;
                }
                if !improvable[b] {
                    s += RULED_OUT;
                }
                if !just_finished {
                    s += RULED_OUT;
                }
                merged.push(Hyp {
                    tokens: extend(beam, token),
                    score: s,
                    finished: just_finished,
                });
            }
            let scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
            finished[b] = top_indices(&scores, k)
                .into_iter()
                .map(|i| merged[i].clone())
                .collect();
            running[b] = next;
        }
        model.reorder(&parents)?;
        cur_len += 1;
        new = 1;

        // Can a running beam still beat the worst finished hypothesis?
        for b in 0..batch {
            if !improvable[b] {
                continue;
            }
            let best_len =
                if opts.early_stopping == EarlyStopping::Never && opts.length_penalty > 0.0 {
                    max_length - prompt_len
                } else {
                    cur_len - prompt_len
                };
            let norm = (best_len as f64).powf(f64::from(opts.length_penalty)) as f32;
            let best_running = running[b][0].score / norm;
            let worst = finished[b]
                .iter()
                .map(|h| h.score)
                .fold(f32::INFINITY, f32::min);
            improvable[b] = finished[b]
                .iter()
                .any(|h| best_running > if h.finished { worst } else { RULED_OUT });
        }
        let all_full = opts.early_stopping == EarlyStopping::Always
            && finished.iter().all(|f| f.iter().all(|h| h.finished));
        if !improvable.iter().any(|&i| i) || all_full || all_hit {
            break;
        }
    }
    // HF fills with `pad_token_id or eos_token_id[0]`: a pad id of 0 is falsy there.
    let fill = match (cfg.pad_token, cfg.stop_tokens.first()) {
        (0, Some(&stop)) => stop,
        (pad, _) => pad,
    };
    let mut best: Vec<Vec<u32>> = finished
        .into_iter()
        .map(|mut f| f.swap_remove(0).tokens)
        .collect();
    let width = best.iter().map(Vec::len).max().unwrap_or(prompt_len);
    for row in best.iter_mut() {
        row.resize(width, fill);
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A bigram model: the next-token logits depend on the last token only.
    struct Bigram {
        table: Vec<Vec<f32>>,
        rows: usize,
        calls: Vec<usize>,
    }

    impl StepModel for Bigram {
        fn next_logits(&mut self, rows: &[Vec<u32>], new: usize) -> Result<Tensor> {
            assert_eq!(rows.len(), self.rows, "rows out of step with reorder");
            self.calls.push(new);
            let data: Vec<f32> = rows
                .iter()
                .flat_map(|r| self.table[*r.last().unwrap() as usize].clone())
                .collect();
            Tensor::from_vec(data, (rows.len(), self.table.len()), &Device::Cpu)
        }

        fn reorder(&mut self, indices: &[usize]) -> Result<()> {
            assert!(indices.iter().all(|&i| i < self.rows));
            self.rows = indices.len();
            Ok(())
        }
    }

    /// Vocabulary of 6: 0 pad, 1 start, 5 stop. From 1, token 2 is likeliest but leads to a
    /// poor continuation; 3 is second but leads to a confident stop.
    fn bigram(rows: usize) -> Bigram {
        let ln = |p: f32| p.ln();
        let t = vec![
            vec![0.0; 6],
            vec![-9.0, -9.0, ln(0.5), ln(0.4), ln(0.1), -9.0],
            vec![-9.0, -9.0, ln(0.3), ln(0.3), ln(0.1), ln(0.3)],
            vec![-9.0, -9.0, -9.0, -9.0, -9.0, 0.0],
            vec![-9.0, -9.0, -9.0, -9.0, 0.0, ln(0.5)],
            vec![0.0; 6],
        ];
        Bigram {
            table: t,
            rows,
            calls: Vec::new(),
        }
    }

    fn cfg(strategy: Strategy) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: 5,
            stop_tokens: vec![5],
            strategy,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_follows_the_argmax_feeds_one_token_per_step_and_stops() {
        let mut m = bigram(1);
        let out = generate(&mut m, vec![vec![1]], &cfg(Strategy::Greedy)).unwrap();
        // 1 -> 2 (0.5) -> 2 (ties 2,3,5 at 0.3: first index) -> 2 ...
        assert_eq!(out, vec![vec![1, 2, 2, 2, 2, 2]]);
        assert_eq!(m.calls, vec![1, 1, 1, 1, 1]);
    }

    #[test]
    fn beam_search_finds_the_more_likely_sequence_greedy_misses() {
        let beam = Strategy::Beam(BeamOptions {
            num_beams: 2,
            ..Default::default()
        });
        let mut m = bigram(2);
        let out = generate(&mut m, vec![vec![1], vec![1]], &cfg(beam)).unwrap();
        // 1 3 5 has probability 0.4; every path through 2 is at most 0.5 * 0.3.
        assert_eq!(out, vec![vec![1, 3, 5], vec![1, 3, 5]]);
    }

    #[test]
    fn min_new_tokens_holds_back_the_stop_token() {
        let beam = Strategy::Beam(BeamOptions {
            num_beams: 2,
            ..Default::default()
        });
        let mut c = cfg(beam);
        c.min_new_tokens = 3;
        let out = generate(&mut bigram(1), vec![vec![1]], &c).unwrap();
        assert!(out[0].len() >= 5 && !out[0][1..4].contains(&5), "{out:?}");
    }

    #[test]
    fn hf_lengths_count_start_tokens_unless_they_are_new_token_counts() {
        let hf: HfGenerationConfig = serde_json::from_str(r#"{"bos_token_id": 1}"#).unwrap();
        assert_eq!((hf.max_new_tokens(4), hf.min_new_tokens(4)), (16, 0));
        let hf: HfGenerationConfig =
            serde_json::from_str(r#"{"max_length": 30, "min_length": 5}"#).unwrap();
        assert_eq!((hf.max_new_tokens(1), hf.min_new_tokens(1)), (29, 4));
        let hf: HfGenerationConfig =
            serde_json::from_str(r#"{"max_length": 30, "max_new_tokens": 7, "min_new_tokens": 2}"#)
                .unwrap();
        assert_eq!((hf.max_new_tokens(1), hf.min_new_tokens(1)), (7, 2));
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -5.0]), 1);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_scores() {
        let mut s = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut s, &[0, 1, 1], 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus_and_always_the_most_likely_token() {
        let scores = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        let s = SamplingOptions {
            top_p: 0.75,
            top_k: 0,
            ..Default::default()
        };
        let p = nucleus_probs(&scores, &s);
        assert!(
            p[0] > 0.0 && p[1] > 0.0 && p[2] == 0.0 && p[3] == 0.0,
            "{p:?}"
        );
        assert!((p[0] - 0.625).abs() < 1e-6);
        let tiny = SamplingOptions { top_p: 0.01, ..s };
        assert_eq!(nucleus_probs(&scores, &tiny), vec![1.0, 0.0, 0.0, 0.0]);
        let top2 = SamplingOptions {
            top_k: 2,
            top_p: 1.0,
            ..s
        };
        let p = nucleus_probs(&scores, &top2);
        assert!(p[2] == 0.0 && p[3] == 0.0 && (p[0] + p[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn sampling_is_reproducible_per_seed_and_stays_in_the_nucleus() {
        let sample = |seed| {
            let s = Strategy::Sample(SamplingOptions {
                seed,
                top_p: 0.6,
                ..Default::default()
            });
            let mut c = cfg(s);
            c.max_new_tokens = 1;
            generate(&mut bigram(64), vec![vec![1]; 64], &c).unwrap()
        };
        assert_eq!(sample(7), sample(7));
        let a = sample(7);
        let b = sample(8);
        assert_ne!(a, b);
        // After 1 the nucleus at 0.6 is {2, 3}: 4 (p = 0.1) is never drawn.
        let firsts: Vec<u32> = a.iter().chain(&b).map(|r| r[1]).collect();
        assert!(firsts.iter().all(|&t| t == 2 || t == 3), "{firsts:?}");
        assert!(firsts.contains(&2) && firsts.contains(&3));
    }

    #[test]
    fn splitmix_matches_its_reference_sequence() {
        // The first outputs for seed 1234567 from the reference implementation.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }
}
