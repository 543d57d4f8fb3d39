//! bf16 (or f16) mixed precision with f32 master weights.
//!
//! The mechanism is a `VarBuilder` backend over a [`ParamStore`]: every variable is created
//! and kept in f32 (the master copy the optimiser updates), and what a layer receives is its
//! differentiable cast to the compute dtype, so gradients flow back to the f32 variable.
//! Norm parameters (names containing `norm`) are handed out in f32: the composed
//! [`torchscale_core::layer_norm::LayerNorm`] normalises in f32 whatever its input dtype, and
//! attention uses `softmax_f32`, so norms and softmax run in f32 while matmuls run in bf16.
//! The router's gating is f32 too (`gating_use_fp32`).

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use torchscale_core::init::ParamStore;

/// Whether parameter `name` stays f32 under mixed precision.
pub fn keeps_f32(name: &str) -> bool {
    name.contains("norm")
}

/// A `VarBuilder` whose variables live in `store` as f32 and are handed out cast to
/// `compute` (except [`keeps_f32`] names).
pub fn mixed_var_builder(
    store: &ParamStore,
    compute: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(MixedBackend {
            store: store.clone(),
            compute,
        }),
        compute,
        device.clone(),
    )
}

struct MixedBackend {
    store: ParamStore,
    compute: DType,
}

impl SimpleBackend for MixedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        _dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let master = SimpleBackend::get(&self.store, s, name, h, DType::F32, dev)?;
        if keeps_f32(name) {
            Ok(master)
        } else {
            master.to_dtype(self.compute)
        }
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let master = self.store.get_unchecked(name, DType::F32, dev)?;
        if keeps_f32(name) {
            Ok(master)
        } else {
            master.to_dtype(self.compute)
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.store.contains_tensor(name)
    }
}
