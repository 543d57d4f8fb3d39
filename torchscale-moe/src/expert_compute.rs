//! How a single-process MoE layer runs its experts on their exact token rows: two grouped matrix
//! products over all experts at once ([`crate::grouped`], the default), or one feed-forward call
//! per expert. Neither pads a batch to a capacity.
//!
//! The choice is process-wide, because layers are built deep inside models: set it with
//! [`set_expert_compute`] or `TORCHSCALE_MOE_EXPERTS=loop|grouped` in the environment. Grouped is
//! the default: in whole training steps it ran 1.05-1.23x faster than the loop at 8 and 64
//! experts, although it stacks every expert's weights at each call (BENCHMARKS.md, "Routing").
//! Both give the same values and gradients; with dropout on, the grouped form draws one mask
//! over all rows instead of one per expert (same distribution, different draws).

use std::sync::atomic::{AtomicU8, Ordering};

/// The expert computation of single-process MoE layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertCompute {
    /// Each expert's feed-forward on its own rows, one after the other.
    Loop,
    /// Two grouped matrix products (`fc1`, `fc2`) over the stacked weights of all experts.
    #[default]
    Grouped,
}

// 0: not decided yet (read the environment), 1: loop, 2: grouped.
static CHOICE: AtomicU8 = AtomicU8::new(0);

/// Sets the expert computation for every single-process MoE layer of this process.
pub fn set_expert_compute(c: ExpertCompute) {
    CHOICE.store(
        match c {
            ExpertCompute::Loop => 1,
            ExpertCompute::Grouped => 2,
        },
        Ordering::Relaxed,
    );
}

/// The expert computation in force: the last [`set_expert_compute`], else
/// `TORCHSCALE_MOE_EXPERTS` (`grouped` or `loop`), else grouped.
pub fn expert_compute() -> ExpertCompute {
    match CHOICE.load(Ordering::Relaxed) {
        1 => ExpertCompute::Loop,
        2 => ExpertCompute::Grouped,
        _ => {
            let c = match std::env::var("TORCHSCALE_MOE_EXPERTS").as_deref() {
                Ok("loop") => ExpertCompute::Loop,
                _ => ExpertCompute::Grouped,
            };
            set_expert_compute(c);
            c
        }
    }
}
