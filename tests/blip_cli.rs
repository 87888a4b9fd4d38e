//! End-to-end tests of `zoo caption` and `zoo match` on the tiny BLIP fixtures: the JSON output
//! contracts against HF's `generate` and `BlipForImageTextRetrieval` on real image files
//! (`cli_reference.json`, made by `scripts/make_blip_fixtures.py` through HF's BlipProcessor),
//! and bad input.

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

fn cli_reference(model: &str) -> Value {
    let path = fixtures().join(model).join("cli_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn image_paths(reference: &Value) -> Vec<String> {
    reference["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| {
            let p = fixtures().join("images").join(name.as_str().unwrap());
            p.to_str().unwrap().to_string()
        })
        .collect()
}

fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(2), "exit status");
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn caption_json_matches_hf_generate_for_greedy_and_beams_with_and_without_a_prompt() {
    let r = cli_reference("blip-tiny-caption");
    let model = fixtures().join("blip-tiny-caption");
    let images = image_paths(&r);
    // Under either attention backend (the fused kernel takes the padding and causal masks).
    let runs = ["greedy", "greedy_prompt", "beams", "beams_prompt"];
    for (backend, run) in ["naive", "fused"]
        .into_iter()
        .flat_map(|b| runs.map(|r| (b, r)))
    {
        let opts = &r[run]["options"];
        let mut args: Vec<String> = vec![
            "--attention".into(),
            backend.into(),
            "caption".into(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--json".into(),
            "--batch-size".into(),
            "2".into(),
        ];
        for (key, flag) in [
            ("num_beams", "--beams"),
            ("max_new_tokens", "--max-new-tokens"),
            ("min_new_tokens", "--min-new-tokens"),
        ] {
            if let Some(v) = opts.get(key) {
                args.extend([flag.to_string(), v.to_string()]);
            }
        }
        if run.ends_with("prompt") {
            args.extend(["--prompt".into(), r["prompt"].as_str().unwrap().into()]);
        }
        args.extend(images.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = json_stdout(&zoo(&argv));
        let list = out.as_array().unwrap();
        assert_eq!(list.len(), images.len());
        for (i, item) in list.iter().enumerate() {
            assert_eq!(item["image"].as_str().unwrap(), images[i]);
            assert_eq!(
                item["token_ids"], r[run]["token_ids"][i],
                "{backend} {run}: token ids of image {i}"
            );
            assert_eq!(
                item["caption"], r[run]["captions"][i],
                "{backend} {run}: caption of image {i}"
            );
        }
        if run.ends_with("prompt") {
            // The ids keep [DEC] and the prompt; the caption leaves the prompt out.
            let ids = list[0]["token_ids"].as_array().unwrap();
            assert_eq!(ids[0], 110);
            let caption = list[0]["caption"].as_str().unwrap();
            assert!(!caption.starts_with("a picture of"), "{caption}");
        }
    }
}

#[test]
fn caption_sampling_is_reproducible_per_seed() {
    let model = fixtures().join("blip-tiny-caption");
    let image = fixtures().join("images/chelsea.png");
    let run = |seed: &str| {
        json_stdout(&zoo(&[
            "caption",
            "--model",
            model.to_str().unwrap(),
            "--top-p",
            "0.9",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "--max-new-tokens",
            "10",
            "--json",
            image.to_str().unwrap(),
        ]))
    };
    assert_eq!(run("5"), run("5"));
}

#[test]
fn match_json_matches_hf_itm_probabilities_and_itc_scores() {
    let r = cli_reference("blip-tiny-itm");
    let model = fixtures().join("blip-tiny-itm");
    let images = image_paths(&r);
    let mut args: Vec<String> = vec![
        "match".into(),
        "--model".into(),
        model.to_str().unwrap().into(),
        "--json".into(),
    ];
    for image in &images {
        args.extend(["--image".into(), image.clone()]);
    }
    for text in r["texts"].as_array().unwrap() {
        args.extend(["--text".into(), text.as_str().unwrap().into()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = json_stdout(&zoo(&argv));
    let ours = out.as_array().unwrap();
    let theirs = r["pairs"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (o, t) in ours.iter().zip(theirs) {
        assert!(o["image"]
            .as_str()
            .unwrap()
            .ends_with(t["image"].as_str().unwrap()));
        assert_eq!(o["text"], t["text"]);
        for key in ["itm_prob", "itc_score"] {
            let (a, b) = (o[key].as_f64().unwrap(), t[key].as_f64().unwrap());
            assert!((a - b).abs() < 1e-4, "{key} {a} vs HF {b} for {o}");
        }
    }
}

#[test]
fn missing_model_folder_and_undecodable_image_are_clear_errors() {
    let image = fixtures().join("images/chelsea.png");
    let missing = fixtures().join("no-such-blip");
    let out = zoo(&[
        "caption",
        "--model",
        missing.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    assert_fails_with(&out, &["no-such-blip"]);
    let out = zoo(&[
        "match",
        "--model",
        missing.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--text",
        "a cat",
    ]);
    assert_fails_with(&out, &["no-such-blip"]);

    let broken = fixtures().join("images/broken.png");
    let caption = fixtures().join("blip-tiny-caption");
    let out = zoo(&[
        "caption",
        "--model",
        caption.to_str().unwrap(),
        broken.to_str().unwrap(),
    ]);
    assert_fails_with(&out, &["cannot decode image", "broken.png"]);
    let itm = fixtures().join("blip-tiny-itm");
    let out = zoo(&[
        "match",
        "--model",
        itm.to_str().unwrap(),
        "--image",
        broken.to_str().unwrap(),
        "--text",
        "a cat",
    ]);
    assert_fails_with(&out, &["cannot decode image", "broken.png"]);
    let out = zoo(&["match", "--model", itm.to_str().unwrap(), "--text", "a cat"]);
    assert_fails_with(&out, &["at least one --image"]);
}
