//! The router plug-in seam: dropless top-k, expert choice and a router written here (a fixed
//! hash router) run in `MoeLayer`; outputs equal `Σ gate · expert(x)` computed row by row,
//! gradients reach every expert and the gate; `RouterChoice` round-trips through JSON and its
//! validation names the field.

// Token and expert indices index several parallel tables at once.
#![allow(clippy::needless_range_loop)]

mod support;

use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_moe::prelude::*;
use torchscale_moe::{ChoiceStatus, Gate};

use support::{hash_layer, max_diff, randn, HashRouter};

const S: usize = 64;
const E: usize = 4;

fn cfg(use_xmoe: bool, router: RouterChoice) -> MoeConfig {
    MoeConfig {
        embed_dim: 8,
        ffn_dim: 12,
        num_experts: E,
        use_xmoe,
        router,
        ..Default::default()
    }
    .validated()
    .unwrap()
}

fn layer(cfg: MoeConfig, seed: u64) -> (ParamStore, MoeLayer) {
    let store = ParamStore::new(seed);
    let layer = MoeLayer::new(cfg, 1.0, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    (store, layer)
}

fn opts(padding: Option<&Tensor>) -> RouteOptions<'_> {
    RouteOptions {
        train: true,
        padding,
        ..Default::default()
    }
}

/// `out[s] = Σ_kept gate[s, j] · expert_{e_j}(x[s])`, one row and one expert call at a time.
fn reference(layer: &MoeLayer, x: &Tensor, r: &Routing) -> Tensor {
    let gate = r
        .gate
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let rows: Vec<Tensor> = (0..x.dim(0).unwrap())
        .map(|s| {
            let xs = x.narrow(0, s, 1).unwrap();
            let mut acc = xs.zeros_like().unwrap().to_dtype(DType::F64).unwrap();
            for j in 0..r.k {
                if r.is_kept(s, j) {
                    let e = r.expert[s * r.k + j] as usize;
                    let y = layer.experts()[e].forward(&xs, false).unwrap();
                    acc = (acc + (y.to_dtype(DType::F64).unwrap() * gate[s][j]).unwrap()).unwrap();
                }
            }
            acc
        })
        .collect();
    Tensor::cat(&rows, 0).unwrap().to_dtype(DType::F32).unwrap()
}

/// Backprops a fixed projection of the output plus the balance loss; every parameter of the
/// store (gate and experts) must get a nonzero finite gradient.
fn assert_every_param_trained(store: &ParamStore, out: &MoeOutput) {
    let w = randn(99, out.output.dims2().unwrap());
    let loss = ((&out.output * w).unwrap().sum_all().unwrap() + &out.balance_loss).unwrap();
    let grads = loss.backward().unwrap();
    let names = store.named_vars();
    assert!(names.iter().any(|(n, _)| n.starts_with("gate.")));
    for (name, var) in names {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(v.iter().any(|x| *x != 0.0), "{name}: zero gradient");
    }
}

#[test]
fn dropless_keeps_every_choice_and_matches_the_reference() {
    for use_xmoe in [false, true] {
        for k in [1, 2, 3] {
            let (store, layer) = layer(cfg(use_xmoe, RouterChoice::Dropless { k }), 5);
            assert_eq!(layer.router().name(), format!("dropless-top{k}"));
            assert_eq!(layer.router().top_k(), k);
            assert!(layer.moe_router().is_none());
            assert!(matches!(
                (layer.gate(), use_xmoe),
                (Some(Gate::XMoe(_)), true) | (Some(Gate::Linear(_)), false)
            ));
            let x = randn(k as u64, (S, 8));
            let out = layer.forward(&x, &opts(None)).unwrap();
            let r = &out.routing;
            assert_eq!(r.k, k);
            assert!(r.status.iter().all(|s| *s == ChoiceStatus::Kept));
            let probs = r.probs.to_vec2::<f32>().unwrap();
            for s in 0..S {
                let ex = &r.expert[s * k..(s + 1) * k];
                let mut distinct = ex.to_vec();
                distinct.dedup();
                assert_eq!(distinct.len(), k, "token {s}: {ex:?}");
                // In probability order.
                assert!(ex
                    .windows(2)
                    .all(|w| probs[s][w[0] as usize] >= probs[s][w[1] as usize]));
            }
            let st = &out.stats;
            assert_eq!(st.dropped, 0);
            assert_eq!(st.tokens_without_expert, 0);
            assert_eq!(st.tokens_per_expert.iter().sum::<usize>(), S * k);
            assert_eq!(st.capacity, *st.tokens_per_expert.iter().max().unwrap());
            assert!(st.tokens_per_expert.iter().all(|&n| n > 0), "{st:?}");
            // Combine weights: renormalised top-k for k >= 2, the raw probability for k = 1.
            let g = r.gate.to_vec2::<f32>().unwrap();
            for s in 0..S {
                let p: Vec<f32> = (0..k)
                    .map(|j| probs[s][r.expert[s * k + j] as usize])
                    .collect();
                let norm = if k == 1 { 1.0 } else { p.iter().sum() };
                for j in 0..k {
                    assert!((g[s][j] - p[j] / norm).abs() < 1e-6, "token {s} choice {j}");
                }
            }
            let d = max_diff(&out.output, &reference(&layer, &x, r));
            assert!(d < 1e-5, "xmoe {use_xmoe} k {k}: {d}");
            assert!(out.balance_loss.to_scalar::<f32>().unwrap() > 0.0);
            assert_eq!(layer.renormalize_gate().unwrap(), use_xmoe);
            assert_every_param_trained(&store, &out);
        }
    }
}

#[test]
fn dropless_never_routes_padding() {
    let (_, layer) = layer(cfg(false, RouterChoice::Dropless { k: 2 }), 6);
    let x = randn(3, (S, 8));
    let pad: Vec<u8> = (0..S).map(|s| (s % 5 == 0) as u8).collect();
    let npad = pad.iter().filter(|&&p| p != 0).count();
    let pad = Tensor::from_vec(pad, S, &Device::Cpu).unwrap();
    let out = layer.forward(&x, &opts(Some(&pad))).unwrap();
    let r = &out.routing;
    for s in 0..S {
        let want = if s % 5 == 0 {
            ChoiceStatus::Padding
        } else {
            ChoiceStatus::Kept
        };
        assert_eq!(r.status[2 * s..2 * s + 2], [want, want]);
    }
    assert_eq!(
        out.stats.tokens_per_expert.iter().sum::<usize>(),
        2 * (S - npad)
    );
    let rows = out.output.to_vec2::<f32>().unwrap();
    assert!(rows
        .iter()
        .step_by(5)
        .all(|row| row.iter().all(|v| *v == 0.0)));
    assert!(max_diff(&out.output, &reference(&layer, &x, r)) < 1e-5);
}

#[test]
fn expert_choice_gives_every_expert_c_tokens() {
    for (use_xmoe, factor) in [(false, 1.0), (true, 1.0), (false, 0.3), (true, 2.5)] {
        let choice = RouterChoice::ExpertChoice {
            capacity_factor: factor,
        };
        let (store, layer) = layer(cfg(use_xmoe, choice), 7);
        assert_eq!(layer.router().name(), "expert-choice");
        assert_eq!(layer.router().top_k(), E);
        let x = randn(11, (S, 8));
        let out = layer.forward(&x, &opts(None)).unwrap();
        let r = &out.routing;
        let c = ((factor * S as f64 / E as f64).ceil() as usize).min(S);
        assert_eq!((r.k, r.capacity, out.stats.capacity), (E, c, c));
        assert_eq!(out.stats.tokens_per_expert, vec![c; E]);
        assert_eq!(out.stats.dropped, 0);
        let probs = r.probs.to_vec2::<f32>().unwrap();
        let g = r.gate.to_vec2::<f32>().unwrap();
        let mut without = 0;
        for s in 0..S {
            assert!(r.expert[s * E..(s + 1) * E].iter().copied().eq(0..E as u32));
            for j in 0..E {
                let want = if r.is_kept(s, j) { probs[s][j] } else { 0.0 };
                assert_eq!(g[s][j], want);
                if !r.is_kept(s, j) {
                    assert_eq!(r.status[s * E + j], ChoiceStatus::NotSampled);
                }
            }
            without += (0..E).all(|j| !r.is_kept(s, j)) as usize;
        }
        assert_eq!(out.stats.tokens_without_expert, without);
        // Each expert took its c most probable tokens.
        for j in 0..E {
            let worst_kept = (0..S)
                .filter(|&s| r.is_kept(s, j))
                .map(|s| probs[s][j])
                .fold(f32::INFINITY, f32::min);
            let best_left = (0..S)
                .filter(|&s| !r.is_kept(s, j))
                .map(|s| probs[s][j])
                .fold(f32::NEG_INFINITY, f32::max);
            assert!(worst_kept >= best_left, "expert {j}");
        }
        assert_eq!(out.balance_loss.dims(), &[] as &[usize]);
        assert_eq!(out.balance_loss.to_scalar::<f32>().unwrap(), 0.0);
        let d = max_diff(&out.output, &reference(&layer, &x, r));
        assert!(d < 1e-5, "xmoe {use_xmoe} factor {factor}: {d}");
        assert_every_param_trained(&store, &out);
    }
}

#[test]
fn expert_choice_runs_as_a_sublayer() {
    let choice = RouterChoice::ExpertChoice {
        capacity_factor: 1.0,
    };
    let (_, layer) = layer(cfg(true, choice), 8);
    let layer = layer.with_layer_index(3);
    let x = randn(4, (16, 8)).reshape((2, 8, 8)).unwrap();
    let mut ctx = Ctx {
        train: true,
        ..Default::default()
    };
    let y = Sublayer::forward(&layer, &x, &mut ctx).unwrap();
    assert_eq!(y.dims(), &[2, 8, 8]);
    assert_eq!(ctx.aux.len(), 1);
    assert_eq!(ctx.aux[0].layer, 3);
    assert_eq!(ctx.aux[0].stats.tokens_per_expert, vec![4; E]);
}

#[test]
fn a_router_written_here_runs_in_the_layer() {
    let store = ParamStore::new(9);
    let layer = hash_layer(&store, cfg(false, RouterChoice::Capacity));
    assert_eq!(layer.router().name(), "hash");
    assert!(layer.moe_router().is_none() && layer.gate().is_none());
    assert!(!layer.renormalize_gate().unwrap());
    let downcast = layer
        .router()
        .as_any()
        .and_then(|a| a.downcast_ref::<HashRouter>());
    assert!(downcast.is_some());
    let x = randn(12, (S, 8));
    let out = layer.forward(&x, &opts(None)).unwrap();
    let r = &out.routing;
    assert!((0..S).all(|s| r.expert[s] as usize == s % E && r.is_kept(s, 0)));
    assert_eq!(out.stats.tokens_per_expert, vec![S / E; E]);
    assert!(max_diff(&out.output, &reference(&layer, &x, r)) < 1e-5);
    assert!(store.get("gate.proj").is_some());
    assert_every_param_trained(&store, &out);
}

#[test]
fn a_router_with_the_wrong_expert_count_is_refused() {
    let store = ParamStore::new(1);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let router = HashRouter::new(8, E + 1, vb.pp("gate")).unwrap();
    let err = MoeLayer::with_router(
        cfg(false, RouterChoice::Capacity),
        Box::new(router),
        1.0,
        vb,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("router"), "{err}");
}

#[test]
fn capacity_routing_is_still_the_default() {
    let (_, layer) = layer(cfg(false, RouterChoice::default()), 2);
    assert_eq!(layer.router().name(), "gshard-top2");
    assert!(layer.moe_router().is_some());
    assert!(matches!(layer.gate(), Some(Gate::Linear(_))));
}

#[test]
fn router_choice_round_trips_through_json() {
    let cases = [
        (RouterChoice::Capacity, r#"{"kind":"capacity"}"#),
        (
            RouterChoice::Dropless { k: 2 },
            r#"{"kind":"dropless","k":2}"#,
        ),
        (
            RouterChoice::ExpertChoice {
                capacity_factor: 1.25,
            },
            r#"{"kind":"expert_choice","capacity_factor":1.25}"#,
        ),
    ];
    for (choice, json) in cases {
        assert_eq!(serde_json::to_string(&choice).unwrap(), json);
        assert_eq!(serde_json::from_str::<RouterChoice>(json).unwrap(), choice);
    }
    let cfg = cfg(false, RouterChoice::Dropless { k: 3 });
    let back: MoeConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn bad_router_choices_name_the_field() {
    let bad = [
        (RouterChoice::Dropless { k: 0 }, "router.k"),
        (RouterChoice::Dropless { k: E + 1 }, "router.k"),
        (
            RouterChoice::ExpertChoice {
                capacity_factor: 0.0,
            },
            "router.capacity_factor",
        ),
        (
            RouterChoice::ExpertChoice {
                capacity_factor: -1.0,
            },
            "router.capacity_factor",
        ),
        (
            RouterChoice::ExpertChoice {
                capacity_factor: f64::NAN,
            },
            "router.capacity_factor",
        ),
    ];
    for (choice, field) in bad {
        let err = choice.validate(E, "moe.router").unwrap_err().to_string();
        assert!(err.contains(&format!("moe.{field}")), "{err}");
        let cfg = MoeConfig {
            num_experts: E,
            router: choice.clone(),
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
        let store = ParamStore::new(0);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        assert!(MoeLayer::new(cfg.clone(), 1.0, vb.clone()).is_err());
        assert!(build_router(&choice, &cfg, vb.pp("gate")).is_err());
    }
}
