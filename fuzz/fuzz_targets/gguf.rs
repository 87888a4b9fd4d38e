//! The GGUF loading path of the LLM commands: the reader (`zoo_models::gguf`, over candle's
//! `gguf_file`) for the header, metadata and tensor table and every tensor the table names;
//! then the Llama checkpoint built from it (config from the metadata, tensors renamed and q/k
//! rows unpermuted), the tokenizer from `tokenizer.ggml.*`, and its chat template rendered.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use zoo_datasets::chat::Message;
use zoo_datasets::tokenize::TextTokenizer;
use zoo_models::gguf::{read_content, read_tensor};
use zoo_models::llm::GgufLlama;

fuzz_target!(|data: &[u8]| {
    let mut reader = Cursor::new(data);
    let Ok(content) = read_content(&mut reader) else {
        return;
    };
    for (key, value) in &content.metadata {
        let _ = format!("{key}: {value:?}");
    }
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let _ = read_tensor(&content, &mut reader, &name, &Device::Cpu);
    }
    let path = Path::new("fuzz.gguf");
    if let Ok(tokenizer) = TextTokenizer::from_gguf(&content.metadata, path) {
        let _ = tokenizer.encode("Hello, world! 123");
        if let Ok(Some(template)) = tokenizer.chat_template() {
            let _ = template.encode(&tokenizer, &[Message::new("user", "hi")]);
        }
    }
    if let Ok(model) = GgufLlama::from_content(path, content) {
        let _ = model.read_tensors(&mut reader, &Device::Cpu);
    }
});
