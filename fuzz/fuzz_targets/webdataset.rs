//! Our tar reader and WebDataset grouping: the input is one shard, read to the end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zoo_datasets::sources::TarSource;

fuzz_target!(|data: &[u8]| {
    let shard = zoo_fuzz::write("shard-0000.tar", data);
    let Ok(source) = TarSource::new(vec![shard]) else {
        return;
    };
    // Every record, good or skipped, until the shard ends.
    for record in source.take(10_000) {
        let _ = record;
    }
});
