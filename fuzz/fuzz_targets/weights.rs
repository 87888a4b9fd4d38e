//! The safetensors weight loading path with its config checks: the input is a
//! `model.safetensors` beside a real fixture's `config.json` (its first byte picks CLIP,
//! SigLIP, BLIP or Llama), loaded as `zoo` loads `--model`.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use zoo_models::hub::ModelRepo;

const CONFIGS: [&str; 4] = [
    include_str!("../../tests/fixtures/clip-tiny-argmax/config.json"),
    include_str!("../../tests/fixtures/siglip-tiny/config.json"),
    include_str!("../../tests/fixtures/blip-tiny-caption/config.json"),
    include_str!("../../tests/fixtures/llama-tiny/config.json"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, weights)) = data.split_first() else {
        return;
    };
    let family = usize::from(which) % CONFIGS.len();
    let dir = zoo_fuzz::folder(
        "weights",
        &[
            ("config.json", CONFIGS[family].as_bytes()),
            ("model.safetensors", weights),
        ],
    );
    let Ok(repo) = ModelRepo::open(&zoo_fuzz::spec(&dir)) else {
        return;
    };
    let device = Device::Cpu;
    let _ = match family {
        0 | 1 => zoo_models::contrastive::load_dual_encoder(&repo, None, &device).map(|_| ()),
        2 => zoo_models::blip::BlipForConditionalGeneration::load(&repo, None, &device).map(|_| ()),
        _ => zoo_models::llm::LlamaForCausalLM::load(&repo, None, &device).map(|_| ()),
    };
});
