//! AdamW with a decay / no-decay parameter split and a resumable state.
//!
//! A step never leaves a non-finite value behind: every update is checked before any parameter
//! or moment changes (see [`AdamW::step`]), and a loaded state must hold finite moments.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use torchscale_core::{Error, Result};
use torchscale_kernels::adamw::{
    adamw_check, adamw_composed, adamw_update, adamw_update_tensors, AdamWStep,
};
use torchscale_kernels::fused_enabled;

use super::SkipReason;

/// AdamW hyper-parameters; the defaults are torchscale's fairseq recipes (betas 0.9, 0.98).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (a schedule overrides it through [`AdamW::set_lr`]).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the bias-corrected root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay, applied only to parameters in the decay group.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    /// Errors (naming the field) unless `lr`, `adam_eps` and `weight_decay` are finite and
    /// `>= 0`, and both betas are in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        // Written as positive checks so that NaN fails them too.
        let finite_non_negative = |field: &str, v: f64| {
            if v >= 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(Error::config(
                    field,
                    format!("must be finite and >= 0, got {v}"),
                ))
            }
        };
        finite_non_negative("adam_eps", self.eps)?;
        finite_non_negative("weight_decay", self.weight_decay)?;
        let unit = |v: f64| (0.0..1.0).contains(&v);
        if !unit(self.beta1) || !unit(self.beta2) {
            return Err(Error::config(
                "adam_betas",
                format!("must be in [0, 1), got ({}, {})", self.beta1, self.beta2),
            ));
        }
        Ok(())
    }
}

/// Errors (field `lr`) unless the learning rate is finite and `>= 0`.
pub(super) fn check_lr(lr: f64) -> Result<()> {
    if lr >= 0.0 && lr.is_finite() {
        Ok(())
    } else {
        Err(Error::config(
            "lr",
            format!("must be finite and >= 0, got {lr}"),
        ))
    }
}

/// Errors unless every value of the optimizer moment `key` is finite and, for a second moment
/// (`second`), `>= 0`: a state that would write NaN into the weights at its first step.
pub(super) fn check_moment(key: &str, t: &Tensor, second: bool) -> Result<()> {
    let host = t
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?;
    let values = host.to_vec1::<f32>()?;
    let bad = |reason: String| Error::TensorValue {
        key: key.to_string(),
        reason,
    };
    if let Some((i, x)) = values.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(bad(format!(
            "holds {x} at index {i}; optimizer moments must be finite"
        )));
    }
    if second {
        if let Some((i, x)) = values.iter().enumerate().find(|(_, x)| **x < 0.0) {
            return Err(bad(format!(
                "holds {x} at index {i}; a second moment must be >= 0"
            )));
        }
    }
    Ok(())
}

/// The update count stored under `key` (i64 `[1]`, `>= 0`).
pub(super) fn read_count(state: &HashMap<String, Tensor>, key: &str) -> Result<u64> {
    let t = state.get(key).ok_or_else(|| Error::MissingTensor {
        key: key.to_string(),
    })?;
    let v = t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    match v.as_slice() {
        [n] => u64::try_from(*n).map_err(|_| Error::TensorValue {
            key: key.to_string(),
            reason: format!("holds the count {n}; counts are >= 0"),
        }),
        _ => Err(Error::TensorShape {
            key: key.to_string(),
            expected: vec![1],
            got: t.dims().to_vec(),
        }),
    }
}

/// A count as the i64 `[1]` tensor the state stores (64-bit end to end; a count past `i64::MAX`
/// would take longer than any run).
pub(super) fn count_tensor(n: u64) -> Result<Tensor> {
    let n =
        i64::try_from(n).map_err(|_| Error::invalid("update count", format!("{n} > i64::MAX")))?;
    Ok(Tensor::new(&[n], &candle_core::Device::Cpu)?)
}

/// A one-value CPU tensor that is exactly 0 iff every value of `ts` is finite: `(x - x)` is 0 for
/// a finite `x` and NaN otherwise (a plain sum could overflow on large finite values).
fn finite_flag(ts: &[&Tensor]) -> Result<Tensor> {
    let mut flag: Option<Tensor> = None;
    for t in ts {
        let t = t.to_dtype(DType::F32)?;
        let f = t.sub(&t)?.sum_all()?;
        flag = Some(match flag {
            None => f,
            Some(acc) => (acc + f)?,
        });
    }
    match flag {
        Some(f) => Ok(f.to_device(&candle_core::Device::Cpu)?.reshape(1)?),
        None => Ok(Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu)?),
    }
}

/// The default grouping: `true` (decay) for matrices and embeddings, `false` for biases and norms.
///
/// No decay when the tensor has rank <= 1 (biases, LayerNorm gains, per-channel scales such as
/// Admin's omega, scalar temperatures), when the last name segment is `bias`, or when a name token
/// (split on `.` and `_`) is `ln` or contains `norm` (`layer_norm`, `ffn_layernorm`,
/// `inner_attn_ln`). Matching whole tokens avoids false hits such as the `ln` inside `kln`.
pub fn default_decay(name: &str, shape: &[usize]) -> bool {
    if shape.len() <= 1 || name.rsplit('.').next() == Some("bias") {
        return false;
    }
    !name
        .split(['.', '_'])
        .any(|t| t == "ln" || t.contains("norm"))
}

/// A parameter's first and second moments (f32), in the form its update path uses.
enum Moments {
    /// Row-major host vectors, updated in place by the fused CPU kernel (no per-step allocation).
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Tensors on the parameter's device, replaced by each composed update.
    Tensors { m: Tensor, v: Tensor },
}

impl std::fmt::Debug for Moments {
    // Not the values: a parameter has millions.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Host { m, .. } => write!(f, "Host({} values)", m.len()),
            Self::Tensors { m, .. } => write!(f, "Tensors({:?})", m.shape()),
        }
    }
}

/// One parameter with its moments and its own update count, as PyTorch keeps them.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
    step: u64,
}

/// How a parameter's update runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpdatePath {
    /// In place on the CPU, with host moments ([`adamw_update`]).
    Host,
    /// In place on the parameter's device, with tensor moments ([`adamw_update_tensors`]).
    Device,
    /// The composed candle update, which makes new tensors ([`adamw_composed`]).
    Composed,
}

/// What the checking phase of [`AdamW::step_agreed`] leaves to the committing phase.
enum Planned {
    /// An in-place update ([`UpdatePath::Host`] or [`UpdatePath::Device`]), to run again for real.
    InPlace {
        slot: usize,
        grad: Tensor,
        path: UpdatePath,
    },
    /// The composed update's results, committed as they are.
    Computed {
        slot: usize,
        p: Tensor,
        m: Tensor,
        v: Tensor,
    },
}

impl Slot {
    /// How this parameter's update runs now (fused kernels may be switched between steps).
    fn path(&self) -> UpdatePath {
        #[cfg(test)]
        if fused_enabled() && tests::DEVICE_PATH_ON_CPU.with(|c| c.get()) {
            // Tests run the device path's logic on CPU tensors (its kernel has a CPU body).
            return UpdatePath::Device;
        }
        if self.fused() {
            UpdatePath::Host
        } else if fused_enabled() && self.var.device().is_cuda() {
            UpdatePath::Device
        } else {
            UpdatePath::Composed
        }
    }

    /// Whether the fused in-place update applies: a contiguous f32 / f16 / bf16 CPU parameter,
    /// with fused kernels on.
    fn fused(&self) -> bool {
        fused_enabled()
            && self.var.device().is_cpu()
            && matches!(self.var.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && self.var.as_tensor().is_contiguous()
    }

    /// The moments as host vectors (tensors, after `load_state` or a composed step, are copied
    /// once).
    fn host_moments(&mut self) -> Result<(&mut [f32], &mut [f32])> {
        if let Moments::Tensors { m, v } = &self.moments {
            let host = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
            self.moments = Moments::Host {
                m: host(m)?,
                v: host(v)?,
            };
        }
        match &mut self.moments {
            Moments::Host { m, v } => Ok((m, v)),
            Moments::Tensors { .. } => Err(Error::invalid("AdamW", "moments left as tensors")),
        }
    }

    /// The moments as f32 tensors of the parameter's shape, on its device.
    fn tensor_moments(&self) -> Result<(Tensor, Tensor)> {
        Ok(match &self.moments {
            Moments::Tensors { m, v } => (m.clone(), v.clone()),
            Moments::Host { m, v } => {
                let t = |x: &[f32]| Tensor::from_slice(x, self.var.shape(), self.var.device());
                (t(m)?, t(v)?)
            }
        })
    }
}

/// AdamW with PyTorch's `torch.optim.AdamW` update on every parameter that has a gradient:
///
/// ```text
/// p ← p · (1 − lr·wd)                     (decay group only)
/// m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²
/// p ← p − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)
/// ```
///
/// `t` counts the updates of that parameter; parameters without a gradient are left alone
/// (no decay, no moment update). Moments are f32 whatever the parameter dtype.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    num_updates: u64,
}

pub(super) const EXP_AVG: &str = "exp_avg.";
pub(super) const EXP_AVG_SQ: &str = "exp_avg_sq.";
pub(super) const STEP: &str = "step.";
pub(super) const NUM_UPDATES: &str = "num_updates";

impl AdamW {
    /// An optimizer over named parameters, grouped by [`default_decay`].
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        Self::with_decay_rule(params, cfg, |name, var| default_decay(name, var.dims()))
    }

    /// An optimizer over named parameters, `decay(name, var)` choosing the weight-decay group.
    pub fn with_decay_rule(
        params: Vec<(String, Var)>,
        cfg: AdamWConfig,
        decay: impl Fn(&str, &Var) -> bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut names = HashSet::new();
        let mut slots = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !var.dtype().is_float() {
                return Err(Error::DType {
                    what: name,
                    expected: DType::F32,
                    got: var.dtype(),
                });
            }
            if !names.insert(name.clone()) {
                return Err(Error::invalid(
                    "params",
                    format!("parameter `{name}` is listed twice"),
                ));
            }
            let moments = if var.device().is_cpu() {
                let n = var.elem_count();
                Moments::Host {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            } else {
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Moments::Tensors {
                    m: zeros.clone(),
                    v: zeros,
                }
            };
            slots.push(Slot {
                decay: decay(&name, &var),
                name,
                var,
                moments,
                step: 0,
            });
        }
        Ok(Self {
            cfg,
            slots,
            num_updates: 0,
        })
    }

    /// The hyper-parameters (with the current learning rate).
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Sets the learning rate for the next steps (called by the trainer from an `LrSchedule`);
    /// a NaN, infinite or negative rate is an [`Error::Config`] for `lr` and changes nothing.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.cfg.lr = lr;
        Ok(())
    }

    /// Number of updates applied so far (fairseq's `num_updates`; refused steps excluded).
    pub fn num_updates(&self) -> u64 {
        self.num_updates
    }

    /// Whether `name` is in the weight-decay group; `None` for an unknown name.
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.slots.iter().find(|s| s.name == name).map(|s| s.decay)
    }

    /// One update of every parameter that has a gradient in `grads`: in place, in one pass, on
    /// CPU parameters when fused kernels are on (`torchscale_kernels::adamw`), with the composed
    /// candle update otherwise; both compute the same f32 operations in the same order.
    ///
    /// The update is all or nothing: when it would leave a NaN or an infinity in any parameter
    /// (after rounding to its dtype) or moment, nothing changes, no count advances, and the
    /// result is `Some(SkipReason::Update)` naming the first such parameter; `None` when the
    /// update was applied.
    pub fn step(&mut self, grads: &GradStore) -> Result<Option<SkipReason>> {
        self.step_agreed(grads, Ok)
    }

    /// As [`AdamW::step`], with the decision taken by `agree` from this process's verdict
    /// (`None`: every update is finite): data-parallel ranks exchange their verdicts there so
    /// that they all apply the step or all refuse it. The step is applied iff `agree` returns
    /// `None`; what it returns otherwise is this call's result.
    ///
    /// Cost of the check, by path: on the fused CPU path a read-only pass of the same kernel
    /// ([`adamw_check`]) runs over every parameter before the in-place update of any (the
    /// update cannot be undone without a copy of everything, see there); on the fused device
    /// path the kernel first runs on copies of one parameter and its moments at a time (exact,
    /// and the copies are dropped before the next parameter); the composed path makes new
    /// tensors anyway, which are checked with one reduction each and kept until the commit.
    pub fn step_agreed<F>(&mut self, grads: &GradStore, agree: F) -> Result<Option<SkipReason>>
    where
        F: FnOnce(Option<SkipReason>) -> Result<Option<SkipReason>>,
    {
        let _span = tracing::debug_span!("optimizer_step", update = self.num_updates + 1).entered();
        // The rate was checked by `set_lr`; checking the whole config again costs nothing.
        self.cfg.validate()?;
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let hp = |decay: bool, step: u64| AdamWStep {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay: if decay { weight_decay } else { 0.0 },
            step,
        };
        // Phase 1: every update is checked; nothing is written.
        let mut plan = Vec::new();
        let mut flags: Vec<(usize, Tensor)> = Vec::new();
        let mut bad: Option<usize> = None;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let Some(g) = grads.get(&s.var) else { continue };
            if g.dims() != s.var.dims() {
                return Err(Error::shape(
                    format!("gradient of `{}`", s.name),
                    format!("{:?}", s.var.dims()),
                    g.dims(),
                ));
            }
            let h = hp(s.decay, s.step + 1);
            let path = s.path();
            match path {
                UpdatePath::Host => {
                    let var = s.var.as_tensor().clone();
                    let (m, v) = s.host_moments()?;
                    if !adamw_check(&var, g, m, v, &h)? && bad.is_none() {
                        bad = Some(i);
                    }
                }
                UpdatePath::Device => {
                    let (m, v) = s.tensor_moments()?;
                    let (p, m, v) = (s.var.as_tensor().copy()?, m.copy()?, v.copy()?);
                    adamw_update_tensors(&p, g, &m, &v, &h)?;
                    flags.push((i, finite_flag(&[&p, &m, &v])?));
                }
                UpdatePath::Composed => {
                    let (m, v) = s.tensor_moments()?;
                    let (p, m, v) = adamw_composed(s.var.as_tensor(), g, &m, &v, &h)?;
                    flags.push((i, finite_flag(&[&p, &m, &v])?));
                    plan.push(Planned::Computed { slot: i, p, m, v });
                    continue;
                }
            }
            plan.push(Planned::InPlace {
                slot: i,
                grad: g.clone(),
                path,
            });
        }
        if !flags.is_empty() {
            let all: Vec<Tensor> = flags.iter().map(|(_, f)| f.clone()).collect();
            let values = Tensor::cat(&all, 0)?.to_vec1::<f32>()?;
            // NaN != 0 as well.
            if let Some(((i, _), _)) = flags.iter().zip(values).find(|(_, f)| *f != 0.0) {
                bad = Some(bad.map_or(*i, |b| b.min(*i)));
            }
        }
        let local = bad.map(|i| SkipReason::Update {
            name: self.slots[i].name.clone(),
        });
        if let Some(reason) = agree(local)? {
            return Ok(Some(reason));
        }
        // Phase 2: the checked updates, for real.
        for planned in plan {
            match planned {
                Planned::InPlace { slot, grad, path } => {
                    let s = &mut self.slots[slot];
                    let h = hp(s.decay, s.step + 1);
                    let var = s.var.as_tensor().clone();
                    if path == UpdatePath::Host {
                        let (m, v) = s.host_moments()?;
                        adamw_update(&var, &grad, m, v, &h)?;
                    } else {
                        // The moments are this optimizer's own tensors (zeros, a composed step's
                        // outputs, or copies made by `load_state`), and `state` hands out copies.
                        let (m, v) = s.tensor_moments()?;
                        adamw_update_tensors(&var, &grad, &m, &v, &h)?;
                        s.moments = Moments::Tensors { m, v };
                    }
                    s.step += 1;
                }
                Planned::Computed { slot, p, m, v } => {
                    let s = &mut self.slots[slot];
                    s.var.set(&p)?;
                    s.moments = Moments::Tensors { m, v };
                    s.step += 1;
                }
            }
        }
        self.num_updates += 1;
        Ok(None)
    }

    /// The state as named tensors: `exp_avg.NAME`, `exp_avg_sq.NAME`, `step.NAME` (i64 `[1]`) and
    /// `num_updates` (i64 `[1]`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(3 * self.slots.len() + 1);
        for s in &self.slots {
            let (m, v) = s.tensor_moments()?;
            // Copies: device moments are updated in place by later steps.
            let (m, v) = if s.var.device().is_cpu() {
                (m, v)
            } else {
                (m.copy()?, v.copy()?)
            };
            out.insert(format!("{EXP_AVG}{}", s.name), m);
            out.insert(format!("{EXP_AVG_SQ}{}", s.name), v);
            out.insert(format!("{STEP}{}", s.name), count_tensor(s.step)?);
        }
        out.insert(NUM_UPDATES.to_string(), count_tensor(self.num_updates)?);
        Ok(out)
    }

    /// Restores a state from [`AdamW::state`]; every key must be present with the parameter's shape
    /// and no key may be left over, so a resumed run continues exactly. A moment holding a NaN or
    /// an infinity, a negative second moment or a negative count is an [`Error::TensorValue`]
    /// naming its key; on any error nothing changes.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: String| state.get(&key).cloned().ok_or(Error::MissingTensor { key });
        let mut loaded = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let moment = |prefix: &str| -> Result<Tensor> {
                let key = format!("{prefix}{}", s.name);
                let t = get(key.clone())?;
                if t.dims() != s.var.dims() {
                    return Err(Error::TensorShape {
                        key,
                        expected: s.var.dims().to_vec(),
                        got: t.dims().to_vec(),
                    });
                }
                check_moment(&key, &t, prefix == EXP_AVG_SQ)?;
                let t = t.to_dtype(DType::F32)?.to_device(s.var.device())?;
                // Device moments are updated in place: never the caller's tensor.
                Ok(if t.device().is_cpu() { t } else { t.copy()? })
            };
            loaded.push((
                moment(EXP_AVG)?,
                moment(EXP_AVG_SQ)?,
                read_count(state, &format!("{STEP}{}", s.name))?,
            ));
        }
        let num_updates = read_count(state, NUM_UPDATES)?;
        if state.len() != 3 * self.slots.len() + 1 {
            let known: HashSet<String> = self.state()?.into_keys().collect();
            if let Some(key) = state.keys().find(|k| !known.contains(*k)) {
                return Err(Error::UnexpectedTensor { key: key.clone() });
            }
        }
        // Commit only once everything has been checked.
        for (s, (m, v, step)) in self.slots.iter_mut().zip(loaded) {
            (s.moments, s.step) = (Moments::Tensors { m, v }, step);
        }
        self.num_updates = num_updates;
        Ok(())
    }

    /// Writes [`AdamW::state`] to a safetensors file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        candle_core::safetensors::save(&self.state()?, path).map_err(|e| Error::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Reads a file written by [`AdamW::save`] and restores it with [`AdamW::load_state`].
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let state =
            candle_core::safetensors::load(path, &candle_core::Device::Cpu).map_err(|e| {
                Error::File {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }
            })?;
        self.load_state(&state)
    }
}

#[cfg(test)]
#[path = "optimizer_tests.rs"]
mod tests;
