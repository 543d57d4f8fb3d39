//! train_lm on several processes: the collective (MPI when started by mpirun in a build with the
//! `mpi` feature, one process otherwise), the same dense parameters on every rank, and
//! checkpoints that gather the experts of an expert-parallel run into one torchscale-layout file.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use torchscale_core::collective::SingleProcess;
use torchscale_core::Collective;
use torchscale_models::lm::LanguageModel;

/// The ranks this process trains with.
#[derive(Clone)]
pub struct Ranks {
    /// MPI under mpirun, [`SingleProcess`] otherwise.
    pub comm: Arc<dyn Collective>,
    /// Experts spread over the ranks (`--expert-parallel` with more than one rank).
    pub expert_parallel: bool,
    /// ZeRO-1 (`--zero1` with more than one rank).
    pub zero1: bool,
}

impl Ranks {
    /// More than one rank.
    pub fn distributed(&self) -> bool {
        self.comm.world_size() > 1
    }

    /// Rank 0: the one that prints, logs and writes checkpoints.
    pub fn is_main(&self) -> bool {
        self.comm.rank() == 0
    }
}

/// The launcher's world size, if a launcher started this process.
fn launcher_world() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|s| s.parse().ok())
}

/// The collective of this process: MPI when mpirun started it (build with `--features mpi`),
/// one process otherwise. Several processes of a build without MPI would each train alone and
/// overwrite each other's checkpoint, so that is an error.
pub fn connect() -> Result<Arc<dyn Collective>> {
    #[cfg(feature = "mpi")]
    {
        if torchscale_dist::launched_by_mpirun() {
            let c = torchscale_dist::MpiCollective::init()?;
            return Ok(Arc::new(c));
        }
    }
    if let Some(n) = launcher_world().filter(|&n| n > 1) {
        bail!(
            "started by mpirun as one of {n} ranks, but this train_lm was built without MPI: \
             rebuild with `--features mpi` (see README, Training on several processes)"
        );
    }
    Ok(Arc::new(SingleProcess))
}

/// Checks the run's layout against the world before anything is built; every rank reaches the
/// same verdict from the same arguments, so none waits for another.
pub fn check(
    comm: &Arc<dyn Collective>,
    moe: usize,
    batch: usize,
    expert_parallel: bool,
    dev: &Device,
) -> Result<()> {
    let w = comm.world_size();
    if w == 1 {
        if expert_parallel {
            tracing::warn!("--expert-parallel has no effect in one process");
        }
        return Ok(());
    }
    if !dev.is_cpu() {
        bail!("--device: MPI moves CPU tensors; NCCL (CUDA) is not built yet, use --device cpu");
    }
    if batch < w {
        bail!("--batch {batch} (the global batch) leaves some of the {w} ranks without rows");
    }
    if expert_parallel {
        if moe == 0 || !moe.is_multiple_of(w) {
            bail!("--expert-parallel needs --moe E with E a multiple of the {w} ranks (got {moe})");
        }
        // Every MoE call exchanges tokens: ranks with different row counts would not match.
        if !batch.is_multiple_of(w) {
            bail!("--expert-parallel needs --batch a multiple of the {w} ranks (got {batch})");
        }
    }
    Ok(())
}

/// `(prefix, expert, rest)` of `layers.{i}.moe_layer.experts.{j}.{rest}`.
fn split_expert(name: &str) -> Option<(&str, usize, &str)> {
    let at = name.find(".experts.")? + ".experts.".len();
    let (head, tail) = name.split_at(at);
    let (j, rest) = tail.split_once('.')?;
    Some((head, j.parse().ok()?, rest))
}

/// Whether `name` is an expert's parameter (or an optimizer entry of one).
pub fn is_expert(name: &str) -> bool {
    split_expert(name).is_some()
}

/// Sets every parameter of `dst` from `src` by name (converting dtype and device); `dst` may hold
/// fewer tensors than `src` (an expert-parallel rank holds only its experts).
pub fn copy_params(dst: &LanguageModel, src: &LanguageModel) -> Result<()> {
    for (name, var) in dst.store.named_vars() {
        let v = src
            .store
            .get(&name)
            .ok_or_else(|| anyhow!("the source model has no parameter `{name}`"))?;
        var.set(
            &v.as_tensor()
                .to_dtype(var.dtype())?
                .to_device(var.device())?,
        )?;
    }
    Ok(())
}

/// Rank 0's values of every parameter that is not an expert's, on every rank, in one broadcast,
/// so that the replicated parameters start identical whatever each rank's build drew.
pub fn broadcast_dense(lm: &LanguageModel, comm: &dyn Collective) -> Result<()> {
    let dense: Vec<_> = lm
        .store
        .named_vars()
        .into_iter()
        .filter(|(n, _)| !is_expert(n))
        .collect();
    let flat: Vec<Tensor> = dense
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all()?.to_dtype(DType::F32))
        .collect::<candle_core::Result<_>>()?;
    let all = comm.broadcast(&Tensor::cat(&flat, 0)?, 0)?;
    let mut off = 0;
    for (_, v) in &dense {
        let n = v.elem_count();
        v.set(
            &all.narrow(0, off, n)?
                .reshape(v.shape())?
                .to_dtype(v.dtype())?,
        )?;
        off += n;
    }
    Ok(())
}

/// AdamW's per-parameter entries (see `AdamW::state`).
const STATE_PREFIXES: [&str; 3] = ["exp_avg.", "exp_avg_sq.", "step."];

/// The entries of a whole checkpoint's trainer state that belong to this rank: every entry
/// except the moments of experts another rank holds.
pub fn local_state(lm: &LanguageModel, state: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mine: std::collections::HashSet<String> =
        lm.store.named_vars().into_iter().map(|(n, _)| n).collect();
    state
        .iter()
        .filter(|(k, _)| {
            let param = STATE_PREFIXES.iter().find_map(|p| k.strip_prefix(p));
            !matches!(param, Some(p) if is_expert(p) && !mine.contains(p))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The other ranks' experts: parameters, and their AdamW entries from each rank's `state`.
pub struct Gathered {
    /// Expert parameters under their global names, in the model's dtype.
    pub params: Vec<(String, Tensor)>,
    /// Their `exp_avg.`, `exp_avg_sq.` and `step.` entries.
    pub state: HashMap<String, Tensor>,
}

/// Every rank's experts, in one all-gather (a collective: every rank calls it). Each rank holds
/// experts `r * E/W ..`; its `k`-th local expert travels at the same offset on every rank, so
/// the receiver names it `r * E/W + k`.
pub fn gather_experts(
    lm: &LanguageModel,
    state: &HashMap<String, Tensor>,
    comm: &dyn Collective,
) -> Result<Gathered> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let per = lm.cfg.moe_expert_count / world;
    let mut slots: Vec<((String, usize, String), String, candle_core::Var)> = Vec::new();
    for (name, var) in lm.store.named_vars() {
        if let Some((head, j, rest)) = split_expert(&name) {
            let k = j
                .checked_sub(rank * per)
                .filter(|&k| k < per)
                .ok_or_else(|| anyhow!("rank {rank} holds `{name}`, not one of its experts"))?;
            slots.push(((head.to_string(), k, rest.to_string()), name.clone(), var));
        }
    }
    slots.sort_by(|a, b| a.0.cmp(&b.0));
    // Per slot: the values, both moments, the step count (exact in f32 below 2^24).
    let mut flat = Vec::with_capacity(4 * slots.len());
    for (_, name, var) in &slots {
        flat.push(var.as_tensor().flatten_all()?.to_dtype(DType::F32)?);
        for p in STATE_PREFIXES {
            let key = format!("{p}{name}");
            let t = state
                .get(&key)
                .ok_or_else(|| anyhow!("the trainer state has no `{key}`"))?;
            flat.push(t.flatten_all()?.to_dtype(DType::F32)?);
        }
    }
    let len: usize = flat.iter().map(Tensor::elem_count).sum();
    if len == 0 {
        bail!("rank {rank} holds no expert parameters to gather");
    }
    let all = comm.all_gather(&Tensor::cat(&flat, 0)?)?;
    let mut out = Gathered {
        params: Vec::new(),
        state: HashMap::new(),
    };
    for r in (0..world).filter(|&r| r != rank) {
        let mut off = r * len;
        let mut take = |n: usize| -> Result<Tensor> {
            let t = all.narrow(0, off, n)?;
            off += n;
            Ok(t)
        };
        for ((head, k, rest), _, var) in &slots {
            let name = format!("{head}{}.{rest}", r * per + k);
            let n = var.elem_count();
            let value = take(n)?.reshape(var.shape())?.to_dtype(var.dtype())?;
            out.params.push((name.clone(), value));
            for p in &STATE_PREFIXES[..2] {
                let t = take(n)?.reshape(var.shape())?;
                out.state.insert(format!("{p}{name}"), t);
            }
            let step = take(1)?.to_dtype(DType::I64)?;
            out.state
                .insert(format!("{}{name}", STATE_PREFIXES[2]), step);
        }
    }
    Ok(out)
}
