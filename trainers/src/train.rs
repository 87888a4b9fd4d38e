//! The training loop, one function for every objective: get batch, forward, backward, clip,
//! step, log, evaluate, checkpoint. Objectives plug in through [`Task`]; the loop does not know
//! which model it trains.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::data::DataPosition;
use crate::error::{Error, Result};
use crate::metrics::MetricsLog;
use crate::optim::{accumulate, clip_grad_norm, cosine_lr, global_norm, named_grads, AdamW};
use crate::precision::{GradScaler, Precision};

/// What a training objective provides to the loop.
pub trait Task {
    type Batch;
    /// The next (micro-)batch.
    fn next_batch(&mut self) -> Result<Self::Batch>;
    /// Where the data stands after the last batch taken, for checkpoints.
    fn data_position(&self) -> DataPosition;
    /// How many samples a batch holds, for throughput.
    fn batch_size(&self, batch: &Self::Batch) -> usize;
    /// The scalar loss of one batch, with its graph.
    fn loss(&mut self, batch: &Self::Batch) -> Result<Tensor>;
    /// Called after each optimizer step (e.g. to clamp the temperature).
    fn after_step(&mut self) -> Result<()> {
        Ok(())
    }
    /// Extra per-step metrics (e.g. the logit scale).
    fn step_metrics(&self) -> Result<Vec<(String, f64)>> {
        Ok(Vec::new())
    }
    /// Evaluation metrics, run every `eval_every` steps and at the end.
    fn evaluate(&mut self, output: &Path, step: u64) -> Result<Vec<(String, f64)>>;
    /// Writes the model in HF layout into `dir`.
    fn save_model(&self, dir: &Path) -> Result<()>;
    /// What the learning rate of parameter `name` is multiplied by (a parameter group).
    fn lr_scale(&self, _name: &str) -> f64 {
        1.0
    }
    /// Whether [`Self::loss`] honours [`TrainConfig::precision`] other than fp32.
    fn mixed_precision(&self) -> bool {
        false
    }
}

/// Loop settings, named after open_clip's flags.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    pub accum_freq: usize,
    pub grad_clip_norm: Option<f64>,
    pub save_every: Option<u64>,
    pub eval_every: Option<u64>,
    pub output: PathBuf,
    pub seed: u64,
    /// Show the progress bar (on stderr).
    pub progress: bool,
    /// `--precision`: the compute dtype of the forward and backward (see [`crate::precision`]).
    #[serde(default)]
    pub precision: Precision,
}

impl TrainConfig {
    /// The same run lasting `epochs` passes over `samples` samples, `batch_size` per
    /// micro-batch: `ceil(epochs · samples / (batch_size · accum_freq))` steps, the warmup no
    /// longer than the run.
    pub fn for_epochs(&self, epochs: u64, samples: u64, batch_size: usize) -> Self {
        let steps = steps_for_epochs(epochs, samples, batch_size * self.accum_freq.max(1));
        Self {
            steps,
            warmup: self.warmup.min(steps),
            ..self.clone()
        }
    }
}

/// Optimizer steps that visit `samples` samples `epochs` times, `per_step` samples a step (at
/// least one step).
pub fn steps_for_epochs(epochs: u64, samples: u64, per_step: usize) -> u64 {
    (epochs * samples).div_ceil(per_step.max(1) as u64).max(1)
}

/// Everything besides weights and optimizer moments that a resumed run needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub step: u64,
    pub data: DataPosition,
    pub seed: u64,
    /// The loss of each step taken so far.
    pub losses: Vec<f64>,
    /// The loss scaler of an f16 run.
    #[serde(default)]
    pub scaler: Option<GradScaler>,
}

/// Trains `task` until `config.steps`, from `state` (a fresh or resumed run).
pub fn train<T: Task>(
    task: &mut T,
    vars: &[(String, Var)],
    optimizer: &mut AdamW,
    config: &TrainConfig,
    mut state: TrainState,
    log: &mut MetricsLog,
) -> Result<TrainState> {
    if config.precision != Precision::Fp32 && !task.mixed_precision() {
        return Err(Error::Input(format!(
            "--precision {} is not implemented for this objective (it is for `zoo train clip`, \
             `siglip`, `blip --objective caption` and `lm` without MTP); use --precision fp32",
            config.precision
        )));
    }
    let bar = progress_bar(config, state.step);
    let accum = config.accum_freq.max(1);
    let mut scaler = config
        .precision
        .scales_loss()
        .then(|| state.scaler.clone().unwrap_or_default());
    let mut window = (Instant::now(), 0usize);
    while state.step < config.steps {
        let lr = cosine_lr(state.step, config.lr, config.warmup, config.steps);
        let mut grads = HashMap::new();
        let mut loss_sum = 0.0;
        let mut samples = 0;
        for _ in 0..accum {
            let batch = task.next_batch()?;
            let loss = task.loss(&batch)?;
            let value = f64::from(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
            if !value.is_finite() {
                return Err(Error::Input(format!(
                    "the loss became {value} at step {}; stopping (the last checkpoint is intact)",
                    state.step + 1
                )));
            }
            loss_sum += value;
            samples += task.batch_size(&batch);
            let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
            let micro = (loss.to_dtype(candle_core::DType::F32)? * (loss_scale / accum as f64))?;
            accumulate(&mut grads, named_grads(vars, &micro.backward()?))?;
        }
        // With loss scaling, an overflow in the backward skips the step and lowers the scale.
        let finite = match &scaler {
            Some(s) => s.unscale(&mut grads)?,
            None => true,
        };
        let grad_norm = if finite {
            match config.grad_clip_norm {
                Some(max) => clip_grad_norm(&mut grads, max)?,
                None => global_norm(&grads)?,
            }
        } else {
            f64::INFINITY
        };
        if finite && !grad_norm.is_finite() {
            return Err(Error::Input(format!(
                "the gradient norm became {grad_norm} at step {}; stopping (the last checkpoint is intact)",
                state.step + 1
            )));
        }
        if let Some(s) = &mut scaler {
            s.update(finite);
        }
        if finite {
            optimizer.step(&grads, lr)?;
            task.after_step()?;
        }
        state.scaler = scaler.clone();
        state.step += 1;
        state.data = task.data_position();
        let loss = loss_sum / accum as f64;
        state.losses.push(loss);

        window.1 += samples;
        let rate = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
        let mut metrics = vec![
            ("loss".to_string(), loss),
            ("lr".into(), lr),
            ("grad_norm".into(), grad_norm),
            ("samples_per_s".into(), rate),
        ];
        if let Some(s) = &scaler {
            metrics.push(("loss_scale".into(), s.scale));
            metrics.push(("skipped_steps".into(), s.skipped as f64));
        }
        metrics.extend(task.step_metrics()?);
        log.write(state.step, &metrics)?;
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {rate:.1} samples/s"));
        bar.inc(1);

        let last = state.step == config.steps;
        if config
            .eval_every
            .is_some_and(|n| state.step.is_multiple_of(n))
            || last
        {
            let eval = task.evaluate(&config.output, state.step)?;
            if !eval.is_empty() {
                log.write(state.step, &eval)?;
                bar.println(format_metrics(state.step, &eval));
            }
        }
        if config
            .save_every
            .is_some_and(|n| state.step.is_multiple_of(n))
            && !last
        {
            let dir = config.output.join(format!("checkpoint-{}", state.step));
            checkpoint::save(&dir, task, optimizer, &state, config)?;
            log.plot(&config.output)?;
        }
    }
    bar.finish_and_clear();
    checkpoint::save(
        &config.output.join("final"),
        task,
        optimizer,
        &state,
        config,
    )?;
    log.plot(&config.output)?;
    Ok(state)
}

fn progress_bar(config: &TrainConfig, start: u64) -> ProgressBar {
    let bar = if config.progress {
        ProgressBar::new(config.steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("train [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(start);
    bar
}

/// `step 100: zeroshot_top1 0.8500, ...`
pub fn format_metrics(step: u64, metrics: &[(String, f64)]) -> String {
    let parts: Vec<String> = metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
    format!("step {step}: {}", parts.join(", "))
}

/// Where a run starts: the trainer state of the checkpoint it resumes, or step 0 with `seed`.
pub fn initial_state(resume: Option<&Path>, seed: u64) -> Result<TrainState> {
    match resume {
        Some(dir) => checkpoint::load_state(dir),
        None => Ok(TrainState {
            seed,
            ..TrainState::default()
        }),
    }
}

/// The start of every run after its task is built: AdamW over `vars` (its moments restored
/// when resuming), the metrics log (cut back to the resumed step), then [`train`].
pub fn run_task<T: Task>(
    task: &mut T,
    vars: &[(String, Var)],
    optimizer: crate::optim::AdamWConfig,
    config: &TrainConfig,
    resume: Option<&Path>,
    state: TrainState,
    device: &candle_core::Device,
) -> Result<TrainState> {
    config.precision.check_device(device)?;
    for stale in checkpoint::remove_stale_temporaries(&config.output)? {
        eprintln!(
            "removed {}, left by a run that ended while saving",
            stale.display()
        );
    }
    let mut optimizer = AdamW::new(vars.to_vec(), optimizer)?;
    optimizer.scale_lr(|name| task.lr_scale(name));
    if let Some(dir) = resume {
        checkpoint::load_optimizer(dir, &mut optimizer, device)?;
    }
    let mut log = MetricsLog::open(&config.output, resume.map(|_| state.step))?;
    train(task, vars, &mut optimizer, config, state, &mut log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_count_steps_of_whole_accumulated_batches_and_cap_the_warmup() {
        let cfg = TrainConfig {
            precision: Default::default(),
            steps: u64::MAX,
            lr: 1e-3,
            warmup: 100,
            accum_freq: 2,
            grad_clip_norm: None,
            save_every: None,
            eval_every: None,
            output: PathBuf::from("out"),
            seed: 0,
            progress: false,
        };
        let run = cfg.for_epochs(3, 10, 4);
        assert_eq!((run.steps, run.warmup), (4, 4)); // ceil(30 / 8)
        assert_eq!(steps_for_epochs(1, 0, 8), 1);
    }
}
