//! Contrastive batches from any image-caption record stream, prepared on worker threads.
//!
//! A producer thread reads records in order and numbers the good samples; worker threads decode,
//! augment (seeded per sample index, so the result does not depend on thread timing) and
//! tokenize; the consumer reorders by index and assembles batches. Bounded channels keep at most
//! a few batches in flight. Bad samples are skipped and counted; if too large a fraction is bad
//! the run stops with a clear error.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use zoo_datasets::augment::{augment, Uniform, DEFAULT_SCALE};
use zoo_datasets::preprocess::ImageProcessor;
use zoo_datasets::sources::{Pair, Record, SkipCounts, SkipReason, Skipped};
use zoo_datasets::synthetic::{Shapes, Split};
use zoo_datasets::tokenize::{Padding, TextTokenizer};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// A stream of records for one epoch.
pub type RecordStream = Box<dyn Iterator<Item = Record> + Send>;

/// Opens the record stream of an epoch (each epoch may shuffle differently).
pub type StreamFactory = Arc<dyn Fn(u64) -> Result<RecordStream> + Send + Sync>;

/// Turns a caption into the token ids of one sample, on a worker thread. The default is the
/// tokenizer with its special tokens, truncated to `max_text_len`; captioning adds a prompt and
/// `[DEC]` (see `blip_caption`).
pub type TextEncoder = Arc<dyn Fn(&str) -> Result<Vec<u32>> + Send + Sync>;

/// Where in the data a run is: resuming restarts exactly here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    /// Records (good or skipped) consumed in this epoch.
    pub records: u64,
    /// Good samples consumed over the whole run; seeds each sample's augmentation.
    pub samples: u64,
}

/// How batches are made.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub workers: usize,
    pub seed: u64,
    /// RandomResizedCrop for training; plain HF preprocessing otherwise.
    pub augment: bool,
    /// Stop when more than this fraction of records is bad (checked after every batch, the
    /// first one included, so a short run is held to it too).
    pub max_bad_fraction: f64,
    pub max_text_len: usize,
    pub padding: Padding,
    /// Whether the text tower takes an attention mask (CLIP) or not (SigLIP).
    pub use_attention_mask: bool,
}

/// One training batch: images and their padded caption ids (for captioning, the decoder's
/// input ids).
pub struct ContrastiveBatch {
    pub pixel_values: Tensor,
    pub input_ids: Tensor,
    pub attention_mask: Option<Tensor>,
    /// The data position after this batch.
    pub position: DataPosition,
}

struct Job {
    index: u64,
    pair: Pair,
    position: DataPosition,
    skipped_before: Vec<Skipped>,
}

struct Prepared {
    index: u64,
    pixels: Vec<f32>,
    dims: (usize, usize),
    ids: Vec<u32>,
    position: DataPosition,
    skipped_before: Vec<Skipped>,
    /// Why the sample itself could not be prepared (an image too large to resize, say): it is
    /// skipped and counted like a bad record.
    bad: Option<Skipped>,
}

enum Message {
    Sample(Prepared),
    Fatal(String),
}

/// Batches prepared in the background.
pub struct BatchLoader {
    rx: Receiver<Message>,
    pending: BTreeMap<u64, Prepared>,
    next_index: u64,
    config: LoaderConfig,
    pad_id: u32,
    device: Device,
    skipped: SkipCounts,
    latest_skip: Option<Skipped>,
    good: u64,
    _threads: Vec<JoinHandle<()>>,
}

impl Uniform for Rng {
    fn uniform(&mut self) -> f64 {
        Rng::uniform(self)
    }
}

impl BatchLoader {
    /// Starts the producer and workers at `start`.
    pub fn start(
        factory: StreamFactory,
        start: DataPosition,
        processor: ImageProcessor,
        tokenizer: TextTokenizer,
        config: LoaderConfig,
        device: &Device,
    ) -> Result<Self> {
        let max_len = config.max_text_len;
        let encoder = {
            let tokenizer = tokenizer.clone();
            Arc::new(move |caption: &str| -> Result<Vec<u32>> {
                Ok(tokenizer
                    .encode_batch(&[caption], Padding::Longest, max_len)?
                    .input_ids
                    .remove(0))
            }) as TextEncoder
        };
        Self::start_with_encoder(
            factory, start, processor, &tokenizer, encoder, config, device,
        )
    }

    /// [`start`](Self::start) with captions turned into ids by `encoder`; `tokenizer` gives
    /// the pad id.
    pub fn start_with_encoder(
        factory: StreamFactory,
        start: DataPosition,
        processor: ImageProcessor,
        tokenizer: &TextTokenizer,
        encoder: TextEncoder,
        config: LoaderConfig,
        device: &Device,
    ) -> Result<Self> {
        let pad_id = tokenizer
            .pad_id()
            .ok_or_else(|| Error::Input("the tokenizer has no pad token".into()))?;
        let capacity = (config.batch_size * 2).max(8);
        let (job_tx, job_rx) = sync_channel::<Job>(capacity);
        let (out_tx, out_rx) = sync_channel::<Message>(capacity);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut threads = Vec::new();

        let fatal_tx = out_tx.clone();
        threads.push(spawn("producer", move || {
            if let Err(e) = produce(&factory, start, &job_tx) {
                let _ = fatal_tx.send(Message::Fatal(e.to_string()));
            }
        })?);
        for _ in 0..config.workers.max(1) {
            let (job_rx, out_tx) = (job_rx.clone(), out_tx.clone());
            let (processor, encoder, cfg) = (processor.clone(), encoder.clone(), config.clone());
            threads.push(spawn("worker", move || loop {
                let job = match job_rx.lock() {
                    Ok(rx) => match rx.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    },
                    Err(_) => return,
                };
                let msg = match prepare(job, &processor, &encoder, &cfg) {
                    Ok(p) => Message::Sample(p),
                    Err(e) => Message::Fatal(e.to_string()),
                };
                if out_tx.send(msg).is_err() {
                    return;
                }
            })?);
        }
        Ok(Self {
            rx: out_rx,
            pending: BTreeMap::new(),
            next_index: start.samples,
            config,
            pad_id,
            device: device.clone(),
            skipped: SkipCounts::default(),
            latest_skip: None,
            good: 0,
            _threads: threads,
        })
    }

    /// Bad samples skipped so far.
    pub fn skipped(&self) -> &SkipCounts {
        &self.skipped
    }

    /// The next sample in order.
    fn next_sample(&mut self) -> Result<Prepared> {
        loop {
            if let Some(p) = self.pending.remove(&self.next_index) {
                self.next_index += 1;
                return Ok(p);
            }
            match self.rx.recv() {
                Ok(Message::Sample(p)) => {
                    self.pending.insert(p.index, p);
                }
                Ok(Message::Fatal(e)) => return Err(Error::Input(e)),
                Err(_) => return Err(Error::Input("the data loader stopped unexpectedly".into())),
            }
        }
    }

    /// The next batch of `batch_size` samples.
    pub fn next_batch(&mut self) -> Result<ContrastiveBatch> {
        let n = self.config.batch_size;
        if n == 0 {
            return Err(Error::Input("the batch size must be at least 1".into()));
        }
        let mut samples = Vec::with_capacity(n);
        while samples.len() < n {
            let s = self.next_sample()?;
            for skip in s.skipped_before.iter().chain(&s.bad) {
                self.skipped.record(skip);
                self.latest_skip = Some(skip.clone());
            }
            if s.bad.is_none() {
                self.good += 1;
                samples.push(s);
            }
        }
        self.check_bad_fraction()?;
        let dims = samples[0].dims;
        let mut pixels = Vec::with_capacity(n * 3 * dims.0 * dims.1);
        for s in &samples {
            pixels.extend_from_slice(&s.pixels);
        }
        let len = match self.config.padding {
            Padding::MaxLength => self.config.max_text_len,
            Padding::Longest => samples.iter().map(|s| s.ids.len()).max().unwrap_or(1),
        };
        let (mut ids, mut mask) = (Vec::with_capacity(n * len), Vec::with_capacity(n * len));
        for s in &samples {
            ids.extend(s.ids.iter().map(|&t| i64::from(t)));
            mask.extend(std::iter::repeat_n(1i64, s.ids.len()));
            ids.extend(std::iter::repeat_n(
                i64::from(self.pad_id),
                len - s.ids.len(),
            ));
            mask.extend(std::iter::repeat_n(0i64, len - s.ids.len()));
        }
        let position = samples[n - 1].position;
        Ok(ContrastiveBatch {
            pixel_values: Tensor::from_vec(pixels, (n, 3, dims.0, dims.1), &self.device)?,
            input_ids: Tensor::from_vec(ids, (n, len), &self.device)?,
            attention_mask: if self.config.use_attention_mask {
                Some(Tensor::from_vec(mask, (n, len), &self.device)?)
            } else {
                None
            },
            position,
        })
    }

    /// `--max-bad-fraction` over every record read so far.
    fn check_bad_fraction(&self) -> Result<()> {
        let bad = self.skipped.total();
        let seen = bad + self.good;
        if bad as f64 > self.config.max_bad_fraction * seen as f64 {
            let example = self
                .latest_skip
                .as_ref()
                .map(|s| format!(" (latest: {}: {})", s.key, s.message))
                .unwrap_or_default();
            return Err(Error::Input(format!(
                "{bad} of {seen} samples were bad, more than the allowed {}% (--max-bad-fraction \
                 {}){example}; skipped: {}",
                self.config.max_bad_fraction * 100.0,
                self.config.max_bad_fraction,
                self.skipped
            )));
        }
        Ok(())
    }
}

/// Reads records from `start` on, numbering good samples and carrying skipped records along.
fn produce(factory: &StreamFactory, start: DataPosition, jobs: &SyncSender<Job>) -> Result<()> {
    let mut pos = start;
    loop {
        let mut stream = factory(pos.epoch)?;
        let fresh = pos.records == 0;
        if !fresh {
            stream.nth(pos.records as usize - 1);
        }
        let mut skipped = Vec::new();
        let mut good_this_epoch = 0u64;
        for record in stream {
            pos.records += 1;
            match record {
                Ok(pair) => {
                    let job = Job {
                        index: pos.samples,
                        pair,
                        position: DataPosition {
                            samples: pos.samples + 1,
                            ..pos
                        },
                        skipped_before: std::mem::take(&mut skipped),
                    };
                    pos.samples += 1;
                    good_this_epoch += 1;
                    if jobs.send(job).is_err() {
                        return Ok(());
                    }
                }
                Err(skip) => skipped.push(skip),
            }
        }
        if fresh && good_this_epoch == 0 {
            return Err(Error::Input(format!(
                "the training data yielded no usable samples in epoch {} ({} records skipped{})",
                pos.epoch,
                skipped.len(),
                skipped
                    .first()
                    .map(|s| format!(", e.g. {}: {}", s.key, s.message))
                    .unwrap_or_default()
            )));
        }
        pos.epoch += 1;
        pos.records = 0;
    }
}

fn prepare(
    job: Job,
    processor: &ImageProcessor,
    encoder: &TextEncoder,
    cfg: &LoaderConfig,
) -> Result<Prepared> {
    let prepared = if cfg.augment {
        let mut rng = Rng::derive(cfg.seed, job.index);
        augment(
            &job.pair.image.to_rgb8(),
            &processor.config,
            DEFAULT_SCALE,
            &mut rng,
        )
    } else {
        processor.preprocess(&job.pair.image)
    };
    let (pixels, dims, bad) = match prepared {
        Ok((pixels, h, w)) => (pixels, (h, w), None),
        Err(message) => (
            Vec::new(),
            (0, 0),
            Some(Skipped::new(job.pair.key, SkipReason::Undecodable, message)),
        ),
    };
    let ids = if bad.is_none() {
        encoder(&job.pair.caption)?
    } else {
        Vec::new()
    };
    Ok(Prepared {
        index: job.index,
        pixels,
        dims,
        ids,
        position: job.position,
        skipped_before: job.skipped_before,
        bad,
    })
}

/// A named thread; failing to start one (the process is out of threads) is an error, not the
/// panic of `std::thread::spawn`.
fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("zoo-data-{name}"))
        .spawn(f)
        .map_err(|e| Error::Input(format!("cannot start a data-loading thread: {e}")))
}

/// The synthetic shapes as an endless record stream; `nth` jumps without generating.
pub struct SyntheticStream {
    shapes: Shapes,
    split: Split,
    next: u64,
}

impl SyntheticStream {
    pub fn new(shapes: Shapes, split: Split, start: u64) -> Self {
        Self {
            shapes,
            split,
            next: start,
        }
    }
}

impl Iterator for SyntheticStream {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        let s = self.shapes.sample(self.split, self.next);
        let key = format!("synthetic-{}", self.next);
        self.next += 1;
        Some(Ok(Pair {
            image: DynamicImage::ImageRgb8(s.image),
            caption: s.caption,
            key,
        }))
    }

    fn nth(&mut self, n: usize) -> Option<Record> {
        self.next += n as u64;
        self.next()
    }
}

/// A factory for synthetic data whose epochs are `epoch_size` samples long.
pub fn synthetic_factory(shapes: Shapes, epoch_size: u64) -> StreamFactory {
    Arc::new(move |epoch| {
        let stream = SyntheticStream::new(shapes.clone(), Split::Train, epoch * epoch_size);
        Ok(Box::new(stream.take(epoch_size as usize)) as RecordStream)
    })
}

/// The kinds of training data `--dataset-type` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetType {
    /// Chosen from the path: `.csv`/`.tsv`, `.jsonl`, `.json` (COCO), `.tar` or a shard
    /// pattern, `synthetic`.
    Auto,
    Csv,
    Jsonl,
    /// A COCO captions JSON (`images` plus `annotations`), images beside the file.
    Coco,
    WebDataset,
    Synthetic,
}

impl std::str::FromStr for DatasetType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "auto" => Self::Auto,
            "csv" => Self::Csv,
            "jsonl" => Self::Jsonl,
            "coco" => Self::Coco,
            "webdataset" | "wds" => Self::WebDataset,
            "synthetic" => Self::Synthetic,
            other => return Err(format!("unknown dataset type `{other}`: expected auto, csv, jsonl, coco, webdataset or synthetic")),
        })
    }
}

/// A file-based (or synthetic) image-caption dataset as given on the command line.
#[derive(Debug, Clone)]
pub struct DataSpec {
    pub path: String,
    pub kind: DatasetType,
    pub csv_img_key: String,
    pub csv_caption_key: String,
    /// `None`: tab for `.tsv`, comma otherwise.
    pub csv_separator: Option<u8>,
    /// Shuffle buffer for tar streams.
    pub shuffle_buffer: usize,
}

impl DataSpec {
    /// The concrete type: `Auto` resolved from the path.
    pub fn resolved_kind(&self) -> DatasetType {
        if self.kind != DatasetType::Auto {
            return self.kind;
        }
        let p = self.path.to_ascii_lowercase();
        if p == "synthetic" {
            DatasetType::Synthetic
        } else if p.ends_with(".jsonl") {
            DatasetType::Jsonl
        } else if p.ends_with(".json") {
            DatasetType::Coco
        } else if p.ends_with(".tar") || p.contains('{') || p.contains('*') {
            DatasetType::WebDataset
        } else {
            DatasetType::Csv
        }
    }

    fn separator(&self) -> u8 {
        self.csv_separator
            .unwrap_or(if self.path.to_ascii_lowercase().ends_with(".tsv") {
                b'\t'
            } else {
                b','
            })
    }

    /// Opens the records of `epoch`, shuffled with `seed` (index sources are permuted, tar shards
    /// reordered and streamed through a shuffle buffer); `shuffle: false` keeps file order.
    pub fn open(&self, seed: u64, epoch: u64, shuffle: bool) -> Result<RecordStream> {
        use zoo_datasets::sources::{
            expand_shards, shuffle_shards, CocoSource, CsvSource, JsonlSource, ShuffleBuffer,
            TarSource,
        };
        Ok(match self.resolved_kind() {
            DatasetType::Csv | DatasetType::Auto => {
                let mut s = CsvSource::open(
                    &self.path,
                    &self.csv_img_key,
                    &self.csv_caption_key,
                    self.separator(),
                )?;
                if shuffle {
                    s.shuffle(seed, epoch);
                }
                Box::new(s)
            }
            DatasetType::Jsonl => {
                let mut s = JsonlSource::open(&self.path)?;
                if shuffle {
                    s.shuffle(seed, epoch);
                }
                Box::new(s)
            }
            DatasetType::Coco => {
                let mut s = CocoSource::open(&self.path, None)?;
                if shuffle {
                    s.shuffle(seed, epoch);
                }
                Box::new(s)
            }
            DatasetType::WebDataset => {
                let mut shards = expand_shards(&self.path)?;
                if shuffle {
                    shuffle_shards(&mut shards, seed, epoch);
                    Box::new(ShuffleBuffer::new(
                        TarSource::new(shards)?,
                        self.shuffle_buffer,
                        seed,
                        epoch,
                    ))
                } else {
                    Box::new(TarSource::new(shards)?)
                }
            }
            DatasetType::Synthetic => {
                return Err(Error::Input(
                    "synthetic data has no file to open; use the synthetic factory".into(),
                ))
            }
        })
    }

    /// A factory for training: every epoch reopens and reshuffles. The data is opened once now,
    /// so a bad path fails before training starts.
    pub fn factory(self, seed: u64) -> Result<StreamFactory> {
        drop(self.open(seed, 0, true)?);
        Ok(Arc::new(move |epoch| self.open(seed, epoch, true)))
    }

    /// Up to `limit` good pairs in file order, and the bad samples skipped on the way.
    pub fn load_pairs(&self, limit: usize) -> Result<(Vec<Pair>, SkipCounts)> {
        let mut skipped = SkipCounts::default();
        let mut pairs = Vec::new();
        for record in self.open(0, 0, false)? {
            match record {
                Ok(p) => pairs.push(p),
                Err(s) => skipped.record(&s),
            }
            if pairs.len() >= limit {
                break;
            }
        }
        if pairs.is_empty() {
            return Err(Error::Input(format!(
                "{} yielded no usable image-caption pairs ({skipped})",
                self.path
            )));
        }
        Ok((pairs, skipped))
    }
}
