//! AdamW with a decay / no-decay parameter split and a resumable state.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use torchscale_core::{Error, Result};
use torchscale_kernels::adamw::{adamw_composed, adamw_update, adamw_update_tensors, AdamWStep};
use torchscale_kernels::fused_enabled;

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
    fn validate(&self) -> Result<()> {
        // Written as positive checks so that NaN fails them too.
        let non_negative = |field: &str, v: f64| {
            if v >= 0.0 {
                Ok(())
            } else {
                Err(Error::config(field, format!("must be >= 0, got {v}")))
            }
        };
        non_negative("lr", self.lr)?;
        non_negative("adam_eps", self.eps)?;
        non_negative("weight_decay", self.weight_decay)?;
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

impl Slot {
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

    /// Sets the learning rate for the next steps (called by the trainer from an `LrSchedule`).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Number of [`AdamW::step`] calls so far (fairseq's `num_updates`).
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
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let _span = tracing::debug_span!("optimizer_step", update = self.num_updates + 1).entered();
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
        // A schedule may have set a non-finite rate: refuse before touching any parameter.
        hp(true, 1)
            .validate()
            .map_err(|e| Error::config("adamw", e.to_string()))?;
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.var) else { continue };
            if g.dims() != s.var.dims() {
                return Err(Error::shape(
                    format!("gradient of `{}`", s.name),
                    format!("{:?}", s.var.dims()),
                    g.dims(),
                ));
            }
            s.step += 1;
            let h = hp(s.decay, s.step);
            if s.fused() {
                let var = s.var.as_tensor().clone();
                let (m, v) = s.host_moments()?;
                adamw_update(&var, g, m, v, &h)?;
            } else if fused_enabled() && s.var.device().is_cuda() {
                // One kernel updates the parameter and both device moments in place. The moments
                // are this optimizer's own tensors (zeros, a composed step's outputs, or copies
                // made by `load_state`), and `state` hands out copies.
                let (m, v) = s.tensor_moments()?;
                adamw_update_tensors(s.var.as_tensor(), g, &m, &v, &h)?;
                s.moments = Moments::Tensors { m, v };
            } else {
                let (m, v) = s.tensor_moments()?;
                let (p, m, v) = adamw_composed(s.var.as_tensor(), g, &m, &v, &h)?;
                s.var.set(&p)?;
                s.moments = Moments::Tensors { m, v };
            }
        }
        self.num_updates += 1;
        Ok(())
    }

    /// The state as named tensors: `exp_avg.NAME`, `exp_avg_sq.NAME`, `step.NAME` (i64 `[1]`) and
    /// `num_updates` (i64 `[1]`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let cpu = candle_core::Device::Cpu;
        let count = |n: u64| Tensor::new(&[n as i64], &cpu);
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
            out.insert(format!("{STEP}{}", s.name), count(s.step)?);
        }
        out.insert(NUM_UPDATES.to_string(), count(self.num_updates)?);
        Ok(out)
    }

    /// Restores a state from [`AdamW::state`]; every key must be present with the parameter's shape
    /// and no key may be left over, so a resumed run continues exactly.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: String| state.get(&key).cloned().ok_or(Error::MissingTensor { key });
        let count = |key: String| -> Result<u64> {
            let t = get(key.clone())?;
            let v = t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
            match v.as_slice() {
                [n] if *n >= 0 => Ok(*n as u64),
                _ => Err(Error::TensorShape {
                    key,
                    expected: vec![1],
                    got: t.dims().to_vec(),
                }),
            }
        };
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
                let t = t.to_dtype(DType::F32)?.to_device(s.var.device())?;
                // Device moments are updated in place: never the caller's tensor.
                Ok(if t.device().is_cpu() { t } else { t.copy()? })
            };
            loaded.push((
                moment(EXP_AVG)?,
                moment(EXP_AVG_SQ)?,
                count(format!("{STEP}{}", s.name))?,
            ));
        }
        let num_updates = count(NUM_UPDATES.to_string())?;
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
