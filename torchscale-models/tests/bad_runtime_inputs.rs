//! Catalogue: bad inputs at run time. Each row hands a built model (or an MoE layer, a routing,
//! an expert-parallel group) one bad input — float token ids, ids outside the vocabulary, a
//! cache of another model, a NaN temperature, a routing with k = 0, a rank that fails — and names
//! the typed error it must give: the variant and the argument it names.

mod catalogue;
mod common;

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use catalogue::{check, refused, Case};
use common::{store, tiny_decoder, tiny_encoder, tokens};
use torchscale_core::{Ctx, Error, Result, RouteOptions, Site, Sublayer};
use torchscale_models::build::{BuildOptions, StackHooks};
use torchscale_models::decoder::{Decoder, DecoderInputs, IncrementalState, Memory};
use torchscale_models::encoder::{Encoder, EncoderInputs};
use torchscale_models::layer::SiteBlock;
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::torchscale_moe::{
    DispatchPlan, ExpertComm, InProcessGroup, MoeConfig, MoeLayer,
};

const CPU: Device = Device::Cpu;

fn decoder(layers: usize) -> Result<Decoder> {
    let (_, vb) = store(0);
    Decoder::new(
        &tiny_decoder().with_layers(layers),
        &BuildOptions::default(),
        vb,
    )
}

fn lm() -> Result<LanguageModel> {
    LanguageModel::new(tiny_decoder().with_max_positions(32), 0)
}

/// A decoder row: `f` gets a 2-layer tiny decoder (vocabulary 20).
fn dec_row(
    name: &'static str,
    input: &'static str,
    variant: &'static str,
    words: &'static [&'static str],
    f: impl FnOnce(&Decoder) -> Result<()> + 'static,
) -> Case {
    refused(name, input, variant, words, move || f(&decoder(2)?))
}

/// A sublayer that fails inside candle (it concatenates tensors of different widths).
#[derive(Debug)]
struct BrokenCat;

impl Sublayer for BrokenCat {
    fn forward(&self, x: &Tensor, _ctx: &mut Ctx) -> Result<Tensor> {
        let half = x.narrow(2, 0, 1)?;
        Ok(Tensor::cat(&[x, &half], 1)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn moe_cfg() -> MoeConfig {
    MoeConfig {
        embed_dim: 8,
        ffn_dim: 12,
        num_experts: 4,
        ..Default::default()
    }
    .validated()
    .unwrap()
}

/// Seeded values in [-1, 1).
fn values(seed: u32, shape: (usize, usize)) -> Tensor {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &CPU).unwrap()
}

#[test]
fn bad_inputs_are_refused_naming_the_argument() {
    let none = || DecoderInputs::default();
    let cases = vec![
        dec_row(
            "f32 token ids",
            "Decoder::forward(prev_output_tokens [2, 5] f32)",
            "Invalid",
            &["prev_output_tokens", "integers"],
            move |m| {
                let ids = tokens(2, 5, 20).to_dtype(DType::F32)?;
                m.forward(&ids, &none()).map(|_| ())
            },
        ),
        refused(
            "f32 source token ids",
            "Encoder::forward(src_tokens [2, 5] f32)",
            "Invalid",
            &["src_tokens", "integers"],
            || {
                let (_, vb) = store(0);
                let m = Encoder::new(&tiny_encoder(), &BuildOptions::default(), vb)?;
                let ids = tokens(2, 5, 20).to_dtype(DType::F32)?;
                m.forward(&ids, &EncoderInputs::default()).map(|_| ())
            },
        ),
        refused(
            "f32 input to a micro-batch",
            "LanguageModel::micro_batch(input [2, 5] f32, target [2, 5] u32)",
            "Invalid",
            &["input"],
            || {
                let lm = lm()?;
                let t = tokens(2, 5, 20);
                let loss = LossConfig::default();
                lm.micro_batch(&t.to_dtype(DType::F32)?, &t, false, &loss, 0)
                    .map(|_| ())
            },
        ),
        dec_row(
            "a token id outside the vocabulary",
            "Decoder::forward([[4, 25]]) with vocabulary 20",
            "Invalid",
            &["prev_output_tokens", "25"],
            move |m| {
                let ids = Tensor::new(&[[4u32, 25]], &CPU)?;
                m.forward(&ids, &none()).map(|_| ())
            },
        ),
        dec_row(
            "token ids of rank 1",
            "Decoder::forward(prev_output_tokens [5])",
            "Shape",
            &["prev_output_tokens"],
            move |m| {
                let ids = Tensor::new(&[4u32, 5, 6, 7, 8], &CPU)?;
                m.forward(&ids, &none()).map(|_| ())
            },
        ),
        refused(
            "a 4-layer cache in a 2-layer decoder",
            "the incremental state of a 4-layer decoder after a 3-token prompt, then one step \
             of a 2-layer decoder",
            "Invalid",
            &["incremental_state", "4 layers"],
            || {
                let four = decoder(4)?;
                let two = decoder(2)?;
                let toks = tokens(1, 4, 20);
                let mut state = IncrementalState::new(true);
                four.forward_incremental(
                    &toks.narrow(1, 0, 3)?,
                    &DecoderInputs::default(),
                    &mut state,
                )?;
                two.forward_incremental(&toks, &DecoderInputs::default(), &mut state)
                    .map(|_| ())
            },
        ),
        dec_row(
            "a padding mask of the wrong shape",
            "Decoder::forward(tokens [2, 5], self_attn_padding_mask [2, 4])",
            "Shape",
            &["self_attn_padding_mask"],
            |m| {
                let mask = Tensor::zeros((2, 4), DType::U8, &CPU)?;
                let inp = DecoderInputs {
                    self_attn_padding_mask: Some(&mask),
                    ..Default::default()
                };
                m.forward(&tokens(2, 5, 20), &inp).map(|_| ())
            },
        ),
        dec_row(
            "an encoder output for a decoder-only model",
            "Decoder::forward(tokens [2, 5], memory: encoder_out [2, 3, 16])",
            "Invalid",
            &["encoder_out"],
            |m| {
                let enc = Tensor::zeros((2, 3, 16), DType::F32, &CPU)?;
                let inp = DecoderInputs {
                    memory: Some(Memory {
                        encoder_out: &enc,
                        padding_mask: None,
                    }),
                    ..Default::default()
                };
                m.forward(&tokens(2, 5, 20), &inp).map(|_| ())
            },
        ),
        dec_row(
            "MoE uniforms for a dense layer",
            "Decoder::forward(tokens [2, 5], moe_uniforms [Some([10])]) without MoE layers",
            "Invalid",
            &["moe_uniforms[0]"],
            |m| {
                let inp = DecoderInputs {
                    moe_uniforms: vec![Some(Tensor::zeros(10, DType::F32, &CPU)?)],
                    ..Default::default()
                };
                m.forward(&tokens(2, 5, 20), &inp).map(|_| ())
            },
        ),
        refused(
            "generate with a NaN temperature",
            "LanguageModel::generate(prompt, 3, temperature NaN)",
            "Config",
            &["temperature"],
            || lm()?.generate(&[5, 6], 3, f64::NAN, 0, 1).map(|_| ()),
        ),
        refused(
            "generate with an infinite temperature",
            "LanguageModel::generate(prompt, 3, temperature -inf)",
            "Config",
            &["temperature"],
            || {
                lm()?
                    .generate(&[5, 6], 3, f64::NEG_INFINITY, 0, 1)
                    .map(|_| ())
            },
        ),
        refused(
            "generate with a prompt outside the vocabulary",
            "LanguageModel::generate(prompt [5, 300]) with vocabulary 20",
            "Invalid",
            &["prompt", "300"],
            || lm()?.generate(&[5, 300], 3, 1.0, 0, 1).map(|_| ()),
        ),
        refused(
            "a candle error inside a call",
            "a site hook whose sublayer concatenates tensors of different widths",
            "Context",
            &["Decoder::forward(prev_output_tokens [2, 7] u32)", "cat"],
            || {
                let hooks = StackHooks::default().with_sites(|cx, mut sites| {
                    sites.push(SiteBlock::new(
                        "broken",
                        cx.residual(Site::Custom("broken_layer_norm"))?,
                        Box::new(BrokenCat),
                    ));
                    Ok(sites)
                });
                let opts = BuildOptions {
                    hooks,
                    ..Default::default()
                };
                let (_, vb) = store(0);
                let m = Decoder::new(&tiny_decoder(), &opts, vb)?;
                m.forward(&tokens(2, 7, 20), &DecoderInputs::default())
                    .map(|_| ())
            },
        ),
    ];
    check("bad_runtime_inputs", cases);
}

#[test]
fn bad_routing_and_failing_ranks_are_refused() {
    let cases = vec![
        refused(
            "DispatchPlan with k = 0",
            "a real top-2 routing of 10 tokens over 4 experts with k set to 0",
            "Invalid",
            &["routing"],
            || {
                let s = torchscale_core::init::ParamStore::new(3);
                let layer = MoeLayer::new(moe_cfg(), 1.0, s.var_builder(DType::F32, &CPU))?;
                let opts = RouteOptions {
                    seed: Some(1),
                    ..Default::default()
                };
                let mut r = layer.forward(&values(1, (10, 8)), &opts)?.routing;
                r.k = 0;
                DispatchPlan::new(&r).map(|_| ())
            },
        ),
        refused(
            "an expert-parallel rank that errors",
            "2 ranks in one process; rank 1's input is [10, 5] (the width is 8), so it fails \
             before the exchange and leaves; rank 0's forward must fail at once, naming rank 1",
            "Collective",
            &["rank 1"],
            || {
                let s = torchscale_core::init::ParamStore::new(13);
                let vb = s.var_builder(DType::F32, &CPU);
                let group = InProcessGroup::with_timeout(2, Duration::from_secs(300));
                let ranks = group
                    .into_iter()
                    .map(|g| {
                        let comm: Arc<dyn ExpertComm> = Arc::new(g);
                        MoeLayer::new_parallel(moe_cfg(), 1.0, vb.clone(), comm)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let start = Instant::now();
                let results: Vec<Result<()>> = std::thread::scope(|sc| {
                    let handles: Vec<_> = ranks
                        .into_iter()
                        .enumerate()
                        .map(|(r, layer)| {
                            sc.spawn(move || {
                                let x = values(r as u32, (10, if r == 1 { 5 } else { 8 }));
                                let opts = RouteOptions {
                                    seed: Some(7),
                                    ..Default::default()
                                };
                                // The layer (and its handle of the group) is dropped on return.
                                layer.forward(&x, &opts).map(|_| ())
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let took = start.elapsed();
                assert!(took < Duration::from_secs(30), "the ranks took {took:?}");
                let mut results = results.into_iter();
                let (r0, r1) = (results.next().unwrap(), results.next().unwrap());
                let e1 = r1.expect_err("rank 1's own input is bad");
                assert!(!matches!(e1, Error::Collective { .. }), "rank 1: {e1}");
                r0
            },
        ),
    ];
    check("bad_runtime_inputs (MoE)", cases);
}
