//! The GGUF reader LLMs load through (candle's `gguf_file`): the header, metadata and tensor
//! table, then every tensor the table names.
#![no_main]

use std::io::Cursor;

use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = Cursor::new(data);
    let Ok(content) = Content::read(&mut reader) else {
        return;
    };
    for (key, value) in &content.metadata {
        let _ = format!("{key}: {value:?}");
    }
    for (name, info) in &content.tensor_infos {
        // The reader allocates a tensor's bytes before reading them: only tensors that the
        // file can hold are read, as a loader must check first.
        let elems = info.shape.elem_count() as u128;
        let block = info.ggml_dtype.block_size() as u128;
        let bytes = elems / block.max(1) * info.ggml_dtype.type_size() as u128;
        let start = content.tensor_data_offset as u128 + info.offset as u128;
        // candle 0.11 builds a zero-element tensor's block slice from a dangling, misaligned
        // pointer (undefined behaviour, caught by the debug checks): a loader refuses empty
        // tensors first, as it refuses tensors larger than the file.
        if elems > 0 && start + bytes <= data.len() as u128 {
            let _ = content.tensor(&mut reader, name, &Device::Cpu);
        }
    }
});
