//! WebDataset tar shards: open_clip's `--dataset-type webdataset`.
//!
//! A sample is a run of consecutive tar members sharing a key, e.g. `dir/0001.jpg` and
//! `dir/0001.txt`. Shards are read member by member, holding one sample's image and caption
//! bytes at a time, never a whole shard.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::tar_reader::TarReader;
use super::{clean_caption, invalid, io_error, Pair, Record, SkipReason, Skipped};
use crate::{Error, Result};

/// Image members in open_clip's order of preference (`rename(image="jpg;png;jpeg;webp")`).
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "png", "jpeg", "webp"];
/// Members read into memory; the rest (`.cls`, `.npy`, ...) are stepped over unread.
const WANTED_EXTENSIONS: [&str; 6] = ["jpg", "png", "jpeg", "webp", "txt", "json"];

/// A brace range longer than this is a typo, not a dataset.
const MAX_RANGE: u64 = 10_000_000;

/// Turns a shard spec, as open_clip's `--train-data` takes it, into shard paths in order:
///
/// - a plain path: `data/shard-0.tar`;
/// - brace ranges, keeping zero padding: `shard-{00000..00099}.tar` gives `shard-00000.tar`
///   to `shard-00099.tar` (descending ranges count down);
/// - brace lists, nestable: `{train,extra}-{0..1}.tar`;
/// - globs, sorted: `data/*.tar`;
/// - several specs joined by `::`, concatenated.
///
/// A glob that matches nothing is an error; plain and brace-expanded paths are not checked
/// here ([`TarSource::new`] does that).
pub fn expand_shards(spec: &str) -> Result<Vec<PathBuf>> {
    let spec_error = |message: String| invalid(Path::new(spec), "shard spec", message);
    let mut shards = Vec::new();
    for part in spec.split("::") {
        if part.is_empty() {
            return Err(spec_error("it has an empty part".to_string()));
        }
        for pattern in expand_braces(part).map_err(spec_error)? {
            if !pattern.contains(['*', '?', '[']) {
                shards.push(PathBuf::from(pattern));
                continue;
            }
            let matches = glob::glob(&pattern).map_err(|e| spec_error(e.to_string()))?;
            let before = shards.len();
            for path in matches {
                let path = path.map_err(|e| Error::Io {
                    path: e.path().to_path_buf(),
                    source: e.into(),
                })?;
                shards.push(path);
            }
            if shards.len() == before {
                return Err(invalid(
                    Path::new(&pattern),
                    "shard glob",
                    "it matches no files".to_string(),
                ));
            }
        }
    }
    Ok(shards)
}

/// Bash-style brace expansion of the first `{...}`, then recursively of the rest.
fn expand_braces(pattern: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err("unmatched '}'".to_string());
        }
        return Ok(vec![pattern.to_string()]);
    };
    let prefix = &pattern[..open];
    if prefix.contains('}') {
        return Err("unmatched '}'".to_string());
    }
    let close = matching_brace(pattern, open).ok_or("unmatched '{'")?;
    let alternatives = brace_alternatives(&pattern[open + 1..close])?;
    let suffixes = expand_braces(&pattern[close + 1..])?;
    let mut out = Vec::with_capacity(alternatives.len() * suffixes.len());
    for alternative in &alternatives {
        for suffix in &suffixes {
            out.push(format!("{prefix}{alternative}{suffix}"));
        }
    }
    Ok(out)
}

fn matching_brace(pattern: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in pattern.char_indices().skip_while(|&(i, _)| i < open) {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The expansions of one brace body: `a,b,{c,d}` or `000..099`.
fn brace_alternatives(body: &str) -> std::result::Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    if parts.len() > 1 {
        let mut out = Vec::new();
        for part in parts {
            out.extend(expand_braces(part)?);
        }
        return Ok(out);
    }
    let range_error =
        || format!("{{{body}}} is neither a range like {{000..099}} nor a list like {{a,b}}");
    let (first, last) = body.split_once("..").ok_or_else(range_error)?;
    let number = |s: &str| {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u64>().ok()
    };
    let (Some(a), Some(b)) = (number(first), number(last)) else {
        return Err(range_error());
    };
    if a.abs_diff(b) >= MAX_RANGE {
        return Err(format!("{{{body}}} has more than {MAX_RANGE} values"));
    }
    // As in bash and Python's braceexpand: a leading zero on either end pads every value to
    // the longer end's width.
    let padded = |s: &str| s.len() > 1 && s.starts_with('0');
    let width = if padded(first) || padded(last) {
        first.len().max(last.len())
    } else {
        0
    };
    let values: Box<dyn Iterator<Item = u64>> = if a <= b {
        Box::new(a..=b)
    } else {
        Box::new((b..=a).rev())
    };
    Ok(values.map(|n| format!("{n:0width$}")).collect())
}

/// Samples streamed from WebDataset shards, in shard order and tar order.
///
/// Members are grouped by WebDataset key: the member path up to the first `.` of its file
/// name (`dir/0001.jpg` has key `dir/0001` and extension `jpg`; extensions are compared in
/// lower case). Members whose file name has no extension or starts with `.` (macOS `._*`
/// files) are ignored, as WebDataset ignores them. A sample takes its image from the first
/// of its `jpg`, `png`, `jpeg`, `webp` members (decoded whatever its extension claims) and
/// its caption from a `txt` member or, failing that, the `caption` field of a `json` member.
///
/// A shard found corrupt or truncated part way yields one [`SkipReason::BadShard`] record
/// and the stream moves on to the next shard. [`Pair::key`] is the WebDataset key; skip
/// messages name the shard.
pub struct TarSource {
    shards: std::vec::IntoIter<PathBuf>,
    current: Option<Shard>,
}

impl TarSource {
    /// Checks up front that every shard can be opened, so a mistyped spec fails at once
    /// rather than hours into a run.
    pub fn new(shards: Vec<PathBuf>) -> Result<Self> {
        for shard in &shards {
            let metadata = std::fs::metadata(shard).map_err(io_error(shard))?;
            if !metadata.is_file() {
                return Err(invalid(shard, "tar shard", "it is not a file".to_string()));
            }
            File::open(shard).map_err(io_error(shard))?;
        }
        Ok(Self {
            shards: shards.into_iter(),
            current: None,
        })
    }
}

impl Iterator for TarSource {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        loop {
            let mut shard = match self.current.take() {
                Some(shard) => shard,
                None => match Shard::open(self.shards.next()?) {
                    Ok(shard) => shard,
                    Err(skipped) => return Some(Err(skipped)),
                },
            };
            match shard.next_sample() {
                Ok(Some(sample)) => {
                    let record = sample.into_record(&shard.path);
                    self.current = Some(shard);
                    return Some(record);
                }
                Ok(None) => {}
                Err(skipped) => return Some(Err(skipped)),
            }
        }
    }
}

/// An open shard and the sample being gathered from it.
struct Shard {
    path: PathBuf,
    tar: TarReader<BufReader<File>>,
    gathering: Option<RawSample>,
    /// A read error, reported after the complete sample gathered before it.
    failed: Option<Skipped>,
}

impl Shard {
    fn open(path: PathBuf) -> std::result::Result<Self, Skipped> {
        match File::open(&path) {
            Ok(file) => Ok(Self {
                tar: TarReader::new(BufReader::new(file)),
                gathering: None,
                failed: None,
                path,
            }),
            Err(e) => Err(Skipped::new(
                path.display().to_string(),
                SkipReason::BadShard,
                format!("cannot open shard: {e}"),
            )),
        }
    }

    /// The next complete sample: the one being gathered, once a member with another key or
    /// the end of the shard shows it is complete.
    ///
    /// After a read error the shard is abandoned. The sample being gathered is still
    /// returned first if the failing member had a new key (it was complete); after a bad
    /// header nothing shows that, so it is dropped with the rest of the shard.
    fn next_sample(&mut self) -> std::result::Result<Option<RawSample>, Skipped> {
        if let Some(error) = self.failed.take() {
            return Err(error);
        }
        loop {
            let member = match self.tar.next_member() {
                Ok(Some(member)) => member,
                Ok(None) => return Ok(self.gathering.take()),
                Err(e) => return Err(self.bad_shard(e)),
            };
            let Some((key, extension)) = split_member_name(&member.name) else {
                continue;
            };
            let same_sample = self.gathering.as_ref().is_some_and(|s| s.key == key);
            let data = if WANTED_EXTENSIONS.contains(&extension.as_str()) {
                match self.tar.read_data() {
                    Ok(data) => Some(data),
                    Err(e) if same_sample => return Err(self.bad_shard(e)),
                    Err(e) => {
                        self.failed = Some(self.bad_shard(e));
                        return Ok(self.gathering.take());
                    }
                }
            } else {
                None
            };
            match &mut self.gathering {
                Some(sample) if same_sample => sample.add(extension, data),
                _ => {
                    let mut sample = RawSample::new(key.to_string());
                    sample.add(extension, data);
                    if let Some(done) = self.gathering.replace(sample) {
                        return Ok(Some(done));
                    }
                }
            }
        }
    }

    fn bad_shard(&self, error: std::io::Error) -> Skipped {
        Skipped::new(
            self.path.display().to_string(),
            SkipReason::BadShard,
            format!("{error}; skipping the rest of the shard"),
        )
    }
}

/// `dir/0001.seg.TXT` → (`dir/0001`, `seg.txt`), as WebDataset's `base_plus_ext`.
fn split_member_name(name: &str) -> Option<(&str, String)> {
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = file_start + name[file_start..].find('.')?;
    let extension = &name[dot + 1..];
    if dot == file_start || extension.is_empty() {
        return None;
    }
    Some((&name[..dot], extension.to_ascii_lowercase()))
}

/// The wanted members of one sample, as bytes.
struct RawSample {
    key: String,
    members: Vec<(String, Vec<u8>)>,
    duplicate: Option<String>,
}

/// The part of a `json` member open_clip-style pipelines read captions from.
#[derive(Deserialize)]
struct JsonCaption {
    caption: Option<String>,
}

impl RawSample {
    fn new(key: String) -> Self {
        Self {
            key,
            members: Vec::new(),
            duplicate: None,
        }
    }

    fn add(&mut self, extension: String, data: Option<Vec<u8>>) {
        let Some(data) = data else { return };
        if self.member(&extension).is_some() {
            self.duplicate = Some(extension);
        } else {
            self.members.push((extension, data));
        }
    }

    fn member(&self, extension: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .find(|(e, _)| e == extension)
            .map(|(_, data)| data.as_slice())
    }

    fn into_record(self, shard: &Path) -> Record {
        let shard = shard.display();
        let skip = |reason, message: String| {
            Skipped::new(&self.key, reason, format!("{message} in shard {shard}"))
        };
        if let Some(extension) = &self.duplicate {
            return Err(skip(
                SkipReason::Malformed,
                format!("two .{extension} members"),
            ));
        }
        let image = IMAGE_EXTENSIONS
            .iter()
            .find_map(|e| self.member(e))
            .ok_or_else(|| {
                skip(
                    SkipReason::MissingImage,
                    "no jpg, png, jpeg or webp member".to_string(),
                )
            })?;
        let caption = if let Some(text) = self.member("txt") {
            std::str::from_utf8(text)
                .map_err(|e| {
                    skip(
                        SkipReason::Malformed,
                        format!("the txt member is not UTF-8 ({e})"),
                    )
                })?
                .to_string()
        } else if let Some(json) = self.member("json") {
            match serde_json::from_slice::<JsonCaption>(json) {
                Ok(JsonCaption {
                    caption: Some(caption),
                }) => caption,
                Ok(JsonCaption { caption: None }) => {
                    return Err(skip(
                        SkipReason::MissingCaption,
                        "no txt member, and the json member has no caption".to_string(),
                    ))
                }
                Err(e) => {
                    return Err(skip(
                        SkipReason::Malformed,
                        format!("the json member is not an object with a string caption ({e})"),
                    ))
                }
            }
        } else {
            return Err(skip(
                SkipReason::MissingCaption,
                "no txt or json member".to_string(),
            ));
        };
        let caption = clean_caption(&self.key, &caption)?;
        let image = crate::preprocess::decode_image(image).map_err(|e| {
            skip(
                SkipReason::Undecodable,
                format!("cannot decode the image ({e})"),
            )
        })?;
        Ok(Pair {
            image,
            caption,
            key: self.key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brace_ranges_keep_padding_and_lists_nest() {
        let expand = |s| expand_braces(s).unwrap();
        assert_eq!(
            expand("s-{008..010}.tar"),
            ["s-008.tar", "s-009.tar", "s-010.tar"]
        );
        assert_eq!(expand("{2..0}"), ["2", "1", "0"]);
        assert_eq!(expand("{9..10}"), ["9", "10"]);
        assert_eq!(
            expand("{a,b{0..1}}-{x,y}"),
            ["a-x", "a-y", "b0-x", "b0-y", "b1-x", "b1-y"]
        );
        assert!(expand_braces("{a").is_err());
        assert!(expand_braces("a}").is_err());
        assert!(expand_braces("{abc}").is_err());
    }

    #[test]
    fn member_names_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(
            split_member_name("a.b/0001.seg.TXT"),
            Some(("a.b/0001", "seg.txt".to_string()))
        );
        assert_eq!(
            split_member_name("0001.jpg"),
            Some(("0001", "jpg".to_string()))
        );
        assert_eq!(split_member_name("dir/._0001.jpg"), None);
        assert_eq!(split_member_name("dir/README"), None);
    }
}
