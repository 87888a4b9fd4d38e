//! Medusa choices files (`--medusa-choices`): a JSON list of paths, turned into the tree and its
//! buffers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = zoo_fuzz::write("choices.json", data);
    let _ = zoo_models::llm::MedusaTree::from_file(&path);
});
