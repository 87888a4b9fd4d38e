//! `config.json` of every family (CLIP/SigLIP, BLIP, BERT, VisionTextDualEncoder, Llama/Qwen2,
//! `generation_config.json`, `preprocessor_config.json`) and the derived settings the loaders
//! compute from it (RoPE frequencies, head sizes).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = zoo_fuzz::write("config.json", data);
    let _ = zoo_models::contrastive::DualEncoderConfig::from_file(&path);
    let _ = zoo_models::blip::BlipConfig::from_file(&path);
    let _ = zoo_models::bert::BertConfig::from_file(&path);
    let _ = zoo_models::dual_bert::VisionTextDualEncoderConfig::from_file(&path);
    let _ = zoo_models::generation::HfGenerationConfig::from_file(&path);
    if let Ok(llama) = zoo_models::llm::LlamaConfig::from_file(&path) {
        let _ = llama.head_dim();
        let _ = llama.check_generation_length(8, 8);
        if let Ok(rope) = llama.rope() {
            // The frequencies for a short sequence, as the model builds them at load.
            let _ = rope.frequencies(rope.max_position_embeddings.min(64));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = zoo_datasets::preprocess::ImageProcessorConfig::from_json(text);
    }
});
