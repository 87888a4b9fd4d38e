//! MTP modules: weights named as DeepSeek-V3 names them, and greedy self-speculative decoding
//! token-identical to plain greedy decoding with random modules of depth 1 to 3; cached chain
//! and tree drafts equal to drafts computed from scratch, the tree grown and cut by confidence
//! as EAGLE-2 does; sampling that stays in the backbone's sampling support and repeats per
//! seed.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use zoo_models::generation::SplitMix64;
use zoo_models::generation::{GenerationConfig, SamplingOptions};
use zoo_models::hub::ModelRepo;
use zoo_models::llm::Acceptance::Greedy;
use zoo_models::llm::{
    mtp_generate, DraftContext, DraftTree, Drafter, KvCache, LlamaConfig, LlamaForCausalLM,
    MtpDraft, MtpDrafter, MtpModules,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// llama-tiny plus `depth` random MTP modules, as a checkpoint folder in `dir`.
fn with_mtp(dir: &Path, depth: usize) -> (LlamaForCausalLM, MtpModules) {
    let src = fixtures().join("llama-tiny");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["num_nextn_predict_layers"] = depth.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cfg: LlamaConfig = serde_json::from_value(config).unwrap();

    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let probe = VarMap::new();
    MtpModules::new(
        &cfg,
        depth,
        VarBuilder::from_varmap(&probe, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let mut specs: Vec<(String, candle_core::Shape)> = probe
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.shape().clone()))
        .collect();
    specs.sort_by(|a, b| a.0.cmp(&b.0));
    for (seed, (name, shape)) in specs.into_iter().enumerate() {
        let seed = seed as u64 + 1;
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(&shape, DType::F32, &Device::Cpu).unwrap()
        } else {
            let n = shape.elem_count();
            let values: Vec<f32> = (0..n)
                .map(|i| {
                    let x = ((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed) >> 40;
                    (x as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
                })
                .collect();
            Tensor::from_vec(values, &shape, &Device::Cpu).unwrap()
        };
        tensors.insert(name, t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let repo = ModelRepo::open(&dir.to_string_lossy()).unwrap();
    let model = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    let mtp = MtpModules::load(&repo, &model.config, DType::F32, &Device::Cpu, None).unwrap();
    (model, mtp)
}

#[test]
fn mtp_weights_follow_deepseek_v3_names() {
    let dir = tempfile::tempdir().unwrap();
    with_mtp(dir.path(), 2);
    let names: Vec<String> =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .filter(|n| n.starts_with("model.layers.2.") || n.starts_with("model.layers.3."))
            .collect();
    for want in [
        "model.layers.2.enorm.weight",
        "model.layers.2.hnorm.weight",
        "model.layers.2.eh_proj.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.2.mlp.gate_proj.weight",
        "model.layers.2.shared_head.norm.weight",
        "model.layers.3.eh_proj.weight",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
}

#[test]
fn greedy_mtp_decoding_is_token_identical_to_plain_greedy() {
    for depth in [1, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let (model, mtp) = with_mtp(dir.path(), depth);
        for prompt in [
            vec![5u32, 17, 42],
            vec![260, 284, 261, 269, 261, 270],
            vec![9],
        ] {
            for max in [1, 2, 7, 30] {
                let cfg = GenerationConfig {
                    max_new_tokens: max,
                    ..GenerationConfig::default()
                };
                let plain = common::plain_greedy(&model, &prompt, &cfg);
                let out = mtp_generate(&model, &mtp, &prompt, max, &[], None).unwrap();
                assert_eq!(
                    out.tokens, plain,
                    "depth {depth}, prompt {prompt:?}, {max} tokens"
                );
                assert_eq!(out.new_tokens, max);
                assert!(out.steps >= 1 && out.steps <= max && out.mean_accepted() >= 1.0);
            }
        }
    }
}

#[test]
fn mtp_decoding_stops_at_a_stop_token() {
    let dir = tempfile::tempdir().unwrap();
    let (model, mtp) = with_mtp(dir.path(), 2);
    let prompt = vec![5u32, 17, 42];
    let plain = common::plain_greedy(&model, &prompt, &GenerationConfig::default());
    let stop = plain[prompt.len() + 5];
    let first = plain[prompt.len()..]
        .iter()
        .position(|&t| t == stop)
        .unwrap();
    let out = mtp_generate(&model, &mtp, &prompt, 20, &[stop], None).unwrap();
    assert_eq!(out.tokens, plain[..prompt.len() + first + 1]);
}

/// The drafts of `mtp` after `tokens`, computed from scratch: the backbone over all but the last
/// token, then each module over every position with the tokens `k` ahead (drafts where they
/// run past the end).
fn drafts_from_scratch(model: &LlamaForCausalLM, mtp: &MtpModules, tokens: &[u32]) -> Vec<u32> {
    let dev = Device::Cpu;
    let m = tokens.len();
    let out = model
        .forward(
            &Tensor::new(vec![tokens[..m - 1].to_vec()], &dev).unwrap(),
            &mut KvCache::new(),
        )
        .unwrap();
    let mut hidden = out.hidden;
    let mut known = tokens.to_vec();
    let mut drafts = Vec::new();
    let positions: Vec<u32> = (0..(m - 1) as u32).collect();
    let (cos, sin) = model.model.rotary_cos_sin(&positions, &dev).unwrap();
    let mask = zoo_models::layers::AttentionMask::causal(0);
    for (k0, module) in mtp.modules.iter().enumerate() {
        let k = k0 + 1;
        let ahead: Vec<u32> = (1..m).map(|i| known[i + k - 1]).collect();
        let embeds = model
            .model
            .embed(&Tensor::new(vec![ahead], &dev).unwrap())
            .unwrap();
        let mut kv = Default::default();
        hidden = module
            .forward(&hidden, &embeds, &cos, &sin, &mask, &mut kv)
            .unwrap();
        let last = hidden.narrow(1, m - 2, 1).unwrap();
        let logits = module.logits(&last, model.lm_head()).unwrap();
        let d = logits
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        drafts.push(d);
        known.push(d);
    }
    drafts
}

/// Module `path.len() + 1`'s probabilities for the token after `tokens` and the drafted `path`,
/// computed from scratch as [`drafts_from_scratch`] computes them.
fn probs_from_scratch(
    model: &LlamaForCausalLM,
    mtp: &MtpModules,
    tokens: &[u32],
    path: &[u32],
) -> Vec<f32> {
    let dev = Device::Cpu;
    let m = tokens.len();
    let out = model
        .forward(
            &Tensor::new(vec![tokens[..m - 1].to_vec()], &dev).unwrap(),
            &mut KvCache::new(),
        )
        .unwrap();
    let known: Vec<u32> = tokens.iter().chain(path).copied().collect();
    let positions: Vec<u32> = (0..(m - 1) as u32).collect();
    let (cos, sin) = model.model.rotary_cos_sin(&positions, &dev).unwrap();
    let mask = zoo_models::layers::AttentionMask::causal(0);
    let mut hidden = out.hidden;
    for (k0, module) in mtp.modules[..=path.len()].iter().enumerate() {
        let k = k0 + 1;
        let ahead: Vec<u32> = (1..m).map(|i| known[i + k - 1]).collect();
        let embeds = model
            .model
            .embed(&Tensor::new(vec![ahead], &dev).unwrap())
            .unwrap();
        let mut kv = Default::default();
        hidden = module
            .forward(&hidden, &embeds, &cos, &sin, &mask, &mut kv)
            .unwrap();
    }
    let module = &mtp.modules[path.len()];
    let logits = module
        .logits(&hidden.narrow(1, m - 2, 1).unwrap(), model.lm_head())
        .unwrap();
    candle_nn::ops::softmax_last_dim(&logits.flatten_all().unwrap())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// The tokens from the root's child down to `node`.
fn path_to(tree: &DraftTree, node: usize) -> Vec<u32> {
    let mut path = Vec::new();
    let mut n = node;
    while n != 0 {
        path.push(tree.tokens[n]);
        n = tree.parents[n];
    }
    path.reverse();
    path
}

#[test]
fn tree_drafts_are_the_most_confident_paths_computed_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let (model, mtp) = with_mtp(dir.path(), 3);
    let dev = Device::Cpu;
    let top_k = 3;
    let mut full = MtpDrafter::with_shape(
        &mtp,
        MtpDraft::Tree {
            top_k,
            max_nodes: 1000,
        },
    );
    let mut cut = MtpDrafter::with_shape(
        &mtp,
        MtpDraft::Tree {
            top_k,
            max_nodes: 7,
        },
    );
    let mut tokens = vec![260u32, 284, 261, 269, 261, 270];
    let mut cached = 0;
    let mut rng = SplitMix64::new(0);
    // Rounds after 0, 2, 1 and 3 more tokens entered the cache (the drafter keeps its own).
    for (round, more) in [vec![], vec![7u32, 300], vec![11], vec![4, 5, 6]]
        .into_iter()
        .enumerate()
    {
        tokens.extend(more);
        let m = tokens.len();
        let all = model
            .forward(
                &Tensor::new(vec![tokens[..m - 1].to_vec()], &dev).unwrap(),
                &mut KvCache::new(),
            )
            .unwrap()
            .hidden;
        let hidden = all.narrow(1, cached, m - 1 - cached).unwrap();
        cached = m - 1;
        let big = full
            .draft(DraftContext::greedy(
                &model,
                &tokens,
                Some(&hidden),
                &mut rng,
            ))
            .unwrap();
        let small = cut
            .draft(DraftContext::greedy(
                &model,
                &tokens,
                Some(&hidden),
                &mut rng,
            ))
            .unwrap();
        // Every expanded node's children are the top-k of its module's distribution, most
        // likely first; each depth expands its k most confident nodes.
        let depths = big.depths();
        let mut confidence = vec![1.0f32; big.len()];
        for node in 0..big.len() {
            let children: Vec<usize> = big.children(node).collect();
            if children.is_empty() {
                continue;
            }
            let probs = probs_from_scratch(&model, &mtp, &tokens, &path_to(&big, node));
            let mut order: Vec<u32> = (0..probs.len() as u32).collect();
            order.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]));
            let got: Vec<u32> = children.iter().map(|&c| big.tokens[c]).collect();
            assert_eq!(got, order[..top_k], "round {round}, node {node}");
            for &c in &children {
                confidence[c] = confidence[node] * probs[big.tokens[c] as usize];
            }
        }
        for depth in 1..=3 {
            let at: Vec<usize> = (1..big.len()).filter(|&n| depths[n] == depth).collect();
            // k under the root, then k children of each of the k expanded nodes.
            assert_eq!(at.len(), if depth == 1 { top_k } else { top_k * top_k });
            let expanded: Vec<usize> = at
                .iter()
                .copied()
                .filter(|&n| big.children(n).next().is_some())
                .collect();
            if depth < 3 {
                let mut ranked = at.clone();
                ranked.sort_by(|&a, &b| confidence[b].total_cmp(&confidence[a]));
                let mut want = ranked[..top_k].to_vec();
                want.sort_unstable();
                assert_eq!(expanded, want, "round {round}, depth {depth}");
            }
        }
        // The cut tree: the 7 most confident drafts, closed under parents.
        let mut ranked: Vec<usize> = (1..big.len()).collect();
        ranked.sort_by(|&a, &b| confidence[b].total_cmp(&confidence[a]));
        let mut want: Vec<Vec<u32>> = ranked[..7].iter().map(|&n| path_to(&big, n)).collect();
        want.sort();
        let mut got: Vec<Vec<u32>> = (1..small.len()).map(|n| path_to(&small, n)).collect();
        got.sort();
        assert_eq!(got, want, "round {round}");
        assert!((1..small.len()).all(|n| small.parents[n] < n));
    }
}

#[test]
fn cached_drafts_equal_drafts_computed_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let (model, mtp) = with_mtp(dir.path(), 3);
    let prompt = vec![260u32, 284, 261, 269, 261, 270];
    let out = mtp_generate(&model, &mtp, &prompt, 25, &[], None).unwrap();
    // Round r drafts after the prompt and the tokens of the rounds before it.
    let mut len = prompt.len();
    for (r, drafts) in out.drafts.iter().enumerate() {
        let want = drafts_from_scratch(&model, &mtp, &out.tokens[..len]);
        assert_eq!(drafts, &want, "round {r} after {len} tokens");
        let accepted = drafts
            .iter()
            .zip(&out.tokens[len..])
            .take_while(|(d, t)| d == t)
            .count();
        len += accepted + 1;
        if len >= out.tokens.len() {
            break;
        }
    }
    assert!(out.drafts.len() > 3);
}

/// With a confidence floor, each round's chain is the chain computed from scratch cut before
/// the first draft whose confidence (the product of the modules' probabilities along it) falls
/// below the floor; modules skipped in one round catch up in a later one, and the output stays
/// plain greedy decoding's.
#[test]
fn a_confidence_floor_cuts_the_chain_computed_from_scratch_and_keeps_greedy_output() {
    let dir = tempfile::tempdir().unwrap();
    let (model, mtp) = with_mtp(dir.path(), 3);
    let (mut cut, mut resumed) = (0, 0);
    // Floors among the random modules' confidences, near the quartiles of the two-draft
    // chains' and the median of the first drafts', halfway between two of them (no confidence
    // sits on a floor, where rounding would decide).
    let probe = vec![260u32, 284, 261, 269, 261, 270, 5, 17, 42, 9, 33, 7];
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for len in 2..=probe.len() {
        let d = drafts_from_scratch(&model, &mtp, &probe[..len]);
        let p1 = probs_from_scratch(&model, &mtp, &probe[..len], &[])[d[0] as usize];
        let p2 = probs_from_scratch(&model, &mtp, &probe[..len], &d[..1])[d[1] as usize];
        one.push(p1);
        two.push(p1 * p2);
    }
    let between = |mut c: Vec<f32>, q: usize| {
        c.sort_by(f32::total_cmp);
        let i = q * (c.len() - 1) / 4;
        (c[i] + c[i + 1]) / 2.0
    };
    let floors = [
        between(two.clone(), 1),
        between(two.clone(), 2),
        between(two, 3),
        between(one, 2),
    ];
    for floor in floors {
        for prompt in [vec![260u32, 284, 261, 269, 261, 270], vec![5, 17, 42]] {
            let cfg = GenerationConfig {
                max_new_tokens: 30,
                ..GenerationConfig::default()
            };
            let plain = common::plain_greedy(&model, &prompt, &cfg);
            let mut drafter = MtpDrafter::new(&mtp).with_min_confidence(floor);
            let out =
                zoo_models::llm::decode_until(&model, &mut drafter, &prompt, 30, &[], &Greedy)
                    .unwrap();
            assert_eq!(out.tokens, plain, "floor {floor}, prompt {prompt:?}");
            let mut len = prompt.len();
            let mut before = usize::MAX;
            for (r, drafts) in out.drafts.iter().enumerate() {
                let full = drafts_from_scratch(&model, &mtp, &out.tokens[..len]);
                let mut want = Vec::new();
                let mut confidence = 1.0f32;
                for (k, &d) in full.iter().enumerate() {
                    confidence *= probs_from_scratch(&model, &mtp, &out.tokens[..len], &full[..k])
                        [d as usize];
                    if confidence < floor {
                        break;
                    }
                    want.push(d);
                }
                assert_eq!(drafts, &want, "floor {floor}, round {r} after {len} tokens");
                cut += usize::from(want.len() < full.len());
                resumed += usize::from(before < 2 && want.len() >= 2);
                before = want.len();
                len += out.accepted[r] + 1;
                if len >= out.tokens.len() {
                    break;
                }
            }
        }
    }
    assert!(
        cut > 0 && resumed > 0,
        "{cut} cut rounds, {resumed} resumed"
    );
}

/// Modules quantized at load (beside a quantized backbone) draft as the f32 ones do on most
/// rounds, and greedy decoding with them stays token-identical to plain greedy decoding.
#[test]
fn quantized_modules_draft_like_f32_ones_and_keep_greedy_output() {
    use candle_core::quantized::GgmlDType;
    let dir = tempfile::tempdir().unwrap();
    let (model, mtp) = with_mtp(dir.path(), 2);
    let repo = ModelRepo::open(&dir.path().to_string_lossy()).unwrap();
    let prompts = [
        vec![5u32, 17, 42],
        vec![260, 284, 261, 269, 261, 270],
        vec![9, 33, 7, 101],
    ];
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
        let quantized =
            MtpModules::load(&repo, &model.config, DType::F32, &Device::Cpu, Some(dtype)).unwrap();
        let (mut same, mut rounds) = (0, 0);
        for prompt in &prompts {
            let cfg = GenerationConfig {
                max_new_tokens: 20,
                ..GenerationConfig::default()
            };
            let plain = common::plain_greedy(&model, prompt, &cfg);
            let out = mtp_generate(&model, &quantized, prompt, 20, &[], None).unwrap();
            assert_eq!(out.tokens, plain, "{dtype:?}, prompt {prompt:?}");
            for len in prompt.len()..plain.len() {
                let want = drafts_from_scratch(&model, &mtp, &plain[..len]);
                let got = drafts_from_scratch(&model, &quantized, &plain[..len]);
                same += usize::from(got == want);
                rounds += 1;
            }
        }
        let floor = if dtype == GgmlDType::Q8_0 { 0.9 } else { 0.6 };
        assert!(
            same as f64 >= floor * rounds as f64,
            "{dtype:?}: {same} of {rounds} drafts as the f32 modules'"
        );
    }
}

#[test]
fn sampled_mtp_tokens_stay_in_the_backbones_top_k_and_repeat_per_seed() {
    let dir = tempfile::tempdir().unwrap();
    let (model, mtp) = with_mtp(dir.path(), 2);
    let prompt = vec![5u32, 17, 42];
    let sampling = SamplingOptions {
        temperature: 1.0,
        top_k: 5,
        top_p: 1.0,
        seed: 11,
    };
    let out = mtp_generate(&model, &mtp, &prompt, 30, &[], Some(&sampling)).unwrap();
    assert_eq!(out.new_tokens, 30);
    let ids = Tensor::new(vec![out.tokens.clone()], &Device::Cpu).unwrap();
    let logits = model
        .forward(&ids, &mut KvCache::new())
        .unwrap()
        .logits
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for at in prompt.len()..out.tokens.len() {
        let row = &logits[at - 1];
        let token = out.tokens[at] as usize;
        let higher = row.iter().filter(|&&v| v > row[token]).count();
        assert!(higher < 5, "token {at} is outside the backbone's top 5");
    }
    let again = mtp_generate(&model, &mtp, &prompt, 30, &[], Some(&sampling)).unwrap();
    assert_eq!(again, out);
    let other = SamplingOptions {
        seed: 12,
        ..sampling
    };
    let other = mtp_generate(&model, &mtp, &prompt, 30, &[], Some(&other)).unwrap();
    assert_ne!(other.tokens, out.tokens);
}

#[test]
fn mtp_sampling_near_zero_temperature_is_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let (model, mtp) = with_mtp(dir.path(), 2);
    let sampling = SamplingOptions {
        temperature: 1e-4,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    for prompt in [vec![5u32, 17, 42], vec![9]] {
        let plain = mtp_generate(&model, &mtp, &prompt, 25, &[], None).unwrap();
        let sampled = mtp_generate(&model, &mtp, &prompt, 25, &[], Some(&sampling)).unwrap();
        assert_eq!(sampled.tokens, plain.tokens, "prompt {prompt:?}");
    }
}
