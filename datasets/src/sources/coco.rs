//! The COCO captions annotation file (`captions_train2017.json`): an `images` list of
//! `{"id", "file_name", ...}` and an `annotations` list of `{"image_id", "caption", ...}`, one
//! pair per annotation, as salesforce/BLIP's `coco_karpathy_train` and torchvision's
//! `CocoCaptions` read it (flattened to one sample per caption, as BLIP trains on it).
//!
//! Like the CSV and JSONL indexes the whole file is parsed when the source is opened, so a
//! broken file fails before any work starts and the source knows its length.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::shuffle::shuffle_seeded;
use super::{clean_caption, invalid, io_error, Pair, Record, SkipReason, Skipped};
use crate::preprocess::load_image;
use crate::Result;

/// One annotation's image path and caption, or why it names no sample.
type Entry = std::result::Result<(PathBuf, String), Skipped>;

/// Image-caption pairs of a COCO captions JSON file, one per annotation, in file order (or the
/// order [`CocoSource::shuffle`] gave them), decoding each image as it is yielded.
#[derive(Debug, Clone)]
pub struct CocoSource {
    entries: std::vec::IntoIter<Entry>,
}

/// COCO ids are integers; some converted datasets use strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(untagged)]
enum Id {
    Int(i64),
    Str(String),
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Id::Int(i) => write!(f, "{i}"),
            Id::Str(s) => write!(f, "{s:?}"),
        }
    }
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: Id,
    file_name: Option<String>,
}

/// `null` or absent fields are bad samples, not a bad file.
#[derive(Deserialize)]
struct CocoAnnotation {
    image_id: Option<Id>,
    caption: Option<String>,
}

impl CocoSource {
    /// Reads the annotation file at `path`. Image `file_name`s are resolved against
    /// `image_root` (COCO ships them apart, e.g. `train2017/`), or the JSON file's folder when
    /// it is `None`; absolute names are used as they are.
    ///
    /// An annotation whose `image_id` is absent or not among `images` (or names an image with
    /// no `file_name`) is yielded as [`SkipReason::MissingImage`], one with no caption as
    /// [`SkipReason::MissingCaption`], keyed `file:annotations[i]`; a missing image file or an
    /// empty caption is skipped when the sample is yielded, as the other sources do.
    ///
    /// Fails, naming the file, if it cannot be read, is not JSON of this shape, lists one image
    /// id twice, or has no annotations.
    pub fn open(path: impl AsRef<Path>, image_root: Option<&Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(io_error(path))?;
        let coco: CocoFile = serde_json::from_reader(BufReader::new(file)).map_err(|e| {
            invalid(
                path,
                "COCO captions file",
                format!("expected {{\"images\": [...], \"annotations\": [...]}}: {e}"),
            )
        })?;
        let root = image_root.unwrap_or_else(|| path.parent().unwrap_or(Path::new("")));

        let mut files: HashMap<Id, Option<String>> = HashMap::with_capacity(coco.images.len());
        for image in coco.images {
            let id = image.id.clone();
            if files.insert(image.id, image.file_name).is_some() {
                return Err(invalid(
                    path,
                    "COCO captions file",
                    format!("image id {id} is listed twice in \"images\""),
                ));
            }
        }

        let key = |i: usize| format!("{}:annotations[{i}]", path.display());
        let entries: Vec<Entry> = coco
            .annotations
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                let id = a.image_id.ok_or_else(|| {
                    Skipped::new(key(i), SkipReason::MissingImage, "no \"image_id\" field")
                })?;
                let file_name = match files.get(&id) {
                    Some(Some(name)) if !name.trim().is_empty() => name,
                    Some(_) => {
                        return Err(Skipped::new(
                            key(i),
                            SkipReason::MissingImage,
                            format!("image {id} has no \"file_name\""),
                        ))
                    }
                    None => {
                        return Err(Skipped::new(
                            key(i),
                            SkipReason::MissingImage,
                            format!("image_id {id} is not in \"images\""),
                        ))
                    }
                };
                let caption = a.caption.ok_or_else(|| {
                    Skipped::new(key(i), SkipReason::MissingCaption, "no \"caption\" field")
                })?;
                Ok((root.join(file_name), caption))
            })
            .collect();
        if entries.is_empty() {
            return Err(invalid(
                path,
                "COCO captions file",
                "it has no annotations".to_string(),
            ));
        }
        Ok(Self {
            entries: entries.into_iter(),
        })
    }

    /// Puts the annotations not yet yielded in a seeded random order, the same on every
    /// machine; a different `epoch` gives a different order (as [`super::IndexSource::shuffle`]).
    pub fn shuffle(&mut self, seed: u64, epoch: u64) {
        shuffle_seeded(self.entries.as_mut_slice(), seed, epoch);
    }
}

impl Iterator for CocoSource {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        self.entries.next().map(load)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.entries.size_hint()
    }

    /// Skips annotations without decoding their images, so resuming part way is cheap.
    fn nth(&mut self, n: usize) -> Option<Record> {
        self.entries.nth(n).map(load)
    }
}

impl ExactSizeIterator for CocoSource {}

/// Reads an entry's image; the caption is checked first, as it costs nothing.
fn load(entry: Entry) -> Record {
    let (path, caption) = entry?;
    let key = path.display().to_string();
    let caption = clean_caption(&key, &caption)?;
    let image = load_image(&path).map_err(|e| Skipped::from_image_error(key.clone(), e))?;
    Ok(Pair {
        image,
        caption,
        key,
    })
}
