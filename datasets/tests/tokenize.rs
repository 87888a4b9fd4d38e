//! Tokenization against HF: the bundled CLIP tokenizer against HF's slow `CLIPTokenizer`, and
//! fixture tokenizers against the ids HF fed the reference models.

use std::path::PathBuf;

use serde_json::Value;
use zoo_datasets::tokenize::{Padding, TextTokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[test]
fn bundled_clip_tokenizer_equals_hf_clip_tokenizer() {
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("clip_tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    let tok = TextTokenizer::clip().unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(tok.model_max_length(), Some(77));
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok
            .encode_batch(&[text], Padding::Longest, 77)
            .unwrap()
            .input_ids
            .remove(0);
        assert_eq!(got, expected, "text {text:?}");
    }
}

#[test]
fn fixture_tokenizers_reproduce_hf_ids_with_padding_and_truncation() {
    for (name, padding) in [
        ("clip-tiny-argmax", Padding::Longest),
        ("siglip-tiny", Padding::MaxLength),
    ] {
        let dir = fixtures().join(name);
        let tok = TextTokenizer::from_files(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
        )
        .unwrap();
        let meta: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("reference_texts.json")).unwrap(),
        )
        .unwrap();
        let texts: Vec<&str> = meta["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let reference = candle_core::safetensors::load(
            dir.join("reference.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let expected: Vec<Vec<i64>> = reference["input_ids"].to_vec2().unwrap();
        let expected_mask: Vec<Vec<i64>> = reference["attention_mask"].to_vec2().unwrap();
        let max_len = tok.model_max_length().unwrap();
        let got = tok.encode_batch(&texts, padding, max_len).unwrap();
        let as_i64 = |rows: &[Vec<u32>]| {
            rows.iter()
                .map(|r| r.iter().map(|&x| i64::from(x)).collect())
                .collect::<Vec<Vec<i64>>>()
        };
        assert_eq!(as_i64(&got.input_ids), expected, "{name}");
        assert_eq!(as_i64(&got.attention_mask), expected_mask, "{name}");
    }
}

#[test]
fn truncation_keeps_the_end_of_text_token() {
    let tok = TextTokenizer::clip().unwrap();
    let long = "word ".repeat(200);
    let ids = tok
        .encode_batch(&[&long], Padding::Longest, 77)
        .unwrap()
        .input_ids
        .remove(0);
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
}
