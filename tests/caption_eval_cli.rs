//! `zoo eval caption` end to end: the `--json` output contract on the pycocoevalcap fixture
//! (scripts/make_caption_metric_fixtures.py), and exit status 2 with the file named on bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/caption_metrics")
        .join(name)
        .display()
        .to_string()
}

fn eval_caption(predictions: &str, references: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args([
            "eval",
            "caption",
            "--predictions",
            predictions,
            "--references",
            references,
        ])
        .args(extra)
        .output()
        .expect("zoo runs")
}

#[test]
fn eval_caption_json_prints_bleu_and_cider_matching_pycocoevalcap() {
    let out = eval_caption(
        &fixture("predictions.json"),
        &fixture("references.json"),
        &["--json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<&String> = got.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["bleu1", "bleu2", "bleu3", "bleu4", "cider", "n"]);
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    for k in 1..=4 {
        let (ours, theirs) = (
            got[format!("bleu{k}")].as_f64().unwrap(),
            want[format!("Bleu_{k}")].as_f64().unwrap(),
        );
        assert!((ours - theirs).abs() < 1e-6, "BLEU-{k}: {ours} vs {theirs}");
    }
    let (ours, theirs) = (
        got["cider"].as_f64().unwrap(),
        want["CIDEr"].as_f64().unwrap(),
    );
    assert!((ours - theirs).abs() < 1e-5, "CIDEr: {ours} vs {theirs}");
    assert_eq!(got["n"], want["n"]);
}

#[test]
fn eval_caption_prints_a_table_without_json() {
    let out = eval_caption(
        &fixture("predictions.json"),
        &fixture("references.csv"),
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("BLEU-4") && text.contains("CIDEr-D") && text.contains("30 images"),
        "{text}"
    );
}

#[test]
fn eval_caption_with_unmatched_predictions_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let preds = dir.path().join("mine.json");
    std::fs::write(
        &preds,
        r#"[{"image": "x/unknown.jpg", "caption": "a cat"}]"#,
    )
    .unwrap();
    let out = eval_caption(
        preds.to_str().unwrap(),
        &fixture("references.json"),
        &["--json"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mine.json") && err.contains("unknown.jpg") && err.contains("references.json"),
        "{err}"
    );
}
