//! torchscale-models (being written).
#![allow(missing_docs)]
pub mod build;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod embed;
pub mod encoder;
pub mod encoder_decoder;
pub mod layer;
pub mod spec;
pub mod train;
