//! Medusa-1 training (`zoo train medusa`): the backbone is frozen and only the heads learn.
//! Head `k` (1-based) reads the backbone's last hidden state at position `t` and is scored
//! against token `t + k + 1` with cross-entropy weighted `λ_k = 0.8^k` (Cai et al. 2024, §2.2).
//! As FasterDecoding initialises them, each ResBlock starts as the identity (zero weight and
//! bias) and each head's vocabulary projection as a copy of the backbone's `lm_head`, so every
//! head starts out predicting the next token. Heads are saved in FasterDecoding's layout
//! (`medusa_lm_head.safetensors`, `config.json`), which `zoo generate --medusa` loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde_json::json;
use zoo_models::hub::ModelRepo;
use zoo_models::llm::medusa::MedusaConfig;
use zoo_models::llm::{KvCache, LlamaForCausalLM, MedusaHeads};

use crate::checkpoint;
use crate::data::DataPosition;
use crate::error::{Error, Result};
use crate::lm::{Corpus, PackedSequences};
use crate::loss::cross_entropy;
use crate::optim::AdamWConfig;
use crate::train::{initial_state, run_task, Task, TrainConfig, TrainState};

/// Medusa's per-head loss decay: head `k` weighs `0.8^k`.
pub const HEAD_DECAY: f64 = 0.8;

/// Trainable Medusa heads over a frozen backbone.
pub struct TrainableMedusa {
    pub heads: MedusaHeads,
    pub config: MedusaConfig,
    pub varmap: VarMap,
    /// Where the backbone came from, written as `base_model_name_or_path`.
    pub base_model: String,
}

impl TrainableMedusa {
    /// `config.medusa_num_heads` new heads for `backbone`: identity ResBlocks and the backbone's
    /// `lm_head` as each head's projection.
    pub fn new(
        config: MedusaConfig,
        backbone: &LlamaForCausalLM,
        base_model: &str,
    ) -> Result<Self> {
        let (d, v) = (backbone.config.hidden_size, backbone.config.vocab_size);
        let device = backbone.model.embeddings().device().clone();
        let lm_head = backbone.lm_head().weight().to_dtype(DType::F32)?;
        let varmap = VarMap::new();
        {
            let mut data = lock(&varmap)?;
            for i in 0..config.medusa_num_heads {
                for j in 0..config.medusa_num_layers {
                    data.insert(
                        format!("{i}.{j}.linear.weight"),
                        Var::zeros((d, d), DType::F32, &device)?,
                    );
                    data.insert(
                        format!("{i}.{j}.linear.bias"),
                        Var::zeros(d, DType::F32, &device)?,
                    );
                }
                let out = Var::from_tensor(&lm_head.copy()?)?;
                if out.dims() != [v, d] {
                    return Err(Error::Input(format!(
                        "the backbone's lm_head is {:?}, expected [{v}, {d}]",
                        out.dims()
                    )));
                }
                data.insert(format!("{i}.{}.weight", config.medusa_num_layers), out);
            }
        }
        Self::assemble(config, varmap, backbone, base_model)
    }

    /// Heads saved by [`Self::save`] (or any FasterDecoding folder), as variables.
    pub fn load(dir: &Path, backbone: &LlamaForCausalLM, base_model: &str) -> Result<Self> {
        let config: MedusaConfig =
            zoo_models::hub::read_json(&dir.join("config.json"), "Medusa config")?;
        let device = backbone.model.embeddings().device().clone();
        let path = dir.join("medusa_lm_head.safetensors");
        let tensors = candle_core::safetensors::load(&path, &device)
            .map_err(|e| Error::Input(format!("cannot read {}: {e}", path.display())))?;
        let varmap = VarMap::new();
        {
            let mut data = lock(&varmap)?;
            for (name, t) in tensors {
                data.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
            }
        }
        Self::assemble(config, varmap, backbone, base_model)
    }

    fn assemble(
        config: MedusaConfig,
        varmap: VarMap,
        backbone: &LlamaForCausalLM,
        base_model: &str,
    ) -> Result<Self> {
        let device = backbone.model.embeddings().device().clone();
        let heads = MedusaHeads::new(
            &config,
            backbone.config.hidden_size,
            backbone.config.vocab_size,
            VarBuilder::from_varmap(&varmap, DType::F32, &device),
        )?;
        Ok(Self {
            heads,
            config,
            varmap,
            base_model: base_model.to_string(),
        })
    }

    /// Every variable, sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Each head's mean cross-entropy on `ids` `[B, L]`: head `k` at position `t` against token
    /// `t + k + 1`, from the frozen backbone's `hidden` `[B, L, D]`.
    pub fn head_losses(
        &self,
        backbone: &LlamaForCausalLM,
        hidden: &Tensor,
        ids: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let l = ids.dim(1)?;
        let mut losses = Vec::new();
        for (i, head) in self.heads.heads.iter().enumerate() {
            let k = i + 1;
            if l <= k + 1 {
                return Err(Error::Input(format!(
                    "sequences of {l} tokens are too short for Medusa head {k}"
                )));
            }
            let n = l - k - 1;
            let h = hidden.narrow(1, 0, n)?;
            let logits = head.forward(&h, backbone.lm_head())?;
            let (b, _, v) = logits.dims3()?;
            let targets = ids
                .narrow(1, k + 1, n)?
                .flatten_all()?
                .to_dtype(DType::U32)?;
            losses.push(cross_entropy(
                &logits.reshape((b * n, v))?.to_dtype(DType::F32)?,
                &targets,
            )?);
        }
        Ok(losses)
    }

    /// Writes `medusa_lm_head.safetensors` and `config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Input(format!("cannot create {}: {e}", dir.display())))?;
        let tensors = crate::model::varmap_tensors(&self.varmap)?;
        zoo_models::weights::save_safetensors_atomic(
            &tensors,
            &dir.join("medusa_lm_head.safetensors"),
        )?;
        let config = json!({
            "medusa_num_heads": self.config.medusa_num_heads,
            "medusa_num_layers": self.config.medusa_num_layers,
            "base_model_name_or_path": self.base_model,
        });
        let path = dir.join("config.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&config).unwrap_or_default(),
        )
        .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))
    }
}

fn lock(varmap: &VarMap) -> Result<std::sync::MutexGuard<'_, HashMap<String, Var>>> {
    varmap
        .data()
        .lock()
        .map_err(|_| Error::Input("poisoned varmap".into()))
}

/// Medusa-1 on packed sequences.
pub struct MedusaTask {
    pub backbone: LlamaForCausalLM,
    pub heads: TrainableMedusa,
    data: PackedSequences,
    position: DataPosition,
    batch_size: usize,
    device: Device,
    /// Per-head losses summed over the current step's micro-batches, and their count.
    sums: (Vec<f64>, usize),
    last: Vec<(String, f64)>,
}

impl Task for MedusaTask {
    type Batch = Tensor;

    fn next_batch(&mut self) -> Result<Tensor> {
        let (ids, pos) = self
            .data
            .batch(self.position, self.batch_size, &self.device)?;
        self.position = pos;
        Ok(ids)
    }

    fn data_position(&self) -> DataPosition {
        self.position
    }

    fn batch_size(&self, batch: &Tensor) -> usize {
        batch.dim(0).unwrap_or(0)
    }

    fn loss(&mut self, batch: &Tensor) -> Result<Tensor> {
        let hidden = self
            .backbone
            .forward(batch, &mut KvCache::new())?
            .hidden
            .detach();
        let losses = self.heads.head_losses(&self.backbone, &hidden, batch)?;
        self.sums.0.resize(losses.len(), 0.0);
        let mut total: Option<Tensor> = None;
        for (i, loss) in losses.iter().enumerate() {
            self.sums.0[i] += f64::from(loss.to_scalar::<f32>()?);
            let weighted = (loss * HEAD_DECAY.powi(i as i32 + 1))?;
            total = Some(match total {
                Some(t) => (t + weighted)?,
                None => weighted,
            });
        }
        self.sums.1 += 1;
        total.ok_or_else(|| Error::Input("no Medusa heads to train".into()))
    }

    fn after_step(&mut self) -> Result<()> {
        let n = self.sums.1.max(1) as f64;
        self.last = self
            .sums
            .0
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("medusa{}_loss", i + 1), s / n))
            .collect();
        self.sums = (Vec::new(), 0);
        Ok(())
    }

    fn step_metrics(&self) -> Result<Vec<(String, f64)>> {
        Ok(self.last.clone())
    }

    fn evaluate(&mut self, _output: &Path, _step: u64) -> Result<Vec<(String, f64)>> {
        Ok(Vec::new())
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.heads.save(dir)
    }
}

/// Everything a Medusa-1 run needs.
pub struct RunConfig {
    /// The backbone: an HF `LlamaForCausalLM` folder or hub id (with its tokenizer).
    pub model: String,
    pub num_heads: usize,
    pub num_layers: usize,
    pub seq_len: usize,
    pub train: TrainConfig,
    pub batch_size: usize,
    pub optimizer: AdamWConfig,
    pub resume: Option<PathBuf>,
    pub device: Device,
}

pub struct RunSummary {
    pub state: TrainState,
    pub task: MedusaTask,
    pub final_dir: PathBuf,
}

/// Loads the frozen backbone, packs the corpus with its tokenizer, and trains the heads with
/// the shared loop.
pub fn run(config: RunConfig, train_files: &[PathBuf]) -> Result<RunSummary> {
    let repo = ModelRepo::open(&config.model)?;
    let backbone = LlamaForCausalLM::load(&repo, Some(DType::F32), &config.device)?;
    let tokenizer = zoo_datasets::tokenize::TextTokenizer::from_files(
        &repo.get("tokenizer.json")?,
        repo.get_optional("tokenizer_config.json")?.as_deref(),
    )?;
    let eos = backbone
        .config
        .eos_token_ids()
        .first()
        .copied()
        .ok_or_else(|| Error::Input("the backbone config has no eos_token_id".into()))?;
    let corpus = Corpus::read(train_files)?;
    let data = PackedSequences::new(
        &corpus.tokens(&tokenizer, eos)?,
        config.seq_len,
        config.train.seed,
    )?;
    let resume_dir = config
        .resume
        .as_deref()
        .map(checkpoint::resolve)
        .transpose()?;
    let heads = match &resume_dir {
        Some(dir) => TrainableMedusa::load(dir, &backbone, &config.model)?,
        None => TrainableMedusa::new(
            MedusaConfig {
                medusa_num_heads: config.num_heads,
                medusa_num_layers: config.num_layers,
            },
            &backbone,
            &config.model,
        )?,
    };
    let state = initial_state(resume_dir.as_deref(), config.train.seed)?;
    let vars = heads.trainable_vars();
    let mut task = MedusaTask {
        backbone,
        heads,
        data,
        position: state.data,
        batch_size: config.batch_size,
        device: config.device.clone(),
        sums: (Vec::new(), 0),
        last: Vec::new(),
    };
    let state = run_task(
        &mut task,
        &vars,
        config.optimizer,
        &config.train,
        resume_dir.as_deref(),
        state,
        &config.device,
    )?;
    Ok(RunSummary {
        state,
        task,
        final_dir: config.train.output.join("final"),
    })
}
