//! Evaluation shared by the training loop and `zoo eval`: zero-shot classification (top-1,
//! top-5, per-class accuracy, confusion matrix) and image-text retrieval recall@K in both
//! directions, as open_clip's `zero_shot.py` and `get_clip_metrics` compute them.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::pipeline::DualEncoderPipeline;

/// Zero-shot accuracy over a labelled image set.
#[derive(Debug, Clone, PartialEq)]
pub struct ZeroShotReport {
    pub top1: f64,
    pub top5: f64,
    /// Accuracy per class name, for classes with at least one image.
    pub per_class: Vec<(String, f64)>,
    pub n: usize,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
}

/// Scores normalised `image_embeds` `[N, D]` against a zero-shot `classifier` `[C, D]`.
pub fn zero_shot_report(
    pipeline: &DualEncoderPipeline,
    classifier: &Tensor,
    image_embeds: &Tensor,
    labels: &[usize],
    class_names: &[String],
) -> Result<ZeroShotReport> {
    let logits = pipeline
        .logits_per_image(image_embeds, classifier)?
        .to_vec2::<f32>()?;
    if logits.len() != labels.len() {
        return Err(Error::Input(format!(
            "{} images but {} labels",
            logits.len(),
            labels.len()
        )));
    }
    if labels.is_empty() {
        return Err(Error::Input("the evaluation set is empty".into()));
    }
    let c = class_names.len();
    let mut confusion = vec![vec![0u64; c]; c];
    let (mut top1, mut top5) = (0usize, 0usize);
    for (row, &target) in logits.iter().zip(labels) {
        let rank = row.iter().filter(|&&v| v > row[target]).count();
        top1 += usize::from(rank == 0);
        top5 += usize::from(rank < 5);
        let predicted = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        confusion[target][predicted] += 1;
    }
    let per_class = class_names
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            let total: u64 = confusion[i].iter().sum();
            (total > 0).then(|| (name.clone(), confusion[i][i] as f64 / total as f64))
        })
        .collect();
    let n = labels.len();
    Ok(ZeroShotReport {
        top1: top1 as f64 / n as f64,
        top5: top5 as f64 / n as f64,
        per_class,
        n,
        confusion,
    })
}

/// Recall@1/5/10 for image→text and text→image retrieval over paired embeddings (pair `i` is
/// image `i` with text `i`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalReport {
    pub image_to_text: [f64; 3],
    pub text_to_image: [f64; 3],
    pub n: usize,
}

pub const RECALL_AT: [usize; 3] = [1, 5, 10];

pub fn retrieval_report(image_embeds: &Tensor, text_embeds: &Tensor) -> Result<RetrievalReport> {
    let sims = image_embeds.matmul(&text_embeds.t()?)?;
    let by_image = sims.to_vec2::<f32>()?;
    let by_text = sims.t()?.contiguous()?.to_vec2::<f32>()?;
    let n = by_image.len();
    if n == 0 || n != by_text.len() {
        return Err(Error::Input(format!(
            "retrieval needs as many images as texts ({n} vs {})",
            by_text.len()
        )));
    }
    let recall = |rows: &[Vec<f32>]| -> [f64; 3] {
        let ranks: Vec<usize> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| r.iter().filter(|&&v| v > r[i]).count())
            .collect();
        RECALL_AT.map(|k| ranks.iter().filter(|&&r| r < k).count() as f64 / n as f64)
    };
    Ok(RetrievalReport {
        image_to_text: recall(&by_image),
        text_to_image: recall(&by_text),
        n,
    })
}

impl RetrievalReport {
    /// Named metrics: `image_to_text_R@1`, …, `text_to_image_R@10`.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (dir, vals) in [
            ("image_to_text", self.image_to_text),
            ("text_to_image", self.text_to_image),
        ] {
            for (k, v) in RECALL_AT.iter().zip(vals) {
                out.push((format!("{dir}_R@{k}"), v));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn retrieval_counts_ranks_in_both_directions() {
        // Image 0 matches text 0 best; image 1 prefers text 0 over its own text 1.
        let img = Tensor::new(&[[1f32, 0.0], [0.8, 0.6]], &Device::Cpu).unwrap();
        let txt = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let r = retrieval_report(&img, &txt).unwrap();
        assert_eq!(r.image_to_text, [0.5, 1.0, 1.0]);
        assert_eq!(r.text_to_image, [1.0, 1.0, 1.0]);
    }
}
