//! CapFilt (Li et al. 2022, "BLIP", §3.3): bootstrapping a noisy web dataset with a captioner
//! and a filter.
//!
//! For every web image-text pair the captioner writes synthetic captions by nucleus sampling,
//! and the filter (an image-text matching head) scores the web caption and each synthetic one;
//! a caption is kept when the filter judges it matched, `itm_prob >= threshold`, where
//! `itm_prob = softmax(itm_score)[1]` (salesforce/BLIP's `filter` keeps
//! `itm_output[:, 1] >= 0.5`, likewise HF `BlipForImageTextRetrieval`).
//!
//! The kept pairs are appended to a JSONL file, one `{"image", "caption", "source", "itm_prob"}`
//! object per line, that [`zoo_datasets::sources::JsonlSource`] reads back. Large inputs take
//! long, so the run is resumable: a sidecar progress file (`OUT.done`) gets one line per
//! processed web pair, written after that pair's output lines, holding the number of output
//! lines written so far. On restart, pairs already listed are skipped and output lines beyond
//! the last recorded count (an image cut short by a crash) are dropped, so a crash loses at
//! most the image being processed and never duplicates a line.
//!
//! [`Captioner`] and [`ItmFilter`] bundle a BLIP checkpoint with its tokenizer and image
//! processor, loaded from a [`ModelRepo`] as `zoo caption` and `zoo match` load them.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use zoo_datasets::preprocess::ImageProcessor;
use zoo_datasets::sources::{Pair, Record, SkipCounts};
use zoo_datasets::tokenize::{Padding, TextTokenizer};
use zoo_models::blip::{BlipForConditionalGeneration, BlipForImageTextRetrieval};
use zoo_models::generation::{GenerationConfig, SamplingOptions, Strategy};
use zoo_models::hub::ModelRepo;

use crate::error::{Error, Result};

/// The tokenizer (`tokenizer.json`, `tokenizer_config.json`) and image processor
/// (`preprocessor_config.json`) of a checkpoint.
fn load_processors(repo: &ModelRepo) -> Result<(TextTokenizer, ImageProcessor)> {
    let tokenizer = TextTokenizer::from_files(
        &repo.get("tokenizer.json")?,
        repo.get_optional("tokenizer_config.json")?.as_deref(),
    )?;
    let processor = ImageProcessor::from_file(&repo.get("preprocessor_config.json")?)?;
    Ok((tokenizer, processor))
}

/// Preprocesses decoded images into one `[N, 3, H, W]` tensor of `dtype`; `keys` name the
/// images in the error when they preprocess to different sizes.
fn pixel_batch(
    processor: &ImageProcessor,
    images: &[&DynamicImage],
    keys: &[&str],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut data = Vec::new();
    let mut dims = None;
    for (image, key) in images.iter().zip(keys) {
        let (values, h, w) = processor
            .preprocess(image)
            .map_err(|e| Error::Input(format!("{key}: {e}")))?;
        match dims {
            Some((dh, dw)) if (dh, dw) != (h, w) => {
                return Err(Error::Input(format!(
                    "{key} preprocesses to {h}x{w} but earlier images gave {dh}x{dw}"
                )))
            }
            _ => dims = Some((h, w)),
        }
        data.extend(values);
    }
    let (h, w) = dims.unwrap_or(processor.config.crop_size);
    Ok(Tensor::from_vec(data, (images.len(), 3, h, w), device)?.to_dtype(dtype)?)
}

/// A tokenized caption prompt.
pub struct Prompt {
    /// "[CLS] prompt [SEP]" `[1, L]`.
    pub ids: Tensor,
    /// The prompt as decoded text.
    pub text: String,
    /// Tokens generation starts from: "[DEC] prompt".
    pub start_len: usize,
}

/// A BLIP captioner (HF `BlipForConditionalGeneration`) with its tokenizer and processor.
pub struct Captioner {
    pub model: BlipForConditionalGeneration,
    pub tokenizer: TextTokenizer,
    pub processor: ImageProcessor,
}

impl Captioner {
    /// Loads the checkpoint, `tokenizer.json` and `preprocessor_config.json` of `repo`.
    pub fn load(repo: &ModelRepo, dtype: Option<DType>, device: &Device) -> Result<Self> {
        let model = BlipForConditionalGeneration::load(repo, dtype, device)?;
        let (tokenizer, processor) = load_processors(repo)?;
        Ok(Self {
            model,
            tokenizer,
            processor,
        })
    }

    /// The tokenizer's "[CLS] prompt [SEP]" as a `[1, L]` tensor (generation starts from
    /// "[DEC] prompt"), with its decoded text, which captions are stripped of.
    pub fn prompt(&self, prompt: Option<&str>) -> Result<Option<Prompt>> {
        let Some(p) = prompt else { return Ok(None) };
        let ids = self.tokenizer.encode(p)?;
        let text = self.decode(&ids)?;
        let n = ids.len();
        let device = self.model.text_decoder.word_embeddings().device().clone();
        Ok(Some(Prompt {
            ids: Tensor::from_vec(ids, (1, n), &device)?,
            text,
            start_len: n.max(2) - 1,
        }))
    }

    /// Generates for preprocessed `pixels` `[N, 3, H, W]`: per image the full token sequence as
    /// HF `generate` returns it, and the caption, decoded without special tokens and without
    /// the prompt (as salesforce/BLIP's `caption[len(prompt):]`).
    pub fn generate(
        &self,
        pixels: &Tensor,
        prompt: Option<&Prompt>,
        cfg: &GenerationConfig,
    ) -> Result<Vec<(Vec<u32>, String)>> {
        let pixels = pixels.to_dtype(self.model.dtype())?;
        let rows = self.model.generate(&pixels, prompt.map(|p| &p.ids), cfg)?;
        rows.into_iter()
            .map(|ids| {
                let text = self.decode(&ids)?;
                let caption = match prompt {
                    Some(p) => text.strip_prefix(p.text.as_str()).unwrap_or(&text).trim(),
                    None => text.trim(),
                }
                .to_string();
                Ok((ids, caption))
            })
            .collect()
    }

    /// Captions decoded images (see [`generate`](Self::generate)); `keys` name them in errors.
    pub fn caption(
        &self,
        images: &[&DynamicImage],
        keys: &[&str],
        prompt: Option<&str>,
        cfg: &GenerationConfig,
    ) -> Result<Vec<String>> {
        let device = self.model.text_decoder.word_embeddings().device().clone();
        let pixels = pixel_batch(&self.processor, images, keys, self.model.dtype(), &device)?;
        let prompt = self.prompt(prompt)?;
        Ok(self
            .generate(&pixels, prompt.as_ref(), cfg)?
            .into_iter()
            .map(|(_, caption)| caption)
            .collect())
    }

    /// HF's `decode(skip_special_tokens=True)`.
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .inner()
            .decode(ids, true)
            .map_err(|e| Error::Input(format!("cannot decode token ids: {e}")))
    }
}

/// A BLIP image-text matching filter (HF `BlipForImageTextRetrieval` with its ITM head) with its
/// tokenizer and processor.
pub struct ItmFilter {
    pub model: BlipForImageTextRetrieval,
    pub tokenizer: TextTokenizer,
    pub processor: ImageProcessor,
}

impl ItmFilter {
    /// Loads the checkpoint, `tokenizer.json` and `preprocessor_config.json` of `repo`.
    pub fn load(repo: &ModelRepo, dtype: Option<DType>, device: &Device) -> Result<Self> {
        let model = BlipForImageTextRetrieval::load(repo, dtype, device)?;
        let (tokenizer, processor) = load_processors(repo)?;
        Ok(Self {
            model,
            tokenizer,
            processor,
        })
    }

    fn device(&self) -> Device {
        self.model.text_encoder.word_embeddings().device().clone()
    }

    /// The vision tower's tokens `[N, T, D]` of each image.
    pub fn image_embeds(&self, images: &[&DynamicImage], keys: &[&str]) -> Result<Tensor> {
        let pixels = pixel_batch(
            &self.processor,
            images,
            keys,
            self.model.dtype(),
            &self.device(),
        )?;
        Ok(self.model.vision_model.forward(&pixels)?)
    }

    /// Tokenizes as HF's BlipProcessor does: "[CLS] text [SEP]", padded to the longest, with
    /// the mask.
    pub fn tokenize(&self, texts: &[&str]) -> Result<(Tensor, Tensor)> {
        let max_len = self.model.config.text_config.max_position_embeddings;
        let max_len = self
            .tokenizer
            .model_max_length()
            .map_or(max_len, |m| m.min(max_len));
        Ok(self
            .tokenizer
            .encode_batch(texts, Padding::Longest, max_len)?
            .to_tensors(&self.device())?)
    }

    /// `itm_prob = softmax(itm_score)[1]` of one image (its `[1, T, D]` embeds) with each of the
    /// tokenized texts.
    pub fn itm_probs_of_tokens(
        &self,
        image_embeds: &Tensor,
        input_ids: &Tensor,
        mask: &Tensor,
    ) -> Result<Vec<f32>> {
        let (_, n, d) = image_embeds.dims3()?;
        let image = image_embeds
            .broadcast_as((input_ids.dim(0)?, n, d))?
            .contiguous()?;
        let logits = self
            .model
            .itm_logits(&image, input_ids, Some(mask))?
            .to_dtype(DType::F32)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let e = logits.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        Ok(probs.narrow(1, 1, 1)?.squeeze(1)?.to_vec1::<f32>()?)
    }

    /// [`itm_probs_of_tokens`](Self::itm_probs_of_tokens) for texts, exactly as `zoo match`
    /// scores them.
    pub fn itm_probs(&self, image_embeds: &Tensor, texts: &[&str]) -> Result<Vec<f32>> {
        let (input_ids, mask) = self.tokenize(texts)?;
        self.itm_probs_of_tokens(image_embeds, &input_ids, &mask)
    }
}

/// How captions are written and judged.
#[derive(Debug, Clone)]
pub struct CapFiltConfig {
    /// Keep a caption when `itm_prob >= threshold` (salesforce/BLIP: 0.5).
    pub threshold: f32,
    /// Synthetic captions per web pair.
    pub num_synthetic: usize,
    /// Nucleus sampling's probability mass (salesforce/BLIP: 0.9).
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// The captioner's prompt (salesforce/BLIP: "a picture of ").
    pub prompt: Option<String>,
    /// Seeds the sampling; with the same input and batch size a run is reproducible.
    pub seed: u64,
    /// Web pairs captioned and scored per forward pass.
    pub batch_size: usize,
}

impl Default for CapFiltConfig {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            num_synthetic: 1,
            top_p: 0.9,
            max_new_tokens: 30,
            min_new_tokens: 5,
            prompt: Some("a picture of ".to_string()),
            seed: 0,
            batch_size: 8,
        }
    }
}

impl CapFiltConfig {
    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::Input("the batch size must be at least 1".into()));
        }
        if !self.threshold.is_finite() {
            return Err(Error::Input(format!(
                "the threshold must be a number, got {}",
                self.threshold
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.num_synthetic > 0 && self.max_new_tokens == 0 {
            return Err(Error::Input(
                "max-new-tokens must be at least 1 to write synthetic captions".into(),
            ));
        }
        Ok(())
    }

    /// salesforce/BLIP's `generate(sample=True)`: nucleus sampling with HF's default top-k of
    /// 50 and a repetition penalty of 1.1. Each batch has its own seed, derived from the run's
    /// seed and the batch's first record, so a resumed run samples what the original would.
    fn generation(&self, captioner: &Captioner, first_record: u64) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            repetition_penalty: 1.1,
            strategy: Strategy::Sample(SamplingOptions {
                temperature: 1.0,
                top_k: 50,
                top_p: self.top_p,
                seed: self
                    .seed
                    .wrapping_add(first_record.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            }),
            ..captioner.model.generation_defaults()
        }
    }
}

/// Where a caption came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptionSource {
    Web,
    Synthetic,
}

/// One line of the bootstrapped dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptPair {
    pub image: String,
    pub caption: String,
    pub source: CaptionSource,
    pub itm_prob: f32,
}

/// Captions kept and removed from one source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub kept: u64,
    pub removed: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.kept + self.removed
    }

    fn add(&mut self, kept: bool) {
        if kept {
            self.kept += 1;
        } else {
            self.removed += 1;
        }
    }
}

/// What a run did. Counts cover this run only; pairs done by an earlier run are
/// `already_done`.
#[derive(Debug, Clone, Default)]
pub struct CapFiltReport {
    pub web: Counts,
    pub synthetic: Counts,
    /// Bad samples of the input (missing or undecodable images, empty captions, ...).
    pub skipped: SkipCounts,
    /// Web pairs skipped because the progress file lists them (or they repeat an earlier pair).
    pub already_done: u64,
    /// Web pairs processed by this run.
    pub processed: u64,
}

/// The progress file beside `out`: `OUT.done`.
pub fn progress_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".done");
    PathBuf::from(name)
}

/// The web pairs a progress file lists, as (image key, caption).
type Done = HashSet<(String, String)>;

/// One line of the progress file: a processed web pair, and the output's line count after it.
#[derive(Serialize, Deserialize)]
struct Progress {
    image: String,
    caption: String,
    lines: u64,
}

/// The output and progress files, opened for appending after the resume state was read.
struct Sink {
    out: File,
    out_path: PathBuf,
    progress: File,
    progress_path: PathBuf,
    lines: u64,
    done: Done,
}

impl Sink {
    /// Opens (or creates) `out` and its progress file, reading which web pairs are done and
    /// dropping output lines an interrupted run wrote after its last recorded pair.
    fn open(out_path: &Path) -> Result<Self> {
        let progress_path = progress_path(out_path);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e: std::io::Error| Error::Input(format!("cannot write {}: {e}", path.display()))
        };
        let (done, lines, progress_len) = match File::open(&progress_path) {
            Ok(file) => read_progress(&progress_path, file)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let nonempty = std::fs::metadata(out_path).is_ok_and(|m| m.len() > 0);
                if nonempty {
                    return Err(Error::Input(format!(
                        "{} already has lines but no progress file {}, so which images it \
                         covers is unknown; move it away or choose another --out",
                        out_path.display(),
                        progress_path.display()
                    )));
                }
                (HashSet::new(), 0, 0)
            }
            Err(e) => {
                return Err(Error::Input(format!(
                    "cannot read {}: {e}",
                    progress_path.display()
                )))
            }
        };
        if lines > 0 && !out_path.exists() {
            return Err(Error::Input(format!(
                "{} records {lines} output lines but {} does not exist",
                progress_path.display(),
                out_path.display()
            )));
        }
        let mut out = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(out_path)
            .map_err(io(out_path))?;
        let keep = byte_len_of_lines(&mut out, out_path, lines)?;
        out.set_len(keep).map_err(io(out_path))?;
        let progress = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&progress_path)
            .map_err(io(&progress_path))?;
        progress.set_len(progress_len).map_err(io(&progress_path))?;
        Ok(Self {
            out,
            out_path: out_path.to_path_buf(),
            progress,
            progress_path,
            lines,
            done,
        })
    }

    /// Appends a web pair's kept captions, then records the pair as done.
    fn write(&mut self, pair: &Pair, kept: &[KeptPair]) -> Result<()> {
        let mut text = String::new();
        for k in kept {
            text.push_str(&serde_json::to_string(k).map_err(|e| Error::Input(e.to_string()))?);
            text.push('\n');
        }
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(|e| Error::Input(format!("cannot write {}: {e}", self.out_path.display())))?;
        self.lines += kept.len() as u64;
        let progress = Progress {
            image: pair.key.clone(),
            caption: pair.caption.clone(),
            lines: self.lines,
        };
        let mut line = serde_json::to_string(&progress).map_err(|e| Error::Input(e.to_string()))?;
        line.push('\n');
        self.progress
            .write_all(line.as_bytes())
            .and_then(|()| self.progress.flush())
            .map_err(|e| {
                Error::Input(format!(
                    "cannot write {}: {e}",
                    self.progress_path.display()
                ))
            })
    }
}

/// The done pairs, the output line count after the last one, and the byte length of the
/// complete lines (a last line cut short by a crash is dropped; any other bad line is an
/// error naming the file and line).
fn read_progress(path: &Path, file: File) -> Result<(Done, u64, u64)> {
    let mut reader = BufReader::new(file);
    let (mut done, mut lines, mut len) = (HashSet::new(), 0, 0u64);
    let mut buf = Vec::new();
    for number in 1.. {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::Input(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            break;
        }
        let entry: Progress = serde_json::from_slice(&buf).map_err(|e| {
            Error::Input(format!(
                "{}:{number} is not a CapFilt progress line: {e}",
                path.display()
            ))
        })?;
        lines = entry.lines;
        len += n as u64;
        done.insert((entry.image, entry.caption));
    }
    Ok((done, lines, len))
}

/// The byte length of the first `lines` lines of `file`; an error if it has fewer.
fn byte_len_of_lines(file: &mut File, path: &Path, lines: u64) -> Result<u64> {
    let err = |e: std::io::Error| Error::Input(format!("cannot read {}: {e}", path.display()));
    file.seek(SeekFrom::Start(0)).map_err(err)?;
    let mut reader = BufReader::new(&*file);
    let (mut found, mut len) = (0u64, 0u64);
    let mut buf = Vec::new();
    while found < lines {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(err)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            return Err(Error::Input(format!(
                "{} has {found} complete lines but its progress file records {lines}; \
                 it was changed or truncated since",
                path.display()
            )));
        }
        found += 1;
        len += n as u64;
    }
    Ok(len)
}

/// Runs CapFilt over `records`, appending kept pairs to `out` (and progress to
/// [`progress_path`]`(out)`), skipping web pairs a previous run already processed.
/// `on_record` is called once per record consumed, for a progress bar.
pub fn run(
    captioner: &Captioner,
    filter: &ItmFilter,
    records: impl Iterator<Item = Record>,
    out: &Path,
    cfg: &CapFiltConfig,
    on_record: &mut dyn FnMut(),
) -> Result<CapFiltReport> {
    cfg.validate()?;
    let mut sink = Sink::open(out)?;
    let mut report = CapFiltReport::default();
    let mut batch: Vec<Pair> = Vec::with_capacity(cfg.batch_size);
    let mut first_record = 0u64;
    for (index, record) in records.enumerate() {
        on_record();
        let pair = match record {
            Ok(pair) => pair,
            Err(skipped) => {
                report.skipped.record(&skipped);
                continue;
            }
        };
        if !sink.done.insert((pair.key.clone(), pair.caption.clone())) {
            report.already_done += 1;
            continue;
        }
        if batch.is_empty() {
            first_record = index as u64;
        }
        batch.push(pair);
        if batch.len() == cfg.batch_size {
            process(
                captioner,
                filter,
                &batch,
                first_record,
                cfg,
                &mut sink,
                &mut report,
            )?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        process(
            captioner,
            filter,
            &batch,
            first_record,
            cfg,
            &mut sink,
            &mut report,
        )?;
    }
    Ok(report)
}

/// Captions, scores and writes one batch of web pairs.
fn process(
    captioner: &Captioner,
    filter: &ItmFilter,
    batch: &[Pair],
    first_record: u64,
    cfg: &CapFiltConfig,
    sink: &mut Sink,
    report: &mut CapFiltReport,
) -> Result<()> {
    let keys: Vec<&str> = batch.iter().map(|p| p.key.as_str()).collect();
    let images: Vec<&DynamicImage> = batch.iter().map(|p| &p.image).collect();
    let context = |e: Error| Error::Input(format!("CapFilt on {} ...: {e}", keys[0]));

    // Each image repeated `num_synthetic` times, one sampled caption per row.
    let synthetic = if cfg.num_synthetic > 0 {
        let n = cfg.num_synthetic;
        let rep_images: Vec<&DynamicImage> = images
            .iter()
            .flat_map(|&i| std::iter::repeat_n(i, n))
            .collect();
        let rep_keys: Vec<&str> = keys
            .iter()
            .flat_map(|&k| std::iter::repeat_n(k, n))
            .collect();
        let gen = cfg.generation(captioner, first_record);
        captioner
            .caption(&rep_images, &rep_keys, cfg.prompt.as_deref(), &gen)
            .map_err(context)?
    } else {
        Vec::new()
    };

    let embeds = filter.image_embeds(&images, &keys).map_err(context)?;
    for (i, pair) in batch.iter().enumerate() {
        let mine = &synthetic[i * cfg.num_synthetic..(i + 1) * cfg.num_synthetic];
        // An empty synthetic caption says nothing about the image: removed unscored.
        let texts: Vec<&str> = std::iter::once(pair.caption.as_str())
            .chain(mine.iter().map(String::as_str).filter(|c| !c.is_empty()))
            .collect();
        let probs = filter
            .itm_probs(&embeds.narrow(0, i, 1)?, &texts)
            .map_err(context)?;
        let mut kept = Vec::new();
        for (t, (&text, &itm_prob)) in texts.iter().zip(&probs).enumerate() {
            let source = if t == 0 {
                CaptionSource::Web
            } else {
                CaptionSource::Synthetic
            };
            let keep = itm_prob >= cfg.threshold;
            match source {
                CaptionSource::Web => report.web.add(keep),
                CaptionSource::Synthetic => report.synthetic.add(keep),
            }
            if keep {
                kept.push(KeptPair {
                    image: pair.key.clone(),
                    caption: text.to_string(),
                    source,
                    itm_prob,
                });
            }
        }
        report.synthetic.removed += (mine.len() + 1 - texts.len()) as u64;
        sink.write(pair, &kept)?;
        report.processed += 1;
    }
    Ok(())
}
