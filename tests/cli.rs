//! End-to-end tests of the `zoo` binary on the committed tiny fixtures: the `embed` output
//! contract against HF's reference tensors, `classify`, offline hub loading, and bad input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn zoo(args: &[&str]) -> Output {
    zoo_env(args, &[])
}

fn zoo_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zoo"));
    cmd.args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HOME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("zoo runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
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
}

fn mean_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn reference_texts(name: &str) -> Vec<String> {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(name).join("reference_texts.json")).unwrap(),
    )
    .unwrap();
    meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Runs `zoo embed` on a fixture with HF's reference images and texts and checks every output
/// tensor against what HF produced for the same inputs.
fn embed_matches_hf(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("emb.safetensors");
    let model = fixtures().join(name);
    let images = [
        fixtures().join("images/astronaut.png"),
        fixtures().join("images/chelsea.png"),
    ];
    let texts = reference_texts(name);
    let mut args = vec![
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
        "--json",
    ];
    for i in &images {
        args.extend(["--image", i.to_str().unwrap()]);
    }
    for t in &texts {
        args.extend(["--text", t.as_str()]);
    }
    let out = zoo(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["image_embeds_shape"], serde_json::json!([2, 24]));
    assert_eq!(json["text_embeds_shape"][0], 4);
    assert_eq!(json["logits_per_image"].as_array().unwrap().len(), 2);

    let ours = load(&out_path);
    let hf = load(&model.join("reference.safetensors"));
    assert_eq!(ours["pixel_values"].dtype(), DType::F32);
    assert_eq!(ours["input_ids"].dtype(), DType::I64);
    assert_eq!(
        ours["input_ids"].to_vec2::<i64>().unwrap(),
        hf["input_ids"].to_vec2::<i64>().unwrap()
    );
    let pixel_gap = mean_abs(&ours["pixel_values"], &hf["pixel_values"]);
    assert!(
        pixel_gap < 0.01,
        "{name}: pixel_values mean abs diff {pixel_gap}"
    );
    // Given the same inputs, the outputs are HF's.
    for key in ["image_embeds", "text_embeds", "logits_per_image"] {
        let d = max_abs(&ours[key], &hf[key]);
        assert!(d < 1e-4, "{name}: {key} differs from HF by {d}");
    }
}

#[test]
fn embed_writes_hf_tensors_for_clip() {
    embed_matches_hf("clip-tiny-argmax");
}

#[test]
fn embed_writes_hf_tensors_for_sharded_clip_at_48px() {
    embed_matches_hf("clip-tiny-eos");
}

#[test]
fn embed_writes_hf_tensors_for_siglip() {
    embed_matches_hf("siglip-tiny");
}

fn classify_json(model: &Path, extra: &[&str]) -> Value {
    let astronaut = fixtures().join("images/astronaut.png");
    let mut args = vec!["classify", "--model", model.to_str().unwrap(), "--json"];
    args.extend(extra);
    args.push(astronaut.to_str().unwrap());
    let out = zoo(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn classify_ranks_labels_with_softmax_for_clip_and_sigmoid_for_siglip() {
    let clip = classify_json(
        &fixtures().join("clip-tiny-argmax"),
        &["--labels", "cat,dog,a red car", "--top-k", "3"],
    );
    let preds = clip[0]["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 3);
    let probs: Vec<f64> = preds.iter().map(|p| p["prob"].as_f64().unwrap()).collect();
    assert!(
        (probs.iter().sum::<f64>() - 1.0).abs() < 1e-5,
        "softmax over labels: {probs:?}"
    );
    assert!(probs.windows(2).all(|w| w[0] >= w[1]), "sorted: {probs:?}");

    let siglip = classify_json(
        &fixtures().join("siglip-tiny"),
        &["--labels", "cat,dog,a red car"],
    );
    let preds = siglip[0]["predictions"].as_array().unwrap();
    for p in preds {
        // An independent sigmoid of the logit.
        let (prob, logit) = (p["prob"].as_f64().unwrap(), p["logit"].as_f64().unwrap());
        assert!((prob - 1.0 / (1.0 + (-logit).exp())).abs() < 1e-5);
    }
}

#[test]
fn classify_averages_templates_and_reads_a_labels_file() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, "# classes\ncat\n\ndog\na red car\n").unwrap();
    let model = fixtures().join("clip-tiny-argmax");
    let single = classify_json(
        &model,
        &[
            "--labels-file",
            labels.to_str().unwrap(),
            "--template",
            "a photo of a {}.",
        ],
    );
    let ensemble = classify_json(
        &model,
        &[
            "--labels-file",
            labels.to_str().unwrap(),
            "--template",
            "a photo of a {}.",
            "--template",
            "a small {} on the left",
        ],
    );
    let labels_of = |v: &Value| {
        let mut l: Vec<String> = v[0]["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["label"].as_str().unwrap().to_string())
            .collect();
        l.sort();
        l
    };
    assert_eq!(labels_of(&single), vec!["a red car", "cat", "dog"]);
    let logit = |v: &Value, label: &str| {
        v[0]["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["label"] == label)
            .unwrap()["logit"]
            .as_f64()
            .unwrap()
    };
    assert!(
        (logit(&single, "cat") - logit(&ensemble, "cat")).abs() > 1e-6,
        "the second template changes the classifier"
    );
}

/// Lays out `fixture` as hf-hub's cache expects: `models--org--name/{refs,snapshots}`.
fn fake_hub_cache(fixture: &str, repo: &str, refs: &[&str]) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let root = home
        .path()
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = root.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    for entry in std::fs::read_dir(fixtures().join(fixture)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, snapshot.join(path.file_name().unwrap())).unwrap();
    }
    for r in refs {
        std::fs::write(root.join("refs").join(r), commit).unwrap();
    }
    home
}

#[test]
fn hub_ids_load_offline_from_an_hf_cache() {
    let home = fake_hub_cache("clip-tiny-eos", "zoo-test/clip-tiny", &["main", "v1"]);
    let astronaut = fixtures().join("images/astronaut.png");
    let env = [("HF_HOME", home.path()), ("HF_HUB_OFFLINE", Path::new("1"))];
    for model in [
        "zoo-test/clip-tiny",
        "zoo-test/clip-tiny@v1",
        "zoo-test/clip-tiny@0123456789abcdef0123456789abcdef01234567",
    ] {
        let out = zoo_env(
            &[
                "classify",
                "--model",
                model,
                "--labels",
                "cat,dog",
                "--json",
                astronaut.to_str().unwrap(),
            ],
            &env,
        );
        assert!(out.status.success(), "{model}: {}", stderr(&out));
    }
    let out = zoo_env(
        &[
            "classify",
            "--model",
            "zoo-test/other",
            "--labels",
            "cat",
            astronaut.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("config.json not found in zoo-test/other@main"),
        "{}",
        stderr(&out)
    );
}

/// A writable copy of a fixture model.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
}

/// Runs `zoo embed` on `model` and expects exit 2 with every `needles` in stderr, and no panic.
fn expect_clean_failure(args: &[&str], needles: &[&str]) {
    let out = zoo(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

fn embed_text(model: &Path) -> Vec<String> {
    vec![
        "embed".into(),
        "--model".into(),
        model.to_str().unwrap().into(),
        "--text".into(),
        "a cat".into(),
    ]
}

fn run_embed(model: &Path, needles: &[&str]) {
    let args = embed_text(model);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_clean_failure(&refs, needles);
}

#[test]
fn missing_model_folder_or_config_is_a_clear_error() {
    run_embed(
        Path::new("/no/such/model-folder"),
        &["/no/such/model-folder", "does not exist"],
    );
    let empty = tempfile::tempdir().unwrap();
    run_embed(
        empty.path(),
        &["config.json not found in", empty.path().to_str().unwrap()],
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("clip-tiny-argmax");
    let path = dir.path().join("model.safetensors");
    let mut tensors = load(&path);
    tensors.remove("text_projection.weight").unwrap();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    run_embed(
        dir.path(),
        &["text_projection.weight", "missing", "model.safetensors"],
    );
}

#[test]
fn weight_shape_disagreeing_with_config_names_tensor_and_both_shapes() {
    let dir = copy_fixture("clip-tiny-argmax");
    edit_config(dir.path(), |c| {
        c["text_config"]["intermediate_size"] = 80.into()
    });
    run_embed(
        dir.path(),
        &[
            "text_model.encoder.layers.0.mlp.fc1.weight",
            "[64, 32]",
            "[80, 32]",
        ],
    );
}

#[test]
fn truncated_safetensors_is_reported_with_its_file() {
    let dir = copy_fixture("clip-tiny-argmax");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    run_embed(dir.path(), &["model.safetensors", "truncated"]);
}

#[test]
fn unknown_model_type_is_reported() {
    let dir = copy_fixture("clip-tiny-argmax");
    edit_config(dir.path(), |c| c["model_type"] = "blipblop".into());
    run_embed(
        dir.path(),
        &[
            "unknown model_type `blipblop`",
            "config.json",
            "clip, siglip",
        ],
    );
}

#[test]
fn undecodable_image_names_the_file() {
    let model = fixtures().join("clip-tiny-argmax");
    let broken = fixtures().join("images/broken.png");
    expect_clean_failure(
        &[
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--image",
            broken.to_str().unwrap(),
        ],
        &["cannot decode image", "broken.png"],
    );
}

#[test]
fn empty_labels_are_rejected() {
    let model = fixtures().join("clip-tiny-argmax");
    let img = fixtures().join("images/astronaut.png");
    expect_clean_failure(
        &[
            "classify",
            "--model",
            model.to_str().unwrap(),
            "--labels",
            "",
            img.to_str().unwrap(),
        ],
        &["no labels"],
    );
    expect_clean_failure(
        &[
            "classify",
            "--model",
            model.to_str().unwrap(),
            "--labels",
            " , ,",
            img.to_str().unwrap(),
        ],
        &["no labels"],
    );
}

#[test]
fn bf16_on_cpu_is_refused_with_advice() {
    let model = fixtures().join("clip-tiny-argmax");
    expect_clean_failure(
        &[
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--text",
            "x",
            "--dtype",
            "bf16",
        ],
        &["bf16", "f32"],
    );
}

/// `--image-size`: the images are preprocessed to the new size and the model runs on them (its
/// position table interpolated; the interpolation itself is checked against HF in
/// `models/tests/interpolate_pos.rs`); BLIP captions at another size too.
#[test]
fn image_size_runs_vision_towers_at_another_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixtures().join("images/chelsea.png");
    let model = fixtures().join("clip-tiny-eos");
    let embed = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = zoo(&args);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let (base, big) = (
        dir.path().join("48.safetensors"),
        dir.path().join("64.safetensors"),
    );
    embed(&[], &base);
    embed(&["--image-size", "64"], &big);
    let (base, big) = (load(&base), load(&big));
    assert_eq!(base["pixel_values"].dims(), [1, 3, 48, 48]);
    assert_eq!(big["pixel_values"].dims(), [1, 3, 64, 64]);
    let norm: f32 = big["image_embeds"]
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    assert!(max_abs(&base["image_embeds"], &big["image_embeds"]) > 1e-4);

    let model = fixtures().join("blip-tiny-caption");
    let out = zoo(&[
        "caption",
        "--model",
        model.to_str().unwrap(),
        image.to_str().unwrap(),
        "--image-size",
        "48",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bad = zoo(&[
        "caption",
        "--model",
        model.to_str().unwrap(),
        image.to_str().unwrap(),
        "--image-size",
        "0",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    let err = stderr(&bad);
    assert!(
        err.contains("--image-size") && err.contains("at least 1"),
        "{err}"
    );
}
