//! A freshly initialised model follows torchscale's init rule: PyTorch's default Linear init
//! (uniform ±1/√fan_in, std 1/√(3·fan_in)) times the technique's gain on v_proj, out_proj, fc1, fc2
//! (weights and biases), none on q/k; embeddings N(0, C^-0.5) with a zero padding row; output
//! projection N(0, C^-0.5).
//!
//! Bound: the sample std of n i.i.d. draws has relative standard error about
//! sqrt((kurtosis - 1) / (4n)); uniform kurtosis is 1.8, normal 3. We allow 6 standard errors.

mod common;

use candle_core::DType;
use common::*;
use torchscale_core::init::ParamStore;
use torchscale_models::build::BuildOptions;
use torchscale_models::config::Technique;
use torchscale_models::decoder::Decoder;
use torchscale_models::encoder_decoder::EncoderDecoder;

fn sample_std(store: &ParamStore, names: &[String]) -> (f64, usize) {
    let mut v = Vec::new();
    for n in names {
        let t = store.get(n).unwrap_or_else(|| panic!("no parameter {n}"));
        v.extend(
            t.as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
        );
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
    (var.sqrt(), v.len())
}

fn check(store: &ParamStore, names: Vec<String>, want: f64, kurtosis: f64, what: &str) {
    let (got, n) = sample_std(store, &names);
    let se = ((kurtosis - 1.0) / (4.0 * n as f64)).sqrt();
    let rel = (got / want - 1.0).abs();
    assert!(
        rel < 6.0 * se,
        "{what}: std {got:.5} vs {want:.5} (rel err {rel:.4}, bound {:.4}, n={n})",
        6.0 * se
    );
}

fn names(layers: usize, f: impl Fn(usize) -> Vec<String>) -> Vec<String> {
    (0..layers).flat_map(f).collect()
}

#[test]
fn deepnorm_decoder_beta_on_v_out_fc_not_qk() {
    let layers = 4;
    let (c, ffn) = (64usize, 128usize);
    let (store, vb) = store(11);
    let cfg = tiny_decoder()
        .with_embed_dim(c)
        .with_heads(4)
        .with_ffn_dim(ffn)
        .with_layers(layers)
        .with_technique(Technique::DeepNorm);
    Decoder::new(&cfg, &BuildOptions::default(), vb).unwrap();
    let beta = (8.0 * layers as f64).powf(-0.25);
    let u = 1.8;
    let base_c = 1.0 / (3.0 * c as f64).sqrt();
    check(
        &store,
        names(layers, |i| {
            vec![
                format!("layers.{i}.self_attn.q_proj.weight"),
                format!("layers.{i}.self_attn.k_proj.weight"),
            ]
        }),
        base_c,
        u,
        "q/k",
    );
    check(
        &store,
        names(layers, |i| {
            vec![
                format!("layers.{i}.self_attn.v_proj.weight"),
                format!("layers.{i}.self_attn.out_proj.weight"),
            ]
        }),
        beta * base_c,
        u,
        "v/out",
    );
    check(
        &store,
        names(layers, |i| {
            vec![
                format!("layers.{i}.self_attn.v_proj.bias"),
                format!("layers.{i}.self_attn.out_proj.bias"),
                format!("layers.{i}.ffn.fc1.bias"),
            ]
        }),
        beta * base_c,
        u,
        "biases",
    );
    check(
        &store,
        names(layers, |i| vec![format!("layers.{i}.ffn.fc1.weight")]),
        beta * base_c,
        u,
        "fc1",
    );
    check(
        &store,
        names(layers, |i| vec![format!("layers.{i}.ffn.fc2.weight")]),
        beta / (3.0 * ffn as f64).sqrt(),
        u,
        "fc2",
    );
    check(
        &store,
        vec!["output_projection.weight".into()],
        (c as f64).powf(-0.5),
        3.0,
        "output_projection",
    );
}

#[test]
fn subln_encoder_decoder_gamma_skips_cross_attention() {
    let (n, m) = (3usize, 2usize);
    let c = 64usize;
    let (store, vb) = store(12);
    let cfg = tiny_encoder_decoder()
        .with_embed_dim(c)
        .with_heads(4)
        .with_ffn_dim(c)
        .with_layers(n, m);
    EncoderDecoder::new(&cfg, &BuildOptions::default(), vb).unwrap();
    let base = 1.0 / (3.0 * c as f64).sqrt();
    let g_dec = (3.0 * m as f64).ln().sqrt();
    let g_enc = ((3.0 * m as f64).ln() * (2.0 * n as f64).ln() / 3.0).sqrt();
    let u = 1.8;
    check(
        &store,
        names(n, |i| {
            vec![
                format!("encoder.layers.{i}.ffn.fc1.weight"),
                format!("encoder.layers.{i}.self_attn.v_proj.weight"),
            ]
        }),
        g_enc * base,
        u,
        "encoder gamma",
    );
    check(
        &store,
        names(m, |i| {
            vec![
                format!("decoder.layers.{i}.ffn.fc2.weight"),
                format!("decoder.layers.{i}.self_attn.out_proj.weight"),
            ]
        }),
        g_dec * base,
        u,
        "decoder gamma",
    );
    check(
        &store,
        names(m, |i| {
            vec![
                format!("decoder.layers.{i}.encoder_attn.v_proj.weight"),
                format!("decoder.layers.{i}.encoder_attn.out_proj.weight"),
            ]
        }),
        base,
        u,
        "cross-attention (no gain)",
    );
    // Token embeddings N(0, C^-0.5), padding row zero.
    check(
        &store,
        vec!["decoder.embed_tokens.weight".into()],
        (c as f64).powf(-0.5) * (19.0f64 / 20.0).sqrt(),
        3.0,
        "embed_tokens",
    );
    let pad: Vec<f32> = store
        .get("encoder.embed_tokens.weight")
        .unwrap()
        .as_tensor()
        .get(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(pad.iter().all(|v| *v == 0.0));
}

#[test]
fn same_seed_same_model() {
    let a = store(7);
    let b = store(7);
    let c = store(8);
    for (s, vb) in [&a, &b, &c] {
        Decoder::new(&tiny_decoder(), &BuildOptions::default(), vb.clone()).unwrap();
        assert!(!s.named_vars().is_empty());
    }
    let get = |s: &ParamStore| {
        s.get("layers.1.ffn.fc1.weight")
            .unwrap()
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(get(&a.0), get(&b.0));
    assert_ne!(get(&a.0), get(&c.0));
}
