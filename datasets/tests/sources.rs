//! Image-text sources on small datasets built in temporary folders: good samples come out in
//! order, bad samples are skipped and counted, bad sources are errors naming the file.

use std::fs::{self, File};
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use zoo_datasets::sources::{
    expand_shards, shuffle_shards, CsvSource, ImageFolder, JsonlSource, Pair, Record,
    ShuffleBuffer, SkipCounts, SkipReason, TarSource, DEFAULT_CSV_CAPTION_KEY, DEFAULT_CSV_IMG_KEY,
    DEFAULT_CSV_SEPARATOR,
};

const RED: [u8; 3] = [255, 0, 0];
const BLUE: [u8; 3] = [0, 0, 255];

/// An 8x8 image of one colour, encoded.
fn encoded(colour: [u8; 3], format: ImageFormat) -> Vec<u8> {
    let image = DynamicImage::ImageRgb8(RgbImage::from_pixel(8, 8, Rgb(colour)));
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

fn write_png(path: &Path, colour: [u8; 3]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, encoded(colour, ImageFormat::Png)).unwrap();
}

/// Writes a tar shard with the `tar` crate, an implementation independent of ours.
fn write_shard(path: &Path, members: &[(&str, Vec<u8>)]) {
    let mut builder = tar::Builder::new(File::create(path).unwrap());
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, data.as_slice())
            .unwrap();
    }
    builder.finish().unwrap();
}

fn pair(record: &Record) -> &Pair {
    record
        .as_ref()
        .unwrap_or_else(|skipped| panic!("expected a pair, got {skipped}"))
}

fn reason(record: &Record) -> SkipReason {
    match record {
        Ok(pair) => panic!("expected a skip, got the pair {:?}", pair.key),
        Err(skipped) => skipped.reason,
    }
}

fn top_left(pair: &Pair) -> [u8; 3] {
    pair.image.to_rgb8().get_pixel(0, 0).0
}

fn counts(records: &[Record]) -> SkipCounts {
    let mut counts = SkipCounts::default();
    for skipped in records.iter().filter_map(|r| r.as_ref().err()) {
        counts.record(skipped);
    }
    counts
}

#[test]
fn csv_reads_quoted_fields_in_order_and_skips_missing_images_and_empty_captions() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), RED);
    write_png(&dir.path().join("sub/c.png"), BLUE);
    let csv = dir.path().join("train.csv");
    fs::write(
        &csv,
        "filepath,title\n\
         a.png,\"a red square, with a comma\"\n\
         missing.png,a ghost\n\
         a.png,\"   \"\n\
         sub/c.png,\"say \"\"blue\"\"\"\n",
    )
    .unwrap();

    let source = CsvSource::open(&csv, "filepath", "title", b',').unwrap();
    assert_eq!(source.len(), 4);
    let records: Vec<Record> = source.collect();

    assert_eq!(pair(&records[0]).caption, "a red square, with a comma");
    assert_eq!(top_left(pair(&records[0])), RED);
    assert_eq!(reason(&records[1]), SkipReason::MissingFile);
    assert!(records[1]
        .as_ref()
        .unwrap_err()
        .key
        .ends_with("missing.png"));
    assert_eq!(reason(&records[2]), SkipReason::EmptyCaption);
    assert_eq!(pair(&records[3]).caption, "say \"blue\"");
    assert_eq!(top_left(pair(&records[3])), BLUE);

    let counts = counts(&records);
    assert_eq!(counts.total(), 2);
    assert_eq!(counts.get(SkipReason::MissingFile), 1);
    assert_eq!(
        counts.to_string(),
        "2 skipped (missing_file: 1, empty_caption: 1)"
    );
}

#[test]
fn tsv_is_read_with_open_clips_default_separator_and_columns() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("images/a.png"), RED);
    let absolute = dir.path().join("elsewhere/b.png");
    write_png(&absolute, BLUE);
    let tsv = dir.path().join("train.tsv");
    fs::write(
        &tsv,
        format!(
            "id\tfilepath\ttitle\n1\timages/a.png\ta red square, unquoted\n2\t{}\tblue\n",
            absolute.display()
        ),
    )
    .unwrap();

    let records: Vec<Record> = CsvSource::open(
        &tsv,
        DEFAULT_CSV_IMG_KEY,
        DEFAULT_CSV_CAPTION_KEY,
        DEFAULT_CSV_SEPARATOR,
    )
    .unwrap()
    .collect();
    assert_eq!(records.len(), 2);
    assert_eq!(pair(&records[0]).caption, "a red square, unquoted");
    assert_eq!(top_left(pair(&records[1])), BLUE);
}

#[test]
fn csv_without_the_requested_column_is_an_error_naming_file_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("captions.csv");
    fs::write(&csv, "filepath,caption\na.png,red\n").unwrap();

    let message = CsvSource::open(&csv, "filepath", "title", b',')
        .unwrap_err()
        .to_string();
    assert!(message.contains("captions.csv"), "{message}");
    assert!(message.contains("\"title\""), "{message}");
    assert!(message.contains("line 1"), "{message}");

    let missing = dir.path().join("nope.csv");
    let message = CsvSource::open(&missing, "filepath", "title", b',')
        .unwrap_err()
        .to_string();
    assert!(message.contains("nope.csv"), "{message}");
}

#[test]
fn csv_row_with_wrong_field_count_is_an_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("captions.csv");
    fs::write(&csv, "filepath,title\na.png,red\nb.png,blue,extra\n").unwrap();

    let message = CsvSource::open(&csv, "filepath", "title", b',')
        .unwrap_err()
        .to_string();
    assert!(message.contains("captions.csv"), "{message}");
    assert!(message.contains("line: 3"), "{message}");
}

#[test]
fn jsonl_ignores_blank_lines_and_skips_malformed_lines_in_place() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), RED);
    write_png(&dir.path().join("b.png"), BLUE);
    let jsonl = dir.path().join("train.jsonl");
    fs::write(
        &jsonl,
        "{\"image\": \"a.png\", \"caption\": \"red\"}\n\
         \n\
         {\"image\": \"b.png\", \"caption\": \"blue\"\n\
         {\"image\": \"b.png\", \"caption\": \" blue \", \"source\": 7}\n\
         {\"caption\": \"no image\"}\n\
         {\"image\": \"a.png\", \"caption\": 3}\n\
         \n",
    )
    .unwrap();

    let records: Vec<Record> = JsonlSource::open(&jsonl).unwrap().collect();
    assert_eq!(records.len(), 5);
    assert_eq!(pair(&records[0]).caption, "red");
    assert_eq!(reason(&records[1]), SkipReason::Malformed);
    assert!(records[1]
        .as_ref()
        .unwrap_err()
        .key
        .ends_with("train.jsonl:3"));
    assert_eq!(pair(&records[2]).caption, "blue");
    assert_eq!(top_left(pair(&records[2])), BLUE);
    assert_eq!(reason(&records[3]), SkipReason::MissingImage);
    assert_eq!(reason(&records[4]), SkipReason::Malformed);
    assert_eq!(counts(&records).get(SkipReason::Malformed), 2);
}

#[test]
fn index_sources_without_samples_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("empty.jsonl");
    fs::write(&jsonl, "\n\n").unwrap();
    let message = JsonlSource::open(&jsonl).unwrap_err().to_string();
    assert!(message.contains("empty.jsonl"), "{message}");
}

#[test]
fn tar_shards_from_a_brace_spec_stream_samples_and_skip_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let long_key = format!("{}0003", "a-long-folder-name/".repeat(8));
    write_shard(
        &dir.path().join("shard-00000.tar"),
        &[
            ("0000.jpg", encoded(RED, ImageFormat::Jpeg)),
            ("0000.txt", b"a red square\n".to_vec()),
            ("0001.jpg", b"not a jpeg at all".to_vec()),
            ("0001.txt", b"corrupt".to_vec()),
            ("0002.png", encoded(BLUE, ImageFormat::Png)),
            ("0002.cls", b"3".to_vec()),
        ],
    );
    write_shard(
        &dir.path().join("shard-00001.tar"),
        &[
            (&format!("{long_key}.png"), encoded(BLUE, ImageFormat::Png)),
            (
                &format!("{long_key}.json"),
                br#"{"caption": "a blue square", "width": 8}"#.to_vec(),
            ),
            ("0004.txt", b"a caption without an image".to_vec()),
        ],
    );

    let spec = format!("{}/shard-{{00000..00001}}.tar", dir.path().display());
    let shards = expand_shards(&spec).unwrap();
    assert_eq!(
        shards,
        [
            dir.path().join("shard-00000.tar"),
            dir.path().join("shard-00001.tar")
        ]
    );
    let records: Vec<Record> = TarSource::new(shards).unwrap().collect();
    assert_eq!(records.len(), 5);

    let red = pair(&records[0]);
    assert_eq!(
        (red.key.as_str(), red.caption.as_str()),
        ("0000", "a red square")
    );
    let [r, g, b] = top_left(red);
    assert!(r > 200 && g < 60 && b < 60, "jpeg pixel {:?}", [r, g, b]);
    assert_eq!(reason(&records[1]), SkipReason::Undecodable);
    assert_eq!(records[1].as_ref().unwrap_err().key, "0001");
    assert!(records[1]
        .as_ref()
        .unwrap_err()
        .message
        .contains("shard-00000.tar"));
    assert_eq!(reason(&records[2]), SkipReason::MissingCaption);
    let blue = pair(&records[3]);
    assert_eq!(blue.key, long_key);
    assert_eq!(blue.caption, "a blue square");
    assert_eq!(top_left(blue), BLUE);
    assert_eq!(reason(&records[4]), SkipReason::MissingImage);
}

#[test]
fn truncated_shard_is_skipped_from_the_break_and_the_next_shard_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("a.tar");
    let second = dir.path().join("b.tar");
    let big = encoded(RED, ImageFormat::Png);
    write_shard(
        &first,
        &[
            ("0000.png", big.clone()),
            ("0000.txt", b"kept".to_vec()),
            ("0001.png", vec![0; 4096]),
            ("0001.txt", b"lost".to_vec()),
        ],
    );
    write_shard(
        &second,
        &[("0002.png", big), ("0002.txt", b"next".to_vec())],
    );
    // Cut the first shard in the middle of 0001.png's data.
    let bytes = fs::read(&first).unwrap();
    let cut = bytes.len() - 3000;
    fs::write(&first, &bytes[..cut]).unwrap();

    let records: Vec<Record> = TarSource::new(vec![first, second]).unwrap().collect();
    assert_eq!(records.len(), 3);
    assert_eq!(pair(&records[0]).caption, "kept");
    assert_eq!(reason(&records[1]), SkipReason::BadShard);
    assert!(records[1].as_ref().unwrap_err().key.ends_with("a.tar"));
    assert_eq!(pair(&records[2]).caption, "next");
}

#[test]
fn tar_source_refuses_shards_that_do_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("shard-7.tar");
    let message = TarSource::new(vec![missing])
        .err()
        .expect("a missing shard is an error")
        .to_string();
    assert!(message.contains("shard-7.tar"), "{message}");
}

#[test]
fn glob_specs_expand_to_sorted_existing_shards() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["b.tar", "a.tar", "c.txt", "extra-0.tar"] {
        fs::write(dir.path().join(name), b"").unwrap();
    }
    let root = dir.path().display();
    let shards = expand_shards(&format!("{root}/?.tar::{root}/extra-{{0..0}}.tar")).unwrap();
    assert_eq!(
        shards,
        ["a.tar", "b.tar", "extra-0.tar"].map(|n| dir.path().join(n))
    );

    let message = expand_shards(&format!("{root}/*.tgz"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("*.tgz"), "{message}");
}

#[test]
fn image_folder_labels_sorted_classes_and_ignores_non_images() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_png(&root.join("dog/2.png"), RED);
    write_png(&root.join("dog/1.PNG"), RED);
    write_png(&root.join("cat/nested/3.png"), BLUE);
    write_png(&root.join("cat/0.png"), BLUE);
    fs::write(root.join("cat/notes.txt"), "not an image").unwrap();
    write_png(&root.join("bird/9.png"), RED);
    fs::write(root.join("README.md"), "not a class").unwrap();

    let folder = ImageFolder::open(root).unwrap();
    assert_eq!(folder.class_names(), ["bird", "cat", "dog"]);
    assert_eq!(folder.len(), 5);
    let samples: Vec<(PathBuf, usize)> = folder.into_iter().collect();
    let expected = [
        ("bird/9.png", 0),
        ("cat/0.png", 1),
        ("cat/nested/3.png", 1),
        ("dog/1.PNG", 2),
        ("dog/2.png", 2),
    ]
    .map(|(path, label)| (root.join(path), label));
    assert_eq!(samples, expected);
}

#[test]
fn image_folder_with_an_empty_class_or_no_classes_is_an_error_naming_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let message = ImageFolder::open(root).unwrap_err().to_string();
    assert!(message.contains("no class"), "{message}");

    write_png(&root.join("cat/0.png"), BLUE);
    fs::create_dir(root.join("dog")).unwrap();
    fs::write(root.join("dog/readme.txt"), "no images here").unwrap();
    let message = ImageFolder::open(root).unwrap_err().to_string();
    assert!(message.contains("dog"), "{message}");
}

#[test]
fn shuffle_buffer_is_deterministic_per_seed_and_keeps_every_item() {
    let shuffled = |seed, epoch| ShuffleBuffer::new(0..100, 10, seed, epoch).collect::<Vec<_>>();
    let order = shuffled(42, 0);
    assert_eq!(order, shuffled(42, 0));
    assert_ne!(order, shuffled(43, 0));
    assert_ne!(order, shuffled(42, 1));
    assert_ne!(order, (0..100).collect::<Vec<_>>());
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());

    let passthrough: Vec<i32> = ShuffleBuffer::new(0..5, 1, 42, 0).collect();
    assert_eq!(passthrough, [0, 1, 2, 3, 4]);
}

#[test]
fn shard_and_index_shuffles_depend_only_on_seed_and_epoch() {
    let shards: Vec<PathBuf> = (0..20).map(|i| PathBuf::from(format!("{i}.tar"))).collect();
    let shuffled = |seed, epoch| {
        let mut s = shards.clone();
        shuffle_shards(&mut s, seed, epoch);
        s
    };
    assert_eq!(shuffled(1, 0), shuffled(1, 0));
    assert_ne!(shuffled(1, 0), shuffled(1, 1));
    assert_ne!(shuffled(1, 0), shards);

    // Keys of skipped rows are enough to see the order; no images needed.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("index.csv");
    let rows: String = (0..20).map(|i| format!("{i}.png,caption {i}\n")).collect();
    fs::write(&csv, format!("filepath,title\n{rows}")).unwrap();
    let keys = |seed, epoch| {
        let mut source = CsvSource::open(&csv, "filepath", "title", b',').unwrap();
        source.shuffle(seed, epoch);
        source.map(|r| r.unwrap_err().key).collect::<Vec<String>>()
    };
    assert_eq!(keys(1, 0), keys(1, 0));
    assert_ne!(keys(1, 0), keys(1, 1));
}

#[test]
fn sources_are_send_iterators_of_records_so_worker_threads_can_own_them() {
    fn source<S: Iterator<Item = Record> + Send>() {}
    source::<CsvSource>();
    source::<JsonlSource>();
    source::<TarSource>();
    source::<ShuffleBuffer<TarSource>>();
}
