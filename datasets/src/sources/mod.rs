//! Image-text sources: the file layouts open_clip's data pipeline reads, as iterators of
//! [`Record`]s.
//!
//! - [`CsvSource`]: a CSV/TSV index of image paths and captions (`--dataset-type csv`,
//!   `--csv-img-key`, `--csv-caption-key`, `--csv-separator`).
//! - [`JsonlSource`]: one `{"image": ..., "caption": ...}` object per line.
//! - [`CocoSource`]: the COCO captions JSON (`images` plus `annotations`), one pair per
//!   annotation (`--dataset-type coco`).
//! - [`TarSource`]: WebDataset tar shards (`--dataset-type webdataset`), streamed member by
//!   member; [`expand_shards`] turns open_clip's `--train-data` spec (brace ranges, globs,
//!   `::` lists) into shard paths.
//! - [`ImageFolder`]: torchvision's one-folder-per-class layout, for zero-shot evaluation.
//! - [`shuffle_shards`] and [`ShuffleBuffer`]: seeded, machine-independent shuffling, so a
//!   resumed or repeated run sees the same order.
//!
//! Two kinds of bad input are told apart, as the design brief asks. A *bad source* (the index
//! file is missing, the header lacks a requested column, a shard cannot be opened) is a
//! fatal [`crate::Error`] naming the file, returned when the source is opened. A *bad sample*
//! (a missing or undecodable image, an empty caption, an incomplete tar sample, a malformed
//! JSONL line) is yielded as `Err(`[`Skipped`]`)` so that one broken file costs one sample,
//! not a training run; [`SkipCounts`] tallies them for the trainer's metrics.
//!
//! Captions are trimmed of surrounding whitespace (a `.txt` member usually ends in a newline);
//! the tokenizers normalise whitespace anyway.

use std::fmt;
use std::path::Path;

use image::DynamicImage;

use crate::Error;

mod coco;
mod image_folder;
mod listed;
mod shuffle;
mod tar_reader;
mod webdataset;

pub use coco::CocoSource;
pub use image_folder::ImageFolder;
pub use listed::{
    Csv, CsvSource, IndexSource, Jsonl, JsonlSource, DEFAULT_CSV_CAPTION_KEY, DEFAULT_CSV_IMG_KEY,
    DEFAULT_CSV_SEPARATOR,
};
pub use shuffle::{shuffle_shards, ShuffleBuffer};
pub use webdataset::{expand_shards, TarSource};

/// One decoded image and its caption.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Decoded but otherwise untouched; the trainer converts and augments.
    pub image: DynamicImage,
    pub caption: String,
    /// Where the sample came from (the image path, or the WebDataset key), for messages.
    pub key: String,
}

/// A sample that could not be read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The image path, the WebDataset key, or `file:line` when neither is known.
    pub key: String,
    pub reason: SkipReason,
    pub message: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "skipped {} ({}): {}",
            self.key, self.reason, self.message
        )
    }
}

/// Why a sample was skipped; the categories a user acts on differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The image file does not exist or cannot be read.
    MissingFile,
    /// The image bytes are not an image the `image` crate can decode.
    Undecodable,
    /// The caption is empty or only whitespace.
    EmptyCaption,
    /// A tar sample with no `txt` member and no `json` caption, or a JSONL object without
    /// `caption`.
    MissingCaption,
    /// A tar sample with no image member, or an index entry with no image path.
    MissingImage,
    /// A JSONL line that is not a JSON object with string fields, a caption that is not
    /// UTF-8 or JSON, or a tar sample with the same member twice.
    Malformed,
    /// A tar shard that turned out truncated or corrupt part way (or vanished after the source
    /// was opened); the rest of that shard is skipped, as open_clip's `log_and_continue`
    /// handler does, so a bad shard late in a long run does not end it.
    BadShard,
}

impl SkipReason {
    /// Every reason, in the order [`SkipCounts`] reports them.
    pub const ALL: [SkipReason; 7] = [
        SkipReason::MissingFile,
        SkipReason::Undecodable,
        SkipReason::EmptyCaption,
        SkipReason::MissingCaption,
        SkipReason::MissingImage,
        SkipReason::Malformed,
        SkipReason::BadShard,
    ];

    /// A stable snake_case name, for logs and `metrics.jsonl` keys.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::MissingFile => "missing_file",
            SkipReason::Undecodable => "undecodable",
            SkipReason::EmptyCaption => "empty_caption",
            SkipReason::MissingCaption => "missing_caption",
            SkipReason::MissingImage => "missing_image",
            SkipReason::Malformed => "malformed",
            SkipReason::BadShard => "bad_shard",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What every source yields: a pair, or the reason a sample was skipped.
pub type Record = std::result::Result<Pair, Skipped>;

/// How many samples were skipped, per reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkipCounts {
    counts: [u64; SkipReason::ALL.len()],
}

impl SkipCounts {
    pub fn record(&mut self, skipped: &Skipped) {
        self.counts[skipped.reason.index()] += 1;
    }

    pub fn get(&self, reason: SkipReason) -> u64 {
        self.counts[reason.index()]
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds another tally, e.g. one kept by a worker thread.
    pub fn merge(&mut self, other: &SkipCounts) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
    }

    /// Every reason with its count, zeros included, so metrics have stable columns.
    pub fn iter(&self) -> impl Iterator<Item = (SkipReason, u64)> + '_ {
        SkipReason::ALL.iter().map(|&r| (r, self.get(r)))
    }
}

/// `3 skipped (missing_file: 1, undecodable: 2)`, or `0 skipped`.
impl fmt::Display for SkipCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} skipped", self.total())?;
        let mut nonzero = self.iter().filter(|&(_, n)| n > 0).peekable();
        if nonzero.peek().is_some() {
            let parts: Vec<String> = nonzero.map(|(r, n)| format!("{r}: {n}")).collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        Ok(())
    }
}

impl Skipped {
    pub fn new(key: impl Into<String>, reason: SkipReason, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason,
            message: message.into(),
        }
    }

    /// A failed image read: an I/O failure means the file is missing or unreadable; anything
    /// else means the bytes are not a decodable image.
    fn from_image_error(key: String, error: Error) -> Self {
        let reason = match error {
            Error::Io { .. } => SkipReason::MissingFile,
            _ => SkipReason::Undecodable,
        };
        Self::new(key, reason, error.to_string())
    }
}

/// The caption as stored in a [`Pair`]: trimmed, and non-empty.
fn clean_caption(key: &str, caption: &str) -> std::result::Result<String, Skipped> {
    let caption = caption.trim();
    if caption.is_empty() {
        return Err(Skipped::new(
            key,
            SkipReason::EmptyCaption,
            "caption is empty",
        ));
    }
    Ok(caption.to_string())
}

fn invalid(path: &Path, what: &'static str, message: String) -> Error {
    Error::Invalid {
        path: path.to_path_buf(),
        what,
        message,
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
