//! Learning-rate schedules with fairseq's formulas.
//!
//! `step` is fairseq's `num_updates`: the number of optimizer updates already done. fairseq sets
//! the rate for the next update from it, so the first update uses `lr(0)`.

use torchscale_core::{Error, Result};

/// A learning rate as a function of the number of completed updates.
pub trait LrSchedule {
    /// The rate for the update that follows `step` completed updates.
    fn lr(&self, step: u64) -> f64;
}

/// fairseq `inverse_sqrt`: linear warm-up from `warmup_init_lr` to `lr` over `warmup_updates`,
/// then `lr * sqrt(warmup_updates / step)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InverseSqrt {
    /// Peak rate, reached at the end of warm-up.
    pub lr: f64,
    /// Warm-up length in updates. With 0 the decay is `lr / sqrt(max(step, 1))` (fairseq's
    /// formula would give 0 there).
    pub warmup_updates: u64,
    /// Rate at step 0; fairseq's default is 0 (SPEC 7.3 suggests 1e-7).
    pub warmup_init_lr: f64,
}

impl InverseSqrt {
    /// Warm-up from 0 to `lr` over `warmup_updates`, as fairseq's defaults.
    pub fn new(lr: f64, warmup_updates: u64) -> Self {
        Self {
            lr,
            warmup_updates,
            warmup_init_lr: 0.0,
        }
    }
}

/// Published settings (SPEC.md sections 6 and 7).
impl InverseSqrt {
    /// fairseq's IWSLT recipe used in the DeepNet instability study: peak 5e-4 after 4,000
    /// warm-up updates starting from 1e-7.
    pub fn deepnet_iwslt() -> Self {
        Self {
            warmup_init_lr: 1e-7,
            ..Self::new(5e-4, 4000)
        }
    }

    /// DeepNet's large-batch WMT recipe: peak 1.5e-3, 4,000 warm-up updates.
    pub fn deepnet_wmt_huge() -> Self {
        Self {
            warmup_init_lr: 1e-7,
            ..Self::new(1.5e-3, 4000)
        }
    }

    /// admin-torch's regular-batch WMT recipe: peak 1e-3, 8,000 warm-up updates.
    pub fn admin_wmt_regular() -> Self {
        Self {
            warmup_init_lr: 1e-7,
            ..Self::new(1e-3, 8000)
        }
    }
}

impl LrSchedule for InverseSqrt {
    fn lr(&self, step: u64) -> f64 {
        let w = self.warmup_updates;
        if w == 0 {
            return self.lr / (step.max(1) as f64).sqrt();
        }
        if step < w {
            self.warmup_init_lr + (self.lr - self.warmup_init_lr) * step as f64 / w as f64
        } else {
            self.lr * (w as f64).sqrt() / (step as f64).sqrt()
        }
    }
}

/// fairseq `polynomial_decay`: linear warm-up from 0 to `lr` over `warmup_updates`, then
/// `(lr - end_lr) * (1 - (step - warmup) / (total - warmup))^power + end_lr`, and `end_lr` from
/// `total_updates` on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolynomialDecay {
    /// Peak rate.
    pub lr: f64,
    /// Warm-up length in updates.
    pub warmup_updates: u64,
    /// Update at which the rate reaches `end_lr`; must exceed `warmup_updates`.
    pub total_updates: u64,
    /// Final rate (fairseq's `end_learning_rate`, default 0).
    pub end_lr: f64,
    /// Exponent (1 = linear decay).
    pub power: f64,
}

impl PolynomialDecay {
    /// Checks `total_updates > warmup_updates` (the decay divides by their difference).
    pub fn new(
        lr: f64,
        warmup_updates: u64,
        total_updates: u64,
        end_lr: f64,
        power: f64,
    ) -> Result<Self> {
        if total_updates <= warmup_updates {
            return Err(Error::config(
                "total_num_update",
                format!("must exceed warmup_updates ({warmup_updates}), got {total_updates}"),
            ));
        }
        Ok(Self {
            lr,
            warmup_updates,
            total_updates,
            end_lr,
            power,
        })
    }
}

impl LrSchedule for PolynomialDecay {
    fn lr(&self, step: u64) -> f64 {
        let w = self.warmup_updates;
        if w > 0 && step <= w {
            self.lr * step as f64 / w as f64
        } else if step >= self.total_updates {
            self.end_lr
        } else {
            let left = 1.0 - (step - w) as f64 / (self.total_updates - w) as f64;
            (self.lr - self.end_lr) * left.powf(self.power) + self.end_lr
        }
    }
}

/// A schedule chosen at run time (from a config or a command line).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// The same rate at every step.
    Constant(f64),
    /// See [`InverseSqrt`].
    InverseSqrt(InverseSqrt),
    /// See [`PolynomialDecay`].
    Polynomial(PolynomialDecay),
}

impl LrSchedule for Schedule {
    fn lr(&self, step: u64) -> f64 {
        match self {
            Schedule::Constant(lr) => *lr,
            Schedule::InverseSqrt(s) => s.lr(step),
            Schedule::Polynomial(s) => s.lr(step),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12 * b.abs().max(1e-12), "{a} vs {b}");
    }

    #[test]
    fn inverse_sqrt_values() {
        let s = InverseSqrt::new(5e-4, 4000);
        close(s.lr(0), 0.0);
        close(s.lr(2000), 2.5e-4);
        close(s.lr(4000), 5e-4);
        close(s.lr(16000), 2.5e-4);
        // 5e-4 * sqrt(4000 / 64000) = 5e-4 / 4
        close(s.lr(64000), 1.25e-4);
    }

    #[test]
    fn inverse_sqrt_warmup_init() {
        let s = InverseSqrt {
            warmup_init_lr: 1e-7,
            ..InverseSqrt::new(5e-4, 4000)
        };
        close(s.lr(0), 1e-7);
        // 1e-7 + (5e-4 - 1e-7) / 2
        close(s.lr(2000), 2.5005e-4);
        let s = InverseSqrt::new(1e-3, 0);
        close(s.lr(0), 1e-3);
        close(s.lr(4), 5e-4);
    }

    #[test]
    fn paper_recipes() {
        let s = InverseSqrt::deepnet_iwslt();
        close(s.lr(0), 1e-7);
        close(s.lr(4000), 5e-4);
        // 5e-4 * sqrt(4000 / 10000)
        close(s.lr(10000), 5e-4 * 0.4f64.sqrt());
        close(InverseSqrt::deepnet_wmt_huge().lr(4000), 1.5e-3);
        close(InverseSqrt::deepnet_wmt_huge().lr(16000), 7.5e-4);
        close(InverseSqrt::admin_wmt_regular().lr(8000), 1e-3);
        close(InverseSqrt::admin_wmt_regular().lr(32000), 5e-4);
    }

    #[test]
    fn polynomial_values() {
        let s = PolynomialDecay::new(1e-3, 100, 1100, 1e-4, 1.0).unwrap();
        close(s.lr(50), 5e-4);
        close(s.lr(100), 1e-3);
        // (1e-3 - 1e-4) * (1 - 500/1000) + 1e-4
        close(s.lr(600), 5.5e-4);
        close(s.lr(1100), 1e-4);
        close(s.lr(5000), 1e-4);
        let s = PolynomialDecay::new(1e-3, 0, 1000, 0.0, 2.0).unwrap();
        // 1e-3 * (1 - 0.5)^2
        close(s.lr(500), 2.5e-4);
        assert!(PolynomialDecay::new(1e-3, 10, 10, 0.0, 1.0).is_err());
    }

    #[test]
    fn enum_dispatch() {
        close(Schedule::Constant(3e-4).lr(12345), 3e-4);
        close(
            Schedule::InverseSqrt(InverseSqrt::new(5e-4, 4000)).lr(16000),
            2.5e-4,
        );
    }
}
