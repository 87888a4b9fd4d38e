//! The Llama backbone against HF transformers 4.57.1 (`scripts/make_llm_fixtures.py`): RoPE
//! frequencies of every `rope_scaling` type, hidden states and logits of tiny random
//! `LlamaForCausalLM` (grouped-query attention, llama3 RoPE, untied) and `Qwen2ForCausalLM`
//! (q/k/v biases, tied, linear RoPE) within 1e-4, greedy generation token-identical to HF
//! `generate`, and the KV cache: incremental, rolled back and compacted to a tree branch, each
//! equal to recomputation.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use zoo_models::generation::{generate, GenerationConfig};
use zoo_models::hub::ModelRepo;
use zoo_models::llm::{KvCache, LlamaConfig, LlamaForCausalLM, LlamaStep};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn load(name: &str) -> (LlamaForCausalLM, std::collections::HashMap<String, Tensor>) {
    let dir = fixtures().join(name);
    let repo = ModelRepo::open(&dir.to_string_lossy()).unwrap();
    let model = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    (model, reference)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

#[test]
fn rope_frequencies_of_every_scaling_type_match_hf() {
    let r =
        candle_core::safetensors::load(fixtures().join("rope_scaling.safetensors"), &Device::Cpu)
            .unwrap();
    let config = |scaling: &str| -> LlamaConfig {
        serde_json::from_str(&format!(
            r#"{{"vocab_size": 8, "hidden_size": 64, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 16,
                "max_position_embeddings": 64, "rope_theta": 10000.0, "rope_scaling": {scaling}}}"#
        ))
        .unwrap()
    };
    let cases = [
        ("default", "null"),
        ("linear", r#"{"rope_type": "linear", "factor": 4.0}"#),
        ("dynamic", r#"{"type": "dynamic", "factor": 2.0}"#),
        (
            "llama3",
            r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}"#,
        ),
        (
            "yarn",
            r#"{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}"#,
        ),
        (
            "yarn_mscale",
            r#"{"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0,
                "mscale": 0.707, "mscale_all_dim": 1.0}"#,
        ),
    ];
    let mut checked = 0;
    for (key, scaling) in cases {
        let rope = config(scaling).rope().unwrap();
        let lengths: &[Option<usize>] = if key == "dynamic" {
            &[None, Some(40), Some(64), Some(100), Some(300)]
        } else {
            &[None]
        };
        for len in lengths {
            let name = match len {
                None => key.to_string(),
                Some(l) => format!("{key}_{l}"),
            };
            let (inv_freq, factor) = rope.frequencies(len.unwrap_or(64));
            let want = r[&format!("{name}.inv_freq")].to_vec1::<f32>().unwrap();
            assert_eq!(inv_freq.len(), want.len(), "{name}");
            for (i, (a, b)) in inv_freq.iter().zip(&want).enumerate() {
                assert!(
                    ((a - b) / b).abs() < 1e-6,
                    "{name}: inv_freq[{i}] {a} vs HF {b}"
                );
            }
            let hf_factor = r[&format!("{name}.attention_factor")]
                .to_vec1::<f32>()
                .unwrap()[0];
            assert!(
                (factor as f32 - hf_factor).abs() < 1e-6,
                "{name}: attention factor {factor} vs HF {hf_factor}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 10);
}

#[test]
fn hidden_states_and_logits_match_hf() {
    for name in ["llama-tiny", "qwen2-tiny"] {
        let (model, r) = load(name);
        let out = model
            .forward(&ids(&r["input_ids"]), &mut KvCache::new())
            .unwrap();
        let h = max_abs_diff(&out.hidden, &r["last_hidden_state"]);
        let l = max_abs_diff(&out.logits, &r["logits"]);
        assert!(h < 1e-4 && l < 1e-4, "{name}: hidden {h}, logits {l}");
    }
}

#[test]
fn greedy_generation_is_token_identical_to_hf_generate() {
    for name in ["llama-tiny", "qwen2-tiny"] {
        let (model, r) = load(name);
        let prompt = ids(&r["prompt"]).to_vec2::<u32>().unwrap();
        let cfg = GenerationConfig {
            max_new_tokens: 20,
            ..GenerationConfig::default()
        };
        let mut step = LlamaStep {
            model: &model,
            cache: KvCache::new(),
        };
        let ours = generate(&mut step, prompt, &cfg).unwrap();
        let hf = ids(&r["generated"]).to_vec2::<u32>().unwrap();
        assert_eq!(ours, hf, "{name}");
    }
}

#[test]
fn the_cache_gives_the_logits_of_full_recomputation() {
    let (model, r) = load("llama-tiny");
    let input = ids(&r["input_ids"]).narrow(0, 0, 1).unwrap();
    let full = model.forward(&input, &mut KvCache::new()).unwrap().logits;

    // Six tokens, then one at a time.
    let mut cache = KvCache::new();
    let mut parts = vec![
        model
            .forward(&input.narrow(1, 0, 6).unwrap(), &mut cache)
            .unwrap()
            .logits,
    ];
    for i in 6..12 {
        parts.push(
            model
                .forward(&input.narrow(1, i, 1).unwrap(), &mut cache)
                .unwrap()
                .logits,
        );
    }
    let incremental = Tensor::cat(&parts, 1).unwrap();
    assert!(max_abs_diff(&incremental, &full) < 1e-5);

    // Rolled back to 8 tokens, the last four again.
    cache.truncate(8).unwrap();
    assert_eq!(cache.len(), 8);
    let again = model
        .forward(&input.narrow(1, 8, 4).unwrap(), &mut cache)
        .unwrap()
        .logits;
    assert!(max_abs_diff(&again, &full.narrow(1, 8, 4).unwrap()) < 1e-5);
}

#[test]
fn a_tree_of_siblings_verified_at_once_compacts_to_the_chosen_branch() {
    let (model, r) = load("llama-tiny");
    let input = ids(&r["input_ids"]).narrow(0, 0, 1).unwrap();
    let prompt = input.narrow(1, 0, 5).unwrap();
    let (a, b, c) = (
        input.narrow(1, 5, 1).unwrap(),
        input.narrow(1, 6, 1).unwrap(),
        input.narrow(1, 7, 1).unwrap(),
    );
    // Reference: the prompt followed by b, then c.
    let mut reference = KvCache::new();
    model.forward(&prompt, &mut reference).unwrap();
    let want_b = model.forward(&b, &mut reference).unwrap().logits;
    let want_c = model.forward(&c, &mut reference).unwrap().logits;

    // The prompt, then siblings a and b both at position 5, each seeing only the prompt and
    // itself; keep b's entry and continue with c.
    let mut cache = KvCache::new();
    model.forward(&prompt, &mut cache).unwrap();
    let siblings = Tensor::cat(&[&a, &b], 1).unwrap();
    let mask = LlamaForCausalLM::tree_mask(5, &[vec![true, false], vec![false, true]]).unwrap();
    let out = model
        .forward_at(&siblings, &[5, 5], &mask, &mut cache)
        .unwrap();
    assert!(max_abs_diff(&out.logits.narrow(1, 1, 1).unwrap(), &want_b) < 1e-5);
    cache.keep(5, &[6]).unwrap();
    assert_eq!(cache.len(), 6);
    let got_c = model.forward(&c, &mut cache).unwrap().logits;
    assert!(max_abs_diff(&got_c, &want_c) < 1e-5);
}
