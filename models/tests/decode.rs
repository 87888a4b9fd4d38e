//! The one decoding loop (`llm::decode`): every drafter (none, Medusa trees, MTP chains, and
//! oracle drafters that are partly right, as trees and as chains) with every processor
//! (repetition penalty, minimum length with stop tokens) gives plain greedy decoding's tokens,
//! also when the drafters draw from a restricted vocabulary (FR-Spec);
//! plain sampling through the loop is plain sampling with the same seed; the caller can stop
//! it after any token.

mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{DType, Device, Result};
use candle_nn::{VarBuilder, VarMap};
use zoo_models::generation::{GenerationConfig, SamplingOptions, Strategy};
use zoo_models::hub::ModelRepo;
use zoo_models::llm::{
    decode, Acceptance, DraftContext, DraftTree, Drafter, LlamaForCausalLM, MedusaDrafter,
    MedusaHeads, MedusaTree, MtpDraft, MtpDrafter, MtpModules, NoDrafts, SpeculativeOutput,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn llama() -> LlamaForCausalLM {
    let repo = ModelRepo::open(&fixtures().join("llama-tiny").to_string_lossy()).unwrap();
    LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap()
}

/// The fixture's Medusa heads for llama-tiny.
fn medusa_heads() -> MedusaHeads {
    MedusaHeads::load(
        &fixtures().join("llama-tiny-medusa"),
        64,
        320,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn run(
    model: &LlamaForCausalLM,
    drafter: &mut dyn Drafter,
    prompt: &[u32],
    cfg: &GenerationConfig,
    rule: &Acceptance,
) -> SpeculativeOutput {
    decode(model, drafter, prompt, cfg, rule, &mut |_| {
        Ok(ControlFlow::Continue(()))
    })
    .unwrap()
}

/// Drafts from a known answer, partly wrong: as a tree, the root's children are a wrong token
/// and the right one, whose chain goes on right, then forks into a wrong and a right token,
/// and one more right one; as a chain, three right tokens and then a wrong one.
struct Oracle {
    answer: Vec<u32>,
    vocab: u32,
    chain: bool,
}

impl Oracle {
    fn right(&self, at: usize) -> u32 {
        self.answer.get(at).copied().unwrap_or(1)
    }

    fn wrong(&self, at: usize) -> u32 {
        (self.right(at) + 1) % self.vocab
    }
}

impl Drafter for Oracle {
    fn draft(&mut self, ctx: DraftContext<'_>) -> Result<DraftTree> {
        let m = ctx.tokens.len();
        let mut tree = DraftTree::root(ctx.tokens[m - 1]);
        if self.chain {
            let a = tree.push(0, self.right(m), None);
            let b = tree.push(a, self.right(m + 1), None);
            let c = tree.push(b, self.right(m + 2), None);
            tree.push(c, self.wrong(m + 3), None);
        } else {
            tree.push(0, self.wrong(m), None);
            let a = tree.push(0, self.right(m), None);
            let b = tree.push(a, self.right(m + 1), None);
            tree.push(b, self.wrong(m + 2), None);
            let c = tree.push(b, self.right(m + 2), None);
            tree.push(c, self.right(m + 3), None);
        }
        Ok(tree)
    }
}

/// The settings to check: plain, repetition penalty, minimum length against a stop token that
/// greedy decoding meets early, and both.
fn settings(model: &LlamaForCausalLM, prompt: &[u32]) -> Vec<GenerationConfig> {
    let plain = GenerationConfig {
        max_new_tokens: 30,
        ..GenerationConfig::default()
    };
    let early = common::plain_greedy(model, prompt, &plain)[prompt.len() + 2];
    vec![
        plain.clone(),
        GenerationConfig {
            repetition_penalty: 1.5,
            ..plain.clone()
        },
        GenerationConfig {
            stop_tokens: vec![early],
            min_new_tokens: 12,
            ..plain.clone()
        },
        GenerationConfig {
            stop_tokens: vec![early],
            min_new_tokens: 8,
            repetition_penalty: 1.3,
            ..plain
        },
    ]
}

#[test]
fn every_drafter_with_every_processor_decodes_as_plain_greedy() {
    let model = llama();
    let vocab = model.config.vocab_size as u32;
    let heads = medusa_heads();
    let full = MedusaTree::mc_sim_7b_63();
    let small = MedusaTree::new(&[vec![0], vec![1], vec![0, 0], vec![0, 1]]).unwrap();
    let varmap = VarMap::new();
    let mtp = MtpModules::new(
        &model.config,
        2,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    // FR-Spec draft vocabularies: the first 100 of the 320 tokens.
    let heads_vocab = medusa_heads()
        .with_draft_vocab(model.lm_head(), 100)
        .unwrap();
    let mtp_vocab = mtp.clone().with_draft_vocab(model.lm_head(), 100).unwrap();
    for prompt in [
        vec![5u32, 17, 42],
        vec![260, 284, 261, 269, 261, 270],
        vec![9],
    ] {
        for (c, cfg) in settings(&model, &prompt).into_iter().enumerate() {
            let want = common::plain_greedy(&model, &prompt, &cfg);
            let mut drafters: Vec<(&str, Box<dyn Drafter>)> = vec![
                ("none", Box::new(NoDrafts)),
                (
                    "medusa",
                    Box::new(MedusaDrafter::new(&heads, &full).unwrap()),
                ),
                (
                    "medusa-small",
                    Box::new(MedusaDrafter::new(&heads, &small).unwrap()),
                ),
                ("mtp", Box::new(MtpDrafter::new(&mtp))),
                (
                    "medusa, draft vocabulary",
                    Box::new(MedusaDrafter::new(&heads_vocab, &small).unwrap()),
                ),
                (
                    "mtp-tree, draft vocabulary",
                    Box::new(MtpDrafter::with_shape(
                        &mtp_vocab,
                        MtpDraft::Tree {
                            top_k: 3,
                            max_nodes: 6,
                        },
                    )),
                ),
                (
                    "mtp-tree",
                    Box::new(MtpDrafter::with_shape(
                        &mtp,
                        MtpDraft::Tree {
                            top_k: 3,
                            max_nodes: 6,
                        },
                    )),
                ),
            ];
            for chain in [false, true] {
                let oracle = Oracle {
                    answer: want.clone(),
                    vocab,
                    chain,
                };
                drafters.push((
                    if chain { "oracle-chain" } else { "oracle-tree" },
                    Box::new(oracle),
                ));
            }
            for (name, drafter) in &mut drafters {
                let out = run(&model, drafter.as_mut(), &prompt, &cfg, &Acceptance::Greedy);
                assert_eq!(out.tokens, want, "{name}, setting {c}, prompt {prompt:?}");
                assert_eq!(out.new_tokens, want.len() - prompt.len());
                assert_eq!(out.accepted.len(), out.steps);
                if name.starts_with("oracle") && want.len() > prompt.len() + 4 {
                    // The right drafts are taken: fewer forward passes than tokens.
                    assert!(
                        out.steps < out.new_tokens && out.accepted.iter().any(|&a| a >= 2),
                        "{name}, setting {c}: {:?}",
                        out.accepted
                    );
                }
                if *name == "none" {
                    assert_eq!(out.steps, out.new_tokens);
                }
            }
        }
    }
}

#[test]
fn plain_sampling_through_the_loop_is_plain_sampling() {
    let model = llama();
    let prompt = vec![5u32, 17, 42];
    for (penalty, seed) in [(1.0, 3), (1.2, 4)] {
        let s = SamplingOptions {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.95,
            seed,
        };
        let cfg = GenerationConfig {
            max_new_tokens: 24,
            repetition_penalty: penalty,
            strategy: Strategy::Sample(s),
            ..GenerationConfig::default()
        };
        let want = common::plain_greedy(&model, &prompt, &cfg);
        let rule = Acceptance::of(&cfg).unwrap();
        let out = run(&model, &mut NoDrafts, &prompt, &cfg, &rule);
        assert_eq!(out.tokens, want, "penalty {penalty}");
    }
}

#[test]
fn sampled_drafts_are_reproducible_per_seed_and_keep_the_length() {
    let model = llama();
    let heads = medusa_heads();
    let tree = MedusaTree::mc_sim_7b_63();
    let prompt = vec![5u32, 17, 42];
    let cfg = |seed| GenerationConfig {
        max_new_tokens: 20,
        min_new_tokens: 20,
        stop_tokens: vec![2],
        repetition_penalty: 1.2,
        strategy: Strategy::Sample(SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed,
        }),
        ..GenerationConfig::default()
    };
    let sample = |seed| {
        let cfg = cfg(seed);
        let rule = Acceptance::of(&cfg).unwrap();
        let mut drafter = MedusaDrafter::new(&heads, &tree).unwrap();
        run(&model, &mut drafter, &prompt, &cfg, &rule)
    };
    let first = sample(3);
    assert_eq!(first.new_tokens, 20);
    assert!(
        !first.tokens[prompt.len()..].contains(&2),
        "a stop token before the minimum"
    );
    assert_eq!(first, sample(3));
    assert_ne!(first.tokens, sample(4).tokens);
}

#[test]
fn the_caller_stops_the_loop_after_any_token() {
    let model = llama();
    let prompt = vec![5u32, 17, 42];
    let cfg = GenerationConfig {
        max_new_tokens: 30,
        ..GenerationConfig::default()
    };
    let want = common::plain_greedy(&model, &prompt, &cfg);
    for stop_after in [1, 2, 5] {
        let mut oracle = Oracle {
            answer: want.clone(),
            vocab: model.config.vocab_size as u32,
            chain: false,
        };
        let mut seen = Vec::new();
        let out = decode(
            &model,
            &mut oracle,
            &prompt,
            &cfg,
            &Acceptance::Greedy,
            &mut |t| {
                seen.push(t);
                Ok(if seen.len() == stop_after {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                })
            },
        )
        .unwrap();
        assert_eq!(out.new_tokens, stop_after);
        assert_eq!(out.tokens, want[..prompt.len() + stop_after]);
        assert_eq!(seen, want[prompt.len()..prompt.len() + stop_after]);
    }
}

#[test]
fn a_tree_not_rooted_at_the_last_token_and_beam_search_are_refused() {
    struct Lost;
    impl Drafter for Lost {
        fn draft(&mut self, ctx: DraftContext<'_>) -> Result<DraftTree> {
            Ok(DraftTree::root(ctx.tokens[0] + 1))
        }
    }
    let model = llama();
    let cfg = GenerationConfig::default();
    let err = decode(
        &model,
        &mut Lost,
        &[5, 6],
        &cfg,
        &Acceptance::Greedy,
        &mut |_| Ok(ControlFlow::Continue(())),
    )
    .unwrap_err();
    assert!(err.to_string().contains("rooted"), "{err}");
    let beam = GenerationConfig {
        strategy: Strategy::Beam(zoo_models::generation::BeamOptions {
            num_beams: 3,
            ..Default::default()
        }),
        ..GenerationConfig::default()
    };
    assert!(Acceptance::of(&beam)
        .unwrap_err()
        .to_string()
        .contains("beam"));
}

/// A draft vocabulary scores its first `n` tokens as `lm_head` does and hides the rest; the
/// heads draft only from it.
#[test]
fn a_draft_vocabulary_keeps_the_first_tokens_scores_and_hides_the_rest() {
    use candle_core::{Module, Tensor};
    use zoo_models::llm::DraftVocab;
    let model = llama();
    let hidden = Tensor::randn(0f32, 1.0, (2, 3, 64), &Device::Cpu).unwrap();
    let full = model.lm_head().forward(&hidden).unwrap();
    let vocab = DraftVocab::new(model.lm_head(), 100).unwrap();
    assert_eq!(vocab.tokens().unwrap(), 100);
    let restricted = vocab.forward(&hidden).unwrap();
    assert_eq!(restricted.dims(), full.dims());
    let kept = |t: &Tensor| {
        t.narrow(2, 0, 100)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    for (a, b) in kept(&restricted).iter().zip(kept(&full)) {
        assert!((a - b).abs() < 1e-5, "{a} against {b}");
    }
    let rest = restricted
        .narrow(2, 100, 220)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(rest.iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(DraftVocab::new(model.lm_head(), 0).is_err());
    assert!(DraftVocab::new(model.lm_head(), 321).is_err());

    let heads = medusa_heads()
        .with_draft_vocab(model.lm_head(), 100)
        .unwrap();
    let last = hidden.narrow(0, 0, 1).unwrap().narrow(1, 2, 1).unwrap();
    for logits in heads.forward(&last, model.lm_head()).unwrap() {
        let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values.len(), 320);
        assert!(values[100..].iter().all(|&x| x == f32::NEG_INFINITY));
        assert!(values[..100].iter().all(|x| x.is_finite()));
    }
}
