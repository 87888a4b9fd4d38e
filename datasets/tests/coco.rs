//! The COCO captions source on small annotation files built in temporary folders: one pair per
//! annotation in order, images resolved against the image root, bad samples skipped with their
//! reason, bad files fatal and named, and a seeded shuffle.

use std::fs;
use std::path::Path;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use serde_json::json;
use zoo_datasets::sources::{CocoSource, Record, SkipCounts, SkipReason};

const RED: [u8; 3] = [255, 0, 0];
const BLUE: [u8; 3] = [0, 0, 255];

fn write_png(path: &Path, colour: [u8; 3]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    DynamicImage::ImageRgb8(RgbImage::from_pixel(8, 8, Rgb(colour)))
        .save_with_format(path, ImageFormat::Png)
        .unwrap();
}

fn write_json(path: &Path, value: &serde_json::Value) {
    fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

/// Two images, three good captions (two for the red image), and one of each bad sample.
fn dataset(dir: &Path, images_dir: &Path) -> std::path::PathBuf {
    write_png(&images_dir.join("red.png"), RED);
    write_png(&images_dir.join("blue.png"), BLUE);
    let path = dir.join("captions.json");
    write_json(
        &path,
        &json!({
            "info": {"description": "test"},
            "images": [
                {"id": 1, "file_name": "red.png", "height": 8, "width": 8},
                {"id": 2, "file_name": "blue.png"},
                {"id": 3, "file_name": "gone.png"},
            ],
            "annotations": [
                {"id": 10, "image_id": 1, "caption": "  a red square\n"},
                {"id": 11, "image_id": 2, "caption": "a blue square"},
                {"id": 12, "image_id": 99, "caption": "no such image"},
                {"id": 13, "image_id": 3, "caption": "the file is missing"},
                {"id": 14, "image_id": 2, "caption": "   "},
                {"id": 15, "image_id": 1},
                {"id": 16, "image_id": 1, "caption": "red again"},
            ],
        }),
    );
    path
}

/// A yielded pair: its key, caption and top-left pixel.
type Yielded = (String, String, [u8; 3]);

fn split(records: Vec<Record>) -> (Vec<Yielded>, Vec<SkipReason>) {
    let mut pairs = Vec::new();
    let mut skips = Vec::new();
    for r in records {
        match r {
            Ok(p) => {
                let colour = p.image.to_rgb8().get_pixel(0, 0).0;
                pairs.push((p.key, p.caption, colour));
            }
            Err(s) => skips.push(s.reason),
        }
    }
    (pairs, skips)
}

#[test]
fn coco_yields_one_pair_per_annotation_in_order_with_images_beside_the_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), dir.path());
    let source = CocoSource::open(&path, None).unwrap();
    assert_eq!(source.len(), 7);
    let (pairs, skips) = split(source.collect());
    let red = dir.path().join("red.png").display().to_string();
    let blue = dir.path().join("blue.png").display().to_string();
    assert_eq!(
        pairs,
        vec![
            (red.clone(), "a red square".to_string(), RED),
            (blue, "a blue square".to_string(), BLUE),
            (red, "red again".to_string(), RED),
        ]
    );
    assert_eq!(
        skips,
        vec![
            SkipReason::MissingImage,
            SkipReason::MissingFile,
            SkipReason::EmptyCaption,
            SkipReason::MissingCaption,
        ]
    );
}

#[test]
fn coco_resolves_file_names_against_the_image_root() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("train2017");
    let path = dataset(dir.path(), &images);
    let (pairs, _) = split(CocoSource::open(&path, Some(&images)).unwrap().collect());
    assert_eq!(pairs.len(), 3);
    assert_eq!(pairs[0].0, images.join("red.png").display().to_string());

    // Without the root the images are looked for beside the JSON, where they are not.
    let mut skipped = SkipCounts::default();
    for r in CocoSource::open(&path, None).unwrap() {
        if let Err(s) = r {
            skipped.record(&s);
        }
    }
    assert_eq!(skipped.get(SkipReason::MissingFile), 4);
}

#[test]
fn coco_skipped_samples_are_keyed_by_file_and_annotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), dir.path());
    let skipped = CocoSource::open(&path, None)
        .unwrap()
        .nth(2)
        .unwrap()
        .unwrap_err();
    assert_eq!(skipped.reason, SkipReason::MissingImage);
    assert!(skipped.key.ends_with("captions.json:annotations[2]"));
    assert!(skipped.message.contains("99"), "{}", skipped.message);
}

#[test]
fn coco_malformed_or_empty_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("truncated.json", "{\"images\": [{\"id\": 1".to_string()),
        ("no_annotations_key.json", json!({"images": []}).to_string()),
        (
            "wrong_type.json",
            json!({"images": [], "annotations": [{"image_id": 1, "caption": 5}]}).to_string(),
        ),
        (
            "empty.json",
            json!({"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}).to_string(),
        ),
        (
            "duplicate_id.json",
            json!({
                "images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
                "annotations": [{"image_id": 1, "caption": "x"}],
            })
            .to_string(),
        ),
    ];
    for (name, text) in cases {
        let path = dir.path().join(name);
        fs::write(&path, text).unwrap();
        let err = CocoSource::open(&path, None).unwrap_err().to_string();
        assert!(err.contains(name), "{name}: {err}");
        assert!(err.contains("COCO captions file"), "{name}: {err}");
    }
    let missing = dir.path().join("missing.json");
    let err = CocoSource::open(&missing, None).unwrap_err().to_string();
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn coco_string_image_ids_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("red.png"), RED);
    let path = dir.path().join("c.json");
    write_json(
        &path,
        &json!({
            "images": [{"id": "img-1", "file_name": "red.png"}],
            "annotations": [{"image_id": "img-1", "caption": "red"}],
        }),
    );
    let (pairs, skips) = split(CocoSource::open(&path, None).unwrap().collect());
    assert_eq!(pairs.len(), 1);
    assert!(skips.is_empty());
}

#[test]
fn coco_shuffle_is_a_seeded_permutation_that_changes_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("red.png"), RED);
    let annotations: Vec<_> = (0..32)
        .map(|i| json!({"image_id": 1, "caption": format!("caption {i}")}))
        .collect();
    let path = dir.path().join("c.json");
    write_json(
        &path,
        &json!({"images": [{"id": 1, "file_name": "red.png"}], "annotations": annotations}),
    );
    let order = |seed, epoch| -> Vec<String> {
        let mut s = CocoSource::open(&path, None).unwrap();
        s.shuffle(seed, epoch);
        s.map(|r| r.unwrap().caption).collect()
    };
    let a = order(7, 0);
    assert_eq!(a, order(7, 0));
    assert_ne!(a, order(7, 1));
    assert_ne!(a, order(8, 0));
    let mut sorted = a.clone();
    sorted.sort();
    let mut expected: Vec<String> = (0..32).map(|i| format!("caption {i}")).collect();
    expected.sort();
    assert_eq!(sorted, expected);
}
