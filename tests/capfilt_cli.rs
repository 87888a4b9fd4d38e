//! End-to-end tests of `zoo capfilt` on the tiny BLIP fixtures (captioner
//! `blip-tiny-caption`, filter `blip-tiny-itm`) over web pairs of real fixture images: the
//! output format, the report's counts, `itm_prob` equal to `zoo match`'s, the threshold, and
//! resuming. The tiny filter is random, so these tests check the bookkeeping; that CapFilt with
//! a trained filter tells right captions from wrong ones is tested in
//! `trainers/tests/blip_pretrain.rs`.

use std::fs;
use std::path::{Path, PathBuf};
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

/// Three good web pairs and one undecodable image.
const WEB: [(&str, &str); 4] = [
    ("astronaut.png", "an astronaut in a white suit"),
    ("chelsea.png", "a cat looking at the camera"),
    ("broken.png", "a broken file"),
    ("small.png", "a small picture"),
];
const GOOD: u64 = 3;

fn web_pairs(dir: &Path) -> PathBuf {
    let path = dir.join("web.jsonl");
    let lines: Vec<String> = WEB
        .iter()
        .map(|(image, caption)| {
            serde_json::json!({
                "image": fixtures().join("images").join(image),
                "caption": caption,
            })
            .to_string()
        })
        .collect();
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn capfilt(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let captioner = fixtures().join("blip-tiny-caption");
    let filter = fixtures().join("blip-tiny-itm");
    let mut args = vec![
        "capfilt",
        "--captioner",
        captioner.to_str().unwrap(),
        "--filter",
        filter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--num-synthetic",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    zoo(&args)
}

fn lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each output line is JSON"))
        .collect()
}

fn count(report: &Value, source: &str, what: &str) -> u64 {
    report[source][what].as_u64().unwrap()
}

fn progress(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.done", out.display()))
}

#[test]
fn capfilt_writes_well_formed_lines_and_counts_that_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = web_pairs(dir.path());
    let out = dir.path().join("clean.jsonl");
    let report = json_stdout(&capfilt(&data, &out, &["--threshold", "0.4"]));

    assert_eq!(report["processed"], GOOD);
    assert_eq!(report["skipped"]["total"], 1);
    assert_eq!(report["skipped"]["undecodable"], 1);
    for (source, total) in [("web", GOOD), ("synthetic", 2 * GOOD)] {
        assert_eq!(count(&report, source, "total"), total, "{source}");
        assert_eq!(
            count(&report, source, "kept") + count(&report, source, "removed"),
            total,
            "{source}"
        );
    }

    let written = lines(&out);
    let good_images: Vec<String> = WEB
        .iter()
        .filter(|(image, _)| *image != "broken.png")
        .map(|(image, _)| fixtures().join("images").join(image).display().to_string())
        .collect();
    for source in ["web", "synthetic"] {
        let n = written.iter().filter(|l| l["source"] == source).count() as u64;
        assert_eq!(n, count(&report, source, "kept"), "{source}");
    }
    for line in &written {
        let obj = line.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["caption", "image", "itm_prob", "source"]);
        assert!(good_images.contains(&line["image"].as_str().unwrap().to_string()));
        assert!(!line["caption"].as_str().unwrap().trim().is_empty());
        let p = line["itm_prob"].as_f64().unwrap();
        assert!((0.4..=1.0).contains(&p), "{p}");
        if line["source"] == "web" {
            let caption = line["caption"].as_str().unwrap();
            assert!(WEB.iter().any(|(_, c)| *c == caption), "{caption}");
        } else {
            assert_eq!(line["source"], "synthetic");
        }
    }
}

#[test]
fn capfilt_threshold_zero_keeps_everything_with_zoo_match_itm_probs() {
    let dir = tempfile::tempdir().unwrap();
    let data = web_pairs(dir.path());
    let out = dir.path().join("clean.jsonl");
    let report = json_stdout(&capfilt(&data, &out, &["--threshold", "0"]));
    assert_eq!(count(&report, "web", "kept"), GOOD);
    assert_eq!(count(&report, "web", "removed"), 0);
    assert_eq!(count(&report, "synthetic", "kept"), 2 * GOOD);
    assert_eq!(count(&report, "synthetic", "removed"), 0);

    let written = lines(&out);
    assert_eq!(written.len() as u64, 3 * GOOD);
    // Per image: its web caption, then its synthetic ones, in input order.
    let sources: Vec<&str> = written
        .iter()
        .map(|l| l["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        ["web", "synthetic", "synthetic"].repeat(GOOD as usize)
    );

    let filter = fixtures().join("blip-tiny-itm");
    for line in &written {
        let image = line["image"].as_str().unwrap();
        let caption = line["caption"].as_str().unwrap();
        let matched = json_stdout(&zoo(&[
            "match",
            "--model",
            filter.to_str().unwrap(),
            "--image",
            image,
            "--text",
            caption,
            "--json",
        ]));
        let expected = matched[0]["itm_prob"].as_f64().unwrap();
        let got = line["itm_prob"].as_f64().unwrap();
        assert!(
            (got - expected).abs() < 1e-5,
            "{image} {caption:?}: capfilt {got}, match {expected}"
        );
    }
}

#[test]
fn capfilt_threshold_one_keeps_nothing_short_of_certainty() {
    let dir = tempfile::tempdir().unwrap();
    let data = web_pairs(dir.path());
    let out = dir.path().join("clean.jsonl");
    let report = json_stdout(&capfilt(&data, &out, &["--threshold", "1"]));
    assert_eq!(count(&report, "web", "kept"), 0);
    assert_eq!(count(&report, "web", "removed"), GOOD);
    assert_eq!(count(&report, "synthetic", "kept"), 0);
    assert_eq!(count(&report, "synthetic", "removed"), 2 * GOOD);
    assert_eq!(fs::read_to_string(&out).unwrap(), "");
    // Images with nothing kept are still remembered as done.
    let report = json_stdout(&capfilt(&data, &out, &["--threshold", "1"]));
    assert_eq!(report["processed"], 0);
    assert_eq!(report["already_done"], GOOD);
}

#[test]
fn capfilt_second_run_resumes_without_new_work_or_duplicate_lines() {
    let dir = tempfile::tempdir().unwrap();
    let data = web_pairs(dir.path());
    let out = dir.path().join("clean.jsonl");
    json_stdout(&capfilt(&data, &out, &["--threshold", "0"]));
    let first = fs::read_to_string(&out).unwrap();
    let first_progress = fs::read_to_string(progress(&out)).unwrap();

    let report = json_stdout(&capfilt(&data, &out, &["--threshold", "0"]));
    assert_eq!(report["processed"], 0);
    assert_eq!(report["already_done"], GOOD);
    assert_eq!(count(&report, "web", "total"), 0);
    assert_eq!(count(&report, "synthetic", "total"), 0);
    assert_eq!(fs::read_to_string(&out).unwrap(), first);
    assert_eq!(fs::read_to_string(progress(&out)).unwrap(), first_progress);
}

#[test]
fn capfilt_interrupted_run_processes_only_the_rest_and_drops_the_cut_image() {
    let dir = tempfile::tempdir().unwrap();
    let data = web_pairs(dir.path());
    let args = ["--threshold", "0", "--batch-size", "1", "--seed", "3"];

    // The uninterrupted run, for reference.
    let whole = dir.path().join("whole.jsonl");
    json_stdout(&capfilt(&data, &whole, &args));
    let whole_lines = fs::read_to_string(&whole).unwrap();
    let whole_progress = fs::read_to_string(progress(&whole)).unwrap();

    // A crash after the first image was recorded, part way through writing the second:
    // its first line was written whole, its second cut short, and it is not in the progress
    // file.
    let out = dir.path().join("clean.jsonl");
    let kept: Vec<&str> = whole_lines.lines().collect();
    let partial = format!("{}\n{}\n{}\n{}", kept[0], kept[1], kept[2], kept[3])
        + &kept[4][..kept[4].len() / 2];
    fs::write(&out, partial).unwrap();
    let first_done = whole_progress.lines().next().unwrap();
    fs::write(progress(&out), format!("{first_done}\n")).unwrap();

    let report = json_stdout(&capfilt(&data, &out, &args));
    assert_eq!(report["already_done"], 1);
    assert_eq!(report["processed"], GOOD - 1);
    assert_eq!(count(&report, "web", "total"), GOOD - 1);
    // Same seed and batch size: the result is what the uninterrupted run wrote.
    assert_eq!(fs::read_to_string(&out).unwrap(), whole_lines);
    assert_eq!(fs::read_to_string(progress(&out)).unwrap(), whole_progress);
}

#[test]
fn capfilt_reads_coco_captions_json() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["astronaut.png", "chelsea.png"] {
        fs::copy(fixtures().join("images").join(name), dir.path().join(name)).unwrap();
    }
    let data = dir.path().join("captions.json");
    let coco = serde_json::json!({
        "images": [{"id": 1, "file_name": "astronaut.png"}, {"id": 2, "file_name": "chelsea.png"}],
        "annotations": [
            {"image_id": 1, "caption": "an astronaut"},
            {"image_id": 2, "caption": "a cat"},
            {"image_id": 2, "caption": "a striped cat"},
        ],
    });
    fs::write(&data, coco.to_string()).unwrap();
    let out = dir.path().join("clean.jsonl");
    let report = json_stdout(&capfilt(&data, &out, &["--threshold", "0"]));
    assert_eq!(report["processed"], 3);
    assert_eq!(count(&report, "web", "kept"), 3);
    let captions: Vec<String> = lines(&out)
        .iter()
        .filter(|l| l["source"] == "web")
        .map(|l| l["caption"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(captions, ["an astronaut", "a cat", "a striped cat"]);
}

#[test]
fn capfilt_bad_input_fails_with_exit_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clean.jsonl");

    let missing = dir.path().join("no-such-pairs.jsonl");
    let result = capfilt(&missing, &out, &[]);
    assert_eq!(result.status.code(), Some(2));
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(err.contains("no-such-pairs.jsonl"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // An output with lines but no progress file is never appended to blindly.
    let data = web_pairs(dir.path());
    fs::write(&out, "{\"image\": \"x\"}\n").unwrap();
    let result = capfilt(&data, &out, &[]);
    assert_eq!(result.status.code(), Some(2));
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(err.contains("clean.jsonl.done"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A garbled progress file names its line.
    fs::write(progress(&out), "not json\n").unwrap();
    let result = capfilt(&data, &out, &[]);
    assert_eq!(result.status.code(), Some(2));
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(err.contains("clean.jsonl.done:1"), "{err}");
}
