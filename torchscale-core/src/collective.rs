//! Collectives over the ranks of a distributed run: the seam between training code (data
//! parallel gradients, ZeRO-1 shards, expert-parallel MoE) and a real engine (MPI on CPUs, NCCL
//! on GPUs), which implement [`Collective`] in their own crates behind cargo features.
//!
//! Every rank calls the same collectives in the same order with matching shapes; a backend
//! checks what it can and returns [`Error::Collective`] naming the operation and the rank. A
//! rank that fails between collectives must call [`Collective::abort`] (or let the backend's
//! timeout fire), so that the other ranks stop with an error instead of waiting forever.
//!
//! Results are fresh tensors outside the autograd graph: gradient buckets and optimizer shards
//! need no backward, and the expert-parallel all-to-all wraps [`Collective::all_to_all`] in its
//! own differentiable op.

use candle_core::Tensor;

use crate::{Error, Result};

/// A communicator: `world_size` ranks, this one `rank`.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// The engine's name (`local`, `mpi`, `nccl`), for logs.
    fn backend(&self) -> &'static str;

    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// The element-wise sum of `t` over all ranks (same shape and dtype on every rank). f32 on
    /// every backend; bf16 where the engine reduces it natively (others return an error naming
    /// the dtype).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Every rank's `t` (same shape on every rank) concatenated along dimension 0, in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;

    /// `t` has `world_size * n` rows (dimension 0); returns block `rank` (`n` rows) of the sum of
    /// `t` over all ranks.
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Sends `chunks[r]` to rank `r` and returns the chunk received from each rank, in rank
    /// order. Chunks may have different numbers of rows (dimension 0; routing is uneven) but the
    /// same trailing dimensions and dtype; a chunk may have zero rows.
    fn all_to_all(&self, chunks: &[Tensor]) -> Result<Vec<Tensor>>;

    /// `root`'s `t`, on every rank (`t` gives the shape and dtype on the others).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Called by a rank that cannot go on: the other ranks' pending and future collectives fail
    /// (or, with MPI, the whole job ends) with a message that names this rank and `reason`, so
    /// that nobody waits forever.
    fn abort(&self, reason: &str);
}

/// One process: every collective is the identity (what a run without a launcher uses).
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn backend(&self) -> &'static str {
        "single"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.copy()?)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.copy()?)
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.copy()?)
    }
    fn all_to_all(&self, chunks: &[Tensor]) -> Result<Vec<Tensor>> {
        if chunks.len() != 1 {
            return Err(Error::Collective {
                op: "all_to_all".into(),
                rank: 0,
                reason: format!("one rank needs 1 chunk, got {}", chunks.len()),
            });
        }
        Ok(vec![chunks[0].copy()?])
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root != 0 {
            return Err(Error::Collective {
                op: "broadcast".into(),
                rank: 0,
                reason: format!("root {root} >= world size 1"),
            });
        }
        Ok(t.copy()?)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _reason: &str) {}
}
