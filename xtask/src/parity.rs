//! `cargo xtask parity`: run golden files through the port and compare every `expect.*` tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_core::{AuxOutput, Branch};
use torchscale_models::build::BuildOptions;
use torchscale_models::checkpoint::load_into;
use torchscale_models::config::{DecoderConfig, EncoderConfig, EncoderDecoderConfig};
use torchscale_models::decoder::{Decoder, DecoderInputs, IncrementalState};
use torchscale_models::encoder::{Encoder, EncoderInputs};
use torchscale_models::encoder_decoder::EncoderDecoder;

use crate::golden::{compare, compare_exact, Comparison, GoldenFile, Tolerance};

/// Which tolerances of FORMAT.md section 6 to apply (`--tolerance strict|default`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TolMode {
    /// FORMAT.md's strict column.
    Strict,
    /// FORMAT.md's default column (looser).
    Default,
}

/// Outcome of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Every expected tensor within tolerance.
    Pass,
    /// Something differs, or the file could not be run.
    Fail,
    /// This kind is not covered yet; the reason names the issue.
    Skip(String),
}

/// The report of one file.
#[derive(Debug, Clone)]
pub struct FileReport {
    /// The file.
    pub path: PathBuf,
    /// Its kind (metadata).
    pub kind: String,
    /// PASS / FAIL / SKIP.
    pub status: Status,
    /// Per expected tensor.
    pub comparisons: Vec<Comparison>,
    /// Why it could not run, if so.
    pub error: Option<String>,
}

impl FileReport {
    /// Largest absolute error over the file.
    pub fn max_abs(&self) -> f64 {
        self.comparisons.iter().fold(0.0, |m, c| m.max(c.max_abs))
    }
    /// Largest relative error over the file.
    pub fn max_rel(&self) -> f64 {
        self.comparisons.iter().fold(0.0, |m, c| m.max(c.max_rel))
    }
    /// One line: path, kind, status, largest errors.
    pub fn line(&self) -> String {
        let status = match &self.status {
            Status::Pass => "PASS".to_string(),
            Status::Fail => "FAIL".to_string(),
            Status::Skip(why) => format!("SKIP ({why})"),
        };
        let mut s = format!(
            "{}  {}  {}  max_abs={:.3e}  max_rel={:.3e}",
            self.path.display(),
            self.kind,
            status,
            self.max_abs(),
            self.max_rel()
        );
        if let Some(e) = &self.error {
            s.push_str(&format!("  error: {e}"));
        }
        for c in self.comparisons.iter().filter(|c| !c.pass) {
            s.push_str(&format!(
                "\n    {}: max_abs={:.3e} max_rel={:.3e}",
                c.key, c.max_abs, c.max_rel
            ));
            if let Some(n) = &c.note {
                s.push_str(&format!(" ({n})"));
            }
        }
        s
    }
}

/// Runs one file.
pub fn check_file(path: &Path, mode: TolMode) -> FileReport {
    let mut report = FileReport {
        path: path.to_path_buf(),
        kind: "?".into(),
        status: Status::Fail,
        comparisons: vec![],
        error: None,
    };
    let f = match GoldenFile::load(path) {
        Ok(f) => f,
        Err(e) => {
            report.error = Some(format!("{e:#}"));
            return report;
        }
    };
    report.kind = f.kind().to_string();
    let tol = match mode {
        TolMode::Strict => Tolerance::STRICT_FORWARD,
        TolMode::Default => Tolerance::DEFAULT_FORWARD,
    };
    match run(&f) {
        Ok(got) => {
            for key in f.keys_with("expect.") {
                let want = &f.tensors[&key];
                let exact = matches!(want.dtype(), DType::U8 | DType::U32 | DType::I64);
                // FORMAT.md's scalar tolerance covers l_aux, norms and clip coefficients.
                let scalar = want.elem_count() == 1
                    && ["l_aux", "norm", "coef"].iter().any(|w| key.contains(w));
                let c = match got.get(&key) {
                    Some(g) if exact => g
                        .to_dtype(DType::I64)
                        .map_err(Into::into)
                        .and_then(|g| compare_exact(&key, &g, &want.to_dtype(DType::I64)?)),
                    Some(g) if scalar => compare(&key, g, want, Tolerance::SCALAR),
                    Some(g) => compare(&key, g, want, tol),
                    None => Ok(missing(&key)),
                };
                match c {
                    Ok(c) => report.comparisons.push(c),
                    Err(e) => report.error = Some(format!("{key}: {e:#}")),
                }
            }
            for family in ["grad", "grad_laux"] {
                match compare_grads(&f, &got, family, mode) {
                    Ok(cs) => report.comparisons.extend(cs),
                    Err(e) => report.error = Some(format!("{family}: {e:#}")),
                }
            }
            let ok = report.error.is_none()
                && !report.comparisons.is_empty()
                && report.comparisons.iter().all(|c| c.pass);
            report.status = if ok { Status::Pass } else { Status::Fail };
        }
        Err(e) => report.error = Some(format!("{e:#}")),
    }
    report
}

fn run(f: &GoldenFile) -> Result<HashMap<String, Tensor>> {
    if f.tensors.keys().any(|k| k.starts_with("input.grad.")) {
        return crate::clip_case::run(f);
    }
    if f.tensors.keys().any(|k| k.starts_with("grad.")) {
        return crate::grad_case::run(f);
    }
    let config = f
        .meta
        .get("config")
        .ok_or_else(|| anyhow!("metadata has no config"))?;
    match f.word("model_class") {
        "Encoder" => run_encoder(f, &EncoderConfig::from_json_str(config)?),
        "Decoder" => run_decoder(f, &DecoderConfig::from_json_str(config)?),
        "EncoderDecoder" => run_encoder_decoder(f, &EncoderDecoderConfig::from_json_str(config)?),
        "AdminPostLNStack" => crate::admin_case::run(f, &EncoderConfig::from_json_str(config)?),
        other => Err(anyhow!("unknown model_class `{other}`")),
    }
}

fn new_store() -> (ParamStore, candle_nn::VarBuilder<'static>) {
    let store = ParamStore::new(0);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    (store, vb)
}

pub(crate) fn build_options(f: &GoldenFile, prefix: &str) -> BuildOptions {
    BuildOptions {
        learned_positions: Some(
            f.tensors
                .contains_key(&format!("{prefix}embed_positions.weight")),
        ),
        ..Default::default()
    }
}

fn states(out: &mut HashMap<String, Tensor>, name: &str, v: &[Tensor]) {
    for (i, t) in v.iter().enumerate() {
        out.insert(format!("expect.{name}.{i}"), t.clone());
    }
}

fn run_encoder(f: &GoldenFile, cfg: &EncoderConfig) -> Result<HashMap<String, Tensor>> {
    let (store, vb) = new_store();
    let model = Encoder::new(cfg, &build_options(f, ""), vb)?;
    load_into(&store, &f.weights(""), &model.buffers()?, &[])?;
    let src = f.get("input.src_tokens")?;
    let mask = f.tensors.get("input.encoder_padding_mask");
    let branch = match f
        .json("setup")?
        .get("multiway_split_position")
        .and_then(|v| v.as_i64())
    {
        Some(p) => Branch::from_split_position(p)?,
        None => Branch::A,
    };
    let moe_uniforms = uniforms(f, "", cfg.encoder_layers);
    let inp = EncoderInputs {
        padding_mask: mask,
        return_all_hiddens: true,
        branch,
        moe_uniforms,
        ..Default::default()
    };
    let o = model.forward(src, &inp)?;
    let mut out = HashMap::new();
    moe_outputs(f, &mut out, &o.aux, "")?;
    out.insert("expect.encoder_out".into(), o.encoder_out);
    out.insert("expect.encoder_embedding".into(), o.encoder_embedding);
    states(&mut out, "encoder_states", &o.encoder_states);
    let feats = model.forward(
        src,
        &EncoderInputs {
            features_only: true,
            ..inp
        },
    )?;
    out.insert("expect.features".into(), feats.encoder_out);
    Ok(out)
}

fn run_decoder(f: &GoldenFile, cfg: &DecoderConfig) -> Result<HashMap<String, Tensor>> {
    let (store, vb) = new_store();
    let model = Decoder::new(cfg, &build_options(f, ""), vb)?;
    load_into(&store, &f.weights(""), &model.buffers()?, &[])?;
    let tokens = f.get("input.prev_output_tokens")?;
    let moe_uniforms = uniforms(f, "", cfg.decoder_layers);
    let o = model.forward(
        tokens,
        &DecoderInputs {
            moe_uniforms: moe_uniforms.clone(),
            ..Default::default()
        },
    )?;
    let mut out = HashMap::new();
    moe_outputs(f, &mut out, &o.aux, "")?;
    out.insert("expect.logits".into(), o.x);
    states(&mut out, "inner_states", &o.inner_states);
    let feats = model.forward(
        tokens,
        &DecoderInputs {
            features_only: true,
            moe_uniforms,
            ..Default::default()
        },
    )?;
    out.insert("expect.features".into(), feats.x);
    if f.tensors.contains_key("expect.incremental_logits") {
        let t = tokens.dim(1)?;
        let mut state = IncrementalState::new(false);
        let mut steps = Vec::with_capacity(t);
        for i in 1..=t {
            steps.push(
                model
                    .forward_incremental(
                        &tokens.narrow(1, 0, i)?,
                        &DecoderInputs::default(),
                        &mut state,
                    )?
                    .x,
            );
        }
        out.insert("expect.incremental_logits".into(), Tensor::cat(&steps, 1)?);
        for (l, c) in state.layers.iter().enumerate() {
            if let (Some(k), Some(v)) = (&c.prev_key, &c.prev_value) {
                out.insert(format!("expect.cache.{l}.prev_key"), k.clone());
                out.insert(format!("expect.cache.{l}.prev_value"), v.clone());
            }
        }
    }
    if f.tensors.contains_key("expect.prompt_then_step_logits") {
        let t = tokens.dim(1)?;
        let p = f
            .json("setup")?
            .get("prompt_len")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| anyhow!("setup has no prompt_len"))? as usize;
        let mut state = IncrementalState::new(true);
        let mut parts = vec![
            model
                .forward_incremental(
                    &tokens.narrow(1, 0, p)?,
                    &DecoderInputs::default(),
                    &mut state,
                )?
                .x,
        ];
        for i in p + 1..=t {
            parts.push(
                model
                    .forward_incremental(
                        &tokens.narrow(1, 0, i)?,
                        &DecoderInputs::default(),
                        &mut state,
                    )?
                    .x,
            );
        }
        out.insert(
            "expect.prompt_then_step_logits".into(),
            Tensor::cat(&parts, 1)?,
        );
    }
    Ok(out)
}

/// The stored random-policy draws of each layer (`input.moe_uniform.<prefix>layers.<i>.moe_layer`).
pub(crate) fn uniforms(f: &GoldenFile, prefix: &str, layers: usize) -> Vec<Option<Tensor>> {
    (0..layers)
        .map(|i| {
            f.tensors
                .get(&format!("input.moe_uniform.{prefix}layers.{i}.moe_layer"))
                .cloned()
        })
        .collect()
}

/// The per-layer MoE results under the keys torchscale's hooks used.
pub(crate) fn moe_outputs(
    f: &GoldenFile,
    out: &mut HashMap<String, Tensor>,
    aux: &[AuxOutput],
    prefix: &str,
) -> Result<()> {
    for a in aux {
        let i = a.layer;
        let m = format!("expect.moe.{prefix}layers.{i}.moe_layer");
        let l_aux = a.balance_loss.reshape(1)?;
        out.insert(format!("expect.l_aux.{i}"), l_aux.clone());
        out.insert(format!("{m}.l_aux"), l_aux);
        if let (Some(x), Some(y)) = (&a.input, &a.output) {
            // torchscale recorded the layer's 3-D input; ours is the same rows flattened.
            for (key, t) in [("layer_input", x), ("layer_output", y)] {
                let k = format!("{m}.{key}");
                let t = match f.tensors.get(&k) {
                    Some(w) => t.reshape(w.dims())?,
                    None => t.clone(),
                };
                out.insert(k, t);
            }
        }
        let Some(r) = &a.routing else { continue };
        out.insert(format!("{m}.gate_logits"), r.logits.clone());
        out.insert(format!("{m}.gate_probs"), r.probs.clone());
        let s = r.num_tokens();
        let dev = &Device::Cpu;
        let top1: Vec<i64> = (0..s).map(|t| r.expert[t * r.k] as i64).collect();
        out.insert(format!("{m}.top1_expert"), Tensor::from_vec(top1, s, dev)?);
        let cand: Vec<i64> = r.runner_up.iter().map(|&e| e as i64).collect();
        out.insert(
            format!("{m}.top2_candidate"),
            Tensor::from_vec(cand, s, dev)?,
        );
        if let Some(sampled) = &r.sampled {
            let v: Vec<u8> = sampled.iter().map(|&b| b as u8).collect();
            out.insert(format!("{m}.second_sampled"), Tensor::from_vec(v, s, dev)?);
        }
        let (e, cap) = (r.num_experts, r.capacity);
        let gate: Vec<f32> = r.gate.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut combine = vec![0f32; s * e * cap];
        for (t, j, ex, slot) in r.kept_choices() {
            combine[(t * e + ex) * cap + slot] = gate[t * r.k + j];
        }
        let mask: Vec<u8> = combine.iter().map(|&w| (w != 0.0) as u8).collect();
        out.insert(
            format!("{m}.combine_weights"),
            Tensor::from_vec(combine, (s, e, cap), dev)?,
        );
        out.insert(
            format!("{m}.dispatch_mask"),
            Tensor::from_vec(mask, (s, e, cap), dev)?,
        );
    }
    Ok(())
}

fn run_encoder_decoder(
    f: &GoldenFile,
    cfg: &EncoderDecoderConfig,
) -> Result<HashMap<String, Tensor>> {
    let (store, vb) = new_store();
    let model = EncoderDecoder::new(cfg, &build_options(f, "encoder."), vb)?;
    load_into(&store, &f.weights(""), &model.buffers()?, &[])?;
    let src = f.get("input.src_tokens")?;
    let prev = f.get("input.prev_output_tokens")?;
    let mask = f.tensors.get("input.encoder_padding_mask");
    let (enc, dec) = model.forward(src, mask, prev, false)?;
    let mut out = HashMap::new();
    out.insert("expect.encoder_out".into(), enc.encoder_out);
    states(&mut out, "encoder_states", &enc.encoder_states);
    out.insert("expect.logits".into(), dec.x);
    states(&mut out, "decoder_inner_states", &dec.inner_states);
    out.insert(
        "expect.logits_forward_without_mask".into(),
        model.forward_torchscale(src, prev)?.x,
    );
    Ok(out)
}

fn missing(key: &str) -> Comparison {
    Comparison {
        key: key.to_string(),
        max_abs: f64::INFINITY,
        max_rel: f64::INFINITY,
        pass: false,
        note: Some("not computed by the port".into()),
    }
}

/// Compares one gradient family (`grad` or `grad_laux`) with FORMAT.md's gradient tolerance,
/// scaled by the family's largest stored entry. A `grad_laux` entry the file leaves out is zero
/// there (the balance loss does not reach it), so the port's must be zero too.
fn compare_grads(
    f: &GoldenFile,
    got: &HashMap<String, Tensor>,
    family: &str,
    mode: TolMode,
) -> Result<Vec<Comparison>> {
    let prefix = format!("{family}.");
    let keys = f.keys_with(&prefix);
    if keys.is_empty() {
        return Ok(vec![]);
    }
    let mut g = 0f64;
    for k in &keys {
        let m = f.tensors[k].abs()?.max_all()?.to_dtype(DType::F64)?;
        g = g.max(m.to_scalar::<f64>()?);
    }
    let tol = match mode {
        TolMode::Strict => Tolerance::strict_grad(g),
        TolMode::Default => Tolerance::default_grad(g),
    };
    let mut out = Vec::new();
    for k in &keys {
        out.push(match got.get(k) {
            Some(t) => compare(k, t, &f.tensors[k], tol)?,
            None => missing(k),
        });
    }
    if family == "grad_laux" {
        let mut extra: Vec<&String> = got
            .keys()
            .filter(|k| k.starts_with(&prefix) && !f.tensors.contains_key(*k))
            .collect();
        extra.sort();
        for k in extra {
            let t = &got[k];
            out.push(compare(k, t, &t.zeros_like()?, tol)?);
        }
    }
    Ok(out)
}

/// The command line of `cargo xtask parity`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "parity",
    about = "Run golden files through the port and compare every expected tensor under FORMAT.md's \
             tolerances; exits 1 when a file fails"
)]
pub struct ParityArgs {
    /// Tolerance column of FORMAT.md section 6
    #[arg(long, value_enum, default_value_t = TolMode::Strict)]
    pub tolerance: TolMode,
    /// Golden files (.safetensors) or folders of them
    #[arg(value_name = "PATH", default_value = "testdata/golden", value_parser = existing_path)]
    pub paths: Vec<PathBuf>,
}

fn existing_path(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.exists() {
        Ok(p)
    } else if s == "testdata/golden" {
        Err("no such folder here; run from the repository root, or give golden files".into())
    } else {
        Err("no such file or folder".into())
    }
}

/// `cargo xtask parity`: checks every file; returns whether none failed.
pub fn main(args: &ParityArgs) -> Result<bool> {
    let files = crate::golden::collect_files(&args.paths)?;
    let (_, failed, _) = run_all(&files, args.tolerance);
    Ok(failed == 0)
}

/// Runs every file, prints one line each and the totals; returns (passed, failed, skipped).
pub fn run_all(files: &[PathBuf], mode: TolMode) -> (usize, usize, usize) {
    let (mut p, mut fl, mut s) = (0, 0, 0);
    for path in files {
        let r = check_file(path, mode);
        println!("{}", r.line());
        match r.status {
            Status::Pass => p += 1,
            Status::Fail => fl += 1,
            Status::Skip(_) => s += 1,
        }
    }
    println!("{p} passed, {fl} failed, {s} skipped");
    (p, fl, s)
}
