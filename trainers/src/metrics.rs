//! `metrics.jsonl` (one JSON object per line: step plus named values) and the PNG plots made
//! from it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::plot::line_plot;

/// An append-only metrics log that also keeps the history for plotting.
pub struct MetricsLog {
    path: PathBuf,
    history: BTreeMap<String, Vec<(f64, f64)>>,
}

impl MetricsLog {
    /// Opens `OUTPUT/metrics.jsonl`. When resuming at `resume_step`, lines after it (from the
    /// interrupted run) are dropped so the log matches an uninterrupted run.
    pub fn open(output: &Path, resume_step: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(output)
            .map_err(|e| Error::Input(format!("cannot create {}: {e}", output.display())))?;
        let path = output.join("metrics.jsonl");
        let mut history: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let mut kept = String::new();
        if let (Some(limit), Ok(text)) = (resume_step, std::fs::read_to_string(&path)) {
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let step = v["step"].as_u64().unwrap_or(u64::MAX);
                if step > limit {
                    continue;
                }
                if let Some(obj) = v.as_object() {
                    for (k, x) in obj {
                        if let (false, Some(x)) = (k == "step", x.as_f64()) {
                            history.entry(k.clone()).or_default().push((step as f64, x));
                        }
                    }
                }
                kept.push_str(line);
                kept.push('\n');
            }
        }
        std::fs::write(&path, kept)
            .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))?;
        Ok(Self { path, history })
    }

    /// Appends one line `{"step": step, name: value, ...}`.
    pub fn write(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in values {
            obj.insert(k.clone(), serde_json::Value::from(*v));
            self.history
                .entry(k.clone())
                .or_default()
                .push((step as f64, *v));
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(|e| Error::Input(format!("cannot open {}: {e}", self.path.display())))?;
        writeln!(file, "{}", serde_json::Value::Object(obj))
            .map_err(|e| Error::Input(format!("cannot write {}: {e}", self.path.display())))
    }

    /// The recorded `(step, value)` series of a metric.
    pub fn series(&self, name: &str) -> &[(f64, f64)] {
        self.history.get(name).map_or(&[], Vec::as_slice)
    }

    /// Writes `loss.png`, `lr.png` and, when evaluated, `zeroshot.png` / `retrieval.png`.
    pub fn plot(&self, output: &Path) -> Result<()> {
        line_plot(
            &output.join("loss.png"),
            "training loss",
            "step",
            &[("loss", self.series("loss").to_vec())],
        )?;
        line_plot(
            &output.join("lr.png"),
            "learning rate",
            "step",
            &[("lr", self.series("lr").to_vec())],
        )?;
        let zs: Vec<(&str, Vec<(f64, f64)>)> = ["zeroshot_top1", "zeroshot_top5"]
            .iter()
            .filter(|k| self.history.contains_key(**k))
            .map(|k| (*k, self.series(k).to_vec()))
            .collect();
        if !zs.is_empty() {
            line_plot(
                &output.join("zeroshot.png"),
                "zero-shot accuracy",
                "step",
                &zs,
            )?;
        }
        let rs: Vec<(&str, Vec<(f64, f64)>)> = ["image_to_text_R@1", "text_to_image_R@1"]
            .iter()
            .filter(|k| self.history.contains_key(**k))
            .map(|k| (*k, self.series(k).to_vec()))
            .collect();
        if !rs.is_empty() {
            line_plot(
                &output.join("retrieval.png"),
                "retrieval recall@1",
                "step",
                &rs,
            )?;
        }
        Ok(())
    }
}
