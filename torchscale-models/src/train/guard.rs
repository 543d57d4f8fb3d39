//! NaN/inf guard: decides whether an optimizer step must be skipped, and says why.

use std::fmt;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use torchscale_core::{Error, Result};

/// Why a step is skipped: the first non-finite value found.
#[derive(Debug, Clone, PartialEq)]
pub enum SkipReason {
    /// The loss is NaN or infinite.
    Loss {
        /// Its value.
        value: f64,
    },
    /// The gradient norm (for example a clipper's `total_norm`) is NaN or infinite.
    GradNorm {
        /// Its value.
        value: f64,
    },
    /// The gradient of this parameter holds a NaN or an infinity.
    Grad {
        /// The parameter's name.
        name: String,
    },
    /// Data parallel: another rank found a non-finite loss or gradient, or refused its update
    /// (ranks skip together).
    OtherRank {
        /// The first rank that did.
        rank: usize,
    },
    /// The optimizer update of this parameter would have left a NaN or an infinity in it (after
    /// rounding to its dtype) or in its moments, from finite gradients: an overflow (a huge
    /// learning rate, a value near the dtype's limit). No parameter or moment was changed.
    Update {
        /// The parameter's name (the first one refused).
        name: String,
    },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Loss { value } => write!(f, "non-finite loss ({value})"),
            SkipReason::GradNorm { value } => write!(f, "non-finite gradient norm ({value})"),
            SkipReason::Grad { name } => write!(f, "non-finite gradient of `{name}`"),
            SkipReason::OtherRank { rank } => {
                write!(f, "non-finite loss, gradient or update on rank {rank}")
            }
            SkipReason::Update { name } => write!(
                f,
                "the update of `{name}` would make it or its moments non-finite (nothing changed)"
            ),
        }
    }
}

/// `Some(reason)` when the (scalar) loss is not finite.
pub fn check_loss(loss: &Tensor) -> Result<Option<SkipReason>> {
    if loss.elem_count() != 1 {
        return Err(Error::shape("loss", "a scalar", loss.dims()));
    }
    let value = loss.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
    Ok((!value.is_finite()).then_some(SkipReason::Loss { value }))
}

/// `Some(reason)` when a gradient norm is not finite (cheap: no tensor is read).
pub fn check_grad_norm(norm: f64) -> Option<SkipReason> {
    (!norm.is_finite()).then_some(SkipReason::GradNorm { value: norm })
}

/// `Some(reason)` naming the first parameter (in `params` order) whose gradient holds a NaN or an
/// infinity; parameters without a gradient are skipped. One host read for all parameters.
pub fn check_grads(grads: &GradStore, params: &[(String, Var)]) -> Result<Option<SkipReason>> {
    let mut names = Vec::new();
    let mut flags = Vec::new();
    for (name, var) in params {
        if let Some(g) = grads.get(var) {
            // x - x is exactly 0 for finite x and NaN for NaN or ±inf, so the sum is 0 iff all are
            // finite (a plain sum could overflow to inf on large finite values).
            let g = g.to_dtype(DType::F32)?;
            flags.push(g.sub(&g)?.sum_all()?.reshape(1)?);
            names.push(name);
        }
    }
    if flags.is_empty() {
        return Ok(None);
    }
    let flags = Tensor::cat(&flags, 0)?.to_vec1::<f32>()?;
    Ok(flags
        .iter()
        .position(|x| !x.is_finite() || *x != 0.0)
        .map(|i| SkipReason::Grad {
            name: names[i].clone(),
        }))
}

/// Loss first, then gradients: the reason to skip this step, if any.
pub fn check_step(
    loss: &Tensor,
    grads: &GradStore,
    params: &[(String, Var)],
) -> Result<Option<SkipReason>> {
    match check_loss(loss)? {
        Some(r) => Ok(Some(r)),
        None => check_grads(grads, params),
    }
}

/// Counts skipped steps and gives up after too many in a row (a diverged run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepGuard {
    /// Consecutive skips tolerated before [`StepGuard::record`] returns an error.
    pub max_consecutive: usize,
    consecutive: usize,
    total: usize,
}

impl StepGuard {
    /// A guard that fails after `max_consecutive` skips in a row.
    pub fn new(max_consecutive: usize) -> Self {
        Self {
            max_consecutive,
            consecutive: 0,
            total: 0,
        }
    }

    /// Records a step's verdict; `Err(Error::NonFinite)` once more than `max_consecutive` steps in
    /// a row were skipped. Returns whether the step should be skipped.
    pub fn record(&mut self, verdict: Option<&SkipReason>) -> Result<bool> {
        let Some(reason) = verdict else {
            self.consecutive = 0;
            return Ok(false);
        };
        self.consecutive += 1;
        self.total += 1;
        if self.consecutive > self.max_consecutive {
            return Err(Error::NonFinite {
                what: format!("{} consecutive steps, last: {reason}", self.consecutive),
            });
        }
        Ok(true)
    }

    /// Steps skipped so far.
    pub fn skipped(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads_of(vals: &[(&str, Vec<f32>)]) -> (Vec<(String, Var)>, GradStore) {
        let dev = Device::Cpu;
        let params: Vec<(String, Var)> = vals
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    Var::zeros(v.len(), DType::F32, &dev).unwrap(),
                )
            })
            .collect();
        let mut loss = Tensor::new(0f32, &dev).unwrap();
        for ((_, v), (_, g)) in params.iter().zip(vals) {
            let g = Tensor::new(g.as_slice(), &dev).unwrap();
            loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        (params, grads)
    }

    #[test]
    fn flags_nan_and_inf_gradients_by_name() {
        let (p, g) = grads_of(&[
            ("a", vec![1.0, 2.0]),
            ("b", vec![3.0e38, f32::NAN]),
            ("c", vec![f32::INFINITY]),
        ]);
        assert_eq!(
            check_grads(&g, &p).unwrap(),
            Some(SkipReason::Grad { name: "b".into() })
        );
        let (p, g) = grads_of(&[("a", vec![3.0e38, 3.0e38]), ("c", vec![f32::NEG_INFINITY])]);
        assert_eq!(
            check_grads(&g, &p).unwrap(),
            Some(SkipReason::Grad { name: "c".into() })
        );
        let (p, g) = grads_of(&[("a", vec![3.0e38, 3.0e38, -1.0])]);
        assert_eq!(check_grads(&g, &p).unwrap(), None);
    }

    #[test]
    fn flags_loss_and_norm() {
        let dev = Device::Cpu;
        let r = check_loss(&Tensor::new(f32::NAN, &dev).unwrap()).unwrap();
        assert!(matches!(r, Some(SkipReason::Loss { value }) if value.is_nan()));
        assert_eq!(
            check_loss(&Tensor::new(&[2.5f32], &dev).unwrap()).unwrap(),
            None
        );
        assert_eq!(
            check_grad_norm(f64::INFINITY),
            Some(SkipReason::GradNorm {
                value: f64::INFINITY
            })
        );
        assert_eq!(check_grad_norm(3.0), None);
        let (p, g) = grads_of(&[("w", vec![f32::NAN])]);
        let r = check_step(&Tensor::new(1f32, &dev).unwrap(), &g, &p)
            .unwrap()
            .unwrap();
        assert_eq!(r.to_string(), "non-finite gradient of `w`");
    }

    #[test]
    fn guard_gives_up_after_too_many_skips() {
        let mut guard = StepGuard::new(2);
        let nan = SkipReason::Loss { value: f64::NAN };
        assert!(guard.record(Some(&nan)).unwrap());
        assert!(!guard.record(None).unwrap());
        assert!(guard.record(Some(&nan)).unwrap());
        assert!(guard.record(Some(&nan)).unwrap());
        assert!(matches!(
            guard.record(Some(&nan)),
            Err(Error::NonFinite { .. })
        ));
        assert_eq!(guard.skipped(), 4);
    }
}
