//! CSV/TSV, JSONL and COCO captions sources: the first byte picks the format, the rest is the
//! index file, opened and read to the end as `--train-data` is (images it names are looked up
//! beside it and skipped when missing).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zoo_trainers::data::{DataSpec, DatasetType};

fuzz_target!(|data: &[u8]| {
    let Some((&which, index)) = data.split_first() else {
        return;
    };
    let (name, kind) = match which % 4 {
        0 => ("pairs.csv", DatasetType::Csv),
        1 => ("pairs.tsv", DatasetType::Csv),
        2 => ("pairs.jsonl", DatasetType::Jsonl),
        _ => ("captions.json", DatasetType::Coco),
    };
    let path = zoo_fuzz::write(name, index);
    let spec = DataSpec {
        path: path.to_string_lossy().into_owned(),
        kind,
        csv_img_key: "filepath".into(),
        csv_caption_key: "title".into(),
        csv_separator: None,
        shuffle_buffer: 0,
    };
    let Ok(records) = spec.open(0, 0, false) else {
        return;
    };
    for record in records.take(10_000) {
        let _ = record;
    }
});
