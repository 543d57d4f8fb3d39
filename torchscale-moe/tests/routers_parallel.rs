//! Expert parallelism with the new routers on a real `Collective` (`LocalGroup`: ranks as
//! threads): dropless routing (whose capacity differs between ranks, so the layer agrees on the
//! buffer size first), expert choice and a router written outside the crate give the
//! single-process layer's outputs and gradients.

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_core::{Collective, LocalGroup};
use torchscale_moe::prelude::*;

use support::{hash_layer, max_diff, randn, HashRouter};

const W: usize = 2;

fn cfg(router: RouterChoice) -> MoeConfig {
    MoeConfig {
        embed_dim: 8,
        ffn_dim: 12,
        num_experts: 4,
        use_xmoe: true,
        router,
        ..Default::default()
    }
    .validated()
    .unwrap()
}

fn opts() -> RouteOptions<'static> {
    RouteOptions {
        train: true,
        ..Default::default()
    }
}

fn loss(out: &MoeOutput, r: usize) -> Tensor {
    let w = randn(500 + r as u64, out.output.dims2().unwrap());
    ((&out.output * w).unwrap().sum_all().unwrap() + &out.balance_loss).unwrap()
}

/// One rank's output, routed capacity and gradients by parameter name.
type RankRun = (Tensor, usize, HashMap<String, Tensor>);

/// Runs the parallel layer `build` makes on every rank and each rank's backward.
fn run_parallel(
    store: &ParamStore,
    xs: &[Tensor],
    build: impl Fn(Arc<dyn Collective>) -> MoeLayer + Sync,
) -> Vec<RankRun> {
    let names = store.named_vars();
    let (build, names) = (&build, &names);
    std::thread::scope(|sc| {
        let hs: Vec<_> = LocalGroup::new(W)
            .into_iter()
            .map(|g| {
                sc.spawn(move || {
                    let r = g.rank();
                    let layer = build(Arc::new(g));
                    let out = layer.forward(&xs[r], &opts()).unwrap();
                    let grads = loss(&out, r).backward().unwrap();
                    let named = names
                        .iter()
                        .filter_map(|(n, v)| {
                            grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone()))
                        })
                        .collect();
                    (out.output, out.stats.capacity, named)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The single-process layer on every rank's tokens: outputs and the gradients of the summed
/// losses; the ranks' outputs must match, each expert's gradient on its owning rank and the
/// gate's summed over ranks must match too.
fn check(store: &ParamStore, single: &MoeLayer, xs: &[Tensor], runs: &[RankRun]) {
    let mut total: Option<Tensor> = None;
    for (r, x) in xs.iter().enumerate() {
        let out = single.forward(x, &opts()).unwrap();
        let d = max_diff(&runs[r].0, &out.output);
        assert!(d < 1e-5, "rank {r}: {d}");
        let l = loss(&out, r);
        total = Some(match total {
            None => l,
            Some(t) => (t + l).unwrap(),
        });
    }
    let grads = total.unwrap().backward().unwrap();
    let per = 4 / W;
    for (name, var) in store.named_vars() {
        let want = grads.get(var.as_tensor()).expect("single-process gradient");
        let got = if let Some(j) = name.strip_prefix("experts.") {
            let j: usize = j.split('.').next().unwrap().parse().unwrap();
            runs[j / per].2[&name].clone()
        } else {
            let parts: Vec<&Tensor> = runs.iter().map(|run| &run.2[&name]).collect();
            parts[1..]
                .iter()
                .fold(parts[0].clone(), |a, b| (a + *b).unwrap())
        };
        let d = max_diff(&got, want);
        assert!(d < 1e-4, "{name}: {d}");
    }
}

#[test]
fn dropless_ranks_agree_on_the_buffer_and_match_one_process() {
    let store = ParamStore::new(21);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let c = cfg(RouterChoice::Dropless { k: 2 });
    let single = MoeLayer::new(c.clone(), 1.0, vb.clone()).unwrap();
    let xs: Vec<Tensor> = (0..W).map(|r| randn(40 + r as u64, (24, 8))).collect();
    let runs = run_parallel(&store, &xs, |comm| {
        MoeLayer::new_expert_parallel(c.clone(), 1.0, vb.clone(), comm).unwrap()
    });
    assert_ne!(runs[0].1, runs[1].1, "the ranks should route unevenly");
    check(&store, &single, &xs, &runs);
}

#[test]
fn expert_choice_ranks_match_one_process() {
    let store = ParamStore::new(22);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let c = cfg(RouterChoice::ExpertChoice {
        capacity_factor: 1.5,
    });
    let single = MoeLayer::new(c.clone(), 1.0, vb.clone()).unwrap();
    let xs: Vec<Tensor> = (0..W).map(|r| randn(50 + r as u64, (24, 8))).collect();
    let runs = run_parallel(&store, &xs, |comm| {
        MoeLayer::new_expert_parallel(c.clone(), 1.0, vb.clone(), comm).unwrap()
    });
    check(&store, &single, &xs, &runs);
}

#[test]
fn a_user_router_runs_expert_parallel() {
    let store = ParamStore::new(23);
    let c = cfg(RouterChoice::Capacity);
    let single = hash_layer(&store, c.clone());
    // The hash router keeps `Router::uniform_capacity` at its default (false), so the ranks
    // exchange their capacities first, as for any user router.
    let xs: Vec<Tensor> = (0..W).map(|r| randn(60 + r as u64, (20, 8))).collect();
    let runs = run_parallel(&store, &xs, |comm| {
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let router = HashRouter::new(8, 4, vb.pp("gate")).unwrap();
        MoeLayer::expert_parallel_with_router(c.clone(), Box::new(router), 1.0, vb, comm).unwrap()
    });
    check(&store, &single, &xs, &runs);
}
