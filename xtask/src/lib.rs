//! The workflows of torchscale-rs (parity checks, benchmarks, experiments, the CUDA build), as a
//! library so that tests can drive them.

pub mod admin_case;
pub mod bench;
pub mod cli;
pub mod clip_case;
pub mod cuda;
pub mod deepnet;
pub mod experiment;
pub mod export_check;
pub mod fuzz;
pub mod golden;
pub mod grad_case;
pub mod parity;
pub mod paths;
pub mod scaling;
pub mod sparseclip;
pub mod stability;

// README.md's Rust snippets, compiled and run as doctests (`cargo test -p xtask --doc`) so that
// they cannot rot; xtask depends on every crate they use.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
