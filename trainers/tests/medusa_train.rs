//! Medusa-2 and self-distillation on the tiny Llama fixture: the heads-only warm-up leaves the
//! backbone untouched and joint training then moves it, with a gradient into every parameter;
//! the heads' learning rate is the multiple asked for; the saved folder is both the model and
//! its heads; self-distilled sequences are the backbone's own greedy continuations, and the KL
//! loss starts at zero because the student starts as its teacher; chat self-distillation's
//! conversations are each prompt's rendered chat and the backbone's own greedy reply, and
//! heads sharing the backbone's `lm_head` train, save and load without a projection of their
//! own. `--epochs` counts passes over the packed sequences.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use zoo_models::generation::{generate, GenerationConfig};
use zoo_models::hub::ModelRepo;
use zoo_models::llm::{
    medusa_generate, HeadAccuracy, KvCache, LlamaForCausalLM, LlamaStep, MedusaHeads, MedusaTree,
};
use zoo_trainers::lm::PackedSequences;
use zoo_trainers::medusa::{
    self, kl_from_teacher, Medusa2, RunConfig, SelfDistill, TrainableMedusa,
};
use zoo_trainers::optim::{without_gradient, AdamWConfig};
use zoo_trainers::train::{Task, TrainConfig};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-tiny")
}

fn corpus(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.txt");
    let text = "the cat sat on the mat and looked at the dog. \
                a small red circle is on the left of the large blue square. \
                speculative decoding drafts several tokens and verifies them at once. "
        .repeat(3);
    std::fs::write(&path, text).unwrap();
    path
}

fn config(output: &Path, steps: u64, joint: Option<Medusa2>) -> RunConfig {
    RunConfig {
        model: fixture().to_string_lossy().into_owned(),
        num_heads: 3,
        num_layers: 1,
        shared_lm_head: false,
        draft_vocab: None,
        seq_len: 16,
        train: TrainConfig {
            precision: Default::default(),
            steps,
            lr: 3e-3,
            warmup: 2,
            accum_freq: 1,
            grad_clip_norm: Some(1.0),
            save_every: None,
            eval_every: None,
            output: output.to_path_buf(),
            seed: 0,
            progress: false,
        },
        batch_size: 4,
        optimizer: AdamWConfig::default(),
        resume: None,
        device: Device::Cpu,
        joint,
        self_distill: None,
        epochs: None,
    }
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    weights_in(&dir.join("model.safetensors"))
}

fn weights_in(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn the_warm_up_trains_only_heads_then_joint_training_reaches_every_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    let joint = Medusa2 {
        heads_warmup_steps: 3,
        ..Medusa2::default()
    };

    // Three warm-up steps: the saved backbone is the fixture's, bit for bit.
    let warm = medusa::run(
        config(&dir.path().join("warm"), 3, Some(joint)),
        std::slice::from_ref(&corpus),
        None,
    )
    .unwrap();
    let original = weights(&fixture());
    let saved = weights(&warm.final_dir);
    for (name, t) in &original {
        assert_eq!(
            max_diff(t, &saved[name]),
            0.0,
            "{name} moved in the warm-up"
        );
    }
    let mut task = warm.task;
    let batch = task.next_batch().unwrap();
    // Three steps done, the warm-up is over: the next loss is the joint one.
    let grads = task.loss(&batch).unwrap().backward().unwrap();
    let medusa::Backbone::Joint(backbone) = &task.backbone else {
        panic!("Medusa-2 trains the backbone");
    };
    let backbone = backbone.trainable_vars(false);
    let heads = task.heads.trainable_vars();
    let missing = without_gradient(&backbone, &grads).unwrap();
    assert!(missing.is_empty(), "joint: no gradient for {missing:?}");
    let missing = without_gradient(&heads, &grads).unwrap();
    assert!(missing.is_empty(), "joint: no gradient for {missing:?}");
    assert_eq!(task.lr_scale("medusa_head.0.0.linear.weight"), 4.0);
    assert_eq!(task.lr_scale("model.layers.0.mlp.up_proj.weight"), 1.0);

    // A run still warming up: no gradient reaches the backbone.
    let cold = medusa::run(
        config(
            &dir.path().join("cold"),
            1,
            Some(Medusa2 {
                heads_warmup_steps: 100,
                ..joint
            }),
        ),
        std::slice::from_ref(&corpus),
        None,
    )
    .unwrap();
    let mut task = cold.task;
    let batch = task.next_batch().unwrap();
    let grads = task.loss(&batch).unwrap().backward().unwrap();
    let medusa::Backbone::Joint(backbone) = &task.backbone else {
        panic!("Medusa-2 trains the backbone");
    };
    let backbone = backbone.trainable_vars(false);
    assert_eq!(
        without_gradient(&backbone, &grads).unwrap().len(),
        backbone.len()
    );

    // Past the warm-up the backbone moves, and the metrics log its LM loss.
    let out = dir.path().join("joint");
    let run = medusa::run(
        config(
            &out,
            6,
            Some(Medusa2 {
                heads_warmup_steps: 2,
                ..joint
            }),
        ),
        std::slice::from_ref(&corpus),
        None,
    )
    .unwrap();
    let saved = weights(&run.final_dir);
    let moved = original
        .iter()
        .filter(|(name, t)| max_diff(t, &saved[*name]) > 0.0)
        .count();
    assert_eq!(
        moved,
        original.len(),
        "every backbone tensor trains jointly"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows[1].get("lm_loss").is_none() && rows[2].get("lm_loss").is_some());

    // The folder is the model and its heads; greedy Medusa decoding with them is lossless.
    let repo = ModelRepo::open(&run.final_dir.to_string_lossy()).unwrap();
    let model = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    let heads = MedusaHeads::load(&run.final_dir, 64, 320, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(heads.heads.len(), 3);
    let prompt = vec![5u32, 17, 42];
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        ..GenerationConfig::default()
    };
    let mut step = LlamaStep {
        model: &model,
        cache: KvCache::new(),
    };
    let plain = generate(&mut step, vec![prompt.clone()], &cfg)
        .unwrap()
        .remove(0);
    let tree = MedusaTree::new(&[vec![0], vec![1], vec![0, 0], vec![0, 0, 0]]).unwrap();
    let out = medusa_generate(&model, &heads, &tree, &prompt, 12, &[], None).unwrap();
    assert_eq!(out.tokens, plain);
}

#[test]
fn self_distilled_sequences_are_the_backbones_greedy_continuations() {
    let repo = ModelRepo::open(&fixture().to_string_lossy()).unwrap();
    let model = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    let tokens: Vec<u32> = (0..64u32).map(|i| (i * 37 + 11) % 300 + 3).collect();
    let data = PackedSequences::new(&tokens, 16, 0).unwrap();
    let settings = SelfDistill {
        prompt_len: 4,
        temperature: 0.0,
        max_sequences: Some(3),
        chat: false,
    };
    let distilled = medusa::self_distill(&model, &data, &settings, 0).unwrap();
    assert_eq!(distilled.len(), 3);
    for (seq, original) in distilled.sequences().iter().zip(data.sequences()) {
        assert_eq!(seq.len(), 16);
        assert_eq!(seq[..4], original[..4]);
        let mut step = LlamaStep {
            model: &model,
            cache: KvCache::new(),
        };
        let cfg = GenerationConfig {
            max_new_tokens: 12,
            ..GenerationConfig::default()
        };
        let alone = generate(&mut step, vec![original[..4].to_vec()], &cfg)
            .unwrap()
            .remove(0);
        assert_eq!(*seq, alone);
    }
    let bad = SelfDistill {
        prompt_len: 16,
        ..settings
    };
    let Err(err) = medusa::self_distill(&model, &data, &bad, 0) else {
        panic!("a prompt as long as the sequence was accepted");
    };
    assert!(err.to_string().contains("prompt length 16"), "{err}");
}

#[test]
fn the_kl_loss_is_zero_for_the_teacher_itself_and_starts_at_zero_in_training() {
    let a = Tensor::new(
        &[[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0], [0.2, 0.2, 0.2]]],
        &Device::Cpu,
    )
    .unwrap();
    let b = Tensor::new(
        &[[[0.0f32, 2.0, 1.5], [1.0, -1.0, 0.0], [9.0, 9.0, 9.0]]],
        &Device::Cpu,
    )
    .unwrap();
    let zero = kl_from_teacher(&a, &a, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(zero.abs() < 1e-7, "{zero}");
    // By hand over the first two positions (the last predicts past the sequence).
    let kl = |p: &[f32], q: &[f32]| -> f32 {
        let norm = |x: &[f32]| {
            let z: f32 = x.iter().map(|v| v.exp()).sum();
            x.iter().map(|v| v.exp() / z).collect::<Vec<_>>()
        };
        let (p, q) = (norm(p), norm(q));
        p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum()
    };
    let want =
        (kl(&[1.0, 2.0, 0.5], &[0.0, 2.0, 1.5]) + kl(&[0.0, -1.0, 3.0], &[1.0, -1.0, 0.0])) / 2.0;
    let got = kl_from_teacher(&a, &b, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // Weighted by the next token's weight: the second position alone (its next token, the
    // third, has weight 1; the second token's is 0).
    let w = Tensor::new(&[[1.0f32, 0.0, 1.0]], &Device::Cpu).unwrap();
    let got = kl_from_teacher(&a, &b, Some(&w))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = kl(&[0.0, -1.0, 3.0], &[1.0, -1.0, 0.0]);
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");

    // Medusa-2 with self-distillation: the first step's KL is that of the model to itself.
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    let out = dir.path().join("distill");
    let mut cfg = config(&out, 3, Some(Medusa2::default()));
    cfg.self_distill = Some(SelfDistill {
        prompt_len: 4,
        temperature: 0.3,
        max_sequences: Some(8),
        chat: false,
    });
    medusa::run(cfg, std::slice::from_ref(&corpus), None).unwrap();
    let lines = std::fs::read_to_string(out.join("self_distill.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 8);
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let kl0 = first["lm_kl"].as_f64().unwrap();
    assert!(kl0.abs() < 1e-6, "the student starts as its teacher: {kl0}");
}

#[test]
fn epochs_count_passes_over_the_packed_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    let mut cfg = config(&dir.path().join("epochs"), 0, None);
    cfg.epochs = Some(2);
    let run = medusa::run(cfg, std::slice::from_ref(&corpus), None).unwrap();
    let tokenizer = zoo_datasets::tokenize::TextTokenizer::from_files(
        &fixture().join("tokenizer.json"),
        Some(&fixture().join("tokenizer_config.json")),
    )
    .unwrap();
    let corpus = zoo_trainers::lm::Corpus::read(&[corpus]).unwrap();
    let sequences = corpus.tokens(&tokenizer, 2).unwrap().len() / 16;
    assert_eq!(run.state.step, (2 * sequences as u64).div_ceil(4));
}

#[test]
fn chat_self_distillation_gives_each_rendered_prompt_and_the_backbones_own_reply_a_row() {
    // The GGUF fixture: the tiny Llama with a chat template.
    let gguf = fixture().join("../gguf/llama-tiny-f32-gpt2.gguf");
    let source = zoo_models::llm::LlmSource::open(&gguf.to_string_lossy(), None).unwrap();
    let model = source.load_model(Some(DType::F32), &Device::Cpu).unwrap();
    let tokenizer = zoo_trainers::lm::llm_tokenizer(&source).unwrap();
    let template = tokenizer.chat_template().unwrap().unwrap();
    // The first two render to one length and are generated in one batch.
    let prompts: Vec<String> = ["the cat", "a cat", "a small red circle is on the left"]
        .map(String::from)
        .to_vec();
    let rendered: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            template
                .encode(&tokenizer, &[zoo_datasets::chat::Message::new("user", p)])
                .unwrap()
        })
        .collect();
    assert_eq!(rendered[0].len(), rendered[1].len());
    let seq_len = rendered.iter().map(Vec::len).max().unwrap() + 6;
    let settings = SelfDistill {
        prompt_len: 1,
        temperature: 0.0,
        max_sequences: None,
        chat: true,
    };
    let (data, texts) =
        medusa::distill_chat(&model, &tokenizer, &prompts, &settings, seq_len, 0).unwrap();
    let eos = model.config.eos_token_ids();
    let mut want = Vec::new();
    let mut targets = Vec::new();
    for (ids, text) in rendered.iter().zip(&texts) {
        let mut step = LlamaStep {
            model: &model,
            cache: KvCache::new(),
        };
        let cfg = GenerationConfig {
            max_new_tokens: seq_len - ids.len(),
            stop_tokens: eos.clone(),
            pad_token: eos[0],
            ..GenerationConfig::default()
        };
        let mut alone = generate(&mut step, vec![ids.clone()], &cfg)
            .unwrap()
            .remove(0);
        let ended = alone[ids.len()..].iter().position(|t| eos.contains(t));
        if let Some(p) = ended {
            alone.truncate(ids.len() + p);
        }
        assert_eq!(text.text, tokenizer.inner().decode(&alone, false).unwrap());
        assert_eq!(
            text.prompt.as_deref(),
            Some(tokenizer.inner().decode(ids, false).unwrap().as_str())
        );
        // One row per conversation, padded with eos: the replies are the targets, with the
        // eos the model wrote; the prompts and the padding are not.
        let mut flags = vec![false; ids.len()];
        flags.resize(alone.len(), true);
        if ended.is_some() {
            alone.push(eos[0]);
            flags.push(true);
        }
        alone.resize(seq_len, eos[0]);
        flags.resize(seq_len, false);
        want.push(alone);
        targets.push(flags);
    }
    assert!(targets.iter().flatten().any(|&t| t) && targets.iter().flatten().any(|&t| !t));
    // In order (the rows' visiting order is shuffled, their contents are not).
    assert_eq!(data.sequences(), want);
    assert_eq!(data.scored().unwrap(), targets);

    let Err(err) = medusa::distill_chat(&model, &tokenizer, &prompts, &settings, 4, 0) else {
        panic!("prompts longer than --seq-len were accepted");
    };
    assert!(err.to_string().contains("--seq-len"), "{err}");
}

#[test]
fn heads_that_share_the_backbones_lm_head_train_save_and_load_without_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    let out = dir.path().join("shared");
    let mut cfg = config(&out, 3, None);
    cfg.shared_lm_head = true;
    let run = medusa::run(cfg, std::slice::from_ref(&corpus), None).unwrap();
    let saved = candle_core::safetensors::load(
        run.final_dir.join("medusa_lm_head.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = saved.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "0.0.linear.bias",
            "0.0.linear.weight",
            "1.0.linear.bias",
            "1.0.linear.weight",
            "2.0.linear.bias",
            "2.0.linear.weight"
        ]
    );
    // Every ResBlock moved (identity at the start: zero weights).
    for (name, t) in &saved {
        let moved: f32 = t.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(moved > 0.0, "{name} did not learn");
    }
    let repo = ModelRepo::open(&fixture().to_string_lossy()).unwrap();
    let model = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    let heads = MedusaHeads::load(
        &run.final_dir,
        model.config.hidden_size,
        model.config.vocab_size,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let hidden = Tensor::ones((1, model.config.hidden_size), DType::F32, &Device::Cpu).unwrap();
    let logits = heads.forward(&hidden, model.lm_head()).unwrap();
    assert_eq!(logits[0].dims(), [1, model.config.vocab_size]);
}

/// Heads trained on a draft vocabulary (`--draft-vocab N`, shared `lm_head`) learn and are
/// measured on its first N tokens: every ResBlock moves, `medusa_accuracy.json` records N,
/// each rank counted is the rank among those N logits and a target outside them is a miss at
/// every rank; the whole vocabulary gives the plain losses back, and an N outside 1..=vocab is
/// refused, naming the flag.
#[test]
fn heads_on_a_draft_vocabulary_rank_its_tokens_and_miss_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    let repo = ModelRepo::open(&fixture().to_string_lossy()).unwrap();
    let model = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    let vocab = model.config.vocab_size;
    let n = vocab / 2;
    let mut cfg = config(&dir.path().join("draft"), 3, None);
    cfg.shared_lm_head = true;
    cfg.draft_vocab = Some(n);
    let run = medusa::run(cfg, std::slice::from_ref(&corpus), None).unwrap();
    let accuracy = HeadAccuracy::load(&run.final_dir).unwrap();
    assert_eq!(accuracy.draft_vocab, Some(n));
    for (name, t) in weights_in(&run.final_dir.join("medusa_lm_head.safetensors")) {
        let moved: f32 = t.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(moved > 0.0, "{name} did not learn");
    }

    let trained = |draft: Option<usize>| {
        let heads = TrainableMedusa::load(&run.final_dir, &model, "tiny").unwrap();
        match draft {
            Some(n) => heads.with_draft_vocab(n, &model).unwrap(),
            None => heads,
        }
    };
    let (draft, whole) = (trained(Some(n)), trained(None));
    // Token ids on both sides of n.
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 37 + 5) % vocab as u32).collect();
    assert!(ids.iter().any(|&t| t as usize >= n) && ids.iter().any(|&t| (t as usize) < n));
    let ids = Tensor::new(vec![ids.clone()], &Device::Cpu).unwrap();
    let hidden = zoo_trainers::lm::frozen_hidden(&model, &ids).unwrap();
    let hits = draft.rank_hits(&model, &hidden, &ids, None).unwrap();
    let targets: Vec<u32> = ids.squeeze(0).unwrap().to_vec1().unwrap();
    for (i, head) in draft.heads.heads.iter().enumerate() {
        let k = i + 1;
        let len = targets.len() - k - 1;
        let logits: Vec<Vec<f32>> = head
            .forward(&hidden.narrow(1, 0, len).unwrap(), model.lm_head())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut want = vec![0usize; zoo_models::llm::medusa::TOPK];
        for (row, &t) in logits.iter().zip(&targets[k + 1..]) {
            if t as usize >= n {
                continue;
            }
            let rank = row[..n].iter().filter(|&&x| x > row[t as usize]).count();
            if let Some(h) = want.get_mut(rank) {
                *h += 1;
            }
        }
        assert_eq!(hits[i], (want, len), "head {k}");
    }

    let same = trained(Some(vocab));
    let a = same.head_losses(&model, &hidden, &ids, None).unwrap();
    let b = whole.head_losses(&model, &hidden, &ids, None).unwrap();
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    }
    for bad in [0, vocab + 1] {
        let Err(err) = trained(None).with_draft_vocab(bad, &model) else {
            panic!("--draft-vocab {bad} was accepted");
        };
        assert!(err.to_string().contains("--draft-vocab"), "{err}");
    }
}
