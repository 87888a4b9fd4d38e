//! End-to-end training through the `zoo` binary and the library: file datasets with bad
//! samples, checkpoints in HF layout that `zoo embed` reloads exactly, evaluation commands, and
//! the demos, and BLIP pretraining through the CLI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::Value;
use zoo_datasets::synthetic::{Shapes, Split};
use zoo_models::contrastive::ScoreKind;
use zoo_trainers::contrastive::{run, ModelSpec, RunConfig, RunData};
use zoo_trainers::data::{RecordStream, SyntheticStream};
use zoo_trainers::optim::AdamWConfig;
use zoo_trainers::train::TrainConfig;

fn zoo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .output()
        .expect("zoo runs")
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `n` synthetic pairs as PNG files plus a CSV index, a JSONL index, an ImageFolder of
/// two classes, a corrupt image and a row with an empty caption.
fn write_dataset(dir: &Path, n: u64) -> (PathBuf, PathBuf, PathBuf) {
    let shapes = Shapes::with_diagonal_held_out(32, 4);
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut csv = String::from("filepath,title\n");
    let mut jsonl = String::new();
    for i in 0..n {
        let s = shapes.sample(Split::Train, i);
        let name = format!("img/{i}.png");
        s.image.save(dir.join(&name)).unwrap();
        csv.push_str(&format!("{name},\"{}\"\n", s.caption));
        jsonl.push_str(&format!(
            "{{\"image\": \"{name}\", \"caption\": \"{}\"}}\n",
            s.caption
        ));
        let class = dir
            .join("folder")
            .join(if s.shape == 0 { "circle" } else { "other" });
        std::fs::create_dir_all(&class).unwrap();
        s.image.save(class.join(format!("{i}.png"))).unwrap();
    }
    std::fs::write(dir.join("img/broken.png"), b"not a png").unwrap();
    csv.push_str("img/broken.png,a broken image\nimg/0.png,\n");
    std::fs::write(dir.join("train.csv"), csv).unwrap();
    std::fs::write(dir.join("pairs.jsonl"), jsonl).unwrap();
    (
        dir.join("train.csv"),
        dir.join("pairs.jsonl"),
        dir.join("folder"),
    )
}

#[test]
fn zoo_train_on_csv_skips_bad_samples_checkpoints_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let (csv, jsonl, folder) = write_dataset(dir.path(), 12);
    let out = dir.path().join("run");
    let stdout = ok(&zoo(&[
        "train",
        "clip",
        "--train-data",
        csv.to_str().unwrap(),
        "--batch-size",
        "4",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--save-every",
        "2",
        // 2 bad rows of 14, the first batch included: within a quarter.
        "--max-bad-fraction",
        "0.25",
        "--val-data",
        jsonl.to_str().unwrap(),
        "--zeroshot-data",
        folder.to_str().unwrap(),
        "--zeroshot-frequency",
        "2",
        "--output",
        out.to_str().unwrap(),
    ]));
    assert!(stdout.contains("trained 4 steps"), "{stdout}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(out.join("final").join(f).is_file(), "final/ lacks {f}");
    }
    assert!(out.join("checkpoint-2").join("model.safetensors").is_file());
    for png in [
        "loss.png",
        "lr.png",
        "zeroshot.png",
        "retrieval.png",
        "confusion.png",
    ] {
        assert!(out.join(png).is_file(), "no {png}");
    }
    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let skipped = lines
        .iter()
        .filter_map(|l| l["skipped_samples"].as_f64())
        .fold(0.0, f64::max);
    assert!(
        skipped >= 1.0,
        "the corrupt image and the empty caption are counted: {skipped}"
    );
    assert!(lines
        .iter()
        .any(|l| l["zeroshot_top1"].is_number() && l["image_to_text_R@1"].is_number()));
    assert_eq!(lines.iter().filter(|l| l["loss"].is_number()).count(), 4);
}

#[test]
fn trained_checkpoint_reloaded_by_zoo_embed_matches_the_in_memory_model() {
    let dir = tempfile::tempdir().unwrap();
    let shapes = Shapes::with_diagonal_held_out(32, 2);
    let data = RunData {
        train: Arc::new(move |_| {
            Ok(
                Box::new(SyntheticStream::new(shapes.clone(), Split::Train, 0).take(16))
                    as RecordStream,
            )
        }),
        zeroshot: None,
        retrieval: None,
    };
    let config = RunConfig {
        model: ModelSpec::Preset("siglip-tiny".into()),
        objective: ScoreKind::Sigmoid,
        train: TrainConfig {
            precision: Default::default(),
            steps: 3,
            lr: 1e-3,
            warmup: 1,
            accum_freq: 2,
            grad_clip_norm: None,
            save_every: None,
            eval_every: None,
            output: dir.path().join("run"),
            seed: 1,
            progress: false,
        },
        batch_size: 4,
        workers: 1,
        optimizer: AdamWConfig::default(),
        image_size: None,
        lock_image: false,
        lock_text: true,
        siglip_chunk: Some(3),
        max_bad_fraction: 0.1,
        resume: None,
        device: Device::Cpu,
    };
    let summary = run(config, data).unwrap();
    let pipeline = summary.task.model.pipeline();
    let image = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/chelsea.png");
    let texts = [
        "a small red circle on the left",
        "a large blue cross at the top",
    ];
    let ours_text = pipeline.embed_texts(&texts).unwrap();
    let ours_image = pipeline
        .embed_pixels(&pipeline.pixel_values(&[&image]).unwrap())
        .unwrap();

    let emb = dir.path().join("emb.safetensors");
    let model = summary.final_dir.to_str().unwrap().to_string();
    ok(&zoo(&[
        "embed",
        "--model",
        &model,
        "--image",
        image.to_str().unwrap(),
        "--text",
        texts[0],
        "--text",
        texts[1],
        "--out",
        emb.to_str().unwrap(),
    ]));
    let saved = candle_core::safetensors::load(&emb, &Device::Cpu).unwrap();
    let diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert!(diff(&ours_text, &saved["text_embeds"]) < 1e-5);
    assert!(diff(&ours_image, &saved["image_embeds"]) < 1e-5);
}

#[test]
fn zoo_eval_prints_zero_shot_and_retrieval_json() {
    let dir = tempfile::tempdir().unwrap();
    let (_, jsonl, folder) = write_dataset(dir.path(), 12);
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tiny-argmax");
    let zs: Value = serde_json::from_str(&ok(&zoo(&[
        "eval",
        "zeroshot",
        "--model",
        model.to_str().unwrap(),
        "--data",
        folder.to_str().unwrap(),
        "--templates",
        "simple",
        "--json",
    ])))
    .unwrap();
    assert_eq!(zs["n"], 12);
    let top1 = zs["top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1) && zs["top5"].as_f64().unwrap() >= top1);
    assert_eq!(zs["per_class"].as_object().unwrap().len(), 2);
    let rt: Value = serde_json::from_str(&ok(&zoo(&[
        "eval",
        "retrieval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        jsonl.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(rt["n"], 12);
    for k in ["image_to_text", "text_to_image"] {
        let (r1, r10) = (
            rt[format!("{k}_R@1")].as_f64().unwrap(),
            rt[format!("{k}_R@10")].as_f64().unwrap(),
        );
        // An untrained model's recall is arbitrary, but monotone in K and at most 1.
        assert!(
            (0.0..=1.0).contains(&r10) && r1 <= r10,
            "{k}: R@1 {r1} R@10 {r10}"
        );
    }
    // At another resolution (the position table interpolated, as `zoo embed --image-size`).
    for (cmd, data) in [("zeroshot", &folder), ("retrieval", &jsonl)] {
        let at = |size: &str| {
            let mut args = vec!["eval", cmd, "--model", model.to_str().unwrap()];
            args.extend([
                "--data",
                data.to_str().unwrap(),
                "--image-size",
                size,
                "--json",
            ]);
            zoo(&args)
        };
        let v: Value = serde_json::from_str(&ok(&at("64"))).unwrap();
        assert_eq!(v["n"], 12, "{cmd}");
        let bad = at("0");
        assert_eq!(bad.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&bad.stderr).contains("at least 1"));
    }
}

#[test]
fn zoo_demo_trains_evaluates_and_writes_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let v: Value = serde_json::from_str(&ok(&zoo(&[
        "demo",
        "--steps",
        "8",
        "--batch-size",
        "16",
        "--eval-samples",
        "40",
        "--output",
        out.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["n"], 40);
    assert_eq!(v["chance_top1"], 0.05);
    assert_eq!(v["held_out_classes"].as_array().unwrap().len(), 5);
    for png in ["loss.png", "confusion.png"] {
        assert!(out.join(png).is_file(), "no {png}");
    }
}

#[test]
fn zoo_demo_caption_trains_captions_held_out_images_and_scores_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo-caption");
    let v: Value = serde_json::from_str(&ok(&zoo(&[
        "demo",
        "caption",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--eval-samples",
        "8",
        "--output",
        out.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["n"], 8);
    assert_eq!(v["steps"], 3);
    let (bleu4, cider) = (v["bleu4"].as_f64().unwrap(), v["cider"].as_f64().unwrap());
    assert!((0.0..=1.0).contains(&bleu4) && cider >= 0.0 && cider.is_finite());
    let examples = v["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 8);
    assert!(examples
        .iter()
        .all(|e| e["truth"].as_str().unwrap().starts_with("a ")));
    assert!(out.join("loss.png").is_file());
    assert!(out.join("final/model.safetensors").is_file());
}

#[test]
fn zoo_train_blip_pretrain_writes_a_folder_zoo_match_and_zoo_caption_use() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pretrain");
    let stdout = ok(&zoo(&[
        "train",
        "blip",
        "--objective",
        "pretrain",
        "--train-data",
        "synthetic",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--queue-size",
        "8",
        "--workers",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]));
    assert!(stdout.contains("trained 2 steps"), "{stdout}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    for k in ["loss_itc", "loss_itm", "loss_lm", "temp", "alpha"] {
        assert!(last[k].is_number(), "metrics lack {k}: {last}");
    }
    let model = out.join("final");
    assert!(model.join("blip_pretrain_state.safetensors").is_file());
    let image = fixtures().join("images/astronaut.png");
    let matched: Value = serde_json::from_str(&ok(&zoo(&[
        "match",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--text",
        "a small red circle on the left",
        "--json",
    ])))
    .unwrap();
    let p = matched[0]["itm_prob"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{matched}");
    let captions: Value = serde_json::from_str(&ok(&zoo(&[
        "caption",
        "--model",
        model.to_str().unwrap(),
        "--max-new-tokens",
        "5",
        "--json",
        image.to_str().unwrap(),
    ])))
    .unwrap();
    assert_eq!(captions[0]["token_ids"][0], 30522, "starts with [DEC]");

    // Pretraining needs negatives from the batch, and a queue at least a batch long.
    for (flags, needle) in [
        (["--batch-size", "1", "--queue-size", "8"], "at least 2"),
        (["--batch-size", "4", "--queue-size", "3"], "--queue-size 3"),
    ] {
        let mut args = vec![
            "train",
            "blip",
            "--objective",
            "pretrain",
            "--train-data",
            "synthetic",
            "--steps",
            "1",
            "--output",
            dir.path().to_str().unwrap(),
        ];
        args.extend(flags);
        let bad = zoo(&args);
        let err = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(2), "{err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{err}");
    }
}

#[test]
fn training_input_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let out = zoo(&[
        "train",
        "clip",
        "--train-data",
        "/no/such/data.csv",
        "--steps",
        "2",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/no/such/data.csv") && !err.contains("panicked"),
        "{err}"
    );
    let out = zoo(&[
        "train",
        "siglip",
        "--model",
        "clip-tiny",
        "--train-data",
        "synthetic",
        "--steps",
        "1",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("use `zoo train clip`"));
    let out = zoo(&[
        "train",
        "clip",
        "--train-data",
        "synthetic",
        "--steps",
        "1",
        "--precision",
        "amp_bf16",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no bf16 matmul on the CPU") && err.contains("use --precision amp_fp16"),
        "{err}"
    );
    let out = zoo(&["train", "clip", "--precision", "fp8", "--output", "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("fp32, fp16, bf16, amp_fp16, amp_bf16"),
        "{err}"
    );
}
