//! HF parity of the BERT encoder: tiny random `BertModel`s (an encoder with pooler, and a
//! decoder with cross-attention) made by `scripts/make_bert_fixtures.py` with transformers
//! 4.57.1, the real all-MiniLM-L6-v2 when `ZOO_MINILM_DIR` points at it, and gradient flow to
//! every parameter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use zoo_models::bert::{mean_pool, BertConfig, BertModel};
use zoo_models::contrastive::l2_normalize;
use zoo_models::hub::ModelRepo;
use zoo_models::weights::SafetensorsWeights;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
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

/// Loads a checkpoint folder the way users do: config, weight files, mmapped safetensors.
fn load(dir: &Path, with_pooler: bool) -> BertModel {
    let repo = ModelRepo::open(dir.to_str().unwrap()).unwrap();
    let cfg = BertConfig::from_file(&repo.get("config.json").unwrap()).unwrap();
    let vb = SafetensorsWeights::open(&repo.weight_files().unwrap())
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    BertModel::new(&cfg, vb, with_pooler).unwrap()
}

/// Runs HF's inputs from the fixture's reference through `model`.
fn run(model: &BertModel, r: &HashMap<String, Tensor>) -> Tensor {
    model
        .forward(
            &r["input_ids"],
            r.get("token_type_ids"),
            Some(&r["attention_mask"]),
            r.get("encoder_hidden_states"),
            r.get("encoder_attention_mask"),
        )
        .unwrap()
}

fn check(name: &str, ours: &Tensor, theirs: &Tensor, what: &str) {
    let d = max_abs_diff(ours, theirs);
    println!("{name}: {what} max abs diff {d:e}");
    assert!(d < 1e-4, "{name}: {what} differs from HF by {d}");
}

#[test]
fn bert_encoder_with_segments_and_padding_matches_hf() {
    let model = load(&fixture("bert-tiny"), true);
    assert!(!model.config.is_decoder);
    let r = load_tensors(&fixture("bert-tiny").join("reference.safetensors"));
    let hidden = run(&model, &r);
    check(
        "bert-tiny",
        &hidden,
        &r["last_hidden_state"],
        "last_hidden_state",
    );
    let pooled = mean_pool(&hidden, &r["attention_mask"]).unwrap();
    check("bert-tiny", &pooled, &r["mean_pooled"], "mean-pooled");
    let pooler = model.pooler().unwrap().forward(&hidden).unwrap();
    check("bert-tiny", &pooler, &r["pooler_output"], "pooler_output");
}

#[test]
fn bert_causal_decoder_with_cross_attention_matches_hf() {
    let model = load(&fixture("bert-tiny-cross"), false);
    assert!(model.config.is_decoder && model.config.add_cross_attention);
    assert!(model.pooler().is_none());
    let r = load_tensors(&fixture("bert-tiny-cross").join("reference.safetensors"));
    assert!(!r.contains_key("token_type_ids"), "HF defaulted them here");
    let hidden = run(&model, &r);
    check(
        "bert-tiny-cross",
        &hidden,
        &r["last_hidden_state"],
        "last_hidden_state",
    );
    let pooled = mean_pool(&hidden, &r["attention_mask"]).unwrap();
    check("bert-tiny-cross", &pooled, &r["mean_pooled"], "mean-pooled");
}

/// A decoder's state at position `t` must not depend on later tokens.
#[test]
fn bert_decoder_states_do_not_see_later_tokens() {
    let model = load(&fixture("bert-tiny-cross"), false);
    let r = load_tensors(&fixture("bert-tiny-cross").join("reference.safetensors"));
    let ids = r["input_ids"].narrow(0, 0, 1).unwrap();
    let enc = r["encoder_hidden_states"].narrow(0, 0, 1).unwrap();
    let full = model.forward(&ids, None, None, Some(&enc), None).unwrap();
    let prefix = ids.narrow(1, 0, 4).unwrap();
    let short = model
        .forward(&prefix, None, None, Some(&enc), None)
        .unwrap();
    let d = max_abs_diff(&full.narrow(1, 0, 4).unwrap(), &short);
    assert!(
        d < 1e-5,
        "prefix states changed by {d} when tokens were appended"
    );
}

/// Builds a model whose every weight is a `Var` initialised from the fixture checkpoint.
fn trainable(name: &str, with_pooler: bool) -> (BertModel, VarMap) {
    let dir = fixture(name);
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (k, t) in load_tensors(&dir.join("model.safetensors")) {
            data.insert(k, Var::from_tensor(&t).unwrap());
        }
    }
    let cfg = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    (BertModel::new(&cfg, vb, with_pooler).unwrap(), varmap)
}

/// `Σ x · sin(i)` over the elements of `x`: distinct weights per feature, since a uniform sum of
/// LayerNorm outputs is constant and would give zero gradients.
fn probe(x: &Tensor) -> Tensor {
    let n = x.elem_count();
    let w = Tensor::arange(0f32, n as f32, &Device::Cpu)
        .unwrap()
        .sin()
        .unwrap()
        .reshape(x.shape())
        .unwrap();
    (x * w).unwrap().sum_all().unwrap()
}

fn assert_every_parameter_gets_gradient(name: &str, with_pooler: bool) {
    let (model, varmap) = trainable(name, with_pooler);
    let r = load_tensors(&fixture(name).join("reference.safetensors"));
    let hidden = run(&model, &r);
    let mut loss =
        (probe(&hidden) + probe(&mean_pool(&hidden, &r["attention_mask"]).unwrap())).unwrap();
    if let Some(pooler) = model.pooler() {
        loss = (loss + probe(&pooler.forward(&hidden).unwrap())).unwrap();
    }
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut missing: Vec<&String> = data
        .iter()
        .filter(|(_, var)| {
            grads.get(var.as_tensor()).is_none_or(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            })
        })
        .map(|(k, _)| k)
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{name}: no gradient reached {missing:?}"
    );
    // A misspelt path would have added a freshly initialised variable to the map.
    let stored = load_tensors(&fixture(name).join("model.safetensors")).len();
    assert_eq!(
        data.len(),
        stored,
        "{name}: the model created variables of its own"
    );
}

#[test]
fn every_bert_parameter_receives_a_gradient() {
    // Embeddings (with token types), both layers' attention and feed-forward, and the pooler.
    assert_every_parameter_gets_gradient("bert-tiny", true);
    // The decoder adds every layer's cross-attention.
    assert_every_parameter_gets_gradient("bert-tiny-cross", false);
}

#[test]
fn minilm_sentence_embeddings_match_hf() {
    let Some(dir) = std::env::var_os("ZOO_MINILM_DIR") else {
        println!(
            "skipping minilm_sentence_embeddings_match_hf: set ZOO_MINILM_DIR to a folder holding \
             sentence-transformers/all-MiniLM-L6-v2 (config.json, model.safetensors)"
        );
        return;
    };
    let model = load(Path::new(&dir), false);
    let r = load_tensors(&fixture("minilm_reference.safetensors"));
    let hidden = run(&model, &r);
    let embeddings = l2_normalize(&mean_pool(&hidden, &r["attention_mask"]).unwrap()).unwrap();
    check(
        "all-MiniLM-L6-v2",
        &embeddings,
        &r["sentence_embeddings"],
        "sentence embeddings",
    );
}
