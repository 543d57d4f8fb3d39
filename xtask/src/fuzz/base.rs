//! What every case starts from: two small real checkpoints (a dense decoder LM and an MoE one,
//! each saved with a trainer state after one training step), a fixed token batch, and the use a
//! case makes of whatever loads (a loss, a training step, parameters checked for finiteness).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_core::{Error, Result};
use torchscale_models::build::BuildOptions;
use torchscale_models::config::DecoderConfig;
use torchscale_models::data::BYTE_VOCAB;
use torchscale_models::lm::{LanguageModel, LossConfig, TrainerFile, CONFIG_FILE};
use torchscale_models::lm::{MODEL_FILE, TRAINER_FILE};
use torchscale_models::train::{AdamW, AdamWConfig, ClipMode, Schedule, Trainer, TrainerConfig};
use torchscale_models::LayerTechnique;

/// The memory budget of every build and load (`BuildOptions::memory_budget`): a config whose
/// model needs more is refused with `Error::MemoryBudget` before anything is allocated, so that
/// cases stay small and fast whatever sizes they ask for.
pub const MEMORY_BUDGET: u64 = 16 << 20;

/// How a case builds or loads a model.
pub fn build_options() -> BuildOptions {
    BuildOptions {
        memory_budget: Some(MEMORY_BUDGET),
        ..Default::default()
    }
}

/// A file of a checkpoint folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CkptFile {
    /// `model.safetensors`.
    Model,
    /// `trainer.safetensors`.
    Trainer,
    /// `config.json`.
    Config,
    /// `optimizer.safetensors`: an `AdamW::save` file (not part of a checkpoint folder; the file
    /// cases load it with `AdamW::load`, candle's reader, where the others go through the
    /// checkpoint's).
    Optimizer,
}

/// The file name of [`CkptFile::Optimizer`].
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

impl CkptFile {
    /// Its name in the folder.
    pub fn name(self) -> &'static str {
        match self {
            CkptFile::Model => MODEL_FILE,
            CkptFile::Trainer => TRAINER_FILE,
            CkptFile::Config => CONFIG_FILE,
            CkptFile::Optimizer => OPTIMIZER_FILE,
        }
    }
}

/// One saved checkpoint, as bytes.
#[derive(Debug, Clone)]
pub struct BaseCheckpoint {
    /// What it is (for the case descriptions).
    pub name: &'static str,
    /// `model.safetensors`.
    pub model: Vec<u8>,
    /// `trainer.safetensors`.
    pub trainer: Vec<u8>,
    /// `config.json`.
    pub config: String,
    /// `optimizer.safetensors` (written next to the others by [`BaseCheckpoint::write`]).
    pub optimizer: Vec<u8>,
}

impl BaseCheckpoint {
    /// The bytes of `file`.
    pub fn bytes(&self, file: CkptFile) -> &[u8] {
        match file {
            CkptFile::Model => &self.model,
            CkptFile::Trainer => &self.trainer,
            CkptFile::Config => self.config.as_bytes(),
            CkptFile::Optimizer => &self.optimizer,
        }
    }

    /// Writes the checkpoint's three files into `dir` (created), `replace` swapping one file's
    /// bytes; a replaced [`CkptFile::Optimizer`] is written too.
    pub fn write(&self, dir: &Path, replace: Option<(CkptFile, &[u8])>) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut files = vec![CkptFile::Model, CkptFile::Trainer, CkptFile::Config];
        if matches!(replace, Some((CkptFile::Optimizer, _))) {
            files.push(CkptFile::Optimizer);
        }
        for f in files {
            let bytes = match replace {
                Some((r, b)) if r == f => b,
                _ => self.bytes(f),
            };
            std::fs::write(dir.join(f.name()), bytes)?;
        }
        Ok(())
    }
}

/// Shared by every case of a run.
pub struct Env {
    /// The dense and the MoE checkpoint.
    pub bases: Vec<BaseCheckpoint>,
    /// A model that saves cleanly (folder cases save it onto what they made).
    pub saver: LanguageModel,
    /// Cases write under this folder (one sub-folder per case, removed after it).
    pub scratch: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The dense base config: a byte-level decoder LM, 2 layers of width 16.
pub fn dense_config() -> DecoderConfig {
    DecoderConfig::default()
        .with_vocab_size(BYTE_VOCAB as i64)
        .with_embed_dim(16)
        .with_heads(2)
        .with_ffn_dim(32)
        .with_layers(2)
        .with_max_positions(16)
}

/// The MoE base config: the second layer is a 2-expert MoE layer, the first one Post-LN.
pub fn moe_config() -> DecoderConfig {
    dense_config()
        .with_moe(2, 2)
        .with_layer_techniques(vec![LayerTechnique::new(
            0..1,
            torchscale_models::Technique::PostLn,
        )])
}

/// `[2, 6]` inputs and targets inside every vocabulary of at least 8 ids (the bases have 260).
pub fn batch() -> Result<(Tensor, Tensor)> {
    let ids: Vec<u32> = (0..12).map(|i| 2 + (i * 5 % 6) as u32).collect();
    let input = Tensor::from_vec(ids.clone(), (2, 6), &Device::Cpu)?;
    let target = Tensor::from_vec(
        ids.iter().map(|i| (i + 1) % 8).collect::<Vec<_>>(),
        (2, 6),
        &Device::Cpu,
    )?;
    Ok((input, target))
}

/// A trainer over `lm` (AdamW, clipping at 1, constant rate).
pub fn trainer(lm: &LanguageModel) -> Result<Trainer> {
    Trainer::new(
        &lm.store,
        &lm.model.expert_parameters(),
        TrainerConfig {
            seed: 5,
            clip: ClipMode::GlobalNorm(1.0),
            max_consecutive_skips: 1000,
        },
        AdamWConfig::default(),
        Schedule::Constant(1e-3),
    )
}

/// One training step of `lm` on [`batch`].
pub fn train_step(lm: &LanguageModel, t: &mut Trainer) -> Result<()> {
    let (input, target) = batch()?;
    t.step(1, |ctx| {
        lm.micro_batch(&input, &target, true, &LossConfig::default(), ctx.seed)
    })?;
    Ok(())
}

fn save_base(name: &'static str, cfg: DecoderConfig, dir: &Path) -> Result<BaseCheckpoint> {
    let lm = LanguageModel::new(cfg, 3)?;
    let mut t = trainer(&lm)?;
    train_step(&lm, &mut t)?;
    let tf = TrainerFile {
        tensors: t.state()?,
        metadata: HashMap::from([("fuzz".to_string(), name.to_string())]),
    };
    let path = dir.join(name);
    lm.save(&path, Some(&tf))?;
    // The same moments as an optimizer file.
    let mut opt = AdamW::new(lm.store.named_vars(), AdamWConfig::default())?;
    let mut moments = tf.tensors.clone();
    moments.remove("trainer.step");
    opt.load_state(&moments)?;
    opt.save(path.join(OPTIMIZER_FILE))?;
    let read = |f: CkptFile| {
        let p = path.join(f.name());
        std::fs::read(&p).map_err(|e| Error::file_op("read", &p, e))
    };
    Ok(BaseCheckpoint {
        name,
        model: read(CkptFile::Model)?,
        trainer: read(CkptFile::Trainer)?,
        config: String::from_utf8_lossy(&read(CkptFile::Config)?).into_owned(),
        optimizer: read(CkptFile::Optimizer)?,
    })
}

impl Env {
    /// Trains and saves the base checkpoints into a temporary folder.
    pub fn new() -> Result<Self> {
        // In memory where the system has a tmpfs: the cases save thousands of checkpoints, and
        // every save fsyncs its files and folders, which a disk makes the slowest part of a run.
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let tmp = tempfile::Builder::new()
            .prefix("torchscale-fuzz-")
            .tempdir_in(&parent)
            .or_else(|_| {
                tempfile::Builder::new()
                    .prefix("torchscale-fuzz-")
                    .tempdir()
            })
            .map_err(|e| Error::file_op("create a temporary folder in", &parent, e))?;
        let bases = vec![
            save_base("dense", dense_config(), tmp.path())?,
            save_base("moe", moe_config(), tmp.path())?,
        ];
        let scratch = tmp.path().join("cases");
        std::fs::create_dir_all(&scratch)
            .map_err(|e| Error::file_op("create the folder", &scratch, e))?;
        Ok(Self {
            bases,
            saver: LanguageModel::new(dense_config(), 9)?,
            scratch,
            _tmp: tmp,
        })
    }

    /// A fresh, empty folder for case `index` (whatever an earlier case left there removed).
    pub fn case_dir(&self, index: u64) -> Result<PathBuf> {
        let d = self.scratch.join(format!("case-{index}"));
        clear(&d)?;
        std::fs::create_dir_all(&d).map_err(|e| Error::file_op("create the folder", &d, e))?;
        Ok(d)
    }
}

/// Removes `path` whatever it is (folder, file, link); absent is fine.
pub fn clear(path: &Path) -> Result<()> {
    let r = match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    r.map_err(|e| Error::file_op("remove", path, e))
}

/// Whether every parameter of `store` is finite.
pub fn all_finite(store: &ParamStore) -> Result<bool> {
    for (_, v) in store.named_vars() {
        let t = v.as_tensor().to_dtype(DType::F32)?;
        // (x - x) is 0 for a finite x and NaN otherwise.
        let s = t.sub(&t)?.sum_all()?.to_scalar::<f32>()?;
        if s != 0.0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A case's verdict when it neither panicked nor broke a promise: the input was used (built or
/// loaded, and run), or refused with a typed error.
pub type Verdict = std::result::Result<(), Error>;

/// A broken promise found by a case (not an error of the input): the run fails on it.
#[derive(Debug)]
pub struct Violation(pub String);

/// Loads a checkpoint folder and uses it: the loss on [`batch`] and, when it has a trainer
/// state, one training step from it. A step from a finite model that leaves a non-finite
/// parameter is a [`Violation`] (AdamW's steps are all or nothing).
pub fn load_and_use(dir: &Path) -> std::result::Result<Verdict, Violation> {
    let (lm, tf) = match LanguageModel::load_with(dir, &build_options()) {
        Ok(x) => x,
        Err(e) => return Ok(Err(e)),
    };
    match use_model(&lm, tf.as_ref()) {
        Ok(Ok(())) => Ok(Ok(())),
        Ok(Err(v)) => Err(v),
        Err(e) => Ok(Err(e)),
    }
}

/// Loads the (intact) checkpoint at `dir`, then its `optimizer.safetensors` with `AdamW::load`,
/// and takes a step; a step from a finite model that leaves a non-finite parameter is a
/// [`Violation`].
pub fn load_optimizer(dir: &Path) -> std::result::Result<Verdict, Violation> {
    let run = || -> Result<std::result::Result<(), Violation>> {
        let (lm, _) = LanguageModel::load_with(dir, &build_options())?;
        let mut opt = AdamW::new(lm.store.named_vars(), AdamWConfig::default())?;
        opt.load(dir.join(OPTIMIZER_FILE))?;
        let (input, target) = batch()?;
        let mb = lm.micro_batch(&input, &target, true, &LossConfig::default(), 1)?;
        let grads = mb.loss_sum.backward()?;
        let finite_before = all_finite(&lm.store)?;
        opt.step(&grads)?;
        if finite_before && !all_finite(&lm.store)? {
            return Ok(Err(Violation(
                "an AdamW step from the loaded optimizer file left a non-finite parameter".into(),
            )));
        }
        Ok(Ok(()))
    };
    match run() {
        Ok(Ok(())) => Ok(Ok(())),
        Ok(Err(v)) => Err(v),
        Err(e) => Ok(Err(e)),
    }
}

fn use_model(
    lm: &LanguageModel,
    tf: Option<&TrainerFile>,
) -> Result<std::result::Result<(), Violation>> {
    let (input, target) = batch()?;
    lm.micro_batch(&input, &target, false, &LossConfig::default(), 0)?;
    let Some(tf) = tf else { return Ok(Ok(())) };
    let mut t = trainer(lm)?;
    t.load_state(&tf.tensors)?;
    let finite_before = all_finite(&lm.store)?;
    train_step(lm, &mut t)?;
    if finite_before && !all_finite(&lm.store)? {
        return Ok(Err(Violation(
            "a training step from the loaded state left a non-finite parameter".into(),
        )));
    }
    Ok(Ok(()))
}
