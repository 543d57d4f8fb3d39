//! The direct small-head attention kernels (head dim up to 128 and up to 192 keys, on
//! AVX-512: groups of 16 query rows in registers instead of `gemm` products) against the
//! composed attention, packed and unpacked: head dims and lengths on both sides of every 16-lane
//! boundary, every mask case, fully masked rows (zeros), partial gradients, strided operands,
//! half precision, and both sides of the switch to `gemm`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_dead_rows_zero, assert_finite, both_paths, check, dead_rows, randn, var};
use torchscale_kernels::attention::{attention, attention_packed, AttentionOptions};

/// The additive causal mask `[t, s]` (-inf above the diagonal), in `dtype`.
fn causal(t: usize, s: usize, dtype: DType) -> Tensor {
    let v: Vec<f32> = (0..t * s)
        .map(|i| {
            if i % s > i / s {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (t, s), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A `[b, s]` u8 padding mask with the last `n[i]` keys of batch `i` padded.
fn padding(s: usize, n: &[usize]) -> Tensor {
    let v: Vec<u8> = n
        .iter()
        .flat_map(|&p| (0..s).map(move |j| u8::from(j + p >= s)))
        .collect();
    Tensor::from_vec(v, (n.len(), s), &Device::Cpu).unwrap()
}

/// Every mask case for `[t, s]` scores over `b` batches: none, causal, a finite mask with a
/// causal part, key padding, causal + padding.
fn cases(b: usize, t: usize, s: usize, dt: DType) -> Vec<(&'static str, AttentionOptions)> {
    let pads: Vec<usize> = (0..b).map(|i| (i + 1) % s.min(3)).collect();
    let finite = (causal(t, s, dt) + randn(4, &[t, s], 0.5, dt)).unwrap();
    let masks = [
        ("no mask", None, None),
        ("causal", Some(causal(t, s, dt)), None),
        ("mask", Some(finite), None),
        ("padding", None, Some(padding(s, &pads))),
        (
            "causal+padding",
            Some(causal(t, s, dt)),
            Some(padding(s, &pads)),
        ),
    ];
    masks
        .into_iter()
        .map(|(name, attn_mask, key_padding_mask)| {
            (
                name,
                AttentionOptions {
                    scale: 0.37,
                    attn_mask,
                    key_padding_mask,
                },
            )
        })
        .collect()
}

/// Unpacked and packed, fused against composed, every mask case.
fn both_ops(what: &str, (b, t, s, h, d): (usize, usize, usize, usize, usize), dt: DType, tol: f64) {
    let q = var(1, &[b, t, h, d], 1.0, dt);
    let k = var(2, &[b, s, h, d], 1.0, dt);
    let v = var(3, &[b, s, h, d], 1.0, dt);
    for (name, o) in cases(b, t, s, dt) {
        check(&format!("{what} {name}"), &[&q, &k, &v], tol, || {
            attention(&q, &k, &v, &o)
        });
    }
    if t == s {
        let qkv = var(5, &[b, t, 3 * h * d], 1.0, dt);
        for (name, o) in cases(b, t, t, dt) {
            check(&format!("{what} packed {name}"), &[&qkv], tol, || {
                attention_packed(&qkv, h, &o)
            });
        }
    }
}

#[test]
fn head_dims_and_lengths() {
    for d in [1, 5, 16, 17, 32] {
        for t in [1, 7, 32, 33] {
            both_ops(&format!("d {d} T {t}"), (2, t, t, 2, d), DType::F32, 1e-5);
        }
    }
}

#[test]
fn cross_attention_lengths() {
    for (t, s) in [(7, 33), (33, 7), (16, 48), (40, 17)] {
        both_ops(&format!("T {t} S {s}"), (2, t, s, 3, 8), DType::F32, 1e-5);
    }
}

#[test]
fn model_size_and_switch_sides() {
    // The 48 x 64 decoder's attention, then each side of the switch to `gemm`: S * d = 8192 at
    // d 128 and at S 128 (direct), S 192 (direct) and 193 (gemm), d 129 (gemm).
    both_ops("model", (8, 32, 32, 4, 16), DType::F32, 1e-5);
    for (t, d) in [(64, 128), (128, 64), (192, 32), (193, 32), (20, 129)] {
        let q = var(6, &[1, t, 2, d], 1.0, DType::F32);
        let k = var(7, &[1, t, 2, d], 1.0, DType::F32);
        let v = var(8, &[1, t, 2, d], 1.0, DType::F32);
        let o = AttentionOptions {
            scale: (d as f64).powf(-0.5),
            attn_mask: Some(causal(t, t, DType::F32)),
            key_padding_mask: Some(padding(t, &[3])),
        };
        check(&format!("T {t} d {d}"), &[&q, &k, &v], 1e-5, || {
            attention(&q, &k, &v, &o)
        });
    }
}

#[test]
fn partial_gradients() {
    let (b, t, h, d) = (2, 33, 2, 16);
    let q = var(10, &[b, t, h, d], 1.0, DType::F32);
    let k = var(11, &[b, t, h, d], 1.0, DType::F32);
    let v = var(12, &[b, t, h, d], 1.0, DType::F32);
    let (qc, kc, vc) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    for (name, o) in cases(b, t, t, DType::F32) {
        check(&format!("dq {name}"), &[&q], 1e-5, || {
            attention(&q, kc, vc, &o)
        });
        check(&format!("dk {name}"), &[&k], 1e-5, || {
            attention(qc, &k, vc, &o)
        });
        check(&format!("dv {name}"), &[&v], 1e-5, || {
            attention(qc, kc, &v, &o)
        });
        check(&format!("dq, dv {name}"), &[&q, &v], 1e-5, || {
            attention(&q, kc, &v, &o)
        });
    }
}

#[test]
fn fully_masked_rows() {
    let (b, t, h, d) = (3, 20, 2, 5);
    let q = var(20, &[b, t, h, d], 1.0, DType::F32);
    let k = var(21, &[b, t, h, d], 1.0, DType::F32);
    let v = var(22, &[b, t, h, d], 1.0, DType::F32);
    // Batch 1: every key padded; batch 2: keys 0 and 19. Mask row 17 is all -inf, row 18 keeps
    // only key 19 (padded in batch 2: fully masked there too). Such rows give zeros.
    let mut p = vec![0u8; b * t];
    p[t..2 * t].fill(1);
    p[2 * t] = 1;
    p[3 * t - 1] = 1;
    let pad = Tensor::from_vec(p, (b, t), &Device::Cpu).unwrap();
    let mut m = vec![0f32; t * t];
    m[17 * t..18 * t].fill(f32::NEG_INFINITY);
    m[18 * t..19 * t - 1].fill(f32::NEG_INFINITY);
    let mask = Tensor::from_vec(m, (t, t), &Device::Cpu).unwrap();
    for (name, attn_mask, key_padding_mask) in [
        ("padding", None, Some(pad.clone())),
        ("mask", Some(mask.clone()), None),
        ("both", Some(mask), Some(pad)),
    ] {
        let o = AttentionOptions {
            scale: 0.4,
            attn_mask,
            key_padding_mask,
        };
        let dead = dead_rows(o.attn_mask.as_ref(), o.key_padding_mask.as_ref(), (b, t, t));
        check(&format!("dead rows {name}"), &[&q, &k, &v], 1e-5, || {
            attention(&q, &k, &v, &o)
        });
        let ((yf, yc), grads) = both_paths(&[&q, &k, &v], || attention(&q, &k, &v, &o));
        assert_dead_rows_zero(&format!("{name} fused"), &yf, &dead);
        assert_dead_rows_zero(&format!("{name} composed"), &yc, &dead);
        for (i, (gf, gc)) in grads.iter().enumerate() {
            assert_finite(&format!("{name} fused grad {i}"), gf.as_ref().unwrap());
            assert_finite(&format!("{name} composed grad {i}"), gc.as_ref().unwrap());
        }
        assert_dead_rows_zero(&format!("{name} dq"), grads[0].0.as_ref().unwrap(), &dead);
    }
}

#[test]
fn strided_operands() {
    let (b, t, h, d) = (2, 33, 2, 20);
    let c = h * d;
    // q from a [B, T, C] projection, k from [B, H, T, d] (row stride d, head stride T d), v with
    // its last dim strided (copied to scratch); a packed projection narrowed from a wider one.
    let x = var(30, &[b, t, c], 1.0, DType::F32);
    let kh = var(31, &[b, h, t, d], 1.0, DType::F32);
    let vt = var(32, &[b, t, d, h], 1.0, DType::F32);
    let wide = var(33, &[b, t, 3 * c + 5], 1.0, DType::F32);
    let tr = var(34, &[b, 3 * c, t], 1.0, DType::F32);
    for (name, o) in cases(b, t, t, DType::F32) {
        check(&format!("strided {name}"), &[&x, &kh, &vt], 1e-5, || {
            let q = x.reshape((b, t, h, d))?;
            attention(&q, &kh.transpose(1, 2)?, &vt.transpose(2, 3)?, &o)
        });
        check(&format!("narrowed packed {name}"), &[&wide], 1e-5, || {
            attention_packed(&wide.narrow(2, 2, 3 * c)?, h, &o)
        });
        check(&format!("transposed packed {name}"), &[&tr], 1e-5, || {
            attention_packed(&tr.transpose(1, 2)?, h, &o)
        });
    }
}

#[test]
fn half_precision() {
    // The composed path rounds scores and probabilities to the half type (the fused one keeps
    // them in f32): at T 33 that reaches 2 bf16 ulps of the largest gradient, on the `gemm`
    // path as on the direct one.
    for (dt, tol) in [(DType::F16, 1e-2), (DType::BF16, 2e-2)] {
        both_ops(&format!("{dt:?} d 16"), (2, 33, 33, 2, 16), dt, tol);
        both_ops(&format!("{dt:?} d 5"), (2, 7, 7, 3, 5), dt, tol);
    }
}
