//! Causal LM training provably learns: a byte-level BPE trained on the corpus round-trips text;
//! every parameter receives a gradient; a small corpus is overfitted; the same seed gives the
//! same loss curve and a resumed run the uninterrupted one's; the saved folder loads back as
//! the same model.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use zoo_datasets::tokenize::TextTokenizer;
use zoo_models::hub::ModelRepo;
use zoo_models::llm::{KvCache, LlamaForCausalLM};
use zoo_trainers::lm::{run, Corpus, ModelSpec, RunConfig, TokenizerSpec, TrainableLlama};
use zoo_trainers::optim::{without_gradient, AdamWConfig};
use zoo_trainers::train::TrainConfig;

const SENTENCES: [&str; 4] = [
    "the cat sat on the mat and looked at the dog.",
    "a small red circle is on the left of the large blue square.",
    "speculative decoding drafts several tokens and verifies them at once.",
    "the quick brown fox jumps over the lazy dog.",
];

/// A corpus file: a JSONL of the sentences, one bad line among them.
fn corpus(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.jsonl");
    let mut lines: Vec<String> = SENTENCES
        .iter()
        .map(|s| serde_json::json!({ "text": s }).to_string())
        .collect();
    lines.insert(2, "{not json".into());
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn config(output: &Path, steps: u64, seed: u64) -> RunConfig {
    RunConfig {
        model: ModelSpec::Preset("llama-tiny".into()),
        tokenizer: TokenizerSpec::Train { vocab_size: 300 },
        seq_len: 16,
        train: TrainConfig {
            precision: Default::default(),
            steps,
            lr: 3e-3,
            warmup: 5,
            accum_freq: 1,
            grad_clip_norm: Some(1.0),
            save_every: None,
            eval_every: None,
            output: output.to_path_buf(),
            seed,
            progress: false,
        },
        batch_size: 4,
        optimizer: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        resume: None,
        device: Device::Cpu,
        mtp: None,
        epochs: None,
    }
}

#[test]
fn a_trained_bpe_round_trips_text_and_starts_with_bos() {
    let tok = TextTokenizer::train_bpe(SENTENCES.iter(), 300).unwrap();
    assert!(tok.vocab_size() <= 300);
    for s in SENTENCES.iter().chain(&["unseen wörds ünïcode 123"]) {
        let ids = tok.encode(s).unwrap();
        assert_eq!(ids[0], 1, "<s> first");
        assert_eq!(tok.inner().decode(&ids, true).unwrap(), *s);
    }
    // Merges were learned: a training sentence takes fewer tokens than bytes.
    assert!(tok.encode(SENTENCES[0]).unwrap().len() < SENTENCES[0].len() / 2);
    assert!(TextTokenizer::train_bpe(SENTENCES.iter(), 100).is_err());
}

#[test]
fn corpora_skip_and_count_bad_jsonl_lines() {
    let dir = tempfile::tempdir().unwrap();
    let c = Corpus::read(&[corpus(dir.path())]).unwrap();
    assert_eq!((c.documents.len(), c.skipped), (4, 1));
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "{\"nope\": 1}\n").unwrap();
    let err = Corpus::read(&[empty]).err().unwrap().to_string();
    assert!(
        err.contains("empty.jsonl") && err.contains("1 lines skipped"),
        "{err}"
    );
}

#[test]
fn every_parameter_receives_a_gradient() {
    let tok = TextTokenizer::train_bpe(SENTENCES.iter(), 300).unwrap();
    let m = TrainableLlama::from_preset("llama-tiny", tok, 0, &Device::Cpu).unwrap();
    let ids: Vec<u32> = m.tokenizer.encode(SENTENCES[0]).unwrap();
    let loss = m
        .lm_loss(&Tensor::new(vec![ids], &Device::Cpu).unwrap())
        .unwrap();
    let grads = loss.backward().unwrap();
    let vars = m.trainable_vars(false);
    assert!(vars.len() > 30);
    let missing = without_gradient(&vars, &grads).unwrap();
    assert!(missing.is_empty(), "no gradient reached {missing:?}");
}

#[test]
fn every_parameter_receives_a_gradient_when_mtp_modules_train_jointly() {
    let tok = TextTokenizer::train_bpe(SENTENCES.iter(), 300).unwrap();
    let m = TrainableLlama::from_preset("llama-tiny", tok, 0, &Device::Cpu)
        .unwrap()
        .add_mtp(2, 0, false)
        .unwrap();
    let ids: Vec<u32> = m.tokenizer.encode(SENTENCES[1]).unwrap();
    let (main, depths) = m
        .losses(
            &Tensor::new(vec![ids], &Device::Cpu).unwrap(),
            false,
            None,
            None,
        )
        .unwrap();
    assert_eq!(depths.len(), 2);
    let total = depths.iter().fold(main, |a, b| (a + b).unwrap());
    let grads = total.backward().unwrap();
    let vars = m.trainable_vars(false);
    let mtp_vars = m.trainable_vars(true);
    assert!(
        !mtp_vars.is_empty()
            && mtp_vars
                .iter()
                .all(|(n, _)| n.starts_with("model.layers.4.") || n.starts_with("model.layers.5."))
    );
    let missing = without_gradient(&vars, &grads).unwrap();
    assert!(missing.is_empty(), "no gradient reached {missing:?}");
}

#[test]
fn mtp_modules_added_to_a_pretrained_model_start_from_its_last_layer() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-tiny");
    let m = TrainableLlama::from_pretrained(&fixture.to_string_lossy(), &Device::Cpu)
        .unwrap()
        .add_mtp(2, 0, true)
        .unwrap();
    let layers = m.config.num_hidden_layers;
    let vars = m.varmap.data().lock().unwrap();
    let get = |name: &str| {
        vars[name].as_tensor().to_vec1::<f32>().unwrap_or_else(|_| {
            vars[name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
    };
    for k in 0..2 {
        let module = format!("model.layers.{}", layers + k);
        let last = format!("model.layers.{}", layers - 1);
        for part in [
            "self_attn.q_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        ] {
            assert_eq!(
                get(&format!("{module}.{part}")),
                get(&format!("{last}.{part}")),
                "{part}"
            );
        }
        assert_eq!(
            get(&format!("{module}.shared_head.norm.weight")),
            get("model.norm.weight")
        );
        // The module's own input projection starts fresh for the embedding and as the
        // identity for the hidden state.
        let eh = get(&format!("{module}.eh_proj.weight"));
        let d = m.config.hidden_size;
        let (emb, hidden): (Vec<f32>, Vec<f32>) = (
            eh.chunks(2 * d).flat_map(|row| row[..d].to_vec()).collect(),
            eh.chunks(2 * d).flat_map(|row| row[d..].to_vec()).collect(),
        );
        assert!(emb.iter().any(|&v| v != 0.0) && emb.iter().all(|v| v.abs() < 0.2));
        for (i, row) in hidden.chunks(d).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                assert_eq!(v, f32::from(i == j), "eh_proj[{i}, {}]", d + j);
            }
        }
    }
}

#[test]
fn training_overfits_a_small_corpus_and_saves_a_loadable_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("run");
    let s = run(
        config(&out, 120, 0),
        std::slice::from_ref(&data),
        Some(std::slice::from_ref(&data)),
    )
    .unwrap();
    let (first, last) = (s.state.losses[0], *s.state.losses.last().unwrap());
    assert!(first > 4.0, "initial loss {first} should be near ln(vocab)");
    assert!(last < 0.5, "loss after overfitting: {last} (from {first})");
    assert_eq!(s.skipped, 2, "the bad line, counted in train and val");

    let repo = ModelRepo::open(&s.final_dir.to_string_lossy()).unwrap();
    let loaded = LlamaForCausalLM::load(&repo, None, &Device::Cpu).unwrap();
    let ids = Tensor::new(
        vec![s.task.model.tokenizer.encode(SENTENCES[1]).unwrap()],
        &Device::Cpu,
    )
    .unwrap();
    let a = s
        .task
        .model
        .model
        .forward(&ids, &mut KvCache::new())
        .unwrap()
        .logits;
    let b = loaded.forward(&ids, &mut KvCache::new()).unwrap().logits;
    // Equal up to rounding: the loaded model's few-row projections go through the small-row
    // f32 kernel (one FMA chain per output), the training variables through the GEMM.
    let diff: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-5, "logits differ after reload by {diff}");
    for f in ["tokenizer.json", "generation_config.json", "config.json"] {
        assert!(s.final_dir.join(f).is_file(), "no {f}");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("val_perplexity"));
}

#[test]
fn the_same_seed_gives_the_same_curve_and_resume_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let a = run(
        config(&dir.path().join("a"), 6, 3),
        std::slice::from_ref(&data),
        None,
    )
    .unwrap();
    let b = run(
        config(&dir.path().join("b"), 6, 3),
        std::slice::from_ref(&data),
        None,
    )
    .unwrap();
    assert_eq!(a.state.losses, b.state.losses);

    let mut full = config(&dir.path().join("full"), 6, 3);
    full.train.save_every = Some(3);
    let uninterrupted = run(full, std::slice::from_ref(&data), None)
        .unwrap()
        .state
        .losses;
    assert_eq!(uninterrupted, a.state.losses);
    let mut resumed = config(&dir.path().join("resumed"), 6, 3);
    resumed.resume = Some(dir.path().join("full/checkpoint-3"));
    let s = run(resumed, &[data], None).unwrap();
    assert_eq!(s.state.losses, uninterrupted);
}

/// MTP modules on a frozen backbone read its hidden states, computed once per sequence and
/// kept: the modules' losses are those of the whole forward pass, they fall, the same seed
/// gives the same curve and a resumed run (its cache empty again) the uninterrupted one's.
#[test]
fn mtp_modules_on_a_frozen_backbone_learn_from_its_kept_hidden_states() {
    let tok = TextTokenizer::train_bpe(SENTENCES.iter(), 300).unwrap();
    let m = TrainableLlama::from_preset("llama-tiny", tok, 0, &Device::Cpu)
        .unwrap()
        .add_mtp(2, 0, false)
        .unwrap();
    let ids: Vec<u32> = m.tokenizer.encode(SENTENCES[1]).unwrap();
    let ids = Tensor::new(vec![ids], &Device::Cpu).unwrap();
    let (_, whole) = m.losses(&ids, true, None, None).unwrap();
    let kept = m
        .mtp_losses(&ids, m.frozen_hidden(&ids).unwrap(), None, None)
        .unwrap();
    for (a, b) in whole.iter().zip(&kept) {
        let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }

    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let frozen = |out: &str, steps: u64| {
        let mut c = config(&dir.path().join(out), steps, 5);
        c.mtp = Some(zoo_trainers::lm::MtpSettings {
            depth: 2,
            lambda: 0.3,
            freeze_backbone: true,
            draft_vocab: None,
        });
        c
    };
    let a = run(frozen("a", 40), std::slice::from_ref(&data), None).unwrap();
    let losses = &a.state.losses;
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < 0.75 * first, "MTP losses {first} -> {last}");
    let b = run(frozen("b", 40), std::slice::from_ref(&data), None).unwrap();
    assert_eq!(a.state.losses, b.state.losses);

    let mut full = frozen("full", 8);
    full.train.save_every = Some(4);
    let uninterrupted = run(full, std::slice::from_ref(&data), None)
        .unwrap()
        .state
        .losses;
    let mut resumed = frozen("resumed", 8);
    resumed.resume = Some(dir.path().join("full/checkpoint-4"));
    let s = run(resumed, &[data], None).unwrap();
    assert_eq!(s.state.losses, uninterrupted);
}

/// LM training under `amp_fp16` starts from the fp32 loss and overfits as the fp32 run does;
/// with MTP modules mixed precision is refused with a message.
#[test]
fn amp_fp16_lm_training_follows_fp32() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let losses = |precision, name: &str| {
        let base = config(&dir.path().join(name), 120, 0);
        let cfg = RunConfig {
            train: TrainConfig {
                precision,
                ..base.train.clone()
            },
            ..base
        };
        run(cfg, std::slice::from_ref(&data), None)
            .unwrap()
            .state
            .losses
    };
    let fp32 = losses(zoo_trainers::precision::Precision::Fp32, "fp32");
    let amp = losses(zoo_trainers::precision::Precision::AmpFp16, "amp");
    let (a, f) = (*amp.last().unwrap(), *fp32.last().unwrap());
    println!(
        "fp32 {:.4} -> {f:.4}, amp_fp16 {:.4} -> {a:.4}",
        fp32[0], amp[0]
    );
    assert!((amp[0] - fp32[0]).abs() < 5e-3, "{} vs {}", amp[0], fp32[0]);
    assert!(a < 0.5 && (a - f).abs() < 0.1, "final loss {a} vs fp32 {f}");

    let base = config(&dir.path().join("mtp"), 2, 0);
    let with_mtp = RunConfig {
        train: TrainConfig {
            precision: zoo_trainers::precision::Precision::AmpFp16,
            ..base.train.clone()
        },
        mtp: Some(zoo_trainers::lm::MtpSettings {
            depth: 1,
            lambda: 0.3,
            freeze_backbone: false,
            draft_vocab: None,
        }),
        ..base
    };
    let err = run(with_mtp, std::slice::from_ref(&data), None)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("lm` without MTP"), "{err}");
}

/// MTP modules trained on a draft vocabulary (`--draft-vocab N`) score its first N tokens only:
/// the loss of each depth is the cross-entropy over those N logits of the positions whose
/// target is among them, the whole vocabulary gives the plain loss back, and reply weights
/// leave the prompt's targets out.
#[test]
fn mtp_losses_on_a_draft_vocabulary_score_its_tokens_only() {
    let tok = TextTokenizer::train_bpe(SENTENCES.iter(), 300).unwrap();
    let m = TrainableLlama::from_preset("llama-tiny", tok, 0, &Device::Cpu)
        .unwrap()
        .add_mtp(1, 0, false)
        .unwrap();
    let vocab = m.config.vocab_size;
    let ids: Vec<u32> = m.tokenizer.encode(SENTENCES[1]).unwrap();
    let t = ids.len();
    let input = Tensor::new(vec![ids.clone()], &Device::Cpu).unwrap();
    let hidden = m.frozen_hidden(&input).unwrap();
    let loss = |weights: Option<&Tensor>, n: Option<usize>| -> f32 {
        m.mtp_losses(&input, hidden.clone(), weights, n).unwrap()[0]
            .to_scalar()
            .unwrap()
    };
    assert_eq!(loss(None, None), loss(None, Some(vocab)));

    // Module 1 at position i predicts ids[i + 2]; its logits over the whole vocabulary.
    let module = &m.mtp.as_ref().unwrap().modules[0];
    let positions: Vec<u32> = (0..t as u32 - 1).collect();
    let (cos, sin) = m
        .model
        .model
        .rotary_cos_sin(&positions, &Device::Cpu)
        .unwrap();
    let ahead = m
        .model
        .model
        .embed(&input.narrow(1, 1, t - 1).unwrap())
        .unwrap();
    let h = module
        .forward(
            &hidden.narrow(1, 0, t - 1).unwrap(),
            &ahead,
            &cos,
            &sin,
            &zoo_models::layers::AttentionMask::causal(0),
            &mut Default::default(),
        )
        .unwrap();
    let logits = module
        .logits(&h.narrow(1, 0, t - 2).unwrap(), m.model.lm_head())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let targets = &ids[2..];
    // The draft vocabulary: the median target, which leaves some targets out and keeps others.
    let mut sorted = targets.to_vec();
    sorted.sort();
    let n = sorted[sorted.len() / 2] as usize;
    let expected = |scored: &dyn Fn(usize) -> bool| -> f32 {
        let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, n).unwrap(), 1).unwrap();
        let logp: Vec<Vec<f32>> = logp.to_vec2().unwrap();
        let picked: Vec<f32> = targets
            .iter()
            .enumerate()
            .filter(|&(i, &tgt)| (tgt as usize) < n && scored(i + 2))
            .map(|(i, &tgt)| -logp[i][tgt as usize])
            .collect();
        assert!(!picked.is_empty() && picked.len() < targets.len());
        picked.iter().sum::<f32>() / picked.len() as f32
    };
    let got = loss(None, Some(n));
    let want = expected(&|_| true);
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // Reply weights: the first half of the sequence is a prompt.
    let reply: Vec<f32> = (0..t).map(|i| f32::from(i >= t / 2)).collect();
    let weights = Tensor::new(vec![reply], &Device::Cpu).unwrap();
    let got = loss(Some(&weights), Some(n));
    let want = expected(&|i| i >= t / 2);
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");

    let Err(err) = m.mtp_losses(&input, hidden.clone(), None, Some(vocab + 1)) else {
        panic!("a draft vocabulary larger than the vocabulary was accepted");
    };
    assert!(err.to_string().contains("--draft-vocab"), "{err}");
}

/// JSONL chats (a `prompt`, as `zoo train medusa --self-distill --chat` writes them) take a
/// row each, padded with eos, after the packed rows of the other documents; a chat scores the
/// tokens after its prompt's only, and the eos after them where its reply `ended`, never the
/// padding; other documents score every token. A line whose text does not start with its
/// prompt, or with an `ended` that is not a boolean, is skipped and counted, and a chat
/// without a target within --seq-len is dropped and counted.
#[test]
fn jsonl_chats_take_a_row_each_and_score_the_reply() {
    let tok = TextTokenizer::train_bpe(SENTENCES.iter(), 300).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.jsonl");
    let (prompt, reply) = ("the cat sat on", " the mat and looked at the dog.");
    let plain = SENTENCES[1].repeat(3);
    let long = SENTENCES[0].repeat(4);
    let lines = [
        serde_json::json!({ "text": format!("{prompt}{reply}"), "prompt": prompt, "ended": true }),
        serde_json::json!({ "text": plain }),
        serde_json::json!({ "text": format!("{prompt}{reply}"), "prompt": prompt }),
        serde_json::json!({ "text": "a reply", "prompt": "another prompt" }),
        serde_json::json!({ "text": format!("{prompt}{reply}"), "prompt": prompt, "ended": "yes" }),
        serde_json::json!({ "text": format!("{long} and more"), "prompt": long }),
    ];
    let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    std::fs::write(&path, text).unwrap();
    let corpus = Corpus::read(&[path]).unwrap();
    assert_eq!((corpus.documents.len(), corpus.skipped), (4, 2));
    let eos = 0;
    let chat = tok.encode(&format!("{prompt}{reply}")).unwrap();
    let p = tok.encode(prompt).unwrap();
    assert!(chat.starts_with(&p) && chat.len() > p.len());
    let seq_len = chat.len() + 3;
    assert!(tok.encode(&long).unwrap().len() >= seq_len);
    let mut stream = tok.encode(&plain).unwrap();
    stream.push(eos);
    assert!(stream.len() >= seq_len);
    let mut rows: Vec<(Vec<u32>, Vec<bool>)> = stream
        .chunks_exact(seq_len)
        .map(|c| (c.to_vec(), vec![true; seq_len]))
        .collect();
    for ended in [true, false] {
        let mut ids = chat.clone();
        ids.push(eos);
        ids.resize(seq_len, eos);
        let mut flags = vec![false; p.len()];
        flags.resize(chat.len(), true);
        flags.push(ended);
        flags.resize(seq_len, false);
        rows.push((ids, flags));
    }
    let (packed, dropped) = corpus.pack(&tok, eos, seq_len, 0).unwrap();
    assert_eq!(
        dropped, 1,
        "the long prompt leaves no target within --seq-len"
    );
    let (ids, flags): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
    assert_eq!(packed.sequences(), ids);
    assert_eq!(packed.scored().unwrap(), flags);
}
