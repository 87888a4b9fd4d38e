//! Zero-shot image classification (Radford et al. 2021, §3.1.4): embed every class name through
//! prompt templates, average the normalised embeddings per class (the prompt ensemble),
//! renormalise, and score images against the resulting classifier.

use candle_core::Tensor;
use zoo_models::contrastive::l2_normalize;

use crate::error::{Error, Result};
use crate::pipeline::DualEncoderPipeline;

/// CLIP's default single prompt.
pub const DEFAULT_TEMPLATE: &str = "a photo of a {}.";

/// Fills a template's `{}` with a label; a template without `{}` is followed by the label.
pub fn fill_template(template: &str, label: &str) -> String {
    if template.contains("{}") {
        template.replace("{}", label)
    } else {
        format!("{template} {label}")
    }
}

/// Class embeddings `[C, D]`: per label, the renormalised mean of its normalised template
/// embeddings.
pub fn build_classifier(
    pipeline: &DualEncoderPipeline,
    labels: &[String],
    templates: &[String],
) -> Result<Tensor> {
    if labels.is_empty() {
        return Err(Error::Input("no labels given".into()));
    }
    let templates: Vec<String> = if templates.is_empty() {
        vec![DEFAULT_TEMPLATE.to_string()]
    } else {
        templates.to_vec()
    };
    let prompts: Vec<String> = labels
        .iter()
        .flat_map(|l| templates.iter().map(move |t| fill_template(t, l)))
        .collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let embeds = pipeline.embed_texts(&refs)?;
    let (_, d) = embeds.dims2()?;
    let per_class = embeds
        .reshape((labels.len(), templates.len(), d))?
        .mean(1)?;
    Ok(l2_normalize(&per_class)?)
}

/// One label's score for an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub prob: f32,
    pub logit: f32,
}

/// Ranks the labels for each image embedding: probabilities are a softmax over labels (CLIP) or
/// a per-label sigmoid (SigLIP), from the model's scaled (and biased) logits.
pub fn classify(
    pipeline: &DualEncoderPipeline,
    image_embeds: &Tensor,
    classifier: &Tensor,
    labels: &[String],
    top_k: usize,
) -> Result<Vec<Vec<Prediction>>> {
    let logits = pipeline.logits_per_image(image_embeds, classifier)?;
    let probs = pipeline.probabilities(&logits)?;
    let logits = logits.to_vec2::<f32>()?;
    let probs = probs.to_vec2::<f32>()?;
    Ok(logits
        .iter()
        .zip(&probs)
        .map(|(lrow, prow)| {
            let mut ranked: Vec<Prediction> = labels
                .iter()
                .zip(lrow.iter().zip(prow))
                .map(|(label, (&logit, &prob))| Prediction {
                    label: label.clone(),
                    prob,
                    logit,
                })
                .collect();
            ranked.sort_by(|a, b| b.logit.total_cmp(&a.logit));
            ranked.truncate(top_k.max(1));
            ranked
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_the_label() {
        assert_eq!(
            fill_template("a photo of a {}.", "cat"),
            "a photo of a cat."
        );
        assert_eq!(fill_template("a photo of", "cat"), "a photo of cat");
    }
}
