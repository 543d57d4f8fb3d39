//! The workflows of torchscale-rs (parity checks, benchmarks, experiments, the CUDA build), as a
//! library so that tests can drive them.

pub mod admin_case;
pub mod bench;
pub mod golden;
pub mod parity;
