//! HF parity of BLIP on tiny random checkpoints made by `scripts/make_blip_fixtures.py` with
//! transformers 4.57.1: vision tokens, decoder logits and LM loss, `generate` token for token
//! (greedy and 3-beam search, with and without a prompt, length penalties, repetition penalty,
//! cached and uncached), ITM logits and ITC scores; nucleus sampling's determinism; and
//! gradient flow to every parameter of the captioning model.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use zoo_models::blip::{BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval};
use zoo_models::generation::{BeamOptions, GenerationConfig, SamplingOptions, Strategy};
use zoo_models::hub::ModelRepo;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn repo(name: &str) -> ModelRepo {
    ModelRepo::open(fixture(name).to_str().unwrap()).unwrap()
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

fn assert_close(ours: &Tensor, theirs: &Tensor, what: &str) {
    let d = max_abs_diff(ours, theirs);
    eprintln!("{what}: max abs diff {d:e}");
    assert!(d < 1e-4, "{what} differs from HF by {d}");
}

fn captioner() -> BlipForConditionalGeneration {
    BlipForConditionalGeneration::load(&repo("blip-tiny-caption"), Some(DType::F32), &Device::Cpu)
        .unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2().unwrap()
}

#[test]
fn vision_tokens_and_caption_logits_match_hf() {
    let model = captioner();
    let r = reference("blip-tiny-caption");
    let image_embeds = model.vision_model.forward(&r["pixel_values"]).unwrap();
    assert_close(&image_embeds, &r["image_embeds"], "image_embeds");
    let logits = model
        .forward(
            &r["pixel_values"],
            &r["input_ids"],
            Some(&r["attention_mask"]),
        )
        .unwrap();
    // Positions whose query is padding are HF's garbage too, but equal: compare all.
    assert_close(&logits, &r["logits"], "caption logits");
}

#[test]
fn lm_loss_matches_hf_with_and_without_label_smoothing() {
    let model = captioner();
    let r = reference("blip-tiny-caption");
    for (eps, key) in [(0.0, "lm_loss"), (0.1, "lm_loss_smoothed")] {
        let loss = model
            .lm_loss(
                &r["pixel_values"],
                &r["input_ids"],
                &r["attention_mask"],
                eps,
            )
            .unwrap();
        assert_close(&loss.reshape(1).unwrap(), &r[key], key);
    }
}

fn options(max_new_tokens: usize, min_new_tokens: usize, strategy: Strategy) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        min_new_tokens,
        strategy,
        ..captioner().generation_defaults()
    }
}

fn beams(num_beams: usize, length_penalty: f32) -> Strategy {
    Strategy::Beam(BeamOptions {
        num_beams,
        length_penalty,
        ..Default::default()
    })
}

#[test]
fn generation_defaults_stop_at_sep_and_pad_with_pad_id() {
    let cfg = captioner().generation_defaults();
    assert_eq!((cfg.stop_tokens, cfg.pad_token), (vec![102], 0));
    assert_eq!((cfg.max_new_tokens, cfg.strategy), (20, Strategy::Greedy));
}

#[test]
fn greedy_captions_are_token_identical_to_hf_generate() {
    let model = captioner();
    let r = reference("blip-tiny-caption");
    let pv = &r["pixel_values"];
    let out = model
        .generate(pv, None, &options(10, 3, Strategy::Greedy))
        .unwrap();
    assert_eq!(out, rows(&r["generated"]));
    let out = model
        .generate(pv, None, &options(12, 0, Strategy::Greedy))
        .unwrap();
    assert_eq!(out, rows(&r["generated_no_min"]));
}

#[test]
fn prompted_captions_match_hf_including_stop_at_sep_and_padding() {
    let model = captioner();
    let r = reference("blip-tiny-caption");
    let expected = rows(&r["generated_with_prompt"]);
    // The fixture has one row that ends at [SEP] and is then padded.
    assert!(expected[0].contains(&102) && expected[0].ends_with(&[0]));
    let out = model
        .generate(
            &r["pixel_values"],
            Some(&r["prompt_ids"]),
            &options(10, 3, Strategy::Greedy),
        )
        .unwrap();
    assert_eq!(out, expected);
}

#[test]
fn beam_captions_are_token_identical_to_hf_generate_with_and_without_a_prompt() {
    let model = captioner();
    let r = reference("blip-tiny-caption");
    let pv = &r["pixel_values"];
    let cfg = options(10, 2, beams(3, 1.0));
    assert_eq!(model.generate(pv, None, &cfg).unwrap(), rows(&r["beams"]));
    let expected = rows(&r["beams_with_prompt"]);
    // HF fills a beam row that ended early with `pad_token_id or eos_token_id`: 0 is falsy, so
    // [SEP].
    assert!(expected[0].ends_with(&[102, 102]), "{expected:?}");
    assert_eq!(
        model.generate(pv, Some(&r["prompt_ids"]), &cfg).unwrap(),
        expected
    );
}

#[test]
fn beam_length_penalties_match_hf() {
    let model = captioner();
    let r = reference("blip-tiny-caption");
    let pv = &r["pixel_values"];
    let long = model
        .generate(pv, None, &options(14, 0, beams(4, 2.0)))
        .unwrap();
    assert_eq!(long, rows(&r["beams_length_penalty_2"]));
    let short = model
        .generate(pv, None, &options(14, 0, beams(3, -1.0)))
        .unwrap();
    assert_eq!(short, rows(&r["beams_length_penalty_neg"]));
}

#[test]
fn repetition_penalty_matches_hf_for_greedy_and_beams() {
    let model = captioner();
    let r = reference("blip-tiny-caption");
    let pv = &r["pixel_values"];
    let mut cfg = options(12, 0, Strategy::Greedy);
    cfg.repetition_penalty = 1.8;
    assert_eq!(
        model.generate(pv, None, &cfg).unwrap(),
        rows(&r["repetition_penalty"])
    );
    cfg.strategy = beams(3, 1.0);
    assert_eq!(
        model.generate(pv, None, &cfg).unwrap(),
        rows(&r["beams_repetition_penalty"])
    );
}

#[test]
fn cached_and_uncached_decoding_give_identical_tokens() {
    let model = captioner();
    let r = reference("blip-tiny-caption");
    let pv = &r["pixel_values"];
    for prompt in [None, Some(&r["prompt_ids"])] {
        for strategy in [Strategy::Greedy, beams(3, 1.0)] {
            let cfg = options(15, 5, strategy);
            assert_eq!(
                model.generate(pv, prompt, &cfg).unwrap(),
                model.generate_uncached(pv, prompt, &cfg).unwrap()
            );
        }
    }
}

#[test]
fn nucleus_sampling_is_reproducible_per_seed_and_respects_max_new_tokens() {
    let model = captioner();
    let r = reference("blip-tiny-caption");
    let pv = &r["pixel_values"];
    let sample = |seed| {
        let s = Strategy::Sample(SamplingOptions {
            top_p: 0.9,
            temperature: 0.8,
            seed,
            ..Default::default()
        });
        model.generate(pv, None, &options(12, 0, s)).unwrap()
    };
    let a = sample(3);
    assert_eq!(a, sample(3));
    assert!(a.iter().all(|row| row.len() <= 13 && row[0] == 110));
    assert!(
        (4..12).any(|seed| sample(seed) != a),
        "seeds change samples"
    );
    // A tiny nucleus keeps only the most likely token: sampling becomes greedy.
    let greedy = model
        .generate(pv, None, &options(12, 0, Strategy::Greedy))
        .unwrap();
    let narrow = Strategy::Sample(SamplingOptions {
        top_p: 1e-6,
        seed: 9,
        ..Default::default()
    });
    assert_eq!(
        model.generate(pv, None, &options(12, 0, narrow)).unwrap(),
        greedy
    );
}

#[test]
fn cached_decoder_states_equal_full_recomputation() {
    use zoo_models::bert::BertKvCache;
    let model = captioner();
    let r = reference("blip-tiny-caption");
    let image = model.vision_model.forward(&r["pixel_values"]).unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let full = model
        .text_decoder
        .forward(&ids, None, None, Some(&image), None)
        .unwrap();
    // A three-token prefix, then one token per step.
    let mut cache = BertKvCache::new();
    let mut parts = vec![model
        .text_decoder
        .forward_cached(&ids.narrow(1, 0, 3).unwrap(), &mut cache, Some(&image))
        .unwrap()];
    for i in 3..ids.dim(1).unwrap() {
        parts.push(
            model
                .text_decoder
                .forward_cached(&ids.narrow(1, i, 1).unwrap(), &mut cache, Some(&image))
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), ids.dim(1).unwrap());
    let incremental = Tensor::cat(&parts, 1).unwrap();
    let d = max_abs_diff(&incremental, &full);
    assert!(d < 1e-5, "cached states differ by {d}");
}

#[test]
fn itm_logits_and_itc_scores_match_hf() {
    let model =
        BlipForImageTextRetrieval::load(&repo("blip-tiny-itm"), Some(DType::F32), &Device::Cpu)
            .unwrap();
    let r = reference("blip-tiny-itm");
    let image_embeds = model.vision_model.forward(&r["pixel_values"]).unwrap();
    assert_close(&image_embeds, &r["image_embeds"], "image_embeds");
    let mask = Some(&r["attention_mask"]);
    let itm = model
        .itm_score(&r["pixel_values"], &r["input_ids"], mask)
        .unwrap();
    assert_close(&itm, &r["itm_logits"], "ITM logits");
    let itc = model
        .itc_score(&r["pixel_values"], &r["input_ids"], mask)
        .unwrap();
    assert_close(&itc, &r["itc_scores"], "ITC scores");
}

#[test]
fn every_caption_model_parameter_receives_a_gradient_from_the_lm_loss() {
    let dir = fixture("blip-tiny-caption");
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (k, t) in
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
        {
            data.insert(k, Var::from_tensor(&t).unwrap());
        }
    }
    let cfg = BlipConfig::from_file(&dir.join("config.json")).unwrap();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = BlipForConditionalGeneration::new(&cfg, vb).unwrap();
    let r = reference("blip-tiny-caption");
    let loss = model
        .lm_loss(
            &r["pixel_values"],
            &r["input_ids"],
            &r["attention_mask"],
            0.1,
        )
        .unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    // The LM head is tied to the word embeddings: no separate decoder weight was created.
    assert!(!data.contains_key("text_decoder.cls.predictions.decoder.weight"));
    let mut missing: Vec<_> = data
        .iter()
        .filter(|(_, var)| {
            !grads
                .get(var.as_tensor())
                .map(|g| {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0
                })
                .unwrap_or(false)
        })
        .map(|(name, _)| name.clone())
        .collect();
    missing.sort();
    assert!(missing.is_empty(), "no gradient reached {missing:?}");
    assert_eq!(data.len(), 91, "every checkpoint tensor is a parameter");
}
