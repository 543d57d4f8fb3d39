//! The MoE layer on 2048 tokens of width 128 with 8 experts (ffn 256): routing alone, and the
//! whole layer (route, index dispatch, experts, combine) forward and backward, top-1 against
//! top-2 X-MoE routing.
//!
//! `cargo bench -p torchscale-moe --bench dispatch`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use torchscale_moe::candle_core::Var;
use torchscale_moe::prelude::*;

const TOKENS: usize = 2048;
const C: usize = 128;

fn layer(top1: bool) -> MoeLayer {
    let cfg = MoeConfig {
        embed_dim: C,
        ffn_dim: 2 * C,
        num_experts: 8,
        top1,
        use_xmoe: true,
        ..Default::default()
    }
    .validated()
    .expect("config");
    let store = ParamStore::new(0);
    MoeLayer::new(cfg, 1.0, store.var_builder(DType::F32, &Device::Cpu)).expect("layer")
}

fn moe(c: &mut Criterion) {
    let x = Var::randn(0f32, 1.0, (TOKENS, C), &Device::Cpu).expect("input");
    let opts = RouteOptions {
        train: true,
        seed: Some(1),
        ..Default::default()
    };
    let mut g = c.benchmark_group("moe 2048x128, 8 experts");
    for (name, top1) in [("top1", true), ("top2", false)] {
        let moe = layer(top1);
        g.bench_function(BenchmarkId::new("route", name), |b| {
            b.iter(|| moe.router().route(x.as_tensor(), &opts).expect("route"))
        });
        g.bench_function(BenchmarkId::new("layer fwd+bwd", name), |b| {
            b.iter(|| {
                let out = moe.forward(x.as_tensor(), &opts).expect("forward");
                let loss = (out.output.sum_all().expect("sum") + out.balance_loss).expect("loss");
                loss.backward().expect("backward")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, moe);
criterion_main!(benches);
