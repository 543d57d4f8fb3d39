//! # torchscale-models
//!
//! torchscale's `Encoder`, `Decoder` and `EncoderDecoder`, composed from the technique crates of
//! torchscale-rs: configs with torchscale's field names and defaults (a torchscale config JSON loads
//! as is), weights under torchscale's state_dict names (checkpoints move between the two
//! implementations unchanged), incremental decoding, and the pieces to train them.
//!
//! Which stabiliser a stack uses follows torchscale's flags (`deepnorm`, `subln` — the default —,
//! `*_normalize_before`), plus our `admin` extension; see [`config::Technique`].
//!
//! **Per-layer choices.** A layer is a sequence of sites, each a `Residual` around a `Sublayer`
//! ([`layer::Layer`], [`layer::SiteBlock`]); torchscale's layout is one way to fill it
//! ([`layer::torchscale_layout`]). A config may give ranges of layers another technique
//! (`layer_techniques`, e.g. Mix-LN), list the MoE layers (`moe_layers`) and choose routers
//! (`moe_router`, `moe_layer_routers`); these extension fields stay out of the JSON at their
//! defaults. What a config cannot name — a stabiliser, router or sublayer written in user code —
//! goes in through [`BuildOptions::hooks`] ([`StackHooks`]).
//!
//! **One dependency.** [`prelude`] brings the models, their configs and inputs, [`ParamStore`],
//! the traits of `torchscale-core` and candle's everyday types in one `use`; the crate root
//! re-exports [`Error`], [`Result`], candle ([`candle_core`], [`candle_nn`]) and the technique
//! crates ([`torchscale_core`], [`torchscale_norm`], [`torchscale_admin`], [`torchscale_moe`],
//! [`torchscale_clip`]), so that no second torchscale or candle dependency is needed.
//!
//! ```
//! use torchscale_models::prelude::*;
//!
//! # fn main() -> torchscale_models::Result<()> {
//! // A small Magneto (Sub-LN) decoder LM, the torchscale default technique.
//! let config = DecoderConfig::new()
//!     .with_vocab_size(100).with_embed_dim(32).with_heads(4).with_ffn_dim(64).with_layers(2);
//! let store = ParamStore::new(0);
//! let model = Decoder::new(&config, &BuildOptions::default(), store.var_builder(DType::F32, &Device::Cpu))?;
//! let tokens = Tensor::new(&[[2u32, 17, 42, 5]], &Device::Cpu)?;
//! let logits = model.forward(&tokens, &DecoderInputs::default())?.x;
//! assert_eq!(logits.dims(), &[1, 4, 100]);
//! assert_eq!(model.stabilizer().name(), "subln");
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod build;
pub mod checkpoint;
pub mod checkpoint_dir;
pub mod config;
pub mod data;
pub mod decoder;
pub mod embed;
pub mod encoder;
pub mod encoder_decoder;
pub mod layer;
pub mod lm;
pub mod pretrained;
pub mod randomness;
pub mod spec;
pub mod train;

pub use build::{BuildOptions, StackHooks};
pub use config::{
    DecoderConfig, EncoderConfig, EncoderDecoderConfig, LayerRouter, LayerTechnique, Technique,
};
pub use data::ByteCorpus;
pub use decoder::{Decoder, DecoderInputs, DecoderOutput, IncrementalState, Memory};
pub use encoder::{Encoder, EncoderInputs, EncoderOutput};
pub use encoder_decoder::EncoderDecoder;
pub use lm::LanguageModel;
pub use pretrained::{convert_pt, ModelClass};
pub use train::Trainer;

// So that this crate is the only dependency a user needs.
pub use candle_core;
pub use candle_nn;
pub use torchscale_admin;
pub use torchscale_clip;
pub use torchscale_core;
pub use torchscale_core::init::ParamStore;
pub use torchscale_core::{Error, Result};
pub use torchscale_moe;
pub use torchscale_norm;

/// The models, their configs, inputs and outputs, [`ParamStore`], the traits of
/// `torchscale-core` and candle's everyday types, for `use torchscale_models::prelude::*`
/// ([`Error`] and [`Result`] stay at the crate root, so that the standard `Result` is not
/// shadowed).
pub mod prelude {
    pub use crate::{
        BuildOptions, ByteCorpus, Decoder, DecoderConfig, DecoderInputs, DecoderOutput, Encoder,
        EncoderConfig, EncoderDecoder, EncoderDecoderConfig, EncoderInputs, EncoderOutput,
        IncrementalState, LanguageModel, Memory, Technique, Trainer,
    };
    pub use torchscale_core::prelude::*;
}

// The README's examples compile and run as doctests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
