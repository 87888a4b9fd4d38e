//! Medusa: tree buffers equal to FasterDecoding's `generate_medusa_buffers` for `mc_sim_7b_63`
//! (`scripts/make_medusa_fixtures.py`); heads loaded from safetensors and from a `.pt` pickle
//! alike; greedy tree decoding token-identical to plain greedy decoding with random heads;
//! typical acceptance that keeps only tokens above its threshold; and a clear error for a tree
//! deeper than the heads.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use zoo_models::generation::GenerationConfig;
use zoo_models::hub::ModelRepo;
use zoo_models::llm::{
    medusa_generate, KvCache, LlamaForCausalLM, MedusaHeads, MedusaTree, TypicalAcceptance,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn llama() -> LlamaForCausalLM {
    let repo = ModelRepo::open(&fixtures().join("llama-tiny").to_string_lossy()).unwrap();
    LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap()
}

fn heads(dir: &str) -> MedusaHeads {
    MedusaHeads::load(&fixtures().join(dir), 64, 320, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn mc_sim_7b_63_buffers_equal_fasterdecodings() {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("medusa_buffers.json")).unwrap(),
    )
    .unwrap();
    let tree = MedusaTree::mc_sim_7b_63();
    let from_fixture: Vec<Vec<usize>> = serde_json::from_value(r["choices"].clone()).unwrap();
    assert_eq!(MedusaTree::new(&from_fixture).unwrap(), tree);

    let mask: Vec<Vec<bool>> = tree.visible.iter().map(|row| row.to_vec()).collect();
    let want_mask: Vec<Vec<bool>> = r["medusa_attn_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v == 1).collect())
        .collect();
    assert_eq!(mask, want_mask);
    let as_vec = |v: &Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let to_i64 = |v: &[usize]| -> Vec<i64> { v.iter().map(|&x| x as i64).collect() };
    assert_eq!(to_i64(&tree.tree_indices), as_vec(&r["tree_indices"]));
    assert_eq!(
        to_i64(&tree.position_ids),
        as_vec(&r["medusa_position_ids"])
    );
    let width = tree.paths.iter().map(Vec::len).max().unwrap();
    let padded: Vec<Vec<i64>> = tree
        .paths
        .iter()
        .map(|p| {
            let mut row = to_i64(p);
            row.resize(width, -1);
            row
        })
        .collect();
    let want: Vec<Vec<i64>> = r["retrieve_indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(as_vec)
        .collect();
    assert_eq!(padded, want);
    assert_eq!((tree.len(), tree.depth(), tree.paths.len()), (64, 4, 42));
}

#[test]
fn heads_load_alike_from_safetensors_and_a_torch_pickle() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("llama-tiny-medusa");
    for f in ["config.json", "medusa_lm_head.pt"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let from_pt = MedusaHeads::load(dir.path(), 64, 320, DType::F32, &Device::Cpu).unwrap();
    let from_st = heads("llama-tiny-medusa");
    let model = llama();
    let x = Tensor::randn(0f32, 1.0, (2, 64), &Device::Cpu).unwrap();
    let a = from_st.forward(&x, model.lm_head()).unwrap();
    let b = from_pt.forward(&x, model.lm_head()).unwrap();
    assert_eq!(a.len(), 4);
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn greedy_medusa_decoding_is_token_identical_to_plain_greedy() {
    let model = llama();
    let heads = heads("llama-tiny-medusa");
    let tree = MedusaTree::mc_sim_7b_63();
    let small = MedusaTree::new(&[vec![0], vec![1], vec![0, 0], vec![0, 1]]).unwrap();
    for prompt in [
        vec![5u32, 17, 42],
        vec![260, 284, 261, 269, 261, 270],
        vec![9],
    ] {
        let cfg = GenerationConfig {
            max_new_tokens: 40,
            ..GenerationConfig::default()
        };
        let plain = common::plain_greedy(&model, &prompt, &cfg);
        for tree in [&tree, &small] {
            let out = medusa_generate(&model, &heads, tree, &prompt, 40, &[], None).unwrap();
            assert_eq!(out.tokens, plain, "prompt {prompt:?}");
            assert_eq!(out.new_tokens, 40);
            assert!(out.steps >= 1 && out.steps <= 40);
            assert!(out.mean_accepted() >= 1.0);
        }
    }
}

#[test]
fn generation_stops_at_a_stop_token_as_plain_greedy_does() {
    let model = llama();
    let heads = heads("llama-tiny-medusa");
    let prompt = vec![5u32, 17, 42];
    let plain = common::plain_greedy(&model, &prompt, &GenerationConfig::default());
    // Stop at the fifth generated token.
    let stop = plain[prompt.len() + 4];
    let first = plain[prompt.len()..]
        .iter()
        .position(|&t| t == stop)
        .unwrap();
    let out = medusa_generate(
        &model,
        &heads,
        &MedusaTree::mc_sim_7b_63(),
        &prompt,
        20,
        &[stop],
        None,
    )
    .unwrap();
    assert_eq!(out.tokens, plain[..prompt.len() + first + 1]);
}

#[test]
fn a_tree_deeper_than_the_heads_is_refused() {
    let model = llama();
    let heads = heads("llama-tiny-medusa");
    let deep: Vec<Vec<usize>> = (1..=5).map(|d| vec![0; d]).collect();
    let tree = MedusaTree::new(&deep).unwrap();
    let err = medusa_generate(&model, &heads, &tree, &[5, 6], 4, &[], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("5 deep") && err.contains("4 heads"), "{err}");
    let err = MedusaTree::new(&[vec![0, 1]]).unwrap_err();
    assert!(err.contains("lacks its prefix [0]"), "{err}");
}

/// Each position's next-token logits for `tokens`, from one uncached forward pass.
fn full_logits(model: &LlamaForCausalLM, tokens: &[u32]) -> Vec<Vec<f32>> {
    let ids = Tensor::new(vec![tokens.to_vec()], &Device::Cpu).unwrap();
    model
        .forward(&ids, &mut KvCache::new())
        .unwrap()
        .logits
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

#[test]
fn typical_acceptance_keeps_only_tokens_above_the_threshold() {
    let model = llama();
    let heads = heads("llama-tiny-medusa");
    let tree = MedusaTree::mc_sim_7b_63();
    let typical = TypicalAcceptance {
        temperature: 1.0,
        seed: 3,
        ..Default::default()
    };
    let prompt = vec![5u32, 17, 42];
    let out = medusa_generate(&model, &heads, &tree, &prompt, 40, &[], Some(&typical)).unwrap();
    assert_eq!(out.new_tokens, 40);
    // The random model is nearly uniform, so the threshold is low and drafts pass.
    assert!(
        out.accepted.iter().sum::<usize>() > 0,
        "no draft was accepted: {:?}",
        out.accepted
    );
    // Walk the steps: each adds its accepted drafts, then the base model's own (typically
    // sampled) token; every one must clear the threshold of the distribution it follows.
    let logits = full_logits(&model, &out.tokens);
    let mut at = prompt.len();
    for (step, &accepted) in out.accepted.iter().enumerate() {
        for k in 0..=accepted {
            if at == out.tokens.len() {
                break;
            }
            let probs = typical.probs(&logits[at - 1]);
            let threshold = typical.threshold(&probs);
            let p = probs[out.tokens[at] as usize];
            if k == accepted {
                let best = probs.iter().copied().fold(0.0, f32::max);
                assert!(
                    p >= threshold || p == best,
                    "step {step}: the base model's token {p} < {threshold}"
                );
            } else {
                assert!(p > threshold, "step {step}, draft {k}: {p} <= {threshold}");
                assert_eq!(out.tokens[at], out.drafts[step][k]);
            }
            at += 1;
        }
    }
    assert_eq!(at, out.tokens.len());
    // Reproducible per seed; another seed samples other text.
    let again = medusa_generate(&model, &heads, &tree, &prompt, 40, &[], Some(&typical)).unwrap();
    assert_eq!(again, out);
    let other = TypicalAcceptance { seed: 4, ..typical };
    let other = medusa_generate(&model, &heads, &tree, &prompt, 40, &[], Some(&other)).unwrap();
    assert_ne!(other.tokens, out.tokens);
}

#[test]
fn typical_acceptance_near_zero_temperature_is_greedy() {
    let model = llama();
    let heads = heads("llama-tiny-medusa");
    let tree = MedusaTree::mc_sim_7b_63();
    let typical = TypicalAcceptance {
        temperature: 1e-4,
        ..Default::default()
    };
    for prompt in [vec![5u32, 17, 42], vec![9]] {
        let cfg = GenerationConfig {
            max_new_tokens: 30,
            ..GenerationConfig::default()
        };
        let plain = common::plain_greedy(&model, &prompt, &cfg);
        let out = medusa_generate(&model, &heads, &tree, &prompt, 30, &[], Some(&typical)).unwrap();
        assert_eq!(out.tokens, plain, "prompt {prompt:?}");
    }
}
