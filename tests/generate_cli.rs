//! `zoo generate` on the tiny Llama and Qwen2 fixtures: greedy token ids exactly as HF
//! `generate` returns them for a text prompt (`cli_reference.json`, made by
//! `scripts/make_llm_fixtures.py`), with and without Medusa heads, the JSON fields, seeded
//! sampling (plain, Medusa typical acceptance, MTP speculative sampling), and clear errors.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn zoo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HOME")
        .output()
        .expect("zoo runs")
}

fn json_stdout(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "zoo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn greedy_generation_matches_hf_generate_token_for_token() {
    // Under both attention backends (grouped-query heads, causal prefill with the cache).
    let runs = [
        ("llama-tiny", "naive"),
        ("qwen2-tiny", "naive"),
        ("llama-tiny", "fused"),
        ("qwen2-tiny", "fused"),
    ];
    for (name, backend) in runs {
        let dir = fixtures().join(name);
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cli_reference.json")).unwrap())
                .unwrap();
        let out = json_stdout(&zoo(&[
            "--attention",
            backend,
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            reference["prompt"].as_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--json",
        ]));
        assert_eq!(out["token_ids"], reference["token_ids"], "{name} {backend}");
        assert_eq!(out["new_tokens"], 12);
        assert_eq!(out["steps"], 12);
        assert_eq!(out["mean_accepted"], 1.0);
        assert!(out["text"].is_string() && out["tokens_per_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn medusa_greedy_decoding_gives_hf_greedy_ids_in_fewer_steps_or_as_many() {
    let dir = fixtures().join("llama-tiny");
    let heads = fixtures().join("llama-tiny-medusa");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cli_reference.json")).unwrap())
            .unwrap();
    let out = json_stdout(&zoo(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        reference["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--medusa",
        heads.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(out["token_ids"], reference["token_ids"]);
    assert_eq!(out["new_tokens"], 12);
    let steps = out["steps"].as_u64().unwrap();
    assert!((1..=12).contains(&steps), "{out}");
    let mean = out["mean_accepted"].as_f64().unwrap();
    assert!((mean - 12.0 / steps as f64).abs() < 1e-9, "{out}");
}

#[test]
fn sampling_is_reproducible_per_seed() {
    let model = fixtures().join("llama-tiny");
    let run = |seed: &str| {
        json_stdout(&zoo(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "the quick brown fox",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
        ]))["token_ids"]
            .clone()
    };
    assert_eq!(run("3"), run("3"));
    assert_ne!(run("3"), run("4"));
}

#[test]
fn medusa_samples_by_typical_acceptance_and_refuses_top_k() {
    let model = fixtures().join("llama-tiny");
    let heads = fixtures().join("llama-tiny-medusa");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "the quick brown fox",
            "--max-new-tokens",
            "16",
            "--medusa",
            heads.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        zoo(&args)
    };
    let sample = |seed: &str| {
        json_stdout(&run(&[
            "--temperature",
            "1.0",
            "--posterior-threshold",
            "0.09",
            "--posterior-alpha",
            "0.3",
            "--seed",
            seed,
            "--json",
        ]))
    };
    let first = sample("3");
    assert_eq!(first["new_tokens"], 16);
    assert_eq!(first["token_ids"], sample("3")["token_ids"]);
    assert_ne!(first["token_ids"], sample("4")["token_ids"]);

    let out = run(&["--top-k", "5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("typical acceptance"), "{err}");
    let out = run(&["--temperature", "0.7", "--posterior-threshold", "1.5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--posterior-threshold"), "{err}");
}

#[test]
fn missing_models_and_unavailable_modes_are_clear_errors() {
    let missing = fixtures().join("no-such-llm");
    let out = zoo(&[
        "generate",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no-such-llm") && !err.contains("panicked"),
        "{err}"
    );

    // llama-tiny has no MTP modules; --mtp says so.
    let model = fixtures().join("llama-tiny");
    let out = zoo(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--mtp",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("num_nextn_predict_layers is 0"), "{err}");
}

/// llama-tiny with one random DeepSeek-V3-style MTP module (`model.layers.2.*`) in `dir`.
fn llama_with_mtp(dir: &std::path::Path) {
    use candle_core::{Device, Tensor};
    let src = fixtures().join("llama-tiny");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["num_nextn_predict_layers"] = 1.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let (d, kv, ff) = (64usize, 32usize, 128usize);
    let shapes: [(&str, Vec<usize>); 12] = [
        ("enorm.weight", vec![d]),
        ("hnorm.weight", vec![d]),
        ("eh_proj.weight", vec![d, 2 * d]),
        ("input_layernorm.weight", vec![d]),
        ("self_attn.q_proj.weight", vec![d, d]),
        ("self_attn.k_proj.weight", vec![kv, d]),
        ("self_attn.v_proj.weight", vec![kv, d]),
        ("self_attn.o_proj.weight", vec![d, d]),
        ("post_attention_layernorm.weight", vec![d]),
        ("mlp.gate_proj.weight", vec![ff, d]),
        ("mlp.up_proj.weight", vec![ff, d]),
        ("mlp.down_proj.weight", vec![d, ff]),
    ];
    // Uniform in [-0.5, 0.5) from a fixed stream, so that every run drafts alike: sampled
    // decoding with typical acceptance depends on the drafts.
    let mut state = 7u64;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for (name, shape) in shapes.iter().chain(&[("shared_head.norm.weight", vec![d])]) {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap()
        } else {
            let values: Vec<f32> = (0..shape.iter().product()).map(|_| uniform()).collect();
            Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap()
        };
        tensors.insert(format!("model.layers.2.{name}"), t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

#[test]
fn mtp_greedy_decoding_gives_plain_greedy_ids() {
    let dir = tempfile::tempdir().unwrap();
    llama_with_mtp(dir.path());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            dir.path().to_str().unwrap(),
            "--prompt",
            "the cat sat on",
            "--max-new-tokens",
            "16",
            "--json",
        ];
        args.extend_from_slice(extra);
        json_stdout(&zoo(&args))
    };
    let plain = run(&[]);
    let mtp = run(&["--mtp"]);
    assert_eq!(mtp["token_ids"], plain["token_ids"]);
    assert_eq!(mtp["new_tokens"], 16);
    let steps = mtp["steps"].as_u64().unwrap();
    assert!((1..=16).contains(&steps), "{mtp}");

    // Speculative sampling: reproducible per seed.
    let sampled = |seed: &str| {
        run(&[
            "--mtp",
            "--temperature",
            "0.8",
            "--top-k",
            "20",
            "--seed",
            seed,
        ])["token_ids"]
            .clone()
    };
    assert_eq!(sampled("1"), sampled("1"));
    assert_ne!(sampled("1"), sampled("2"));
}

#[test]
fn zoo_train_lm_then_eval_lm_and_generate_use_the_saved_folder() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    std::fs::write(
        &corpus,
        "{\"text\": \"the cat sat on the mat and looked at the dog.\"}\n\
         {\"text\": \"the quick brown fox jumps over the lazy dog.\"}\nnot json\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let train = zoo(&[
        "train",
        "lm",
        "--train-data",
        corpus.to_str().unwrap(),
        "--tokenizer",
        "train",
        "--vocab-size",
        "300",
        "--seq-len",
        "8",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        train.status.success(),
        "{}",
        String::from_utf8_lossy(&train.stderr)
    );
    assert!(String::from_utf8_lossy(&train.stderr)
        .contains("skipped 1 JSONL lines or chats (malformed"));
    let model = out.join("final");
    let ppl = json_stdout(&zoo(&[
        "eval",
        "lm",
        "--model",
        model.to_str().unwrap(),
        "--data",
        corpus.to_str().unwrap(),
        "--seq-len",
        "8",
        "--json",
    ]));
    let p = ppl["perplexity"].as_f64().unwrap();
    assert!(p.is_finite() && p >= 1.0, "{ppl}");
    assert_eq!(ppl["skipped_lines"], 1);
    let gen = json_stdout(&zoo(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "4",
        "--json",
    ]));
    assert_eq!(gen["token_ids"][0], 1, "starts with <s>");

    // Medusa-1 heads on the trained LM, then decoding with them and a two-level tree.
    let heads_out = dir.path().join("medusa");
    let train = zoo(&[
        "train",
        "medusa",
        "--model",
        model.to_str().unwrap(),
        "--train-data",
        corpus.to_str().unwrap(),
        "--medusa-num-heads",
        "2",
        "--seq-len",
        "8",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--output",
        heads_out.to_str().unwrap(),
    ]);
    assert!(
        train.status.success(),
        "{}",
        String::from_utf8_lossy(&train.stderr)
    );
    let tree = dir.path().join("tree.json");
    std::fs::write(&tree, "[[0], [1], [0, 0], [0, 1]]").unwrap();
    let with_heads = json_stdout(&zoo(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "4",
        "--medusa",
        heads_out.join("final").to_str().unwrap(),
        "--medusa-choices",
        tree.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(with_heads["token_ids"], gen["token_ids"]);

    // MTP modules added to the trained LM and trained on its frozen hidden states.
    let mtp_out = dir.path().join("mtp");
    let train = zoo(&[
        "train",
        "mtp",
        "--model",
        model.to_str().unwrap(),
        "--train-data",
        corpus.to_str().unwrap(),
        "--mtp-depth",
        "2",
        "--freeze-backbone",
        "--seq-len",
        "8",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--output",
        mtp_out.to_str().unwrap(),
    ]);
    assert!(
        train.status.success(),
        "{}",
        String::from_utf8_lossy(&train.stderr)
    );
    let with_mtp = json_stdout(&zoo(&[
        "generate",
        "--model",
        mtp_out.join("final").to_str().unwrap(),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "4",
        "--mtp",
        "--json",
    ]));
    assert_eq!(
        with_mtp["token_ids"], gen["token_ids"],
        "the frozen LM decodes as before"
    );

    // Medusa-2 with self-distillation, for an epoch: one folder is the model and its heads.
    let joint_out = dir.path().join("medusa2");
    let medusa2 = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "medusa",
            "--model",
            model.to_str().unwrap(),
            "--train-data",
            corpus.to_str().unwrap(),
            "--medusa-num-heads",
            "2",
            "--seq-len",
            "8",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--output",
            joint_out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        zoo(&args)
    };
    let train = medusa2(&["--joint", "--medusa-warmup-steps", "1", "--self-distill"]);
    let stdout = String::from_utf8_lossy(&train.stdout);
    assert!(
        train.status.success() && stdout.contains("--model and --medusa"),
        "{stdout}{}",
        String::from_utf8_lossy(&train.stderr)
    );
    assert!(joint_out.join("self_distill.jsonl").is_file());
    let both = joint_out.join("final");
    let out = json_stdout(&zoo(&[
        "generate",
        "--model",
        both.to_str().unwrap(),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "4",
        "--medusa",
        both.to_str().unwrap(),
        "--medusa-choices",
        tree.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(out["new_tokens"], 4);

    let bad = medusa2(&["--medusa-lr-multiplier", "2"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("add --joint"), "{err}");
}

#[test]
fn zoo_bench_generate_reports_greedy_and_medusa_side_by_side() {
    let model = fixtures().join("llama-tiny");
    let heads = fixtures().join("llama-tiny-medusa");
    let out = json_stdout(&zoo(&[
        "bench",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--medusa",
        heads.to_str().unwrap(),
        "--prompt",
        "the cat sat on",
        "--prompt",
        "the quick brown fox",
        "--max-new-tokens",
        "8",
        "--json",
    ]));
    let rows = out["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["method"], "greedy");
    assert_eq!(rows[1]["method"], "medusa");
    for r in rows {
        assert_eq!(r["identical_to_greedy"], true, "{r}");
        assert_eq!(r["new_tokens"], 16);
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(rows[0]["mean_accepted"], 1.0);
    assert_eq!(rows[0]["speedup"], 1.0);
}

/// `zoo generate` on a GGUF file (dequantized and quantized), and `zoo chat` streaming the
/// same reply as `zoo generate --chat`.
#[test]
fn gguf_generation_and_chat() {
    let dir = fixtures().join("gguf");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    for (file, dtype) in [
        ("llama-tiny-q8_0-gpt2.gguf", Some("f32")),
        ("llama-tiny-q4_0-llama.gguf", Some("f32")),
        ("llama-tiny-f32-gpt2.gguf", None),
    ] {
        let want = &reference["files"][file];
        let path = dir.join(file);
        let mut args = vec![
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            "the cat sat on",
            "--max-new-tokens",
            "20",
            "--json",
        ];
        if let Some(d) = dtype {
            args.extend(["--dtype", d]);
        }
        let out = json_stdout(&zoo(&args));
        assert_eq!(out["token_ids"], want["generated"], "{file} {dtype:?}");
    }
    // The same file through --gguf-file in its folder.
    let out = json_stdout(&zoo(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--gguf-file",
        "llama-tiny-f32-gpt2.gguf",
        "--prompt",
        "the cat sat on",
        "--max-new-tokens",
        "20",
        "--json",
    ]));
    assert_eq!(
        out["token_ids"],
        reference["files"]["llama-tiny-f32-gpt2.gguf"]["generated"]
    );

    let model = dir.join("llama-tiny-f32-gpt2.gguf");
    let model = model.to_str().unwrap();
    let chat_ids = &reference["tokenizers"]["gpt2"]["chats"][0]["ids"];
    let generated = json_stdout(&zoo(&[
        "generate",
        "--model",
        model,
        "--chat",
        "--prompt",
        "the cat sat on",
        "--max-new-tokens",
        "8",
        "--json",
    ]));
    let ids = generated["token_ids"].as_array().unwrap();
    let rendered = chat_ids.as_array().unwrap();
    assert_eq!(
        &ids[..rendered.len()],
        &rendered[..],
        "token_ids start with the rendered chat"
    );
    let reply = generated["text"].as_str().unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(["chat", "--model", model, "--max-new-tokens", "8"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello there\n/reset\nthe cat sat on\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout:?}");
    assert_eq!(
        lines[1], reply,
        "after /reset the turn is a fresh conversation"
    );
}

/// `zoo eval lm` on a GGUF, over every position and, as llama-perplexity scores, over the
/// second half of each window only.
#[test]
fn gguf_perplexity_whole_and_second_half() {
    let model = fixtures().join("gguf/llama-tiny-q8_0-gpt2.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ppl.txt");
    std::fs::write(
        &data,
        "the cat sat on the mat and looked at the dog. ".repeat(20),
    )
    .unwrap();
    let ppl = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "lm",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--seq-len",
            "32",
            "--json",
        ];
        args.extend_from_slice(extra);
        json_stdout(&zoo(&args))["perplexity"].as_f64().unwrap()
    };
    let (whole, half) = (ppl(&[]), ppl(&["--second-half"]));
    assert!(whole.is_finite() && half.is_finite() && whole > 1.0 && half > 1.0);
    assert!((whole - half).abs() > 1e-6, "{whole} {half}");
}

#[test]
fn every_decoder_takes_every_flag_with_plain_greedy_ids() {
    let dir = tempfile::tempdir().unwrap();
    llama_with_mtp(dir.path());
    let heads = fixtures().join("llama-tiny-medusa");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            dir.path().to_str().unwrap(),
            "--prompt",
            "the cat sat on",
            "--max-new-tokens",
            "24",
            "--json",
        ];
        args.extend_from_slice(extra);
        json_stdout(&zoo(&args))
    };
    let decoders: [&[&str]; 4] = [
        &[],
        &["--medusa", heads.to_str().unwrap()],
        &["--mtp"],
        &["--mtp", "--mtp-tree", "5", "--mtp-top-k", "2"],
    ];
    for flags in [
        &["--repetition-penalty", "1.4"][..],
        &["--min-new-tokens", "20"],
        &["--repetition-penalty", "1.2", "--min-new-tokens", "10"],
    ] {
        let plain = run(flags);
        for decoder in &decoders[1..] {
            let args: Vec<&str> = flags.iter().chain(decoder.iter()).copied().collect();
            let out = run(&args);
            assert_eq!(out["token_ids"], plain["token_ids"], "{args:?}");
        }
    }
    // A stop string: the plain text up to and including its first occurrence, for every
    // decoder, in fewer tokens.
    let plain = run(&[]);
    let text = plain["text"].as_str().unwrap().to_string();
    // Two ASCII letters a third of the way in (the random model writes odd bytes too).
    let bytes = text.as_bytes();
    let at = (text.len() / 3..text.len() - 2)
        .find(|&i| bytes[i].is_ascii_alphanumeric() && bytes[i + 1].is_ascii_alphanumeric())
        .unwrap_or_else(|| panic!("no stop string to take from {text:?}"));
    let stop = &text[at..at + 2];
    for decoder in decoders {
        let mut args = vec!["--stop", stop];
        args.extend_from_slice(decoder);
        let out = run(&args);
        let got = out["text"].as_str().unwrap();
        let end = text.find(stop).unwrap() + stop.len();
        assert!(
            got.starts_with(&text[..end]) && got.len() < text.len(),
            "{decoder:?}: {got:?}"
        );
        assert!(out["new_tokens"].as_u64().unwrap() < 24, "{out}");
        let ids = out["token_ids"].as_array().unwrap();
        assert_eq!(ids[..], plain["token_ids"].as_array().unwrap()[..ids.len()]);
    }
    // Medusa with exact speculative sampling takes --top-k and --top-p, reproducibly.
    let medusa = heads.to_str().unwrap();
    let exact = |seed: &str| {
        run(&[
            "--medusa",
            medusa,
            "--acceptance",
            "exact",
            "--temperature",
            "0.8",
            "--top-k",
            "20",
            "--top-p",
            "0.9",
            "--seed",
            seed,
        ])
    };
    let first = exact("1");
    assert_eq!(first["new_tokens"], 24);
    assert_eq!(first["token_ids"], exact("1")["token_ids"]);
    assert_ne!(first["token_ids"], exact("2")["token_ids"]);
    // MTP with typical acceptance.
    let typical = run(&[
        "--mtp",
        "--acceptance",
        "typical",
        "--temperature",
        "0.7",
        "--posterior-alpha",
        "0.2",
    ]);
    assert_eq!(typical["new_tokens"], 24);
}

#[test]
fn a_gguf_base_decodes_with_mtp_modules_from_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    llama_with_mtp(dir.path());
    let gguf = fixtures().join("gguf/llama-tiny-f32-gpt2.gguf");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "--prompt",
            "the cat sat on",
            "--max-new-tokens",
            "16",
            "--json",
        ];
        args.extend_from_slice(extra);
        zoo(&args)
    };
    let plain = json_stdout(&run(&[]));
    let mtp = json_stdout(&run(&["--mtp", dir.path().to_str().unwrap()]));
    assert_eq!(mtp["token_ids"], plain["token_ids"]);
    assert_eq!(mtp["new_tokens"], 16);

    // Modules made for another shape of model are refused by name.
    let config = dir.path().join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["vocab_size"] = 321.into();
    std::fs::write(&config, c.to_string()).unwrap();
    let out = run(&["--mtp", dir.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("config.json: vocab_size is 321"), "{err}");
}

#[test]
fn medusa_heads_and_mtp_modules_train_on_a_gguf_base_and_decode_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    std::fs::write(
        &corpus,
        "{\"text\": \"the cat sat on the mat and looked at the dog. the dog sat too.\"}\n"
            .repeat(20),
    )
    .unwrap();
    let gguf = fixtures().join("gguf/llama-tiny-f32-gpt2.gguf");
    let train = |family: &str, out: &str, extra: &[&str]| {
        let output = dir.path().join(out);
        let mut args = vec![
            "train",
            family,
            "--model",
            gguf.to_str().unwrap(),
            "--train-data",
            corpus.to_str().unwrap(),
            "--steps",
            "2",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--output",
            output.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = zoo(&args);
        assert!(
            out.status.success(),
            "{family}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        output.join("final")
    };
    let medusa = train(
        "medusa",
        "medusa",
        &["--val-data", corpus.to_str().unwrap()],
    );
    // The heads' accuracy on the validation text, per head and rank.
    let acc: Value = serde_json::from_str(
        &std::fs::read_to_string(medusa.join("medusa_accuracy.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(acc["data"], "validation");
    let heads = acc["heads"].as_array().unwrap();
    assert!(
        !heads.is_empty() && acc["positions"].as_u64().unwrap() > 0,
        "{acc}"
    );
    for head in heads {
        let ranks: Vec<f64> = head
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_f64().unwrap())
            .collect();
        assert_eq!(ranks.len(), 10);
        assert!(
            ranks.iter().all(|a| (0.0..=1.0).contains(a))
                && ranks.iter().sum::<f64>() <= 1.0 + 1e-9
        );
    }
    let mtp = train("mtp", "mtp", &["--freeze-backbone"]);
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "--prompt",
            "the cat",
            "--max-new-tokens",
            "12",
            "--json",
        ];
        args.extend_from_slice(extra);
        json_stdout(&zoo(&args))["token_ids"].clone()
    };
    let plain = generate(&[]);
    assert_eq!(generate(&["--medusa", medusa.to_str().unwrap()]), plain);
    let auto = &[
        "--medusa",
        medusa.to_str().unwrap(),
        "--medusa-choices",
        "auto",
    ];
    assert_eq!(generate(auto), plain);
    assert_eq!(generate(&["--mtp", mtp.to_str().unwrap()]), plain);
    assert_eq!(
        generate(&["--mtp", mtp.to_str().unwrap(), "--mtp-tree", "4"]),
        plain
    );

    // Chat self-distillation (one prompt per line, the model's replies as the data) into heads
    // that share the model's lm_head: only ResBlocks are saved, and they decode beside it.
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "the cat\nthe dog sat\nhello there\nthe mat\n").unwrap();
    let shared = dir.path().join("shared");
    let out = zoo(&[
        "train",
        "medusa",
        "--model",
        gguf.to_str().unwrap(),
        "--train-data",
        prompts.to_str().unwrap(),
        "--val-data",
        prompts.to_str().unwrap(),
        "--self-distill",
        "--chat",
        "--distill-temperature",
        "0",
        "--medusa-shared-lm-head",
        "--steps",
        "2",
        "--seq-len",
        "112",
        "--batch-size",
        "2",
        "--output",
        shared.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = std::fs::read_to_string(shared.join("self_distill.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4, "{lines}");
    for line in lines.lines() {
        let text: Value = serde_json::from_str(line).unwrap();
        assert!(text["text"].as_str().unwrap().contains("the"), "{line}");
    }
    let weights = candle_core::safetensors::load(
        shared.join("final/medusa_lm_head.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(
        weights.keys().all(|k| k.contains(".linear.")),
        "{:?}",
        weights.keys()
    );
    let shared = shared.join("final");
    assert_eq!(generate(&["--medusa", shared.to_str().unwrap()]), plain);
}
