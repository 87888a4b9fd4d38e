//! `tokenizer.json` loading, and encoding a sentence with what loaded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zoo_datasets::tokenize::{Padding, TextTokenizer};

fuzz_target!(|data: &[u8]| {
    let Ok(tokenizer) = TextTokenizer::from_bytes(data, &serde_json::Value::Null) else {
        return;
    };
    let _ = tokenizer.encode("a photo of a cat, 42 times ünïcode");
    let _ = tokenizer.encode_batch(&["a", "longer text here"], Padding::Longest, 16);
});
