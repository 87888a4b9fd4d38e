//! `zoo bench embed|train-step|caption|attention` run on the tiny fixtures and report their
//! fields. Benchmarks are never timed here: only that they run and report sensible values.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn zoo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("zoo runs")
}

fn json_stdout(args: &[&str]) -> Value {
    let out = zoo(args);
    assert!(
        out.status.success(),
        "zoo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

fn positive(v: &Value, key: &str) -> f64 {
    let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"));
    assert!(x > 0.0 && x.is_finite(), "{key} = {x}");
    x
}

#[test]
fn embed_reports_throughput_gemm_peak_and_mfu() {
    for name in ["clip-tiny-eos", "siglip-tiny"] {
        let model = fixture(name);
        let out = json_stdout(&[
            "bench",
            "embed",
            "--model",
            &model,
            "--batch",
            "2",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--json",
        ]);
        assert_eq!(out["bench"], "embed");
        assert_eq!(out["impl"], "candle-zoo");
        assert_eq!(out["model"], name);
        assert_eq!(out["batch"], 2);
        for key in [
            "images_per_s",
            "texts_per_s",
            "gemm_gflops",
            "vision_gflop_per_image",
        ] {
            positive(&out, key);
        }
        let mfu = positive(&out, "mfu");
        assert!(mfu < 1.5, "{mfu}");
    }
    // The table form.
    let out = zoo(&[
        "bench",
        "embed",
        "--model",
        &fixture("siglip-tiny"),
        "--batch",
        "1",
        "--warmup",
        "0",
        "--repeats",
        "1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| model | batch | images/s"), "{text}");
}

#[test]
fn train_step_reports_samples_per_second_for_clip_and_siglip() {
    for name in ["clip-tiny-eos", "siglip-tiny"] {
        let model = fixture(name);
        let out = json_stdout(&[
            "bench",
            "train-step",
            "--model",
            &model,
            "--batch",
            "3",
            "--warmup",
            "0",
            "--steps",
            "2",
            "--json",
        ]);
        assert_eq!(out["bench"], "train-step");
        assert_eq!(out["batch"], 3);
        let ms = positive(&out, "ms_per_step");
        let rate = positive(&out, "samples_per_s");
        assert!((rate * ms / 1e3 - 3.0).abs() < 1e-6);
    }
}

#[test]
fn caption_reports_ms_per_caption() {
    let out = json_stdout(&[
        "bench",
        "caption",
        "--model",
        &fixture("blip-tiny-caption"),
        "--images",
        "2",
        "--max-new-tokens",
        "4",
        "--warmup",
        "0",
        "--json",
    ]);
    assert_eq!(out["bench"], "caption");
    assert_eq!(out["new_tokens"], 4);
    assert_eq!(out["images"], 2);
    positive(&out, "ms_per_caption");
}

#[test]
fn attention_reports_time_and_peak_memory_of_both_backends() {
    let out = json_stdout(&[
        "bench",
        "attention",
        "--lengths",
        "16,200",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "8",
        "--causal",
        "--mode",
        "train",
        "--repeats",
        "1",
        "--json",
    ]);
    assert_eq!(out["bench"], "attention");
    assert_eq!(out["mode"], "train");
    let rows = out["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for r in rows {
        positive(r, "ms");
        positive(r, "peak_mib");
    }
    // At 200 tokens naive already holds 4 heads of 200×200 scores several times over.
    let peak = |backend: &str| {
        rows.iter()
            .find(|r| r["backend"] == backend && r["seq_len"] == 200)
            .unwrap()["peak_mib"]
            .as_f64()
            .unwrap()
    };
    assert!(peak("fused") < peak("naive"), "{rows:?}");
}

#[test]
fn an_unknown_attention_backend_is_a_clear_error() {
    let out = zoo(&[
        "--attention",
        "flash",
        "bench",
        "attention",
        "--lengths",
        "8",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unknown attention backend") && err.contains("auto, naive or fused"),
        "{err}"
    );
}
