//! # torchscale-dist
//!
//! Collective backends for torchscale-rs: implementations of [`torchscale_core::Collective`] on
//! the engines distributed training runs on, each behind a cargo feature that is off by default
//! (the default build needs neither MPI nor CUDA):
//!
//! - **`mpi`**: `MpiCollective`, on the `mpi` crate (rsmpi 0.8) and the system's MPI library
//!   (OpenMPI on Debian: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`). CPU
//!   tensors.
//! - **`nccl`**: `NcclCollective`, NCCL through cudarc (candle's `nccl` feature) for CUDA
//!   tensors, one GPU per rank, its unique id broadcast and every call checked over MPI. Built
//!   by `cargo xtask cuda build` (CUDA toolkit and libnccl from PyPI); its test needs 2 GPUs.
//!
//! For tests without a launcher, `torchscale_core::LocalGroup` runs W ranks as threads of one
//! process; it is a test double, not a backend to train with.
//!
//! ## Running under mpirun
//!
//! ```text
//! cargo build --release -p torchscale-models --features mpi --example train_lm
//! mpirun -np 2 --oversubscribe -x RAYON_NUM_THREADS=1 -x CANDLE_NUM_THREADS=1 \
//!     target/release/examples/train_lm ...
//! ```
//!
//! Each process calls `MpiCollective::init` once (it finalises MPI when dropped). As root (in a
//! container) OpenMPI also needs `--allow-run-as-root`; `--oversubscribe` lets more ranks than
//! cores start; `-x NAME=VALUE` sets a variable in every rank (one compute thread per rank when
//! ranks share a machine's cores). [`launched_by_mpirun`] tells a program whether it runs
//! under mpirun. A rank that calls [`torchscale_core::Collective::abort`] or panics ends the
//! whole job: mpirun exits non-zero and stderr names the rank and the reason.
#![warn(missing_docs)]

pub mod header;
#[cfg(feature = "mpi")]
mod mpi_collective;
#[cfg(feature = "nccl")]
mod nccl_collective;

#[cfg(feature = "mpi")]
pub use mpi_collective::MpiCollective;
#[cfg(feature = "nccl")]
pub use nccl_collective::{local_rank, NcclCollective};

/// Whether this process was started by a launcher: OpenMPI's `mpirun` (it sets
/// `OMPI_COMM_WORLD_SIZE`) or another PMI launcher (`PMI_SIZE`, MPICH and Slurm).
pub fn launched_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}
