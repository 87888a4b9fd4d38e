//! The GGUF reader LLMs load through (`zoo_models::gguf`, over candle's `gguf_file`): the
//! header, metadata and tensor table, then every tensor the table names.
#![no_main]

use std::io::Cursor;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use zoo_models::gguf::{read_content, read_tensor};

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
});
