//! BLEU and CIDEr-D against pycocoevalcap's numbers on the committed fixture
//! (scripts/make_caption_metric_fixtures.py), and the input formats and their errors.

use std::path::{Path, PathBuf};

use serde_json::Value;
use zoo_trainers::caption_metrics::{evaluate_files, ptb_tokenize, CaptionScores};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/caption_metrics")
        .join(name)
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_matches_reference(scores: &CaptionScores) {
    let want = expected();
    for (k, got) in scores.bleu.iter().enumerate() {
        let reference = want[format!("Bleu_{}", k + 1)].as_f64().unwrap();
        assert!(
            (got - reference).abs() < 1e-6,
            "BLEU-{}: ours {got} pycocoevalcap {reference}",
            k + 1
        );
    }
    let reference = want["CIDEr"].as_f64().unwrap();
    assert!(
        (scores.cider - reference).abs() < 1e-5,
        "CIDEr: ours {} pycocoevalcap {reference}",
        scores.cider
    );
    assert_eq!(scores.n as u64, want["n"].as_u64().unwrap());
}

#[test]
fn tokenizer_matches_ptb_tokenizer_on_fixture_captions() {
    for case in expected()["tokenized"].as_array().unwrap() {
        let caption = case["caption"].as_str().unwrap();
        let want = case["tokens"].as_str().unwrap();
        assert_eq!(ptb_tokenize(caption).join(" "), want, "caption {caption:?}");
    }
}

#[test]
fn scores_match_pycocoevalcap_on_fixture() {
    let scores = evaluate_files(&fixture("predictions.json"), &fixture("references.json")).unwrap();
    assert_matches_reference(&scores);
}

#[test]
fn coco_results_and_csv_references_give_the_same_scores() {
    let by_id = evaluate_files(
        &fixture("predictions_coco.json"),
        &fixture("references.json"),
    )
    .unwrap();
    assert_matches_reference(&by_id);
    let from_csv =
        evaluate_files(&fixture("predictions.json"), &fixture("references.csv")).unwrap();
    assert_matches_reference(&from_csv);
}

#[test]
fn csv_predictions_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let preds: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("predictions.json")).unwrap())
            .unwrap();
    let mut csv = String::from("image,caption\n");
    for p in preds.as_array().unwrap() {
        let caption = p["caption"].as_str().unwrap().replace('"', "\"\"");
        csv += &format!("{},\"{caption}\"\n", p["image"].as_str().unwrap());
    }
    let path = dir.path().join("predictions.csv");
    std::fs::write(&path, csv).unwrap();
    assert_matches_reference(&evaluate_files(&path, &fixture("references.json")).unwrap());
}

fn error(predictions: &str, references: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preds.json");
    std::fs::write(&path, predictions).unwrap();
    evaluate_files(&path, references).unwrap_err().to_string()
}

#[test]
fn a_prediction_without_references_is_an_error_naming_the_file() {
    let refs = fixture("references.json");
    let e = error(
        r#"[{"image": "elsewhere/missing.jpg", "caption": "a dog"}]"#,
        &refs,
    );
    assert!(e.contains("preds.json") && e.contains("missing.jpg"), "{e}");
    let e = error(r#"[{"image_id": 4, "caption": "a dog"}]"#, &refs);
    assert!(
        e.contains("image_id 4") && e.contains("no reference captions"),
        "{e}"
    );
}

#[test]
fn empty_and_duplicate_predictions_are_errors() {
    let refs = fixture("references.json");
    assert!(error("", &refs).contains("empty"));
    assert!(error("[]", &refs).contains("no predictions"));
    let e = error(
        r#"[{"image_id": 1000, "caption": "a"}, {"image": "COCO_val2014_000000001000.jpg", "caption": "b"}]"#,
        &refs,
    );
    assert!(e.contains("same image"), "{e}");
}
