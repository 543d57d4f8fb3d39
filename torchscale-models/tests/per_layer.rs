//! Per-layer choices: techniques by layer range (Mix-LN), explicit MoE layers, routers per MoE
//! layer, and the stabiliser and router hooks of `BuildOptions`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor, D};
use candle_nn::VarBuilder;
use common::*;
use torchscale_core::attention::causal_mask;
use torchscale_core::{
    Ctx, Error, NormSpec, Residual, Result, RouteOptions, Router, Routing, Site, Stabilizer,
};
use torchscale_models::build::{BuildOptions, StackHooks};
use torchscale_models::config::{
    DecoderConfig, EncoderDecoderConfig, LayerRouter, LayerTechnique, Technique,
};
use torchscale_models::decoder::{Decoder, DecoderInputs};
use torchscale_models::encoder_decoder::EncoderDecoder;
use torchscale_moe::{build_router, RouterChoice};

const ZERO_OK: &[&str] = &["k_proj.bias"];

fn four_layers(t: Technique) -> DecoderConfig {
    tiny_decoder().with_layers(4).with_technique(t)
}

fn mix_ln() -> DecoderConfig {
    four_layers(Technique::PreLn)
        .with_layer_techniques(vec![LayerTechnique::new(0..2, Technique::PostLn)])
}

fn build(cfg: &DecoderConfig, opts: &BuildOptions, seed: u64) -> (ParamStoreT, Decoder) {
    let (store, vb) = store(seed);
    let m = Decoder::new(cfg, opts, vb).unwrap();
    (store, m)
}

type ParamStoreT = torchscale_core::init::ParamStore;

fn names(m: &Decoder) -> Vec<&'static str> {
    m.layer_stabilizers().iter().map(|s| s.name()).collect()
}

fn config_field<T: std::fmt::Debug>(r: Result<T>) -> String {
    match r {
        Err(Error::Config { field, .. }) => field,
        other => panic!("expected a Config error, got {other:?}"),
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// LayerNorm over the last dimension by hand, with the affine of `prefix` in `store`.
fn layer_norm(store: &ParamStoreT, prefix: &str, x: &Tensor) -> Tensor {
    let w = store.get(&format!("{prefix}.weight")).unwrap();
    let b = store.get(&format!("{prefix}.bias")).unwrap();
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let c = x.broadcast_sub(&mean).unwrap();
    let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let n = c
        .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap();
    n.broadcast_mul(w.as_tensor())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap()
}

#[test]
fn mix_ln_places_norms_per_layer_and_gets_a_final_norm() {
    let (store, m) = build(&mix_ln(), &BuildOptions::default(), 3);
    assert_eq!(names(&m), ["post-ln", "post-ln", "pre-ln", "pre-ln"]);
    assert_eq!(m.stabilizer().name(), "pre-ln");
    assert!(store.get("layer_norm.weight").is_some(), "Pre-LN on top");
    assert!(mix_ln().finalize().unwrap().has_final_layer_norm());

    // The reverse (Pre-LN below, Post-LN on top) ends with a normalised stream: no final norm.
    let rev = four_layers(Technique::PreLn)
        .with_layer_techniques(vec![LayerTechnique::new(2..4, Technique::PostLn)]);
    let (store, m) = build(&rev, &BuildOptions::default(), 3);
    assert_eq!(names(&m), ["pre-ln", "pre-ln", "post-ln", "post-ln"]);
    assert!(store.get("layer_norm.weight").is_none());
    assert!(!rev.finalize().unwrap().has_final_layer_norm());
}

/// Each site of a Mix-LN stack is wired as its layer's technique says, checked against the
/// formula composed by hand from the site's own sublayer and LayerNorm parameters.
#[test]
fn mix_ln_residual_wiring_by_hand() {
    let (store, m) = build(&mix_ln(), &BuildOptions::default(), 5);
    let toks = tokens(2, 6, 20);
    let out = m.forward(&toks, &DecoderInputs::default()).unwrap();
    let mask = causal_mask(6, &Device::Cpu).unwrap();
    for (i, layer) in m.layers().iter().enumerate() {
        let x = &out.inner_states[i];
        let mut ctx = Ctx {
            attn_mask: Some(&mask),
            layer: i,
            ..Default::default()
        };
        // The whole layer reproduces the stack's state.
        let y = layer.forward(x, &mut ctx).unwrap();
        assert!(max_diff(&y, &out.inner_states[i + 1]) < 1e-6, "layer {i}");
        // Its self-attention site by hand.
        let site = &layer.sites()[0];
        assert_eq!(site.name(), "self_attn");
        let norm = format!("layers.{i}.self_attn_layer_norm");
        let got = site.forward(x, &mut ctx).unwrap();
        let want = if i < 2 {
            let fx = site.sublayer().forward(x, &mut ctx).unwrap();
            layer_norm(&store, &norm, &(x + fx).unwrap())
        } else {
            let fx = site
                .sublayer()
                .forward(&layer_norm(&store, &norm, x), &mut ctx)
                .unwrap();
            (x + fx).unwrap()
        };
        assert!(max_diff(&got, &want) < 1e-5, "layer {i}");
    }
}

/// One range covering every layer is the plain config: same parameters, same logits (DeepNorm's
/// constants come from the full stack either way).
#[test]
fn a_range_over_every_layer_is_the_plain_technique() {
    for t in [Technique::PostLn, Technique::DeepNorm, Technique::SubLn] {
        let base = if t == Technique::SubLn {
            Technique::PostLn
        } else {
            Technique::SubLn
        };
        let ranged = four_layers(base).with_layer_techniques(vec![LayerTechnique::new(0..4, t)]);
        let (sa, a) = build(&ranged, &BuildOptions::default(), 9);
        let (sb, b) = build(&four_layers(t), &BuildOptions::default(), 9);
        let va = sa.named_vars();
        let vb = sb.named_vars();
        let ka: Vec<_> = va.iter().map(|(k, _)| k.clone()).collect();
        let kb: Vec<_> = vb.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(ka, kb, "{t}");
        for ((k, x), (_, y)) in va.iter().zip(&vb) {
            assert_eq!(max_diff(x.as_tensor(), y.as_tensor()), 0.0, "{t} {k}");
        }
        let toks = tokens(2, 5, 20);
        let la = a.forward(&toks, &DecoderInputs::default()).unwrap().x;
        let lb = b.forward(&toks, &DecoderInputs::default()).unwrap().x;
        assert_eq!(max_diff(&la, &lb), 0.0, "{t}");
        assert_eq!(
            a.layer_stabilizers()[3].residual_scale(),
            b.stabilizer().residual_scale()
        );
    }
}

#[test]
fn new_fields_round_trip_and_stay_hidden_at_default() {
    let cfg = mix_ln()
        .with_moe(0, 4)
        .with_moe_layers(Some(vec![1, 3]))
        .with_moe_router(RouterChoice::ExpertChoice {
            capacity_factor: 1.5,
        })
        .with_moe_layer_routers(vec![LayerRouter::new(3, RouterChoice::Dropless { k: 2 })])
        .finalize()
        .unwrap();
    let s = cfg.to_json_string().unwrap();
    for part in [
        r#""layer_techniques":[{"layers":[0,2],"technique":"post_ln"}]"#,
        r#""moe_layers":[1,3]"#,
        r#""moe_router":{"kind":"expert_choice","capacity_factor":1.5}"#,
        r#""moe_layer_routers":[{"layer":3,"router":{"kind":"dropless","k":2}}]"#,
    ] {
        assert!(s.contains(part), "{part} not in {s}");
    }
    assert_eq!(DecoderConfig::from_json_str(&s).unwrap(), cfg);
    let plain = tiny_decoder().to_json_string().unwrap();
    for k in [
        "layer_techniques",
        "moe_layers",
        "moe_router",
        "moe_layer_routers",
    ] {
        assert!(!plain.contains(k), "{k} serialised at its default");
    }

    let ed = tiny_encoder_decoder()
        .with_moe(0, 2)
        .with_technique(Technique::PreLn);
    let ed = EncoderDecoderConfig {
        encoder_layer_techniques: vec![LayerTechnique::new(0..1, Technique::PostLn)],
        decoder_moe_layers: Some(vec![1]),
        decoder_moe_layer_routers: vec![LayerRouter::new(1, RouterChoice::Dropless { k: 1 })],
        ..ed
    }
    .finalize()
    .unwrap();
    let s = ed.to_json_string().unwrap();
    assert!(s.contains(r#""encoder_layer_techniques":[{"layers":[0,1],"technique":"post_ln"}]"#));
    assert_eq!(EncoderDecoderConfig::from_json_str(&s).unwrap(), ed);
    assert_eq!(
        ed.encoder_config().layer_techniques,
        ed.encoder_layer_techniques
    );
    assert_eq!(ed.decoder_config().moe_layers, Some(vec![1]));
    assert!(!tiny_encoder_decoder()
        .to_json_string()
        .unwrap()
        .contains("layer_techniques"));
}

#[test]
fn validation_errors_name_the_field() {
    let lt = |a, b| LayerTechnique::new(a..b, Technique::PostLn);
    let moe = || four_layers(Technique::PreLn).with_moe(0, 4);
    let cases: Vec<(DecoderConfig, &str)> = vec![
        (
            mix_ln().with_layer_techniques(vec![lt(0, 5)]),
            "layer_techniques",
        ),
        (
            mix_ln().with_layer_techniques(vec![lt(1, 1)]),
            "layer_techniques",
        ),
        (
            mix_ln().with_layer_techniques(vec![lt(0, 2), lt(1, 3)]),
            "layer_techniques",
        ),
        (moe().with_moe_layers(Some(vec![4])), "moe_layers"),
        (moe().with_moe_layers(Some(vec![1, 1])), "moe_layers"),
        (
            moe().with_moe(0, 0).with_moe_layers(Some(vec![1])),
            "moe_expert_count",
        ),
        (
            moe()
                .with_moe_layers(Some(vec![1]))
                .with_moe_layer_routers(vec![LayerRouter::new(2, RouterChoice::Capacity)]),
            "moe_layer_routers",
        ),
        (
            moe()
                .with_moe_layers(Some(vec![1]))
                .with_moe_layer_routers(vec![LayerRouter::new(1, RouterChoice::Dropless { k: 9 })]),
            "moe_layer_routers[0].router.k",
        ),
        (
            moe()
                .with_moe_layers(Some(vec![1]))
                .with_moe_router(RouterChoice::Dropless { k: 0 }),
            "moe_router.k",
        ),
    ];
    for (cfg, field) in cases {
        assert_eq!(config_field(cfg.finalize()), field);
    }
    let ed = |f: fn(&mut EncoderDecoderConfig)| {
        let mut c = tiny_encoder_decoder();
        f(&mut c);
        config_field(c.finalize())
    };
    assert_eq!(
        ed(|c| c.decoder_layer_techniques = vec![LayerTechnique::new(0..3, Technique::PreLn)]),
        "decoder_layer_techniques"
    );
    assert_eq!(
        ed(|c| {
            c.moe_expert_count = 2;
            c.encoder_moe_layers = Some(vec![2]);
        }),
        "encoder_moe_layers"
    );
}

#[test]
fn explicit_moe_layers_and_per_layer_routers() {
    let cfg = four_layers(Technique::PreLn)
        .with_moe(0, 4)
        .with_moe_layers(Some(vec![1, 3]))
        .with_moe_layer_routers(vec![LayerRouter::new(3, RouterChoice::Dropless { k: 2 })]);
    let (_, m) = build(&cfg, &BuildOptions::default(), 2);
    let kinds: Vec<bool> = m.layers().iter().map(|l| l.moe().is_some()).collect();
    assert_eq!(kinds, [false, true, false, true]);
    assert!(m.layers()[0].ffn().is_some() && m.layers()[1].ffn().is_none());
    assert_eq!(m.layers()[1].moe().unwrap().router().name(), "gshard-top2");
    assert_eq!(
        m.layers()[3].moe().unwrap().router().name(),
        "dropless-top2"
    );
    // MoE outputs are reported per MoE layer, under their layer index.
    let out = m
        .forward(
            &tokens(2, 5, 20),
            &DecoderInputs {
                train: true,
                ..Default::default()
            },
        )
        .unwrap();
    let layers: Vec<usize> = out.aux.iter().map(|a| a.layer).collect();
    assert_eq!(layers, [1, 3]);
    let l_aux: Vec<bool> = out.l_aux.iter().map(Option::is_some).collect();
    assert_eq!(l_aux, [false, true, false, true]);

    // moe_layers wins over moe_freq, and an empty list is a dense stack.
    let (_, m) = build(
        &cfg.clone()
            .with_moe(2, 4)
            .with_moe_layers(Some(vec![0]))
            .with_moe_layer_routers(vec![]),
        &BuildOptions::default(),
        2,
    );
    let kinds: Vec<bool> = m.layers().iter().map(|l| l.moe().is_some()).collect();
    assert_eq!(kinds, [true, false, false, false]);
    let (_, m) = build(
        &cfg.with_moe(2, 4)
            .with_moe_layers(Some(vec![]))
            .with_moe_layer_routers(vec![]),
        &BuildOptions::default(),
        2,
    );
    assert!(m.layers().iter().all(|l| l.moe().is_none()));
}

/// A stabiliser of the test: Pre-LN under another name, counting the residuals it builds.
#[derive(Debug)]
struct Counting {
    inner: Box<dyn Stabilizer>,
    built: Arc<AtomicUsize>,
}

impl Stabilizer for Counting {
    fn name(&self) -> &'static str {
        "counting-pre-ln"
    }
    fn residual(&self, site: Site, spec: NormSpec, vb: VarBuilder) -> Result<Box<dyn Residual>> {
        self.built.fetch_add(1, Ordering::SeqCst);
        self.inner.residual(site, spec, vb)
    }
    fn final_norm(&self) -> bool {
        true
    }
}

/// A router of the test: a built-in one under another name.
struct Renamed(Box<dyn Router>);

impl Router for Renamed {
    fn num_experts(&self) -> usize {
        self.0.num_experts()
    }
    fn top_k(&self) -> usize {
        self.0.top_k()
    }
    fn route(&self, x: &Tensor, opts: &RouteOptions) -> Result<Routing> {
        self.0.route(x, opts)
    }
    fn name(&self) -> &str {
        "renamed-by-test"
    }
}

fn hooks(built: Arc<AtomicUsize>) -> StackHooks {
    StackHooks::default()
        .with_stabilizer(move |spec, i| {
            assert_eq!(spec.layers, 4);
            Ok((i == 1).then(|| {
                Arc::new(Counting {
                    inner: Box::new(torchscale_models::torchscale_norm::PreLn),
                    built: built.clone(),
                }) as Arc<dyn Stabilizer>
            }))
        })
        .with_router(|cx, cfg, vb| {
            if cx.index != 3 {
                return Ok(None);
            }
            let r = build_router(&RouterChoice::Dropless { k: 1 }, cfg, vb)?;
            Ok(Some(Box::new(Renamed(r)) as Box<dyn Router>))
        })
}

#[test]
fn stabilizer_and_router_hooks_from_code_are_used() {
    let built = Arc::new(AtomicUsize::new(0));
    let cfg = four_layers(Technique::PostLn)
        .with_moe(0, 4)
        .with_moe_layers(Some(vec![1, 3]));
    let opts = BuildOptions {
        hooks: hooks(built.clone()),
        ..Default::default()
    };
    let (store, m) = build(&cfg, &opts, 4);
    assert_eq!(
        built.load(Ordering::SeqCst),
        2,
        "self_attn and moe residuals"
    );
    assert_eq!(
        names(&m),
        ["post-ln", "counting-pre-ln", "post-ln", "post-ln"]
    );
    assert_eq!(m.layers()[1].moe().unwrap().router().name(), "gshard-top2");
    assert_eq!(
        m.layers()[3].moe().unwrap().router().name(),
        "renamed-by-test"
    );
    // The router's parameters keep torchscale's key.
    assert!(store.get("layers.3.moe_layer.gate.wg.weight").is_some());
    // The top layer is Post-LN: no final norm even though layer 1 would want one.
    assert!(store.get("layer_norm.weight").is_none());
    // An encoder-decoder runs the hooks on both sides (the stabiliser hook checks the depth).
    let (_, vb) = store_pair();
    let ed = tiny_encoder_decoder().with_layers(4, 4);
    let built = Arc::new(AtomicUsize::new(0));
    let m = EncoderDecoder::new(
        &ed,
        &BuildOptions {
            hooks: hooks(built.clone()),
            ..Default::default()
        },
        vb,
    )
    .unwrap();
    // Encoder: 2 residuals in layer 1; decoder: 3 (self, cross, ffn).
    assert_eq!(built.load(Ordering::SeqCst), 5);
    assert_eq!(m.decoder.layer_stabilizers()[1].name(), "counting-pre-ln");
}

fn store_pair() -> (ParamStoreT, VarBuilder<'static>) {
    store(8)
}

/// A stack mixing Post-LN, DeepNorm, Pre-LN and Sub-LN layers with capacity and dropless MoE
/// layers: every parameter gets a gradient.
#[test]
fn every_parameter_gets_a_gradient_in_a_mixed_stack() {
    let cfg = four_layers(Technique::PreLn)
        .with_layer_techniques(vec![
            LayerTechnique::new(0..1, Technique::PostLn),
            LayerTechnique::new(1..2, Technique::DeepNorm),
            LayerTechnique::new(3..4, Technique::SubLn),
        ])
        .with_moe(0, 4)
        .with_moe_layers(Some(vec![1, 3]))
        .with_moe_layer_routers(vec![LayerRouter::new(3, RouterChoice::Dropless { k: 2 })]);
    let (store, m) = build(&cfg, &BuildOptions::default(), 6);
    assert_eq!(names(&m), ["post-ln", "deepnorm", "pre-ln", "subln"]);
    // Sub-LN's inner norms only where Sub-LN wires the layer.
    assert!(store
        .get("layers.3.moe_layer.experts.0.ffn_layernorm.weight")
        .is_some());
    assert!(store.get("layers.2.ffn.ffn_layernorm.weight").is_none());
    m.reseed(1);
    let out = m
        .forward(
            &tokens(4, 8, 20),
            &DecoderInputs {
                train: true,
                ..Default::default()
            },
        )
        .unwrap();
    let mut loss = weighted_sum(&out.x);
    for a in &out.aux {
        loss = (loss + &a.balance_loss).unwrap();
    }
    assert_all_grads(&store, &loss, ZERO_OK);
    // fc1/fc2 weights and biases of 8 experts, plus Sub-LN's ffn_layernorm in layer 3's.
    assert_eq!(m.expert_parameters().len(), 4 * 4 + 4 * 6);
}
