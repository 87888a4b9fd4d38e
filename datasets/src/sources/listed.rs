//! Index files that list image paths and captions: CSV/TSV, as open_clip's `CsvDataset`
//! reads them, and JSONL.
//!
//! The whole index is parsed when the source is opened (images are decoded only as they are
//! yielded). open_clip does the same with `pandas.read_csv`; it costs a few hundred bytes a
//! row, and in exchange a broken index fails before training starts, with its line number,
//! and the source knows its length and can be shuffled per epoch.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::shuffle::shuffle_seeded;
use super::{clean_caption, invalid, io_error, Pair, Record, SkipReason, Skipped};
use crate::preprocess::load_image;
use crate::{Error, Result};

/// open_clip's `--csv-img-key` default.
pub const DEFAULT_CSV_IMG_KEY: &str = "filepath";
/// open_clip's `--csv-caption-key` default.
pub const DEFAULT_CSV_CAPTION_KEY: &str = "title";
/// open_clip's `--csv-separator` default: a tab, whatever the file's extension.
pub const DEFAULT_CSV_SEPARATOR: u8 = b'\t';

/// Image-caption pairs listed in an index file; `Format` only selects the constructor
/// ([`CsvSource::open`] or [`JsonlSource::open`]), iteration is shared.
///
/// Yields the entries in file order (or the order [`IndexSource::shuffle`] gave them),
/// decoding each image as it is yielded.
#[derive(Debug, Clone)]
pub struct IndexSource<Format> {
    entries: std::vec::IntoIter<Entry>,
    format: PhantomData<Format>,
}

/// Marker for CSV/TSV index files.
#[derive(Debug, Clone)]
pub enum Csv {}

/// Marker for JSONL index files.
#[derive(Debug, Clone)]
pub enum Jsonl {}

/// A CSV/TSV file with a header row naming the image-path and caption columns.
pub type CsvSource = IndexSource<Csv>;

/// A JSONL file with one `{"image": "path", "caption": "text"}` object per line.
pub type JsonlSource = IndexSource<Jsonl>;

/// One parsed line: an image path and its caption, or why the line names no sample.
type Entry = std::result::Result<(PathBuf, String), Skipped>;

impl CsvSource {
    /// Reads the index at `path`, taking image paths from column `img_key` and captions from
    /// column `caption_key`; fields may be quoted (`"a, b"`, `""` for a quote).
    ///
    /// Image paths are relative to the CSV file's folder unless absolute. (open_clip passes
    /// them to PIL unchanged, i.e. relative to the working directory; relative to the index
    /// lets a dataset folder move as a whole.)
    ///
    /// Fails, naming the file and line, if the file cannot be read, the header lacks either
    /// column, a row has the wrong number of fields or is not UTF-8, or there are no rows.
    pub fn open(
        path: impl AsRef<Path>,
        img_key: &str,
        caption_key: &str,
        separator: u8,
    ) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(io_error(path))?;
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(separator)
            .from_reader(file);
        let header = reader.headers().map_err(|e| csv_error(path, e))?.clone();
        let column = |key: &str| {
            header.iter().position(|name| name == key).ok_or_else(|| {
                let names: Vec<&str> = header.iter().collect();
                invalid(
                    path,
                    "CSV file",
                    format!("line 1: the header has no column {key:?} (it has {names:?})"),
                )
            })
        };
        let (img_column, caption_column) = (column(img_key)?, column(caption_key)?);

        let dir = path.parent().unwrap_or(Path::new(""));
        let mut entries = Vec::new();
        for row in reader.records() {
            let row = row.map_err(|e| csv_error(path, e))?;
            let line = row.position().map_or(0, |p| p.line());
            entries.push(entry(
                dir,
                &row[img_column],
                row[caption_column].to_string(),
                || format!("{}:{line}", path.display()),
            ));
        }
        Self::from_entries(path, "CSV file", entries)
    }
}

impl JsonlSource {
    /// Reads the index at `path`: one JSON object per line with string fields `image` (a path,
    /// relative to the file's folder unless absolute) and `caption`; other fields are ignored.
    ///
    /// Blank lines are ignored. A line that is not such an object (invalid JSON, not UTF-8,
    /// a field of the wrong type) is a bad sample, not a bad file: it is yielded as
    /// [`SkipReason::Malformed`] in its place, keyed `file:line`, so one garbled line (often
    /// the last, cut short by an interrupted writer) does not cost the whole dataset. A
    /// missing `image` or `caption` field is [`SkipReason::MissingImage`] or
    /// [`SkipReason::MissingCaption`].
    ///
    /// Fails if the file cannot be read or lists no lines at all.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut reader = BufReader::new(File::open(path).map_err(io_error(path))?);
        let dir = path.parent().unwrap_or(Path::new(""));
        let mut entries = Vec::new();
        let mut bytes = Vec::new();
        for line in 1.. {
            bytes.clear();
            if reader
                .read_until(b'\n', &mut bytes)
                .map_err(io_error(path))?
                == 0
            {
                break;
            }
            let key = || format!("{}:{line}", path.display());
            let malformed = |message: String| -> Entry {
                Err(Skipped::new(key(), SkipReason::Malformed, message))
            };
            let text = match std::str::from_utf8(&bytes) {
                Ok(text) => text.trim_start_matches('\u{feff}').trim(),
                Err(e) => {
                    entries.push(malformed(format!("line is not UTF-8: {e}")));
                    continue;
                }
            };
            if text.is_empty() {
                continue;
            }
            entries.push(match serde_json::from_str::<JsonlLine>(text) {
                Err(e) => malformed(format!("not a JSON object with string fields: {e}")),
                Ok(JsonlLine { image: None, .. }) => Err(Skipped::new(
                    key(),
                    SkipReason::MissingImage,
                    "no \"image\" field",
                )),
                Ok(JsonlLine { caption: None, .. }) => Err(Skipped::new(
                    key(),
                    SkipReason::MissingCaption,
                    "no \"caption\" field",
                )),
                Ok(JsonlLine {
                    image: Some(image),
                    caption: Some(caption),
                }) => entry(dir, &image, caption, key),
            });
        }
        Self::from_entries(path, "JSONL file", entries)
    }
}

/// The fields of a JSONL line; `null` counts as missing.
#[derive(Deserialize)]
struct JsonlLine {
    image: Option<String>,
    caption: Option<String>,
}

impl<Format> IndexSource<Format> {
    /// An empty index is an error: training on nothing should not look like success.
    fn from_entries(path: &Path, what: &'static str, entries: Vec<Entry>) -> Result<Self> {
        if entries.is_empty() {
            return Err(invalid(path, what, "it lists no samples".to_string()));
        }
        Ok(Self {
            entries: entries.into_iter(),
            format: PhantomData,
        })
    }

    /// Puts the entries not yet yielded in a seeded random order, the same on every machine;
    /// a different `epoch` gives a different order. This is the per-epoch shuffle open_clip
    /// gets from its sampler.
    pub fn shuffle(&mut self, seed: u64, epoch: u64) {
        shuffle_seeded(self.entries.as_mut_slice(), seed, epoch);
    }
}

impl<Format> Iterator for IndexSource<Format> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        self.entries.next().map(load)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.entries.size_hint()
    }

    /// Skips entries without decoding them, so resuming part way through an epoch is cheap.
    fn nth(&mut self, n: usize) -> Option<Record> {
        self.entries.nth(n).map(load)
    }
}

impl<Format> ExactSizeIterator for IndexSource<Format> {}

/// An index line's entry; an empty image path names no sample.
fn entry(dir: &Path, image: &str, caption: String, key: impl FnOnce() -> String) -> Entry {
    if image.trim().is_empty() {
        return Err(Skipped::new(
            key(),
            SkipReason::MissingImage,
            "the image path is empty",
        ));
    }
    Ok((dir.join(image), caption))
}

/// Reads an entry's image. The caption is checked first: it costs nothing, decoding does.
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

/// The csv crate's parse errors already say `record N (line: L, byte: B)`.
fn csv_error(path: &Path, error: csv::Error) -> Error {
    let message = error.to_string();
    match error.into_kind() {
        csv::ErrorKind::Io(source) => io_error(path)(source),
        _ => invalid(path, "CSV file", message),
    }
}
