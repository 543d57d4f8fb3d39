//! A whole MoE decoder (every layer X-MoE, 4 experts) on 2 expert-parallel ranks (torchscale-core's
//! `LocalGroup`: ranks as threads, tensors copied between them) equals the single process
//! holding every expert: logits, balance losses, and every gradient (dense ones summed over
//! the ranks as the trainer's all-reduce does, each expert's on its owning rank).

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use torchscale_core::{Collective, LocalGroup};
use torchscale_models::build::{decoder_spec, stabilizer, BuildOptions};
use torchscale_models::decoder::{Decoder, DecoderInputs};
use torchscale_models::DecoderConfig;
use torchscale_models::ParamStore;

const WORLD: usize = 2;
const EXPERTS: usize = 4;
const B: usize = 2;
const T: usize = 6;

fn config() -> DecoderConfig {
    tiny_decoder()
        .with_moe(1, EXPERTS)
        .with_xmoe(true)
        .finalize()
        .unwrap()
}

/// Rank `r`'s tokens: different on every rank.
fn rank_tokens(r: usize) -> Tensor {
    let v: Vec<u32> = (0..B * T)
        .map(|i| 4 + (i as u32 * 7 + 5 * r as u32 + 3) % 16)
        .collect();
    Tensor::from_vec(v, (B, T), &Device::Cpu).unwrap()
}

/// Rank `r`'s second-expert uniforms, one `[B T]` tensor per layer.
fn uniforms(r: usize, layers: usize) -> Vec<Option<Tensor>> {
    (0..layers)
        .map(|l| {
            let v: Vec<f32> = (0..B * T)
                .map(|i| (((i * 13 + l * 5 + r * 29) % 97) as f32 + 0.5) / 97.0)
                .collect();
            Some(Tensor::from_vec(v, B * T, &Device::Cpu).unwrap())
        })
        .collect()
}

/// One rank's (or the single process's, on that rank's tokens) results.
struct Run {
    logits: Tensor,
    l_aux: Vec<f32>,
    grads: HashMap<String, Tensor>,
}

/// Logits through `weighted_sum` plus the balance losses (so the gate gets their gradient too).
fn forward(m: &Decoder, r: usize) -> (Tensor, Vec<Tensor>, Tensor) {
    let layers = m.layers().len();
    let out = m
        .forward(
            &rank_tokens(r),
            &DecoderInputs {
                train: true,
                moe_uniforms: uniforms(r, layers),
                ..Default::default()
            },
        )
        .unwrap();
    let aux: Vec<Tensor> = out.l_aux.iter().map(|l| l.clone().unwrap()).collect();
    let mut loss = weighted_sum(&out.x);
    for a in &aux {
        loss = (loss + (a * 0.5).unwrap()).unwrap();
    }
    (out.x, aux, loss)
}

fn named_grads(
    store: &ParamStore,
    grads: &candle_core::backprop::GradStore,
) -> HashMap<String, Tensor> {
    store
        .named_vars()
        .into_iter()
        .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n, g.clone())))
        .collect()
}

fn scalars(ts: &[Tensor]) -> Vec<f32> {
    ts.iter().map(|t| t.to_scalar::<f32>().unwrap()).collect()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// The expert index `j` of a name `layers.{i}.moe_layer.experts.{j}.…`.
fn expert_of(name: &str) -> Option<usize> {
    let rest = name.split(".experts.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

#[test]
fn expert_parallel_decoder_equals_the_single_process() {
    let cfg = config();
    let store = ParamStore::new(21);
    // The single process builds every parameter; the ranks reuse the same variables (a real run
    // loads one checkpoint or broadcasts rank 0's dense parameters).
    let single = Decoder::new(
        &cfg,
        &BuildOptions::default(),
        store.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let mut total = None::<Tensor>;
    let mut want = Vec::new();
    for r in 0..WORLD {
        let (logits, aux, loss) = forward(&single, r);
        total = Some(match total {
            None => loss,
            Some(t) => (t + loss).unwrap(),
        });
        want.push((logits, scalars(&aux)));
    }
    let want_grads = named_grads(&store, &total.unwrap().backward().unwrap());

    let runs: Vec<Run> = std::thread::scope(|sc| {
        let hs: Vec<_> = LocalGroup::new(WORLD)
            .into_iter()
            .map(|g| {
                let (store, cfg) = (&store, &cfg);
                sc.spawn(move || {
                    let r = g.rank();
                    let comm: Arc<dyn Collective> = Arc::new(g);
                    let mut spec = decoder_spec(cfg, &BuildOptions::default());
                    spec.moe.as_mut().unwrap().expert_comm = Some(comm);
                    let st = stabilizer(
                        cfg.technique(),
                        cfg.stack_kind(),
                        &cfg.admin_output_change_scale,
                        cfg.admin_as_parameter,
                    )
                    .unwrap();
                    let vb = store.var_builder(DType::F32, &Device::Cpu);
                    let m = Decoder::from_spec(spec, st, false, None, vb).unwrap();
                    let (logits, aux, loss) = forward(&m, r);
                    let grads = named_grads(store, &loss.backward().unwrap());
                    Run {
                        logits,
                        l_aux: scalars(&aux),
                        grads,
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let (mut worst_out, mut worst_grad) = (0f32, 0f32);
    for (r, (run, (logits, l_aux))) in runs.iter().zip(&want).enumerate() {
        let d = max_abs(&(&run.logits - logits).unwrap());
        assert!(d <= 1e-5, "rank {r}: logits differ by {d}");
        worst_out = worst_out.max(d);
        assert_eq!(run.l_aux.len(), cfg.decoder_layers);
        for (l, (a, b)) in run.l_aux.iter().zip(l_aux).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6,
                "rank {r} layer {l}: l_aux {a} vs {b}"
            );
        }
    }
    let per = EXPERTS / WORLD;
    let mut experts_seen = 0;
    for (name, want) in &want_grads {
        let scale = max_abs(want).max(1.0);
        let got = match expert_of(name) {
            Some(j) => {
                experts_seen += 1;
                for (r, run) in runs.iter().enumerate() {
                    if r != j / per {
                        assert!(!run.grads.contains_key(name), "{name} on rank {r}");
                    }
                }
                runs[j / per].grads[name].clone()
            }
            None => runs
                .iter()
                .map(|run| run.grads[name].clone())
                .reduce(|a, b| (a + b).unwrap())
                .unwrap(),
        };
        let d = max_abs(&(&got - want).unwrap()) / scale;
        assert!(d <= 1e-5, "{name}: differs by {d} (relative to {scale})");
        worst_grad = worst_grad.max(d);
    }
    // Two layers, four experts, fc1/fc2 weights and biases at least.
    assert!(
        experts_seen >= 2 * EXPERTS * 4,
        "{experts_seen} expert tensors"
    );
    eprintln!(
        "{} parameters: logits max diff {worst_out:e}, gradients max diff (relative to max(1, |g|)) \
         {worst_grad:e}",
        want_grads.len()
    );
}
