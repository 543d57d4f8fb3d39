//! The MoE decoder of expert_parallel_decoder.rs (every layer X-MoE, 4 experts) on 2
//! expert-parallel ranks of `mpirun -np 2` (torchscale-dist's `MpiCollective`) equals the single
//! process holding every expert: logits, balance losses, and every gradient (dense ones summed
//! over the ranks as the trainer's all-reduce does, each expert's on its owning rank only).
//!
//! A build with the `mpi` feature; CI runs it (see .ci/run). Started by `cargo test` it launches
//! itself under mpirun (`--oversubscribe --allow-run-as-root`, one compute thread per rank) and
//! passes only if mpirun exits 0 and both ranks report success. As a rank, it builds every
//! parameter from one seed (the single-process reference, computed locally on both ranks'
//! tokens), then the expert-parallel decoder on the same variables; a mismatch names the tensor
//! and aborts the job, so no rank waits on a failed one.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use common::*;
use torchscale_core::Collective;
use torchscale_dist::MpiCollective;
use torchscale_models::build::{decoder_spec, stabilizer, BuildOptions};
use torchscale_models::decoder::{Decoder, DecoderInputs};
use torchscale_models::DecoderConfig;
use torchscale_models::ParamStore;

const WORLD: usize = 2;
const EXPERTS: usize = 4;
const B: usize = 2;
const T: usize = 6;
const TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    if torchscale_dist::launched_by_mpirun() {
        return rank_main();
    }
    let start = Instant::now();
    let (ok, text) = match launch() {
        Ok(r) => r,
        Err(e) => (false, e.to_string()),
    };
    let passed = (0..WORLD)
        .filter(|r| text.contains(&format!("rank {r}: all checks passed")))
        .count();
    let good = ok && passed == WORLD;
    println!(
        "mpirun -np {WORLD}: expert-parallel decoder equals one process: {} ({passed}/{WORLD} \
         ranks passed, {:.1} s)",
        if good { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    if good {
        // The ranks' summary lines (largest differences) for the log.
        text.lines()
            .filter(|l| l.contains("all checks passed"))
            .for_each(|l| println!("{l}"));
        ExitCode::SUCCESS
    } else {
        println!("{text}");
        ExitCode::FAILURE
    }
}

/// Runs this binary as `WORLD` ranks; returns whether mpirun exited 0, and its output.
fn launch() -> Result<(bool, String)> {
    let tmp = tempfile::tempdir()?;
    let log = |n: &str| tmp.path().join(n);
    let file = |p: &Path| std::fs::File::create(p).with_context(|| p.display().to_string());
    let mut child = Command::new("mpirun")
        .args(["-np", &WORLD.to_string()])
        // Two ranks on a small machine (CI has 2 cores), as root in CI's container.
        .args(["--oversubscribe", "--allow-run-as-root"])
        .args(["-x", "RAYON_NUM_THREADS=1", "-x", "CANDLE_NUM_THREADS=1"])
        .arg(std::env::current_exe()?)
        .stdin(Stdio::null())
        .stdout(file(&log("stdout"))?)
        .stderr(file(&log("stderr"))?)
        .spawn()
        .context("cannot start mpirun (it comes with openmpi-bin, see .ci/run)")?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait()? {
            Some(s) => break Some(s),
            None if start.elapsed() > TIMEOUT => {
                // SIGTERM lets mpirun take its ranks down; SIGKILL if it lingers.
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(3));
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut text = std::fs::read_to_string(log("stdout")).unwrap_or_default();
    text.push_str(&std::fs::read_to_string(log("stderr")).unwrap_or_default());
    match status {
        Some(s) if !s.success() => text.push_str(&format!("\nmpirun: {s}")),
        None => text.push_str(&format!("\n(killed: still running after {TIMEOUT:?})")),
        Some(_) => {}
    }
    Ok((status.is_some_and(|s| s.success()), text))
}

fn rank_main() -> ExitCode {
    let comm = match MpiCollective::init() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("init failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = comm.rank();
    match check(comm.clone()) {
        Ok(summary) => {
            println!("rank {r}: all checks passed; {summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let e = format!("{e:#}");
            println!("rank {r}: FAILED {e}");
            // The other rank may wait in a collective: end the job, with the reason.
            comm.abort(&e);
            ExitCode::FAILURE
        }
    }
}

fn config() -> Result<DecoderConfig> {
    Ok(tiny_decoder()
        .with_moe(1, EXPERTS)
        .with_xmoe(true)
        .finalize()?)
}

/// Rank `r`'s tokens: different on every rank (as in expert_parallel_decoder.rs).
fn rank_tokens(r: usize) -> Result<Tensor> {
    let v: Vec<u32> = (0..B * T)
        .map(|i| 4 + (i as u32 * 7 + 5 * r as u32 + 3) % 16)
        .collect();
    Ok(Tensor::from_vec(v, (B, T), &Device::Cpu)?)
}

/// Rank `r`'s second-expert uniforms, one `[B T]` tensor per layer.
fn uniforms(r: usize, layers: usize) -> Result<Vec<Option<Tensor>>> {
    (0..layers)
        .map(|l| {
            let v: Vec<f32> = (0..B * T)
                .map(|i| (((i * 13 + l * 5 + r * 29) % 97) as f32 + 0.5) / 97.0)
                .collect();
            Ok(Some(Tensor::from_vec(v, B * T, &Device::Cpu)?))
        })
        .collect()
}

/// Logits, balance losses, and the loss: logits through `weighted_sum` plus half of each balance
/// loss (so that the gates get their gradient too).
fn forward(m: &Decoder, r: usize) -> Result<(Tensor, Vec<Tensor>, Tensor)> {
    let layers = m.layers().len();
    let out = m.forward(
        &rank_tokens(r)?,
        &DecoderInputs {
            train: true,
            moe_uniforms: uniforms(r, layers)?,
            ..Default::default()
        },
    )?;
    let aux = out
        .l_aux
        .iter()
        .enumerate()
        .map(|(l, a)| {
            a.clone()
                .ok_or_else(|| anyhow!("layer {l}: no balance loss"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut loss = weighted_sum(&out.x);
    for a in &aux {
        loss = (loss + (a * 0.5)?)?;
    }
    Ok((out.x, aux, loss))
}

/// Every gradient of `store`'s variables, by name.
fn named_grads(
    store: &ParamStore,
    grads: &candle_core::backprop::GradStore,
) -> HashMap<String, Tensor> {
    store
        .named_vars()
        .into_iter()
        .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n, g.clone())))
        .collect()
}

fn scalars(ts: &[Tensor]) -> Result<Vec<f32>> {
    Ok(ts
        .iter()
        .map(|t| t.to_scalar::<f32>())
        .collect::<candle_core::Result<_>>()?)
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.max_all()?.to_scalar()?)
}

/// The expert index `j` of a name `layers.{i}.moe_layer.experts.{j}.…`.
fn expert_of(name: &str) -> Option<usize> {
    let rest = name.split(".experts.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

/// This rank's checks; a summary of the largest differences, or the first mismatch.
fn check(comm: Arc<MpiCollective>) -> Result<String> {
    let r = comm.rank();
    if comm.world_size() != WORLD {
        bail!("{} ranks, this test wants {WORLD}", comm.world_size());
    }
    let cfg = config()?;
    let store = ParamStore::new(21);
    // Every rank builds every parameter from the same seed (the single-process reference); the
    // expert-parallel decoder reuses the variables of its own experts and the dense ones.
    let single = Decoder::new(
        &cfg,
        &BuildOptions::default(),
        store.var_builder(DType::F32, &Device::Cpu),
    )?;
    let mut vars = store.named_vars();
    // Collectives run in one order on every rank: by name, not in a HashMap's order.
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    // The seed gave both ranks the same parameters (else nothing below is comparable).
    for (name, v) in &vars {
        let root = comm.broadcast(v.as_tensor(), 0)?;
        if max_abs(&(&root - v.as_tensor())?)? != 0.0 {
            bail!("parameter {name} differs from rank 0's");
        }
    }

    // The reference: one process, every expert, both ranks' tokens, one loss.
    let mut total = None::<Tensor>;
    let mut want = Vec::new();
    for q in 0..WORLD {
        let (logits, aux, loss) = forward(&single, q)?;
        total = Some(match total {
            None => loss,
            Some(t) => (t + loss)?,
        });
        want.push((logits, scalars(&aux)?));
    }
    let total = total.ok_or_else(|| anyhow!("no reference loss"))?;
    let want_grads = named_grads(&store, &total.backward()?);

    // Expert parallel over MPI: this rank's tokens, its own experts.
    let mut spec = decoder_spec(&cfg, &BuildOptions::default());
    spec.moe
        .as_mut()
        .ok_or_else(|| anyhow!("the decoder spec has no MoE"))?
        .expert_comm = Some(comm.clone() as Arc<dyn Collective>);
    let st = stabilizer(
        cfg.technique(),
        cfg.stack_kind(),
        &cfg.admin_output_change_scale,
        cfg.admin_as_parameter,
    )?;
    let m = Decoder::from_spec(
        spec,
        st,
        false,
        None,
        store.var_builder(DType::F32, &Device::Cpu),
    )?;
    let (logits, aux, loss) = forward(&m, r)?;
    let grads = named_grads(&store, &loss.backward()?);

    let d_logits = max_abs(&(&logits - &want[r].0)?)?;
    if d_logits.is_nan() || d_logits > 1e-5 {
        bail!("logits differ by {d_logits}");
    }
    let l_aux = scalars(&aux)?;
    if l_aux.len() != cfg.decoder_layers {
        bail!(
            "{} balance losses for {} layers",
            l_aux.len(),
            cfg.decoder_layers
        );
    }
    for (l, (a, b)) in l_aux.iter().zip(&want[r].1).enumerate() {
        if (a - b).is_nan() || (a - b).abs() > 1e-6 {
            bail!("layer {l}: balance loss {a} vs {b}");
        }
    }

    let mut names: Vec<&String> = want_grads.keys().collect();
    names.sort();
    let per = EXPERTS / WORLD;
    let (mut worst_grad, mut dense, mut mine) = (0f32, 0usize, 0usize);
    for name in names {
        let want = &want_grads[name];
        let got = match expert_of(name) {
            // Another rank's expert: this rank must not have touched it.
            Some(j) if j / per != r => {
                if grads.contains_key(name) {
                    bail!("{name}: a gradient on rank {r}, which does not own expert {j}");
                }
                continue;
            }
            Some(_) => {
                mine += 1;
                grads
                    .get(name)
                    .cloned()
                    .ok_or_else(|| anyhow!("{name}: no gradient on its owning rank {r}"))?
            }
            // Summed over the ranks, as the trainer's all-reduce does.
            None => {
                dense += 1;
                let g = grads
                    .get(name)
                    .ok_or_else(|| anyhow!("{name}: no gradient on rank {r}"))?;
                comm.all_reduce_sum(g)
                    .with_context(|| format!("all-reduce of {name}"))?
            }
        };
        let scale = max_abs(want)?.max(1.0);
        let d = max_abs(&(&got - want).with_context(|| name.clone())?)? / scale;
        if d.is_nan() || d > 1e-5 {
            bail!("gradient {name} differs by {d} (relative to {scale})");
        }
        worst_grad = worst_grad.max(d);
    }
    // Two layers, this rank's two experts, fc1/fc2 weights and biases at least.
    if mine < cfg.decoder_layers * per * 4 {
        bail!("{mine} expert gradients on rank {r}");
    }
    if dense == 0 {
        bail!("no dense gradients");
    }
    Ok(format!(
        "logits max diff {d_logits:e}, {dense} dense and {mine} own expert gradients, max diff \
         (relative to max(1, |g|)) {worst_grad:e}"
    ))
}
