//! Multi-token training provably helps speculative decoding. On a small LM trained here on a
//! templated corpus: Medusa-1 heads (frozen LM) and MTP modules (trained jointly with the LM)
//! each lower every head's or depth's loss, and decoding with them accepts more than 1.5 tokens
//! per step on held-out prompts while staying token-identical to plain greedy decoding (and
//! more than 1.5 under Medusa's typical acceptance, and after Medusa-2 with self-distillation); MTP speculative sampling follows the LM's
//! own distribution (chi-square against the exact law). Every head parameter receives a
//! gradient.

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use zoo_models::generation::{generate, nucleus_probs, GenerationConfig, SamplingOptions};
use zoo_models::hub::ModelRepo;
use zoo_models::llm::{
    medusa_generate, KvCache, LlamaForCausalLM, LlamaStep, MedusaTree, TypicalAcceptance,
};
use zoo_trainers::lm;
use zoo_trainers::medusa;
use zoo_trainers::optim::{without_gradient, AdamWConfig};
use zoo_trainers::train::TrainConfig;

const COLOURS: [&str; 5] = ["red", "green", "blue", "yellow", "purple"];
const SHAPES: [&str; 4] = ["circle", "square", "triangle", "cross"];
const PLACES: [&str; 4] = ["on the left", "on the right", "at the top", "at the bottom"];

/// Templated sentences; those with a purple shape are held out of training.
fn sentences(held_out: bool) -> Vec<String> {
    let mut out = Vec::new();
    for c in COLOURS {
        for s in SHAPES {
            for p in PLACES {
                if (c == "purple") == held_out {
                    out.push(format!("the {c} {s} is {p} of the picture."));
                }
            }
        }
    }
    out
}

fn write_corpus(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.txt");
    std::fs::write(&path, sentences(false).join(" ")).unwrap();
    path
}

fn train_config(output: &Path, steps: u64, lr: f64) -> TrainConfig {
    TrainConfig {
        precision: Default::default(),
        steps,
        lr,
        warmup: 10,
        accum_freq: 1,
        grad_clip_norm: Some(1.0),
        save_every: None,
        eval_every: None,
        output: output.to_path_buf(),
        seed: 0,
        progress: false,
    }
}

/// The step rows of a run's `metrics.jsonl` that log `key`.
fn metric_rows(dir: &Path, key: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get(key).is_some())
        .collect()
}

/// Asserts that `{prefix}{k}_loss` at least halves over the run, for `k` in `1..=n`.
fn assert_losses_halve(rows: &[serde_json::Value], prefix: &str, n: usize) {
    for k in 1..=n {
        let key = format!("{prefix}{k}_loss");
        let (first, last) = (
            rows.first().unwrap()[&key].as_f64().unwrap(),
            rows.last().unwrap()[&key].as_f64().unwrap(),
        );
        eprintln!("{key}: {first} -> {last}");
        assert!(last < first * 0.5, "{key} did not fall: {first} -> {last}");
    }
}

/// Plain greedy decoding of `prompt` by 24 tokens.
fn greedy(model: &LlamaForCausalLM, prompt: &[u32]) -> Vec<u32> {
    let mut step = LlamaStep {
        model,
        cache: KvCache::new(),
    };
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        ..GenerationConfig::default()
    };
    generate(&mut step, vec![prompt.to_vec()], &cfg)
        .unwrap()
        .remove(0)
}

/// Mean accepted tokens per step of greedy Medusa decoding with the last of `trees` over the
/// held-out prompts (half of every third held-out sentence, 24 new tokens); every tree's output
/// is checked token-identical to plain greedy.
fn held_out_medusa_acceptance(
    model: &LlamaForCausalLM,
    heads: &zoo_models::llm::MedusaHeads,
    trees: &[&MedusaTree],
    tokenizer: &zoo_datasets::tokenize::TextTokenizer,
) -> f64 {
    let (mut new_tokens, mut steps) = (0, 0);
    for sentence in sentences(true).iter().step_by(3) {
        let prompt = tokenizer.encode(&sentence[..sentence.len() / 2]).unwrap();
        let plain = greedy(model, &prompt);
        for (i, tree) in trees.iter().enumerate() {
            let out = medusa_generate(model, heads, tree, &prompt, 24, &[], None).unwrap();
            assert_eq!(out.tokens, plain);
            if i + 1 == trees.len() {
                new_tokens += out.new_tokens;
                steps += out.steps;
            }
        }
    }
    new_tokens as f64 / steps as f64
}

#[test]
fn trained_medusa_heads_accept_more_than_one_and_a_half_tokens_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let lm_run = lm::run(
        lm::RunConfig {
            model: lm::ModelSpec::Preset("llama-tiny".into()),
            tokenizer: lm::TokenizerSpec::Train { vocab_size: 300 },
            seq_len: 32,
            train: train_config(&dir.path().join("lm"), 200, 3e-3),
            batch_size: 8,
            optimizer: AdamWConfig::default(),
            resume: None,
            device: Device::Cpu,
            mtp: None,
            epochs: None,
        },
        std::slice::from_ref(&corpus),
        None,
    )
    .unwrap();
    let lm_loss = *lm_run.state.losses.last().unwrap();
    eprintln!("LM loss {} -> {lm_loss}", lm_run.state.losses[0]);
    assert!(lm_loss < 1.0, "the LM did not learn the corpus: {lm_loss}");

    let heads_out = dir.path().join("medusa");
    let run = medusa::run(
        medusa::RunConfig {
            model: lm_run.final_dir.to_string_lossy().into_owned(),
            num_heads: 4,
            num_layers: 1,
            shared_lm_head: false,
            draft_vocab: None,
            seq_len: 32,
            train: train_config(&heads_out, 150, 3e-3),
            batch_size: 8,
            optimizer: AdamWConfig::default(),
            resume: None,
            device: Device::Cpu,
            joint: None,
            self_distill: None,
            epochs: None,
        },
        std::slice::from_ref(&corpus),
        None,
    )
    .unwrap();
    assert_losses_halve(&metric_rows(&heads_out, "medusa1_loss"), "medusa", 4);

    // Held-out prompts (a colour never seen in training), decoded with the saved heads.
    let repo = ModelRepo::open(&lm_run.final_dir.to_string_lossy()).unwrap();
    let model = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    let heads = zoo_models::llm::MedusaHeads::load(
        &run.final_dir,
        model.config.hidden_size,
        model.config.vocab_size,
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let tokenizer = &lm_run.task.model.tokenizer;
    let tree = MedusaTree::mc_sim_7b_63();
    let small: Vec<Vec<usize>> = vec![vec![0], vec![1], vec![0, 0], vec![0, 0, 0]];
    let small = MedusaTree::new(&small).unwrap();
    let mean = held_out_medusa_acceptance(&model, &heads, &[&small, &tree], tokenizer);
    eprintln!("mean accepted tokens per step on held-out prompts: {mean:.2}");
    assert!(mean > 1.5, "mean accepted {mean}");

    // Typical acceptance at FasterDecoding's defaults (temperature 0.7, ε 0.09, δ 0.3).
    let typical = TypicalAcceptance::default();
    let (mut new_tokens, mut steps) = (0, 0);
    for (i, sentence) in sentences(true).iter().step_by(3).enumerate() {
        let prompt = tokenizer.encode(&sentence[..sentence.len() / 2]).unwrap();
        let typical = TypicalAcceptance {
            seed: i as u64,
            ..typical
        };
        let out = medusa_generate(&model, &heads, &tree, &prompt, 24, &[], Some(&typical)).unwrap();
        new_tokens += out.new_tokens;
        steps += out.steps;
    }
    let mean = new_tokens as f64 / steps as f64;
    eprintln!("typical acceptance: mean accepted tokens per step {mean:.2}");
    assert!(mean > 1.5, "typical acceptance: mean accepted {mean}");

    // Medusa-2 on the same LM: 40 heads-only steps, then joint training on self-distilled
    // data, the KL from the original LM holding the backbone near what it was.
    let joint_out = dir.path().join("medusa2");
    let joint = medusa::run(
        medusa::RunConfig {
            model: lm_run.final_dir.to_string_lossy().into_owned(),
            num_heads: 4,
            num_layers: 1,
            shared_lm_head: false,
            draft_vocab: None,
            seq_len: 32,
            train: train_config(&joint_out, 120, 1e-3),
            batch_size: 8,
            optimizer: AdamWConfig::default(),
            resume: None,
            device: Device::Cpu,
            joint: Some(medusa::Medusa2 {
                heads_warmup_steps: 40,
                ..medusa::Medusa2::default()
            }),
            self_distill: Some(medusa::SelfDistill {
                prompt_len: 8,
                temperature: 0.3,
                max_sequences: None,
                chat: false,
            }),
            epochs: None,
        },
        std::slice::from_ref(&corpus),
        None,
    )
    .unwrap();
    let rows = metric_rows(&joint_out, "medusa1_loss");
    assert_losses_halve(&rows, "medusa", 4);
    let kl = rows.last().unwrap()["lm_kl"].as_f64().unwrap();
    eprintln!("Medusa-2 final KL from the original LM: {kl}");
    assert!(kl < 0.05, "the backbone drifted: KL {kl}");
    let repo = ModelRepo::open(&joint.final_dir.to_string_lossy()).unwrap();
    let model2 = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    let heads2 = zoo_models::llm::MedusaHeads::load(
        &joint.final_dir,
        model2.config.hidden_size,
        model2.config.vocab_size,
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mean = held_out_medusa_acceptance(&model2, &heads2, &[&tree], tokenizer);
    eprintln!("Medusa-2: mean accepted tokens per step {mean:.2}");
    assert!(mean > 1.5, "Medusa-2: mean accepted {mean}");
}

#[test]
fn every_head_parameter_receives_a_gradient_and_heads_start_as_the_next_token_predictor() {
    let repo = ModelRepo::open(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/llama-tiny")
            .to_string_lossy(),
    )
    .unwrap();
    let model = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    let heads = medusa::TrainableMedusa::new(
        zoo_models::llm::medusa::MedusaConfig {
            medusa_num_heads: 3,
            medusa_num_layers: 2,
        },
        &model,
        "llama-tiny",
        false,
    )
    .unwrap();
    let ids = candle_core::Tensor::new(&[[5u32, 17, 42, 9, 100, 3, 77, 8]], &Device::Cpu).unwrap();
    let out = model.forward(&ids, &mut KvCache::new()).unwrap();
    // Identity ResBlocks and the backbone's lm_head: each head's logits are the backbone's.
    let head0 = heads.heads.heads[0]
        .forward(&out.hidden, model.lm_head())
        .unwrap();
    let d = (head0 - &out.logits)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-5);

    let losses = heads
        .head_losses(&model, &out.hidden.detach(), &ids, None)
        .unwrap();
    let total = losses
        .iter()
        .skip(1)
        .fold(losses[0].clone(), |a, b| (a + b).unwrap());
    let grads = total.backward().unwrap();
    let vars = heads.trainable_vars();
    assert_eq!(vars.len(), 3 * (2 * 2 + 1));
    let missing = without_gradient(&vars, &grads).unwrap();
    assert!(missing.is_empty(), "no gradient reached {missing:?}");
}

#[test]
fn reply_weights_restrict_the_heads_losses_and_hits_to_the_flagged_targets() {
    let repo = ModelRepo::open(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/llama-tiny")
            .to_string_lossy(),
    )
    .unwrap();
    let model = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    let heads = medusa::TrainableMedusa::new(
        zoo_models::llm::medusa::MedusaConfig {
            medusa_num_heads: 2,
            medusa_num_layers: 1,
        },
        &model,
        "llama-tiny",
        false,
    )
    .unwrap();
    let ids = candle_core::Tensor::new(
        &[
            [5u32, 17, 42, 9, 100, 3, 77, 8],
            [6, 18, 43, 10, 101, 4, 78, 9],
        ],
        &Device::Cpu,
    )
    .unwrap();
    // A "prompt" of 3 tokens per row; the replies are the targets.
    let flags: Vec<Vec<bool>> = vec![(0..8).map(|t| t >= 3).collect(); 2];
    let weights = candle_core::Tensor::new(
        flags
            .iter()
            .map(|r| r.iter().map(|&f| f as u8 as f32).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap();
    let hidden = model
        .forward(&ids, &mut KvCache::new())
        .unwrap()
        .hidden
        .detach();
    let all = heads.head_losses(&model, &hidden, &ids, None).unwrap();
    let ones = heads
        .head_losses(&model, &hidden, &ids, Some(&weights.ones_like().unwrap()))
        .unwrap();
    let replies = heads
        .head_losses(&model, &hidden, &ids, Some(&weights))
        .unwrap();
    let hits = heads
        .rank_hits(&model, &hidden, &ids, Some(&flags))
        .unwrap();
    let every = heads.rank_hits(&model, &hidden, &ids, None).unwrap();
    for (i, head) in heads.heads.heads.iter().enumerate() {
        let k = i + 1;
        let scalar = |t: &candle_core::Tensor| t.to_scalar::<f32>().unwrap();
        assert!((scalar(&all[i]) - scalar(&ones[i])).abs() < 1e-6);
        // The reply loss by hand: head k at position t predicts t + k + 1, a target from 3 on.
        let logits = head.forward(&hidden, model.lm_head()).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
        let logp: Vec<Vec<Vec<f32>>> = logp.to_vec3().unwrap();
        let rows: Vec<Vec<u32>> = ids.to_vec2().unwrap();
        let (mut sum, mut n) = (0f32, 0);
        for (b, row) in rows.iter().enumerate() {
            for t in 0..8 - k - 1 {
                if t + k + 1 >= 3 {
                    sum -= logp[b][t][row[t + k + 1] as usize];
                    n += 1;
                }
            }
        }
        let want = sum / n as f32;
        assert!(
            (scalar(&replies[i]) - want).abs() < 1e-5,
            "head {k}: {want}"
        );
        assert_eq!(hits[i].1, n, "head {k} counts only the replies");
        assert_eq!(every[i].1, 2 * (8 - k - 1));
    }
}

#[test]
fn trained_mtp_modules_accept_more_than_one_and_a_half_tokens_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    // The LM and two MTP modules trained jointly (DeepSeek-V3's λ = 0.3).
    let out = dir.path().join("lm-mtp");
    let run = lm::run(
        lm::RunConfig {
            model: lm::ModelSpec::Preset("llama-tiny".into()),
            tokenizer: lm::TokenizerSpec::Train { vocab_size: 300 },
            seq_len: 32,
            train: train_config(&out, 250, 3e-3),
            batch_size: 8,
            optimizer: AdamWConfig::default(),
            resume: None,
            device: Device::Cpu,
            mtp: Some(lm::MtpSettings {
                depth: 2,
                lambda: 0.3,
                freeze_backbone: false,
                draft_vocab: None,
            }),
            epochs: None,
        },
        std::slice::from_ref(&corpus),
        None,
    )
    .unwrap();
    assert_losses_halve(&metric_rows(&out, "mtp1_loss"), "mtp", 2);

    // The saved folder holds the modules as model.layers.{4, 5}; decode held-out prompts.
    let repo = ModelRepo::open(&run.final_dir.to_string_lossy()).unwrap();
    let model = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    assert_eq!(model.config.num_nextn_predict_layers, 2);
    let mtp = zoo_models::llm::MtpModules::load(
        &repo,
        &model.config,
        candle_core::DType::F32,
        &Device::Cpu,
        None,
    )
    .unwrap();
    let tokenizer = &run.task.model.tokenizer;
    let (mut new_tokens, mut steps) = (0, 0);
    for sentence in sentences(true).iter().step_by(3) {
        let prompt = tokenizer.encode(&sentence[..sentence.len() / 2]).unwrap();
        let out = zoo_models::llm::mtp_generate(&model, &mtp, &prompt, 24, &[], None).unwrap();
        assert_eq!(out.tokens, greedy(&model, &prompt));
        new_tokens += out.new_tokens;
        steps += out.steps;
    }
    let mean = new_tokens as f64 / steps as f64;
    eprintln!("MTP mean accepted tokens per step on held-out prompts: {mean:.2}");
    assert!(mean > 1.5, "mean accepted {mean}");

    // Speculative sampling draws from the backbone's own distribution: the first three new
    // tokens (one from the prefill, two drafted and verified) against their exact joint law. A
    // high temperature spreads the trained model's mass; top-3 keeps the continuations few.
    let prompt = tokenizer.encode("the purple circle is").unwrap();
    let sampling = SamplingOptions {
        temperature: 2.0,
        top_k: 3,
        top_p: 1.0,
        seed: 0,
    };
    let exact = exact_continuations(&model, &prompt, 3, &sampling);
    let runs = 1500u64;
    let mut counts: HashMap<Vec<u32>, usize> = HashMap::new();
    let (mut kept, mut replaced) = (0usize, 0usize);
    for seed in 0..runs {
        let s = SamplingOptions { seed, ..sampling };
        let out = zoo_models::llm::mtp_generate(&model, &mtp, &prompt, 3, &[], Some(&s)).unwrap();
        *counts
            .entry(out.tokens[prompt.len()..].to_vec())
            .or_default() += 1;
        kept += out.accepted.iter().sum::<usize>();
        replaced += out.accepted.iter().filter(|&&a| a < 2).count();
    }
    eprintln!("speculative sampling: {kept} drafts kept, {replaced} replaced");
    assert!(kept > 0 && replaced > 0, "both outcomes must be exercised");
    let (stat, dof) = chi_square(&counts, &exact, runs as usize);
    let bound = dof as f64 + 5.0 * (2.0 * dof as f64).sqrt();
    eprintln!("chi-square {stat:.1} over {dof} degrees of freedom (bound {bound:.1})");
    assert!(stat < bound, "chi-square {stat} >= {bound}");
}

/// The exact probability of every continuation of `prompt` by `len` tokens under plain
/// sampling with `sampling`'s warpers.
fn exact_continuations(
    model: &LlamaForCausalLM,
    prompt: &[u32],
    len: usize,
    sampling: &SamplingOptions,
) -> HashMap<Vec<u32>, f64> {
    let mut frontier: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 1.0)];
    for _ in 0..len {
        let mut next = Vec::new();
        for (tail, p) in frontier {
            let row: Vec<u32> = prompt.iter().chain(&tail).copied().collect();
            let ids = Tensor::new(vec![row.clone()], &Device::Cpu).unwrap();
            let out = model.forward(&ids, &mut KvCache::new()).unwrap();
            let logits = out.logits.get(0).unwrap().get(row.len() - 1).unwrap();
            let probs = nucleus_probs(&logits.to_vec1::<f32>().unwrap(), sampling);
            for (t, &q) in probs.iter().enumerate() {
                let joint = p * f64::from(q);
                if joint > 0.0 {
                    let mut longer = tail.clone();
                    longer.push(t as u32);
                    next.push((longer, joint));
                }
            }
        }
        frontier = next;
    }
    frontier.into_iter().collect()
}

/// Pearson's chi-square of observed continuations against `exact`, over the continuations
/// expected at least 5 times and one bin for all the others; returns the statistic and its
/// degrees of freedom.
fn chi_square(
    counts: &HashMap<Vec<u32>, usize>,
    exact: &HashMap<Vec<u32>, f64>,
    n: usize,
) -> (f64, usize) {
    let mut stat = 0.0;
    let (mut bins, mut rest_expected, mut rest_observed) = (0, n as f64, n as f64);
    for (seq, &p) in exact {
        let expected = p * n as f64;
        if expected < 5.0 {
            continue;
        }
        let observed = *counts.get(seq).unwrap_or(&0) as f64;
        stat += (observed - expected).powi(2) / expected;
        rest_expected -= expected;
        rest_observed -= observed;
        bins += 1;
    }
    if rest_expected >= 1.0 {
        stat += (rest_observed - rest_expected).powi(2) / rest_expected;
        bins += 1;
    }
    (stat, bins - 1)
}
