//! Process settings for training binaries: call [`one_compute_pool`] first thing in `main`.
//!
//! candle 0.11 runs its element-wise ops on a pool of its own (`candle-bp-*` threads) whose
//! workers spin 25,000 iterations after each op, while the fused kernels here and the matrix
//! products run on rayon's pool. On a small machine the two pools fight over the cores: on the
//! 2-core build machine the DeepNorm encoder of `cargo xtask bench train` took 0.53 s per step
//! with both pools and 0.40 s with candle's pool reduced to the calling thread, while the 48-layer
//! decoder was unchanged (0.048 s either way). The remaining candle element-wise ops (residual
//! sums, gradient accumulation) then run on the calling thread.

/// Gives candle's element-wise pool a single thread (the caller's) unless `CANDLE_NUM_THREADS` is
/// already set, so that rayon's pool alone computes in parallel. Must run before the first
/// candle op (candle reads the variable once); returns whether it set the variable.
pub fn one_compute_pool() -> bool {
    if std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return false;
    }
    // Called at the start of `main`, before any other thread exists.
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    true
}

/// Runs `f` on one of rayon's workers and returns its result (directly when already on one).
///
/// Run a training step or loop this way: the kernels then split their work by pushing it to the
/// worker's own queue, where the other workers steal it, instead of handing every parallel
/// section from a foreign thread to the pool and waking a worker for it; that lets them split
/// much smaller work (a 256 x 64 x 256 product ran 1.7x faster on two threads from a worker, and
/// no faster from outside the pool). Thread-local state set before the call (such as
/// `torchscale_core::dropout::seed_dropout`) is not seen inside; seed inside `f`.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}
