//! Fully masked attention rows (every key padded or behind the causal mask) give zero outputs
//! and finite, zero gradients through `MultiheadAttention` on every path (packed, fused, fused
//! with a cache, composed with a relative bias), fused and composed alike; rows that keep a key
//! are untouched.

use candle_core::{DType, Device, Tensor};
use torchscale_core::attention::{
    causal_mask, AttentionConfig, AttentionGains, AttentionInputs, KvCache, MultiheadAttention,
};
use torchscale_core::init::ParamStore;
use torchscale_kernels::with_fused;

const C: usize = 8;
const H: usize = 2;

fn attention(self_attention: bool, xpos: bool) -> (ParamStore, MultiheadAttention) {
    let store = ParamStore::new(5);
    let cfg = AttentionConfig {
        embed_dim: C,
        num_heads: H,
        self_attention,
        inner_norm: false,
        xpos_scale_base: xpos.then_some(512.0),
        multiway: false,
        attention_dropout: 0.0,
        layernorm_eps: 1e-5,
    };
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let m = MultiheadAttention::new(cfg, AttentionGains::default(), vb).unwrap();
    (store, m)
}

/// Seeded values in [-1, 1) (candle's own `randn` is unseeded).
fn input(seed: u64, dims: (usize, usize, usize)) -> Tensor {
    let n = dims.0 * dims.1 * dims.2;
    let v: Vec<f32> = (0..n as u64)
        .map(|i| (((i + 1) * (seed * 2 + 7919)) % 2003) as f32 / 1001.5 - 1.0)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn rows(x: &Tensor) -> Vec<Vec<f32>> {
    let (b, t, c) = x.dims3().unwrap();
    x.reshape((b * t, c)).unwrap().to_vec2().unwrap()
}

/// The output (rows), and whether the gradient of every parameter and of the inputs is finite.
fn run(
    m: &MultiheadAttention,
    store: &ParamStore,
    (q, kv): (&Tensor, &Tensor),
    inputs: &AttentionInputs,
) -> (Vec<Vec<f32>>, bool) {
    let (qv, kvv) = (
        candle_core::Var::from_tensor(q).unwrap(),
        candle_core::Var::from_tensor(kv).unwrap(),
    );
    // Self-attention on one tensor takes the packed path: keep query and key the same tensor.
    let kvt = if q.id() == kv.id() {
        qv.as_tensor().clone()
    } else {
        kvv.as_tensor().clone()
    };
    let y = m.forward(qv.as_tensor(), &kvt, inputs, None).unwrap();
    let w = input(99, y.dims3().unwrap());
    let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let finite = |t: &Tensor| {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().all(|x| x.is_finite())
    };
    let mut ok = store
        .named_vars()
        .iter()
        .all(|(_, v)| grads.get(v.as_tensor()).is_none_or(&finite));
    for t in [qv.as_tensor(), &kvt] {
        ok &= grads.get(t).is_none_or(&finite);
    }
    (rows(&y), ok)
}

/// Asserts rows `dead` are zero, all are finite, and fused equals composed to `1e-5`.
fn check(what: &str, fused: &[Vec<f32>], composed: &[Vec<f32>], dead: &[usize]) {
    for (r, (f, c)) in fused.iter().zip(composed).enumerate() {
        for (a, b) in f.iter().zip(c) {
            assert!(a.is_finite() && b.is_finite(), "{what}: row {r} not finite");
            assert!((a - b).abs() <= 1e-5, "{what}: row {r}: {a} vs {b}");
        }
    }
    // A dead row's attention output is zero, so the module returns out_proj's bias there.
    for &r in dead {
        assert_eq!(fused[r], fused[dead[0]], "{what}: dead row {r}");
        assert_eq!(composed[r], composed[dead[0]], "{what}: dead row {r}");
    }
}

#[test]
fn self_attention_padding_and_left_padding_under_the_causal_mask() {
    let (store, m) = attention(true, false);
    let (b, t) = (3, 5);
    let x = input(1, (b, t, C));
    // Batch 1 entirely padded; batch 2 left-padded by 2 (under the causal mask its first two
    // query rows see only padded keys).
    let pad = Tensor::new(
        &[[0u8, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = causal_mask(t, &Device::Cpu).unwrap();
    for (name, attn_mask, dead) in [
        ("padding", None, vec![5, 6, 7, 8, 9]),
        ("causal", Some(&mask), vec![5, 6, 7, 8, 9, 10, 11]),
    ] {
        let inputs = AttentionInputs {
            key_padding_mask: Some(&pad),
            attn_mask,
            ..Default::default()
        };
        let (yf, okf) = with_fused(true, || run(&m, &store, (&x, &x), &inputs));
        let (yc, okc) = with_fused(false, || run(&m, &store, (&x, &x), &inputs));
        assert!(okf && okc, "{name}: gradients not finite");
        check(name, &yf, &yc, &dead);
        // A relative position bias takes the composed path even with the kernels on.
        let rel = input(3, (H, t, t));
        let with_rel = AttentionInputs {
            rel_pos: Some(&rel),
            ..inputs.clone()
        };
        let (yr, okr) = run(&m, &store, (&x, &x), &with_rel);
        assert!(okr, "{name} + rel_pos: gradients not finite");
        check(&format!("{name} + rel_pos"), &yr, &yr, &dead);
        assert_eq!(
            yr[dead[0]], yf[dead[0]],
            "{name}: dead rows differ with rel_pos"
        );
    }
}

#[test]
fn cross_attention_to_a_fully_padded_memory() {
    let (store, m) = attention(false, false);
    let (b, t, s) = (2, 3, 4);
    let q = input(4, (b, t, C));
    let mem = input(5, (b, s, C));
    let pad = Tensor::new(&[[0u8, 0, 1, 1], [1, 1, 1, 1]], &Device::Cpu).unwrap();
    let inputs = AttentionInputs {
        key_padding_mask: Some(&pad),
        ..Default::default()
    };
    let (yf, okf) = with_fused(true, || run(&m, &store, (&q, &mem), &inputs));
    let (yc, okc) = with_fused(false, || run(&m, &store, (&q, &mem), &inputs));
    assert!(okf && okc);
    check("cross", &yf, &yc, &[3, 4, 5]);
    // The batch that keeps keys is computed as without the other one.
    let one = |x: &Tensor| x.narrow(0, 0, 1).unwrap();
    let alone = AttentionInputs {
        key_padding_mask: Some(&one(&pad)),
        ..Default::default()
    };
    for on in [true, false] {
        let y = with_fused(on, || m.forward(&one(&q), &one(&mem), &alone, None)).unwrap();
        let want = if on { &yf } else { &yc };
        assert_eq!(rows(&y), want[..3].to_vec(), "fused {on}");
    }
}

#[test]
fn incremental_decoding_with_left_padding() {
    for xpos in [false, true] {
        let (_, m) = attention(true, xpos);
        let (b, t) = (2, 4);
        let x = input(6, (b, t, C));
        let pad = Tensor::new(&[[0u8, 0, 0, 0], [1, 1, 0, 0]], &Device::Cpu).unwrap();
        let mask = causal_mask(t, &Device::Cpu).unwrap();
        let full_inputs = AttentionInputs {
            key_padding_mask: Some(&pad),
            attn_mask: Some(&mask),
            ..Default::default()
        };
        for on in [true, false] {
            let full = with_fused(on, || m.forward(&x, &x, &full_inputs, None)).unwrap();
            let full = rows(&full);
            let mut cache = KvCache::default();
            for i in 0..t {
                let step = x.narrow(1, i, 1).unwrap();
                let kpm = pad.narrow(1, 0, i + 1).unwrap();
                let inputs = AttentionInputs {
                    key_padding_mask: Some(&kpm),
                    ..Default::default()
                };
                let y = with_fused(on, || m.forward(&step, &step, &inputs, Some(&mut cache)));
                let y = rows(&y.unwrap());
                for (bi, row) in y.iter().enumerate() {
                    let want = &full[bi * t + i];
                    for (a, w) in row.iter().zip(want) {
                        assert!(a.is_finite(), "xpos {xpos} fused {on} step {i} batch {bi}");
                        assert!((a - w).abs() <= 1e-5, "step {i} batch {bi}: {a} vs {w}");
                    }
                }
            }
            // Batch 1's first two rows are dead: the bias row, equal to each other.
            assert_eq!(full[4], full[5], "xpos {xpos} fused {on}");
        }
    }
}
