//! Catalogue: bad checkpoints. Each row damages a real checkpoint folder (a small decoder LM
//! saved with its trainer state) or what stands around it — `config.json`, `model.safetensors`,
//! `trainer.safetensors`, the folder itself, `<dir>.old`, `<dir>.tmp-<pid>` — and names the typed
//! error loading or saving must give (the variant and the key, field or path it names), or the
//! success it must still have. What the library must leave untouched is checked inside the rows.

mod catalogue;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use catalogue::{accepted, check, check_isolated, refused, Case};
use torchscale_core::Result;
use torchscale_models::checkpoint::{read_safetensors, serialize};
use torchscale_models::config::DecoderConfig;
use torchscale_models::data::BYTE_VOCAB;
use torchscale_models::lm::{LanguageModel, LossConfig, TrainerFile};
use torchscale_models::lm::{CONFIG_FILE, MODEL_FILE, TRAINER_FILE};
use torchscale_models::train::{AdamWConfig, ClipMode, Schedule, Trainer, TrainerConfig};

fn tiny() -> DecoderConfig {
    DecoderConfig::default()
        .with_vocab_size(BYTE_VOCAB as i64)
        .with_embed_dim(16)
        .with_heads(2)
        .with_ffn_dim(32)
        .with_layers(1)
        .with_max_positions(32)
}

fn trainer(lm: &LanguageModel) -> Result<Trainer> {
    Trainer::new(
        &lm.store,
        &lm.model.expert_parameters(),
        TrainerConfig {
            clip: ClipMode::GlobalNorm(1.0),
            ..TrainerConfig::default()
        },
        AdamWConfig::default(),
        Schedule::Constant(1e-3),
    )
}

fn step(lm: &LanguageModel, t: &mut Trainer) -> Result<()> {
    let ids: Vec<u32> = (0..12).map(|i| 3 + i % 7).collect();
    let input = Tensor::from_vec(ids.clone(), (2, 6), &Device::Cpu)?;
    let target = Tensor::from_vec(ids.iter().map(|i| i + 1).collect(), (2, 6), &Device::Cpu)?;
    t.step(1, |ctx| {
        lm.micro_batch(&input, &target, true, &LossConfig::default(), ctx.seed)
    })?;
    Ok(())
}

/// A temporary folder holding `ckpt/`: the tiny model after one training step, with its
/// trainer state.
struct Saved {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Saved {
    fn new() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("ckpt");
        let lm = LanguageModel::new(tiny(), 1)?;
        let mut t = trainer(&lm)?;
        step(&lm, &mut t)?;
        let tf = TrainerFile {
            tensors: t.state()?,
            metadata: HashMap::new(),
        };
        lm.save(&dir, Some(&tf))?;
        Ok(Self { _tmp: tmp, dir })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A sibling of the folder: `ckpt{suffix}`.
    fn sibling(&self, suffix: &str) -> PathBuf {
        self.dir.with_file_name(format!("ckpt{suffix}"))
    }

    /// Rewrites `config.json` with `f` applied to its JSON object.
    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
        let p = self.file(CONFIG_FILE);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(v.as_object_mut().unwrap());
        std::fs::write(&p, v.to_string()).unwrap();
    }

    /// Rewrites a safetensors file with `f` applied to its tensors.
    fn edit_tensors(&self, name: &str, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
        let p = self.file(name);
        let (mut tensors, meta) = read_safetensors(&p).unwrap();
        f(&mut tensors);
        let mut list: Vec<(String, Tensor)> = tensors.into_iter().collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        std::fs::write(&p, serialize(&list, meta).unwrap()).unwrap();
    }

    /// Loads the folder, then the trainer state into a trainer over the loaded model, then
    /// takes a step.
    fn load_and_resume(&self) -> Result<()> {
        load_and_resume(&self.dir)
    }
}

fn load_and_resume(dir: &Path) -> Result<()> {
    let (lm, tf) = LanguageModel::load(dir)?;
    let tf = tf.expect("the checkpoint has a trainer state");
    let mut t = trainer(&lm)?;
    t.load_state(&tf.tensors)?;
    step(&lm, &mut t)
}

/// A row on a fresh saved checkpoint: `damage` it, then `run`.
fn row(
    name: &'static str,
    input: &'static str,
    variant: &'static str,
    words: &'static [&'static str],
    damage: impl FnOnce(&Saved) + 'static,
) -> Case {
    refused(name, input, variant, words, move || {
        let s = Saved::new()?;
        damage(&s);
        s.load_and_resume()
    })
}

#[test]
fn damaged_files_are_refused_naming_the_file_or_key() {
    let cases = vec![
        row(
            "config.json not JSON",
            "config.json = `{\"decoder_layers\": 1,`",
            "File",
            &["config.json"],
            |s| std::fs::write(s.file(CONFIG_FILE), "{\"decoder_layers\": 1,").unwrap(),
        ),
        row(
            "config.json with decoder_layers 0",
            "config.json: decoder_layers = 0",
            "Config",
            &["decoder_layers", "config.json"],
            |s| {
                s.edit_config(|c| {
                    c.insert("decoder_layers".into(), 0.into());
                })
            },
        ),
        row(
            "config.json with a field of the wrong type",
            "config.json: decoder_embed_dim = \"16\"",
            "Config",
            &["decoder_embed_dim", "config.json"],
            |s| {
                s.edit_config(|c| {
                    c.insert("decoder_embed_dim".into(), "16".into());
                })
            },
        ),
        row(
            "config.json missing",
            "config.json removed",
            "File",
            &["config.json"],
            |s| std::fs::remove_file(s.file(CONFIG_FILE)).unwrap(),
        ),
        row(
            "config.json with more layers than the weights",
            "config.json: decoder_layers = 4, the weights have 1",
            "MissingTensor",
            &["layers."],
            |s| {
                s.edit_config(|c| {
                    c.insert("decoder_layers".into(), 4.into());
                })
            },
        ),
        row(
            "config.json wider than the weights",
            "config.json: decoder_embed_dim = 32, the weights have 16",
            "TensorShape",
            &["weight"],
            |s| {
                s.edit_config(|c| {
                    c.insert("decoder_embed_dim".into(), 32.into());
                })
            },
        ),
        row(
            "model.safetensors missing",
            "model.safetensors removed",
            "File",
            &["model.safetensors"],
            |s| std::fs::remove_file(s.file(MODEL_FILE)).unwrap(),
        ),
        row(
            "model.safetensors truncated",
            "model.safetensors cut to half its length",
            "File",
            &["model.safetensors"],
            |s| {
                let b = std::fs::read(s.file(MODEL_FILE)).unwrap();
                std::fs::write(s.file(MODEL_FILE), &b[..b.len() / 2]).unwrap();
            },
        ),
        row(
            "model.safetensors header length u64::MAX",
            "model.safetensors: the first 8 bytes say u64::MAX",
            "File",
            &["model.safetensors"],
            |s| {
                let mut b = std::fs::read(s.file(MODEL_FILE)).unwrap();
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                std::fs::write(s.file(MODEL_FILE), b).unwrap();
            },
        ),
        row(
            "model.safetensors a folder",
            "model.safetensors is an empty folder",
            "File",
            &["model.safetensors"],
            |s| {
                std::fs::remove_file(s.file(MODEL_FILE)).unwrap();
                std::fs::create_dir(s.file(MODEL_FILE)).unwrap();
            },
        ),
        row(
            "a weight of the wrong shape",
            "model.safetensors: layers.0.self_attn.q_proj.weight is [16, 8]",
            "TensorShape",
            &["layers.0.self_attn.q_proj.weight"],
            |s| {
                s.edit_tensors(MODEL_FILE, |t| {
                    t.insert(
                        "layers.0.self_attn.q_proj.weight".into(),
                        Tensor::zeros((16, 8), DType::F32, &Device::Cpu).unwrap(),
                    );
                })
            },
        ),
        row(
            "a weight of an integer dtype",
            "model.safetensors: embed_tokens.weight is i64",
            "DType",
            &["embed_tokens.weight"],
            |s| {
                s.edit_tensors(MODEL_FILE, |t| {
                    let w = t["embed_tokens.weight"].to_dtype(DType::I64).unwrap();
                    t.insert("embed_tokens.weight".into(), w);
                })
            },
        ),
        row(
            "a tensor of a layer the config does not have",
            "model.safetensors: layers.9.fc9.weight added",
            "UnexpectedTensor",
            &["layers.9"],
            |s| {
                s.edit_tensors(MODEL_FILE, |t| {
                    t.insert(
                        "layers.9.fc9.weight".into(),
                        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
                    );
                })
            },
        ),
        row(
            "NaN in a first moment",
            "trainer.safetensors: exp_avg.embed_tokens.weight[0] = NaN",
            "TensorValue",
            &["exp_avg.embed_tokens.weight"],
            |s| {
                s.edit_tensors(TRAINER_FILE, |t| {
                    let k = "exp_avg.embed_tokens.weight";
                    let mut v = t[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v[0] = f32::NAN;
                    let shape = t[k].shape().clone();
                    t.insert(k.into(), Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
                })
            },
        ),
        row(
            "a negative second moment",
            "trainer.safetensors: exp_avg_sq.layer_norm.weight[1] = -1",
            "TensorValue",
            &["exp_avg_sq.layer_norm.weight"],
            |s| {
                s.edit_tensors(TRAINER_FILE, |t| {
                    let k = "exp_avg_sq.layer_norm.weight";
                    let mut v = t[k].to_vec1::<f32>().unwrap();
                    v[1] = -1.0;
                    t.insert(k.into(), Tensor::new(v, &Device::Cpu).unwrap());
                })
            },
        ),
        row(
            "a negative step count",
            "trainer.safetensors: trainer.step = -1",
            "TensorValue",
            &["trainer.step"],
            |s| {
                s.edit_tensors(TRAINER_FILE, |t| {
                    t.insert(
                        "trainer.step".into(),
                        Tensor::new(&[-1i64], &Device::Cpu).unwrap(),
                    );
                })
            },
        ),
        row(
            "a moment missing",
            "trainer.safetensors: exp_avg.layer_norm.bias removed",
            "MissingTensor",
            &["exp_avg.layer_norm.bias"],
            |s| {
                s.edit_tensors(TRAINER_FILE, |t| {
                    t.remove("exp_avg.layer_norm.bias");
                })
            },
        ),
        row(
            "the folder is a regular file",
            "ckpt is a file of 3 bytes",
            "File",
            &["ckpt"],
            |s| {
                std::fs::remove_dir_all(&s.dir).unwrap();
                std::fs::write(&s.dir, b"abc").unwrap();
            },
        ),
        accepted(
            "the folder gone, ckpt.old complete",
            "ckpt moved to ckpt.old (a save interrupted between its renames)",
            || {
                let s = Saved::new()?;
                std::fs::rename(&s.dir, s.sibling(".old")).unwrap();
                s.load_and_resume()
            },
        ),
    ];
    check("bad_checkpoints", cases);
}

/// Saving next to or onto things the library did not make.
#[test]
fn saves_refuse_strangers_and_clean_up_their_own() {
    let cases = vec![
        refused(
            "saving onto a regular file",
            "ckpt is a regular file of 256 bytes",
            "FileOp",
            &["ckpt", "regular file"],
            || {
                let tmp = tempfile::tempdir()?;
                let path = tmp.path().join("ckpt");
                let bytes: Vec<u8> = (0..=255u8).collect();
                std::fs::write(&path, &bytes)?;
                let r = LanguageModel::new(tiny(), 0)?.save(&path, None);
                assert_eq!(std::fs::read(&path)?, bytes, "the file was changed");
                r
            },
        ),
        refused(
            "a regular file at ckpt.old",
            "ckpt.old is a regular file; ckpt is a checkpoint",
            "FileOp",
            &["ckpt.old"],
            || {
                let s = Saved::new()?;
                let old = s.sibling(".old");
                std::fs::write(&old, b"mine")?;
                let r = LanguageModel::new(tiny(), 0)?.save(&s.dir, None);
                assert_eq!(std::fs::read(&old)?, b"mine", "ckpt.old was changed");
                s.load_and_resume()
                    .expect("the previous checkpoint still loads");
                r
            },
        ),
        refused(
            "a symbolic link at ckpt",
            "ckpt is a link to a folder elsewhere",
            "FileOp",
            &["ckpt", "symbolic link"],
            || {
                let s = Saved::new()?;
                let elsewhere = s.sibling("-elsewhere");
                std::fs::rename(&s.dir, &elsewhere)?;
                std::os::unix::fs::symlink(&elsewhere, &s.dir)?;
                let r = LanguageModel::new(tiny(), 0)?.save(&s.dir, None);
                load_and_resume(&elsewhere).expect("the linked checkpoint is untouched");
                r
            },
        ),
        accepted(
            "stale temporary folders",
            "ckpt.tmp-4000000000 (a dead process) and ckpt.tmp-1 (alive) next to ckpt",
            || {
                let s = Saved::new()?;
                let dead = s.sibling(".tmp-4000000000");
                let alive = s.sibling(".tmp-1");
                for d in [&dead, &alive] {
                    std::fs::create_dir(d)?;
                    std::fs::write(d.join(MODEL_FILE), b"half written")?;
                }
                LanguageModel::new(tiny(), 0)?.save(&s.dir, None)?;
                assert!(!dead.exists(), "the dead process's folder is still there");
                assert!(alive.exists(), "the live process's folder was removed");
                LanguageModel::load(&s.dir)?;
                Ok(())
            },
        ),
        accepted(
            "a temporary file of this process's name",
            "ckpt.tmp-<this pid> is a folder left by an earlier failed save",
            || {
                let s = Saved::new()?;
                let mine = s.sibling(&format!(".tmp-{}", std::process::id()));
                std::fs::create_dir(&mine)?;
                std::fs::write(mine.join("junk"), b"x")?;
                LanguageModel::new(tiny(), 0)?.save(&s.dir, None)?;
                assert!(!mine.exists());
                LanguageModel::load(&s.dir)?;
                Ok(())
            },
        ),
    ];
    check("bad_checkpoints (saving)", cases);
}

/// A config.json whose sizes disagree with the weights by far: refused on the shapes before
/// the model it describes is built (each row in its own process under a memory limit).
#[test]
fn configs_claiming_huge_sizes_are_checked_against_the_weights() {
    let cases = vec![
        row(
            "config.json claims 10^12 positions, the weights hold 32",
            "config.json: max_target_positions = 10^12",
            "TensorShape",
            &["embed_positions.weight"],
            |s| {
                s.edit_config(|c| {
                    c.insert("max_target_positions".into(), 1_000_000_000_000u64.into());
                })
            },
        ),
        row(
            "config.json claims 10^9 layers, the weights hold 1",
            "config.json: decoder_layers = 10^9",
            "MissingTensor",
            &["layers.1."],
            |s| {
                s.edit_config(|c| {
                    c.insert("decoder_layers".into(), 1_000_000_000u64.into());
                })
            },
        ),
        row(
            "config.json claims vocab_size 2^40",
            "config.json: vocab_size = 2^40",
            "TensorShape",
            &["embed_tokens.weight"],
            |s| {
                s.edit_config(|c| {
                    c.insert("vocab_size".into(), (1u64 << 40).into());
                })
            },
        ),
    ];
    check_isolated(
        "bad_checkpoints (huge)",
        "configs_claiming_huge_sizes_are_checked_against_the_weights",
        cases,
    );
}
