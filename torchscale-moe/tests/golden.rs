//! Parity with torchscale 0.3.0 on the MoE layers of the golden files (FORMAT.md 3.10): routing
//! decisions exactly, outputs, logits, probabilities and combine weights within the strict
//! forward tolerance, l_aux within rtol 1e-5.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;
use torchscale_core::{Activation, Ctx, RouteOptions, Router};
use torchscale_moe::{MoeConfig, MoeLayer, SecondExpertPolicy};

struct Golden {
    name: String,
    tensors: HashMap<String, Tensor>,
    config: Value,
    moe_meta: Value,
}

fn load(case: &str) -> Golden {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(format!("{case}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().expect("metadata");
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    Golden {
        name: case.to_string(),
        tensors,
        config: serde_json::from_str(&meta["config"]).unwrap(),
        moe_meta: serde_json::from_str(&meta["moe"]).unwrap(),
    }
}

/// The MoE part of a torchscale config (encoder or decoder field names).
fn moe_config(cfg: &Value) -> MoeConfig {
    let get = |k: &str| &cfg[k];
    let side = if cfg.get("decoder_embed_dim").is_some() {
        "decoder"
    } else {
        "encoder"
    };
    let policy = match get("moe_second_expert_policy").as_str().unwrap() {
        "sampling" => SecondExpertPolicy::Sampling,
        "random" => SecondExpertPolicy::Random,
        _ => SecondExpertPolicy::All,
    };
    MoeConfig {
        embed_dim: get(&format!("{side}_embed_dim")).as_u64().unwrap() as usize,
        ffn_dim: get(&format!("{side}_ffn_embed_dim")).as_u64().unwrap() as usize,
        num_experts: get("moe_expert_count").as_u64().unwrap() as usize,
        top1: get("moe_top1_expert").as_bool().unwrap(),
        use_xmoe: get("use_xmoe").as_bool().unwrap(),
        xmoe_routing_dim: 16,
        paper_routing: false,
        eval_capacity_token_fraction: get("moe_eval_capacity_token_fraction").as_f64().unwrap(),
        capacity_factor: 1.0,
        second_expert_policy: policy,
        normalize_gate_prob_before_dropping: get("moe_normalize_gate_prob_before_dropping")
            .as_bool()
            .unwrap(),
        gating_use_fp32: get("moe_gating_use_fp32").as_bool().unwrap(),
        activation: get("activation_fn")
            .as_str()
            .unwrap()
            .parse::<Activation>()
            .unwrap(),
        activation_dropout: get("activation_dropout").as_f64().unwrap(),
        dropout: get("dropout").as_f64().unwrap(),
        inner_norm: get("subln").as_bool().unwrap(),
        layernorm_eps: get("layernorm_eps").as_f64().unwrap(),
        router: torchscale_moe::RouterChoice::Capacity,
    }
    .validated()
    .unwrap()
}

fn modules(g: &Golden) -> Vec<String> {
    let mut m: Vec<String> = g
        .tensors
        .keys()
        .filter_map(|k| {
            k.strip_prefix("expect.moe.")?
                .strip_suffix(".layer_input")
                .map(str::to_string)
        })
        .collect();
    m.sort();
    assert!(!m.is_empty(), "{}: no MoE module", g.name);
    m
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

fn layer_for(g: &Golden, m: &str) -> MoeLayer {
    let vb = VarBuilder::from_tensors(g.tensors.clone(), DType::F32, &Device::Cpu).pp(m);
    MoeLayer::new(moe_config(&g.config), 1.0, vb).unwrap()
}

fn check_case(case: &str) {
    let g = load(case);
    let cfg = moe_config(&g.config);
    for m in modules(&g) {
        let what = |k: &str| format!("{case} {m} {k}");
        let exp = |k: &str| {
            g.tensors
                .get(&format!("expect.moe.{m}.{k}"))
                .unwrap_or_else(|| panic!("missing {}", what(k)))
        };
        let layer = layer_for(&g, &m);
        let input = exp("layer_input");
        let c = *input.dims().last().unwrap();
        let s = input.elem_count() / c;
        let x = input.reshape((s, c)).unwrap();
        let uniform = g.tensors.get(&format!("input.moe_uniform.{m}"));
        let opts = RouteOptions {
            train: false,
            uniform,
            ..Default::default()
        };
        let out = layer.forward(&x, &opts).unwrap();
        let r = &out.routing;
        let (atol, rtol) = (5e-6, 1e-5);

        assert_close(
            &what("layer_output"),
            &f32s(&out.output),
            &f32s(exp("layer_output")),
            atol,
            rtol,
        );
        assert_close(
            &what("gate_logits"),
            &f32s(&r.logits),
            &f32s(exp("gate_logits")),
            atol,
            rtol,
        );
        assert_close(
            &what("gate_probs"),
            &f32s(&r.probs),
            &f32s(exp("gate_probs")),
            atol,
            rtol,
        );
        let l_aux = out
            .balance_loss
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = f32s(exp("l_aux"))[0];
        assert!(
            (l_aux - want).abs() <= 1e-5 * want.abs(),
            "{}: {l_aux} vs {want}",
            what("l_aux")
        );

        // Discrete decisions, exactly.
        let top1: Vec<i64> = (0..s).map(|t| r.expert[t * r.k] as i64).collect();
        assert_eq!(top1, ints(exp("top1_expert")), "{}", what("top1_expert"));
        let cand: Vec<i64> = r.runner_up.iter().map(|&e| e as i64).collect();
        assert_eq!(
            cand,
            ints(exp("top2_candidate")),
            "{}",
            what("top2_candidate")
        );
        if r.k == 2 {
            let second: Vec<i64> = (0..s).map(|t| r.expert[t * 2 + 1] as i64).collect();
            assert_eq!(
                second,
                cand,
                "{}: random policy has no noise",
                what("second")
            );
            let sampled: Vec<i64> = r
                .sampled
                .clone()
                .unwrap()
                .iter()
                .map(|&b| b as i64)
                .collect();
            assert_eq!(
                sampled,
                ints(exp("second_sampled")),
                "{}",
                what("second_sampled")
            );
        }

        // Dense [S, E, cap] views rebuilt from the indices.
        let want_cw = exp("combine_weights");
        let cap = want_cw.dims()[2];
        let e = cfg.num_experts;
        assert_eq!(r.capacity, cap, "{}", what("capacity"));
        let gate = f32s(&r.gate);
        let mut cw = vec![0f32; s * e * cap];
        let mut dm = vec![0i64; s * e * cap];
        for (t, j, ex, slot) in r.kept_choices() {
            cw[(t * e + ex) * cap + slot] = gate[t * r.k + j];
            dm[(t * e + ex) * cap + slot] = 1;
        }
        assert_eq!(dm, ints(exp("dispatch_mask")), "{}", what("dispatch_mask"));
        assert_close(&what("combine_weights"), &cw, &f32s(want_cw), atol, rtol);

        // Statistics against the file's `moe` metadata.
        let meta = &g.moe_meta[&m];
        let n = |k: &str| meta[k].as_u64().unwrap() as usize;
        assert_eq!(out.stats.capacity, n("capacity"));
        assert_eq!(
            out.stats.dropped_first,
            n("first_choice_dropped_by_capacity")
        );
        assert_eq!(out.stats.tokens_without_expert, n("tokens_with_no_expert"));
        if r.k == 2 {
            assert_eq!(
                out.stats.dropped_second,
                n("second_choice_dropped_by_capacity")
            );
            let kept_by_policy = r.sampled.as_ref().unwrap().iter().filter(|&&b| b).count();
            assert_eq!(kept_by_policy, n("second_choice_kept_by_random_policy"));
        }
        let kept_total: usize = out.stats.tokens_per_expert.iter().sum();
        assert_eq!(kept_total, dm.iter().sum::<i64>() as usize);

        // The torchscale-style dense path gives the same output.
        let dense = layer.dense_onehot_forward(&x, &opts).unwrap();
        assert_close(
            &what("dense layer_output"),
            &f32s(&dense.output),
            &f32s(exp("layer_output")),
            atol,
            rtol,
        );
    }
}

#[test]
fn decoder_moe_top1() {
    check_case("decoder_moe_top1");
}

#[test]
fn decoder_moe_top2() {
    check_case("decoder_moe_top2");
}

#[test]
fn encoder_moe_top2() {
    check_case("encoder_moe_top2");
}

/// `forward_ctx` takes `[B, T, C]` and flattens batch-major (decoder) or time-major (encoder,
/// whose stored layer input is already `[T, B, C]`), pushing l_aux to the context.
#[test]
fn forward_ctx_token_order() {
    for (case, time_major) in [("decoder_moe_top2", false), ("encoder_moe_top2", true)] {
        let g = load(case);
        for m in modules(&g) {
            let layer = layer_for(&g, &m);
            let input = &g.tensors[&format!("expect.moe.{m}.layer_input")];
            let want = &g.tensors[&format!("expect.moe.{m}.layer_output")];
            // The stack hands over [B, T, C].
            let (x, want) = if time_major {
                (
                    input.transpose(0, 1).unwrap(),
                    want.transpose(0, 1).unwrap(),
                )
            } else {
                (input.clone(), want.clone())
            };
            let u = g.tensors.get(&format!("input.moe_uniform.{m}"));
            let mut ctx = Ctx {
                time_major,
                moe_uniform: u,
                ..Default::default()
            };
            let y = layer.forward_ctx(&x, &mut ctx, 7).unwrap();
            assert_eq!(y.dims(), x.dims());
            assert_close(
                &format!("{case} {m} ctx"),
                &f32s(&y),
                &f32s(&want),
                5e-6,
                1e-5,
            );
            assert_eq!(ctx.aux.len(), 1);
            assert_eq!(ctx.aux[0].layer, 7);
            let l = ctx.aux[0].balance_loss.to_scalar::<f32>().unwrap();
            let want_l = f32s(&g.tensors[&format!("expect.moe.{m}.l_aux")])[0];
            assert!((l - want_l).abs() <= 1e-5 * want_l.abs());
            // The other token order routes differently (capacity is first come, first served).
            let mut wrong = Ctx {
                time_major: !time_major,
                moe_uniform: u,
                ..Default::default()
            };
            let y2 = layer.forward_ctx(&x, &mut wrong, 7).unwrap();
            let diff = (y2 - &y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff > 1e-3, "{case} {m}: token order made no difference");
        }
    }
}

#[test]
fn router_trait_matches_layer_routing() {
    let g = load("decoder_moe_top2");
    let m = &modules(&g)[0];
    let layer = layer_for(&g, m);
    let input = &g.tensors[&format!("expect.moe.{m}.layer_input")];
    let c = *input.dims().last().unwrap();
    let x = input.reshape((input.elem_count() / c, c)).unwrap();
    let router: &dyn Router = layer.router();
    assert_eq!(router.top_k(), 2);
    assert_eq!(router.num_experts(), moe_config(&g.config).num_experts);
    // Wrong uniform length is a typed error naming the input.
    let bad = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let err = router
        .route(
            &x,
            &RouteOptions {
                uniform: Some(&bad),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("uniform"), "{err}");
    let err = router
        .route(&x.narrow(1, 0, c - 1).unwrap(), &RouteOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("`x`"), "{err}");
}
