//! A hand-built or buggy routing is a typed error in dispatch, never a division by zero or an
//! index out of bounds.

use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_core::{Error, RouteOptions, Routing};
use torchscale_moe::dispatch::{dense_combine, dense_dispatch_mask};
use torchscale_moe::{ChoiceStatus, DispatchPlan, MoeConfig, MoeLayer};

/// A real top-2 routing of 10 tokens over 4 experts.
fn routing() -> Routing {
    let cfg = MoeConfig {
        embed_dim: 8,
        ffn_dim: 12,
        num_experts: 4,
        ..Default::default()
    }
    .validated()
    .unwrap();
    let store = ParamStore::new(3);
    let layer = MoeLayer::new(cfg, 1.0, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let x = Tensor::ones((10, 8), DType::F32, &Device::Cpu).unwrap();
    let opts = RouteOptions {
        seed: Some(1),
        ..Default::default()
    };
    layer.forward(&x, &opts).unwrap().routing
}

/// All three entry points reject `r` with an `Error::Invalid` or `Error::Shape` on the routing.
fn rejected(what: &str, r: &Routing) {
    let errs = [
        DispatchPlan::new(r).map(|_| ()).unwrap_err(),
        dense_dispatch_mask(r, DType::F32).map(|_| ()).unwrap_err(),
        dense_combine(r).map(|_| ()).unwrap_err(),
    ];
    for e in errs {
        assert!(
            matches!(&e, Error::Invalid { what, .. } | Error::Shape { what, .. } if what.starts_with("routing")),
            "{what}: {e}"
        );
    }
}

#[test]
fn a_valid_routing_dispatches() {
    let r = routing();
    assert!(r.status.iter().any(|s| s.is_kept()));
    DispatchPlan::new(&r).unwrap();
    dense_dispatch_mask(&r, DType::F32).unwrap();
    dense_combine(&r).unwrap();
}

#[test]
fn zero_choices_per_token_is_an_error() {
    let mut r = routing();
    r.k = 0;
    rejected("k = 0", &r);
}

#[test]
fn kept_choices_out_of_range_are_errors() {
    let kept = |r: &Routing| r.status.iter().position(|s| s.is_kept()).unwrap();
    let mut r = routing();
    let i = kept(&r);
    r.expert[i] = r.num_experts as u32;
    rejected("expert out of range", &r);
    let mut r = routing();
    let i = kept(&r);
    r.slot[i] = r.capacity as u32 + 3;
    rejected("slot out of range", &r);
    // A dropped choice may name any slot (it was counted before dropping).
    let mut r = routing();
    let i = kept(&r);
    r.status[i] = ChoiceStatus::DroppedByCapacity;
    r.slot[i] = r.capacity as u32 + 3;
    DispatchPlan::new(&r).unwrap();
}

#[test]
fn inconsistent_lengths_are_errors() {
    let mut r = routing();
    r.expert.pop();
    rejected("short expert list", &r);
    let mut r = routing();
    r.k = 3;
    rejected("k that does not divide the choices", &r);
    let mut r = routing();
    r.gate = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
    rejected("gate of the wrong shape", &r);
}
