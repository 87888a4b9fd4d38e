//! Bad input over every subcommand, table-driven: each case must end with exit status 2, an
//! `error:` line that names the flag or the file at fault, and no panic. Then the cases that
//! need more than a table: a closed stdout, stale temporary checkpoints, dataset keys that try
//! to climb out of their folder, and a pickle that tries to run a command.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture(name: &str) -> String {
    fixtures().join(name).to_string_lossy().into_owned()
}

fn zoo(args: &[String], home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .env("HF_HOME", home)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .output()
        .expect("zoo runs")
}

/// One bad input: the command line, and what its error must name.
struct Case {
    args: Vec<String>,
    names: String,
}

fn case(args: &[&str], names: &str) -> Case {
    Case {
        args: args.iter().map(|s| s.to_string()).collect(),
        names: names.to_string(),
    }
}

/// `base` with the `(flag, value)` pairs of `defaults` that `over` does not replace, then
/// `over`; a value of "" is a bare switch.
fn with(base: &[&str], defaults: &[(&str, &str)], over: &[(&str, &str)], names: &str) -> Case {
    let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    for (flag, value) in defaults
        .iter()
        .filter(|(f, _)| !over.iter().any(|(o, _)| o == f))
        .chain(over)
    {
        args.push(flag.to_string());
        if !value.is_empty() {
            args.push(value.to_string());
        }
    }
    Case {
        args,
        names: names.to_string(),
    }
}

/// Runs every case and fails with the list of those that did not answer as they should.
fn run_table(cases: Vec<Case>, home: &Path) {
    let n = cases.len();
    println!("{n} bad-input cases");
    let failures: Vec<String> = cases
        .into_iter()
        .filter_map(|c| {
            let out = zoo(&c.args, home);
            let err = String::from_utf8_lossy(&out.stderr);
            let error_line = err
                .lines()
                .find(|l| l.starts_with("error:"))
                .unwrap_or_default();
            let problems = [
                (out.status.code() != Some(2), "exit status is not 2"),
                (error_line.is_empty(), "no `error:` line"),
                (!err.contains(&c.names), "the error does not name it"),
                (
                    err.contains("panicked") || err.contains("RUST_BACKTRACE"),
                    "it panicked",
                ),
            ];
            let what: Vec<&str> = problems.iter().filter(|p| p.0).map(|p| p.1).collect();
            (!what.is_empty()).then(|| {
                format!(
                    "zoo {}\n  expected {:?}: {} (status {:?})\n  stderr: {}",
                    c.args.join(" "),
                    c.names,
                    what.join(", "),
                    out.status.code(),
                    err.trim()
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Files the file cases point at, in one temporary folder.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn write(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.dir.path().join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, bytes).unwrap();
        path.to_string_lossy().into_owned()
    }

    /// A copy of the fixture model `name` with `file` replaced by `contents`.
    fn model_with(&self, name: &str, copy: &str, file: &str, contents: &str) -> String {
        let dir = self.dir.path().join(copy);
        fs::create_dir_all(&dir).unwrap();
        for entry in fs::read_dir(fixtures().join(name)).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        fs::write(dir.join(file), contents).unwrap();
        dir.to_string_lossy().into_owned()
    }

    /// A CSV of `good` real images and `missing` rows whose images do not exist.
    fn csv(&self, name: &str, good: usize, missing: usize) -> String {
        let mut text = String::from("filepath,title\n");
        for i in 0..good {
            let image = ["chelsea.png", "astronaut.png", "small.png"][i % 3];
            text.push_str(&format!(
                "{},picture number {i}\n",
                fixtures().join("images").join(image).display()
            ));
        }
        for i in 0..missing {
            text.push_str(&format!("no-such-image-{i}.png,a missing picture\n"));
        }
        self.write(name, text.as_bytes())
    }
}

/// The first half of a real JPEG.
fn truncated_jpeg() -> Vec<u8> {
    let bytes = fs::read(fixtures().join("images/cmyk.jpg")).unwrap();
    bytes[..bytes.len() / 2].to_vec()
}

const TRAIN: &[&str] = &["train", "clip"];
const TRAIN_DEFAULTS: &[(&str, &str)] = &[
    ("--train-data", "synthetic"),
    ("--steps", "2"),
    ("--batch-size", "4"),
];

#[test]
fn training_flags_out_of_range_are_refused_by_name() {
    let s = Scratch::new();
    let out = s.path("run");
    let defaults: Vec<(&str, &str)> = TRAIN_DEFAULTS
        .iter()
        .copied()
        .chain([("--output", out.as_str())])
        .collect();
    let t =
        |flag: &'static str, value: &'static str| with(TRAIN, &defaults, &[(flag, value)], flag);
    let mut cases = vec![
        t("--steps", "0"),
        t("--steps", "-3"),
        t("--steps", "many"),
        t("--batch-size", "0"),
        t("--batch-size", "1"),
        t("--accum-freq", "0"),
        t("--grad-clip-norm", "NaN"),
        t("--grad-clip-norm", "0"),
        t("--beta1", "2"),
        t("--beta2", "1"),
        t("--beta1", "-0.1"),
        t("--eps", "0"),
        t("--lr", "NaN"),
        t("--lr", "inf"),
        t("--lr", "-0.001"),
        t("--wd", "NaN"),
        t("--wd", "-0.1"),
        t("--max-bad-fraction", "NaN"),
        t("--max-bad-fraction", "1.5"),
        t("--siglip-chunk", "0"),
        t("--train-num-samples", "0"),
        t("--save-every", "0"),
        t("--zeroshot-frequency", "0"),
        t("--image-size", "0"),
        t("--image-size", "100000"),
        t("--workers", "0"),
        t("--workers", "100000"),
        t("--val-samples", "0"),
        t("--label-smoothing", "1"),
        t("--momentum", "1"),
        t("--alpha", "2"),
        t("--mtp-depth", "0"),
        t("--mtp-lambda", "-1"),
        t("--medusa-num-heads", "0"),
        t("--draft-vocab", "0"),
        // Only Medusa and MTP draft: `zoo train clip` refuses it.
        t("--draft-vocab", "100"),
        t("--medusa-lr-multiplier", "0"),
        t("--medusa-heads-coefficient", "NaN"),
        t("--distill-temperature", "NaN"),
        t("--distill-prompt-len", "0"),
        t("--seq-len", "1"),
        t("--vocab-size", "0"),
        t("--device", "gpu"),
        t("--device", "cuda:x"),
        t("--precision", "fp8"),
        t("--warmup", "-1"),
        t("--dataset-type", "parquet"),
    ];
    // --epochs conflicts with --steps, so it goes without.
    cases.push(case(
        &[
            "train",
            "clip",
            "--train-data",
            "synthetic",
            "--epochs",
            "0",
            "--output",
            &out,
        ],
        "--epochs",
    ));
    run_table(cases, s.dir.path());
    assert!(
        !Path::new(&out).exists(),
        "no refused run may write its output folder"
    );
}

#[test]
fn training_data_problems_name_the_data() {
    let s = Scratch::new();
    let out = s.path("run");
    let empty_tar = s.write("empty.tar", &[0u8; 1024]);
    let zero_tar = s.write("zero.tar", b"");
    let missing = s.csv("missing.csv", 0, 5);
    // 7 good and 4 missing images: 36% bad, in a run far shorter than 64 samples.
    let mostly_bad = s.csv("mostly-bad.csv", 7, 4);
    let text = s.write("corpus.txt", b"hello world, a tiny corpus\n");
    let train = |data: &str, extra: &[(&str, &str)], names: &str| {
        let mut over = vec![("--train-data", data), ("--output", out.as_str())];
        over.extend_from_slice(extra);
        with(TRAIN, TRAIN_DEFAULTS, &over, names)
    };
    let cases = vec![
        train(&empty_tar, &[], "empty.tar"),
        train(&zero_tar, &[], "zero.tar"),
        train(&missing, &[], "missing.csv"),
        train(&mostly_bad, &[], "--max-bad-fraction"),
        train("/no/such/pairs.csv", &[], "/no/such/pairs.csv"),
        train("synthetic", &[("--resume", "/no/such/run")], "/no/such/run"),
        train(
            "synthetic",
            &[("--zeroshot-data", "/no/such/folder")],
            "/no/such/folder",
        ),
        case(
            &[
                "train",
                "lm",
                "--train-data",
                "/no/such/*.txt",
                "--steps",
                "1",
                "--output",
                &out,
            ],
            "/no/such/*.txt",
        ),
        case(
            &[
                "train",
                "lm",
                "--train-data",
                &text,
                "--steps",
                "1",
                "--seq-len",
                "64",
                "--output",
                &out,
            ],
            "--seq-len",
        ),
        case(
            &[
                "train",
                "medusa",
                "--train-data",
                &text,
                "--steps",
                "1",
                "--output",
                &out,
            ],
            "--model",
        ),
        case(
            &[
                "train",
                "medusa",
                "--model",
                &fixture("llama-tiny"),
                "--train-data",
                &text,
                "--steps",
                "1",
                "--chat",
                "--output",
                &out,
            ],
            "--self-distill",
        ),
        case(
            &[
                "train",
                "medusa",
                "--model",
                &fixture("llama-tiny"),
                "--train-data",
                &text,
                "--steps",
                "1",
                "--self-distill",
                "--chat",
                "--distill-prompt-len",
                "4",
                "--output",
                &out,
            ],
            "--distill-prompt-len",
        ),
        // A checkpoint without a chat template cannot render chat prompts.
        case(
            &[
                "train",
                "medusa",
                "--model",
                &fixture("llama-tiny"),
                "--train-data",
                &text,
                "--steps",
                "1",
                "--self-distill",
                "--chat",
                "--seq-len",
                "64",
                "--output",
                &out,
            ],
            "chat template",
        ),
        case(
            &[
                "train",
                "lm",
                "--train-data",
                &text,
                "--steps",
                "1",
                "--medusa-shared-lm-head",
                "--output",
                &out,
            ],
            "--medusa-shared-lm-head",
        ),
        case(
            &[
                "train",
                "medusa",
                "--model",
                &fixture("llama-tiny"),
                "--train-data",
                &text,
                "--steps",
                "1",
                "--seq-len",
                "100000",
                "--output",
                &out,
            ],
            "--seq-len",
        ),
        case(
            &[
                "train",
                "blip",
                "--train-data",
                "synthetic",
                "--steps",
                "1",
                "--output",
                &out,
            ],
            "--objective",
        ),
    ];
    run_table(cases, s.dir.path());
}

#[test]
fn inference_flags_and_files_are_refused_by_name() {
    let s = Scratch::new();
    let clip = fixture("clip-tiny-eos");
    let blip = fixture("blip-tiny-caption");
    let itm = fixture("blip-tiny-itm");
    let llama = fixture("llama-tiny");
    let image = fixture("images/chelsea.png");
    let broken = fixture("images/broken.png");
    let truncated = s.write("truncated.jpg", &truncated_jpeg());
    let size0 = s.model_with(
        "clip-tiny-eos",
        "size0",
        "preprocessor_config.json",
        r#"{"size": 0, "crop_size": 32, "feature_extractor_type": "CLIPFeatureExtractor"}"#,
    );
    let crop0 = s.model_with(
        "clip-tiny-eos",
        "crop0",
        "preprocessor_config.json",
        r#"{"size": 32, "crop_size": {"height": 0, "width": 32}, "feature_extractor_type": "CLIPFeatureExtractor"}"#,
    );
    let climbing_shards = s.model_with(
        "clip-tiny-eos",
        "climbing",
        "model.safetensors.index.json",
        r#"{"weight_map": {"logit_scale": "../../../../etc/passwd"}}"#,
    );
    let bad_tokenizer = s.model_with(
        "clip-tiny-eos",
        "badtok",
        "tokenizer.json",
        r#"{"version": "1.0", "decoder": {"type": "ByteLevel" "add_prefix_space": true}}"#,
    );
    let choices = s.write("choices.json", b"[[0], [0, 7], [1, -1]]");
    let medusa = fixture("llama-tiny-medusa");

    let caption = |over: &[(&str, &str)], names: &str| {
        let mut c = with(&["caption"], &[("--model", blip.as_str())], over, names);
        c.args.push(image.clone());
        c
    };
    let generate = |over: &[(&str, &str)], names: &str| {
        with(
            &["generate"],
            &[("--model", llama.as_str()), ("--prompt", "hello")],
            over,
            names,
        )
    };
    let classify = |model: &str, img: &str, extra: &[&str], names: &str| {
        let mut args = vec!["classify", "--model", model, "--labels", "cat,dog"];
        args.extend_from_slice(extra);
        args.push(img);
        case(&args, names)
    };
    let cases = vec![
        // caption
        caption(&[("--max-new-tokens", "0")], "--max-new-tokens"),
        caption(&[("--length-penalty", "NaN")], "--length-penalty"),
        caption(
            &[
                ("--max-new-tokens", "1000000000"),
                ("--min-new-tokens", "1000000000"),
            ],
            "max_position_embeddings",
        ),
        caption(&[("--beams", "0")], "--beams"),
        caption(&[("--beams", "1000000000000")], "--beams"),
        caption(&[("--top-p", "0")], "--top-p"),
        caption(&[("--top-p", "1.5")], "--top-p"),
        caption(&[("--temperature", "0")], "--temperature"),
        caption(&[("--repetition-penalty", "0")], "--repetition-penalty"),
        caption(&[("--batch-size", "0")], "--batch-size"),
        caption(&[("--dtype", "f8")], "--dtype"),
        caption(&[("--image-size", "0")], "--image-size"),
        caption(&[("--image-size", "100000")], "--image-size"),
        caption(
            &[("--min-new-tokens", "9"), ("--max-new-tokens", "3")],
            "--min-new-tokens",
        ),
        case(&["caption", "--model", &blip, &truncated], "truncated.jpg"),
        case(&["caption", "--model", &blip, &broken], "broken.png"),
        case(
            &["caption", "--model", &blip, "/no/such.png"],
            "/no/such.png",
        ),
        // generate
        generate(&[("--max-new-tokens", "0")], "--max-new-tokens"),
        generate(
            &[
                ("--max-new-tokens", "1000000000"),
                ("--min-new-tokens", "1000000000"),
            ],
            "max_position_embeddings",
        ),
        generate(
            &[("--max-new-tokens", "4"), ("--min-new-tokens", "8")],
            "--min-new-tokens",
        ),
        generate(&[("--temperature", "-1")], "--temperature"),
        generate(&[("--top-p", "NaN")], "--top-p"),
        generate(&[("--repetition-penalty", "inf")], "--repetition-penalty"),
        generate(&[("--prompt", "")], "prompt"),
        generate(&[("--medusa-choices", choices.as_str())], "--medusa"),
        generate(&[("--acceptance", "exact")], "--acceptance"),
        generate(&[("--draft-vocab", "100")], "--draft-vocab"),
        generate(
            &[("--medusa", medusa.as_str()), ("--draft-vocab", "0")],
            "--draft-vocab",
        ),
        generate(
            &[("--medusa", medusa.as_str()), ("--draft-vocab", "100000")],
            "--draft-vocab",
        ),
        generate(
            &[("--medusa", medusa.as_str()), ("--medusa-choices", "auto")],
            "medusa_accuracy.json",
        ),
        generate(&[("--posterior-alpha", "0.2")], "--posterior-alpha"),
        generate(&[("--stop", "")], "--stop"),
        generate(
            &[
                ("--medusa", medusa.as_str()),
                ("--temperature", "0.7"),
                ("--top-p", "0.9"),
            ],
            "--acceptance exact",
        ),
        generate(
            &[
                ("--medusa", medusa.as_str()),
                ("--posterior-threshold", "2"),
            ],
            "--posterior-threshold",
        ),
        generate(
            &[
                ("--medusa", medusa.as_str()),
                ("--medusa-choices", choices.as_str()),
            ],
            "choices.json",
        ),
        generate(&[("--model", "/no/such/llama")], "/no/such/llama"),
        generate(&[("--model", "org/name@../../etc")], "is not a revision"),
        // classify, embed, match
        classify(&clip, &image, &["--top-k", "0"], "--top-k"),
        classify(&clip, &truncated, &[], "truncated.jpg"),
        classify(&clip, &broken, &[], "broken.png"),
        classify(&size0, &image, &[], "preprocessor_config.json"),
        classify(&crop0, &image, &[], "preprocessor_config.json"),
        classify(&bad_tokenizer, &image, &[], "tokenizer.json"),
        classify(&climbing_shards, &image, &[], "../../../../etc/passwd"),
        classify(&clip, &image, &["--image-size", "100000"], "--image-size"),
        case(&["classify", "--model", &clip, &image], "labels"),
        case(&["embed", "--model", &clip], "--image or --text"),
        case(
            &["embed", "--model", "/no/such/clip", "--text", "a"],
            "/no/such/clip",
        ),
        case(
            &["embed", "--model", &clip, "--image", &truncated],
            "truncated.jpg",
        ),
        case(
            &["embed", "--model", &clip, "--text", "a", "--device", "tpu"],
            "--device",
        ),
        case(
            &[
                "match",
                "--model",
                &itm,
                "--image",
                "/no/such.png",
                "--text",
                "a",
            ],
            "/no/such.png",
        ),
    ];
    run_table(cases, s.dir.path());
}

#[test]
fn eval_bench_demo_and_capfilt_flags_are_refused_by_name() {
    let s = Scratch::new();
    let clip = fixture("clip-tiny-eos");
    let blip = fixture("blip-tiny-caption");
    let itm = fixture("blip-tiny-itm");
    let llama = fixture("llama-tiny");
    let pairs = s.csv("pairs.csv", 3, 0);
    let missing = s.csv("missing.csv", 0, 4);
    let text = s.write("corpus.txt", b"some words to score\n");
    let out = s.path("clean.jsonl");
    let capfilt = |data: &str, extra: &[&str], names: &str| {
        let mut args = vec![
            "capfilt",
            "--captioner",
            blip.as_str(),
            "--filter",
            itm.as_str(),
            "--data",
            data,
            "--out",
            out.as_str(),
        ];
        args.extend_from_slice(extra);
        case(&args, names)
    };
    let cases = vec![
        // eval
        case(
            &[
                "eval",
                "retrieval",
                "--model",
                &clip,
                "--data",
                &pairs,
                "--max-samples",
                "0",
            ],
            "--max-samples",
        ),
        case(
            &["eval", "retrieval", "--model", &clip, "--data", &missing],
            "missing.csv",
        ),
        case(
            &[
                "eval",
                "lm",
                "--model",
                &llama,
                "--data",
                &text,
                "--seq-len",
                "1",
            ],
            "--seq-len",
        ),
        case(
            &[
                "eval",
                "lm",
                "--model",
                &llama,
                "--data",
                &text,
                "--seq-len",
                "100000",
            ],
            "--seq-len",
        ),
        case(
            &[
                "eval",
                "zeroshot",
                "--model",
                &clip,
                "--data",
                "/no/such/folder",
            ],
            "/no/such/folder",
        ),
        case(
            &[
                "eval",
                "caption",
                "--predictions",
                "/no/such/preds.json",
                "--references",
                &pairs,
            ],
            "/no/such/preds.json",
        ),
        // bench
        case(
            &["bench", "embed", "--model", &clip, "--repeats", "0"],
            "--repeats",
        ),
        case(
            &["bench", "embed", "--model", &clip, "--batch", "0"],
            "--batch",
        ),
        case(
            &["bench", "embed", "--model", &clip, "--batch", "100000000"],
            "--batch",
        ),
        case(
            &["bench", "train-step", "--model", &clip, "--steps", "0"],
            "--steps",
        ),
        case(
            &["bench", "caption", "--model", &blip, "--images", "0"],
            "--images",
        ),
        case(
            &[
                "bench",
                "caption",
                "--model",
                &blip,
                "--max-new-tokens",
                "0",
            ],
            "--max-new-tokens",
        ),
        case(&["bench", "attention", "--head-dim", "0"], "--head-dim"),
        case(&["bench", "attention", "--lengths", "0"], "--lengths"),
        case(&["bench", "attention", "--lengths", "64,x"], "--lengths"),
        case(
            &["bench", "attention", "--lengths", "10000000000"],
            "--lengths",
        ),
        case(&["bench", "attention", "--heads", "0"], "--heads"),
        case(
            &["bench", "attention", "--heads", "6", "--kv-heads", "4"],
            "--kv-heads",
        ),
        case(
            &[
                "bench",
                "generate",
                "--model",
                &llama,
                "--prompt",
                "hi",
                "--max-new-tokens",
                "0",
            ],
            "--max-new-tokens",
        ),
        case(
            &[
                "bench",
                "generate",
                "--model",
                &llama,
                "--prompt",
                "hi",
                "--max-new-tokens",
                "100000",
            ],
            "max_position_embeddings",
        ),
        // demo
        case(&["demo", "--batch-size", "0"], "--batch-size"),
        case(&["demo", "--batch-size", "1"], "--batch-size"),
        case(&["demo", "--steps", "0"], "--steps"),
        case(&["demo", "--eval-samples", "0"], "--eval-samples"),
        case(&["demo", "--model", "resnet50"], "--model"),
        case(&["demo", "caption", "--batch-size", "0"], "--batch-size"),
        case(&["demo", "caption", "--steps", "0"], "--steps"),
        case(
            &["demo", "caption", "--eval-samples", "0"],
            "--eval-samples",
        ),
        // capfilt
        capfilt(&pairs, &["--threshold", "2"], "--threshold"),
        capfilt(&pairs, &["--top-p", "0"], "--top-p"),
        capfilt(&pairs, &["--num-synthetic", "0"], "--num-synthetic"),
        capfilt(&pairs, &["--batch-size", "0"], "--batch-size"),
        capfilt(&pairs, &["--max-new-tokens", "0"], "--max-new-tokens"),
        capfilt(
            &pairs,
            &["--max-new-tokens", "100000"],
            "max_position_embeddings",
        ),
        case(
            &[
                "bench",
                "caption",
                "--model",
                &blip,
                "--max-new-tokens",
                "100000",
            ],
            "max_position_embeddings",
        ),
        capfilt(
            &pairs,
            &["--min-new-tokens", "9", "--max-new-tokens", "3"],
            "--min-new-tokens",
        ),
        capfilt(&missing, &[], "missing.csv"),
        capfilt("/no/such/pairs.csv", &[], "/no/such/pairs.csv"),
        capfilt(&pairs, &["--dataset-type", "parquet"], "parquet"),
    ];
    run_table(cases, s.dir.path());
}

#[test]
fn a_closed_stdout_ends_quietly_with_status_0() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(["embed", "--model", &fixture("clip-tiny-eos")])
        .args(["--text", "a cat", "--text", "a dog", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before zoo writes anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}

/// A ustar member.
fn tar_member(tar: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    header[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    header[136..148].copy_from_slice(b"00000000000\0");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    tar.extend_from_slice(&header);
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
}

#[test]
fn dataset_keys_that_climb_out_are_never_written_to() {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("a/b/work");
    fs::create_dir_all(&work).unwrap();
    let png = fs::read(fixtures().join("images/small.png")).unwrap();
    let mut tar = Vec::new();
    for key in ["../../escaped", "/tmp/zoo-absolute-escape"] {
        tar_member(&mut tar, &format!("{key}.png"), &png);
        tar_member(&mut tar, &format!("{key}.txt"), b"a small picture");
    }
    tar.extend_from_slice(&[0u8; 1024]);
    let shard = work.join("shard-0000.tar");
    fs::write(&shard, tar).unwrap();
    let out = work.join("clean.jsonl");
    let result = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(["capfilt", "--captioner", &fixture("blip-tiny-caption")])
        .args(["--filter", &fixture("blip-tiny-itm"), "--threshold", "0"])
        .args(["--data", shard.to_str().unwrap(), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(0), "{err}");
    // The keys travel as data in the output lines...
    let lines = fs::read_to_string(&out).unwrap();
    assert!(lines.contains("../../escaped"), "{lines}");
    // ...and nothing was written anywhere but --out and its progress file.
    let mut written: Vec<String> = Vec::new();
    let mut stack = vec![root.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                written.push(
                    path.strip_prefix(root.path())
                        .unwrap()
                        .display()
                        .to_string(),
                );
            }
        }
    }
    written.sort();
    assert_eq!(
        written,
        [
            "a/b/work/clean.jsonl",
            "a/b/work/clean.jsonl.done",
            "a/b/work/shard-0000.tar"
        ]
    );
    assert!(!Path::new("/tmp/zoo-absolute-escape.png").exists());
}

/// A `.pt` whose pickle asks for `os.system("touch MARKER")`: torch.load without
/// `weights_only` would run it.
fn malicious_pt(marker: &Path) -> Vec<u8> {
    let mut pickle = Vec::new();
    pickle.extend_from_slice(b"\x80\x02cos\nsystem\n");
    let command = format!("touch {}", marker.display());
    pickle.push(b'X');
    pickle.extend_from_slice(&(command.len() as u32).to_le_bytes());
    pickle.extend_from_slice(command.as_bytes());
    pickle.extend_from_slice(b"\x85R.");
    // A zip archive (stored, no compression) holding archive/data.pkl, as torch.save writes.
    let name = b"archive/data.pkl";
    let crc = crc32(&pickle);
    let mut zip = Vec::new();
    let local = |zip: &mut Vec<u8>| {
        zip.extend_from_slice(&[0x50, 0x4b, 0x03, 0x04, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        zip.extend_from_slice(&crc.to_le_bytes());
        zip.extend_from_slice(&(pickle.len() as u32).to_le_bytes());
        zip.extend_from_slice(&(pickle.len() as u32).to_le_bytes());
        zip.extend_from_slice(&(name.len() as u16).to_le_bytes());
        zip.extend_from_slice(&0u16.to_le_bytes());
        zip.extend_from_slice(name);
        zip.extend_from_slice(&pickle);
    };
    local(&mut zip);
    let central_start = zip.len() as u32;
    zip.extend_from_slice(&[0x50, 0x4b, 0x01, 0x02, 20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    zip.extend_from_slice(&crc.to_le_bytes());
    zip.extend_from_slice(&(pickle.len() as u32).to_le_bytes());
    zip.extend_from_slice(&(pickle.len() as u32).to_le_bytes());
    zip.extend_from_slice(&(name.len() as u16).to_le_bytes());
    zip.extend_from_slice(&[0; 12]);
    zip.extend_from_slice(&0u32.to_le_bytes());
    zip.extend_from_slice(name);
    let central_len = zip.len() as u32 - central_start;
    zip.extend_from_slice(&[0x50, 0x4b, 0x05, 0x06, 0, 0, 0, 0, 1, 0, 1, 0]);
    zip.extend_from_slice(&central_len.to_le_bytes());
    zip.extend_from_slice(&central_start.to_le_bytes());
    zip.extend_from_slice(&0u16.to_le_bytes());
    zip
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_pickle_that_would_run_a_command_is_refused_without_running_it() {
    let dir = tempfile::tempdir().unwrap();
    let heads = dir.path().join("heads");
    fs::create_dir_all(&heads).unwrap();
    fs::copy(
        fixtures().join("llama-tiny-medusa/config.json"),
        heads.join("config.json"),
    )
    .unwrap();
    let marker = dir.path().join("pwned");
    fs::File::create(heads.join("medusa_lm_head.pt"))
        .unwrap()
        .write_all(&malicious_pt(&marker))
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args([
            "generate",
            "--model",
            &fixture("llama-tiny"),
            "--prompt",
            "hi",
        ])
        .arg("--medusa")
        .arg(&heads)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(heads.to_str().unwrap()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!marker.exists(), "the pickle's command ran");
}

#[test]
fn training_removes_stale_temporary_checkpoints_of_dead_runs_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    fs::create_dir_all(&out).unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = out.join(format!(".checkpoint-2.tmp-{dead}"));
    let live = out.join(format!(".checkpoint-2.tmp-{}", std::process::id()));
    for d in [&stale, &live] {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join("model.safetensors"), b"half written").unwrap();
    }
    let result = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(["train", "clip", "--train-data", "synthetic", "--steps", "1"])
        .args(["--batch-size", "4", "--warmup", "0", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(0), "{err}");
    if !Path::new("/proc").join(dead.to_string()).exists() {
        assert!(!stale.exists(), "a dead run's temporary stays: {err}");
        assert!(err.contains("removed"), "{err}");
    }
    assert!(live.exists(), "a live process's temporary was removed");
    assert!(out.join("final/model.safetensors").is_file());
}

/// `bytes` with the first occurrence of `from` (after `after`, when given) replaced by `to`,
/// which has the same length; returns where it was.
fn patch(bytes: &mut [u8], after: Option<&[u8]>, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let find = |hay: &[u8], needle: &[u8], start: usize| {
        hay[start..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + start)
            .expect("pattern in the fixture")
    };
    let start = after.map_or(0, |a| find(bytes, a, 0) + a.len());
    let at = find(bytes, from, start);
    bytes[at..at + to.len()].copy_from_slice(to);
    at
}

#[test]
fn gguf_files_and_chat_templates_are_refused_by_name() {
    let s = Scratch::new();
    let good = fs::read(fixtures().join("gguf/llama-tiny-q8_0-gpt2.gguf")).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = good.clone();
        edit(&mut bytes);
        s.write(name, &bytes)
    };
    let header_cut = variant("header-cut.gguf", &|b| b.truncate(200));
    let data_cut = variant("data-cut.gguf", &|b| {
        let n = b.len() - 1000;
        b.truncate(n)
    });
    let magic = variant("magic.gguf", &|b| b[..4].copy_from_slice(b"GGUX"));
    let arch = variant("arch.gguf", &|b| {
        patch(b, Some(b"general.architecture"), b"llama", b"mamba");
    });
    let missing = variant("missing.gguf", &|b| {
        patch(b, None, b"blk.1.ffn_up.weight", b"blk.1.ffn_xp.weight");
    });
    let shapes = variant("shapes.gguf", &|b| {
        // llama.feed_forward_length: u32 type tag, then the value 128.
        let at = patch(
            b,
            None,
            b"llama.feed_forward_length",
            b"llama.feed_forward_length",
        );
        let value = at + b"llama.feed_forward_length".len() + 4;
        b[value..value + 4].copy_from_slice(&96u32.to_le_bytes());
    });
    let layers = variant("layers.gguf", &|b| {
        // llama.block_count: u32 type tag, then a count no tensor table of this size backs.
        let at = patch(b, None, b"llama.block_count", b"llama.block_count");
        let value = at + b"llama.block_count".len() + 4;
        b[value..value + 4].copy_from_slice(&(1u32 << 30).to_le_bytes());
    });
    let qtype = variant("qtype.gguf", &|b| {
        // The tensor table entry of token_embd.weight: name, 2 dims, then its ggml type.
        let at = patch(
            b,
            Some(b"general.name"),
            b"token_embd.weight",
            b"token_embd.weight",
        );
        let kind = at + b"token_embd.weight".len() + 4 + 16;
        assert_eq!(b[kind..kind + 4], 8u32.to_le_bytes(), "Q8_0 there");
        b[kind..kind + 4].copy_from_slice(&9u32.to_le_bytes());
    });
    let bad_template = s.model_with(
        "llama-tiny",
        "badchat",
        "tokenizer_config.json",
        r#"{"chat_template": "{% for m in messages %}{{ raise_exception('roles must alternate') }}{% endfor %}", "eos_token": "</s>"}"#,
    );
    let syntax_template = s.model_with(
        "llama-tiny",
        "syntaxchat",
        "tokenizer_config.json",
        r#"{"chat_template": "{% for m in messages %}{{ m.content }", "eos_token": "</s>"}"#,
    );
    let gguf_dir = fixture("gguf");
    let generate =
        |model: &str, names: &str| case(&["generate", "--model", model, "--prompt", "hi"], names);
    let cases = vec![
        generate(&header_cut, "header-cut.gguf"),
        generate(&data_cut, "lies past the end of the file"),
        generate(&magic, "no GGUF magic"),
        generate(&arch, "unknown model_type `mamba`"),
        generate(&missing, "tensor blk.1.ffn_up.weight is missing"),
        generate(&shapes, "tensor blk.0.ffn_gate.weight has shape [128, 64]"),
        generate(&qtype, "tensor token_embd.weight is of type Q8_1"),
        generate(
            &layers,
            "llama.block_count is 1073741824, but the file holds only",
        ),
        case(
            &[
                "eval",
                "lm",
                "--model",
                &magic,
                "--data",
                &fixture("llama-tiny/config.json"),
            ],
            "magic.gguf",
        ),
        case(
            &[
                "generate",
                "--model",
                &gguf_dir,
                "--gguf-file",
                "nope.gguf",
                "--prompt",
                "hi",
            ],
            "nope.gguf not found",
        ),
        case(
            &[
                "generate",
                "--model",
                &bad_template,
                "--chat",
                "--prompt",
                "hi",
            ],
            "roles must alternate",
        ),
        case(
            &[
                "generate",
                "--model",
                &syntax_template,
                "--chat",
                "--prompt",
                "hi",
            ],
            "syntaxchat/tokenizer_config.json",
        ),
        case(
            &["chat", "--model", &fixture("llama-tiny")],
            "has no chat template",
        ),
        case(
            &[
                "generate",
                "--model",
                &fixture("gguf/llama-tiny-f32-gpt2.gguf"),
                "--mtp",
                "--prompt",
                "hi",
            ],
            "--mtp",
        ),
        case(
            &[
                "generate",
                "--model",
                &fixture("llama-tiny"),
                "--mtp-tree",
                "4",
                "--prompt",
                "hi",
            ],
            "--mtp",
        ),
        case(
            &[
                "generate",
                "--model",
                &fixture("llama-tiny"),
                "--mtp",
                "--mtp-tree",
                "0",
                "--prompt",
                "hi",
            ],
            "--mtp-tree",
        ),
        case(
            &[
                "generate",
                "--model",
                &fixture("llama-tiny"),
                "--mtp",
                "--mtp-top-k",
                "2",
                "--prompt",
                "hi",
            ],
            "--mtp-tree",
        ),
    ];
    run_table(cases, s.dir.path());
}
