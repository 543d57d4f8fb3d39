//! The fused attention against the composed candle attention: outputs and the gradients of q, k
//! and v, with and without masks, odd sizes, strided inputs, half precision and fully masked
//! rows (zeros, not NaN).

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::{assert_dead_rows_zero, assert_finite, both_paths, check, dead_rows, randn, var};
use torchscale_kernels::attention::{attention, attention_composed, AttentionOptions};
use torchscale_kernels::with_fused;

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
        .flat_map(|&p| (0..s).map(move |j| u8::from(j >= s - p)))
        .collect();
    Tensor::from_vec(v, (n.len(), s), &Device::Cpu).unwrap()
}

fn opts(d: usize, mask: Option<Tensor>, pad: Option<Tensor>) -> AttentionOptions {
    AttentionOptions {
        scale: (d as f64).powf(-0.5),
        attn_mask: mask,
        key_padding_mask: pad,
    }
}

/// Checks fused against composed on `[b, t|s, h, d]` inputs for every mask combination.
fn all_masks(
    what: &str,
    (b, t, s, h, d): (usize, usize, usize, usize, usize),
    dt: DType,
    tol: f64,
) {
    let q = var(1, &[b, t, h, d], 1.0, dt);
    let k = var(2, &[b, s, h, d], 1.0, dt);
    let v = var(3, &[b, s, h, d], 1.0, dt);
    let pads: Vec<usize> = (0..b).map(|i| (i + 1) % s.min(3)).collect();
    // A mask with finite values besides -inf, and -inf only where every row keeps a key.
    let mask = (causal(t, s, dt) + randn(4, &[t, s], 0.5, dt)).unwrap();
    let cases = [
        ("no mask", None, None),
        ("causal", Some(causal(t, s, dt)), None),
        ("mask", Some(mask), None),
        ("padding", None, Some(padding(s, &pads))),
        (
            "causal+padding",
            Some(causal(t, s, dt)),
            Some(padding(s, &pads)),
        ),
    ];
    for (name, mask, pad) in cases {
        let o = opts(d, mask, pad);
        check(&format!("{what} {name}"), &[&q, &k, &v], tol, || {
            attention(&q, &k, &v, &o)
        });
    }
}

#[test]
fn odd_sizes_f32() {
    all_masks("odd", (2, 7, 7, 3, 5), DType::F32, 1e-5);
    all_masks("single", (1, 1, 1, 1, 1), DType::F32, 1e-5);
}

#[test]
fn cross_attention_f32() {
    all_masks("cross T>S", (2, 7, 5, 3, 5), DType::F32, 1e-5);
    all_masks("cross T<S", (3, 4, 9, 2, 6), DType::F32, 1e-5);
}

#[test]
fn several_row_blocks_threaded() {
    // T > 64: several blocks of query rows, causal skipping, rayon over (b, h).
    all_masks("blocks", (2, 150, 150, 3, 16), DType::F32, 1e-5);
    all_masks("blocks cross", (2, 130, 70, 2, 8), DType::F32, 1e-5);
}

#[test]
fn strided_inputs() {
    let (b, t, h, d) = (2, 7, 3, 5);
    let c = h * d;
    let o = opts(d, Some(causal(t, t, DType::F32)), Some(padding(t, &[1, 2])));
    // q from a [B, T, C] projection (the caller's case), k from a [B, H, T, d] tensor,
    // v from a fused [B, T, 2C] projection (row stride 2C) with d strided in the middle dim.
    let x = var(5, &[b, t, c], 1.0, DType::F32);
    let kh = var(6, &[b, h, t, d], 1.0, DType::F32);
    let kv = var(7, &[b, t, 2 * c], 1.0, DType::F32);
    check("strided", &[&x, &kh, &kv], 1e-5, || {
        let q = x.reshape((b, t, h, d))?;
        let k = kh.transpose(1, 2)?;
        let v = kv.narrow(2, c, c)?.reshape((b, t, d, h))?.transpose(2, 3)?;
        attention(&q, &k, &v, &o)
    });
    // Last dim not contiguous for q, k, v alike, also in half precision (converted copies).
    for dt in [DType::F32, DType::BF16] {
        let q = var(8, &[b, t, d, h], 1.0, dt);
        let k = var(9, &[b, t, d, h], 1.0, dt);
        let v = var(10, &[b, t, d, h], 1.0, dt);
        let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
        check(
            &format!("last dim strided {dt:?}"),
            &[&q, &k, &v],
            tol,
            || {
                let f = |x: &Tensor| x.transpose(2, 3);
                attention(&f(&q)?, &f(&k)?, &f(&v)?, &o)
            },
        );
    }
}

#[test]
fn half_precision() {
    for dt in [DType::F16, DType::BF16] {
        // Both paths round to the half type; the composed one also rounds scores and
        // probabilities, the fused one keeps them in f32.
        all_masks(&format!("{dt:?}"), (2, 7, 5, 3, 8), dt, 1e-2);
        all_masks(&format!("{dt:?} blocks"), (1, 80, 80, 2, 16), dt, 1e-2);
    }
}

#[test]
fn fully_masked_rows_give_zeros_in_both_paths() {
    // Small heads (the direct kernels on AVX-512), then more keys than those take (`gemm` and the
    // column softmax, with several row blocks).
    for (b, t, s, h, d) in [(3, 5, 4, 2, 3), (3, 70, 200, 2, 8)] {
        let q = var(11, &[b, t, h, d], 1.0, DType::F32);
        let k = var(12, &[b, s, h, d], 1.0, DType::F32);
        let v = var(13, &[b, s, h, d], 1.0, DType::F32);
        // Batch 1 has every key padded, batch 2 its first and last keys. Mask row 2 is all -inf,
        // row 3 keeps only the last key and row 4 only key 0: both fully masked in batch 2.
        let mut p = vec![0u8; b * s];
        p[s..2 * s].fill(1);
        p[2 * s] = 1;
        p[3 * s - 1] = 1;
        let pad = Tensor::from_vec(p, (b, s), &Device::Cpu).unwrap();
        let mut m = vec![0f32; t * s];
        m[2 * s..3 * s].fill(f32::NEG_INFINITY);
        m[3 * s..4 * s - 1].fill(f32::NEG_INFINITY);
        m[4 * s + 1..5 * s].fill(f32::NEG_INFINITY);
        let mask = Tensor::from_vec(m, (t, s), &Device::Cpu).unwrap();
        for (name, mask, pad) in [
            ("padding", None, Some(pad.clone())),
            ("mask", Some(mask.clone()), None),
            ("both", Some(mask), Some(pad)),
        ] {
            let name = format!("{name} s {s}");
            let dead = dead_rows(mask.as_ref(), pad.as_ref(), (b, t, s));
            assert!(dead.iter().any(|&x| x), "{name}: no fully masked row");
            let o = opts(d, mask, pad);
            check(&format!("dead rows, {name}"), &[&q, &k, &v], 1e-5, || {
                attention(&q, &k, &v, &o)
            });
            let ((yf, yc), grads) = both_paths(&[&q, &k, &v], || attention(&q, &k, &v, &o));
            assert_dead_rows_zero(&format!("{name} fused"), &yf, &dead);
            assert_dead_rows_zero(&format!("{name} composed"), &yc, &dead);
            for (i, (gf, gc)) in grads.iter().enumerate() {
                assert_finite(&format!("{name} fused grad {i}"), gf.as_ref().unwrap());
                assert_finite(&format!("{name} composed grad {i}"), gc.as_ref().unwrap());
            }
            // A fully masked query row takes no part: its q gets no gradient.
            let (dqf, dqc) = (grads[0].0.as_ref().unwrap(), grads[0].1.as_ref().unwrap());
            assert_dead_rows_zero(&format!("{name} dq"), dqf, &dead);
            assert_dead_rows_zero(&format!("{name} dq composed"), dqc, &dead);
        }
    }
}

/// A batch element with a fully masked row leaves the other batch elements exactly as they are
/// computed without it, on both paths.
#[test]
fn dead_batch_leaves_the_others_bitwise() {
    let (t, h, d) = (6, 2, 4);
    let q = randn(14, &[2, t, h, d], 1.0, DType::F32);
    let k = randn(15, &[2, t, h, d], 1.0, DType::F32);
    let v = randn(16, &[2, t, h, d], 1.0, DType::F32);
    // Left padding: batch 1's first two keys are padded, so under the causal mask its first two
    // query rows see only padded keys.
    let pad = Tensor::new(&[[0u8, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], &Device::Cpu).unwrap();
    let o = opts(d, Some(causal(t, t, DType::F32)), Some(pad.clone()));
    let one = |x: &Tensor| x.narrow(0, 0, 1).unwrap();
    let o1 = opts(d, Some(causal(t, t, DType::F32)), Some(one(&pad)));
    for on in [true, false] {
        let both = with_fused(on, || attention(&q, &k, &v, &o)).unwrap();
        let alone = with_fused(on, || attention(&one(&q), &one(&k), &one(&v), &o1)).unwrap();
        let first = both.narrow(0, 0, 1).unwrap().flatten_all().unwrap();
        assert_eq!(
            first.to_vec1::<f32>().unwrap(),
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "fused {on}"
        );
        let dead = dead_rows(Some(&causal(t, t, DType::F32)), Some(&pad), (2, t, t));
        assert_eq!(dead.iter().filter(|&&x| x).count(), 2);
        assert_dead_rows_zero(&format!("left padding, fused {on}"), &both, &dead);
    }
}

#[test]
fn float_padding_mask_and_f64_mask() {
    let (b, t, h, d) = (2, 6, 2, 4);
    let q = var(18, &[b, t, h, d], 1.0, DType::F32);
    let k = var(19, &[b, t, h, d], 1.0, DType::F32);
    let v = var(20, &[b, t, h, d], 1.0, DType::F32);
    let pad = padding(t, &[1, 3]).to_dtype(DType::F32).unwrap();
    let mask = causal(t, t, DType::F64);
    let o = opts(d, Some(mask), Some(pad));
    check("float masks", &[&q, &k, &v], 1e-5, || {
        attention(&q, &k, &v, &o)
    });
}

#[test]
fn frozen_inputs_get_no_gradient() {
    let (b, t, h, d) = (2, 3, 2, 4);
    let q = var(14, &[b, t, h, d], 1.0, DType::F32);
    let k = randn(15, &[b, t, h, d], 1.0, DType::F32);
    let v = var(16, &[b, t, h, d], 1.0, DType::F32);
    let y = attention(&q, &k, &v, &opts(d, None, None)).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&k).is_none());
    assert_eq!(g.get(&q).unwrap().dims(), &[b, t, h, d]);
    assert_eq!(g.get(&v).unwrap().dims(), &[b, t, h, d]);
}

#[test]
fn bad_shapes_are_errors() {
    let t = |dims: &[usize]| randn(17, dims, 1.0, DType::F32);
    let (q, k) = (t(&[2, 3, 2, 4]), t(&[2, 5, 2, 4]));
    let o = opts(4, None, None);
    for fused in [true, false] {
        with_fused(fused, || {
            let err = |r: Result<Tensor>| r.unwrap_err().to_string();
            assert!(err(attention(&t(&[2, 3, 8]), &k, &k, &o)).contains("q must be"));
            assert!(err(attention(&q, &t(&[2, 5, 2, 3]), &k, &o)).contains("k "));
            assert!(err(attention(&q, &t(&[1, 5, 2, 4]), &k, &o)).contains("k "));
            assert!(err(attention(&q, &k, &t(&[2, 4, 2, 4]), &o)).contains("v "));
            let half = k.to_dtype(DType::F16).unwrap();
            assert!(err(attention(&q, &k, &half, &o)).contains("dtype"));
            let bad_mask = opts(4, Some(t(&[3, 3])), None);
            assert!(err(attention(&q, &k, &k, &bad_mask)).contains("attn_mask"));
            let bad_pad = opts(4, None, Some(padding(4, &[0, 1])));
            assert!(err(attention(&q, &k, &k, &bad_pad)).contains("key_padding_mask"));
        });
    }
    assert!(attention_composed(&q, &t(&[2, 5, 3, 4]), &k, &o).is_err());
}

/// Fused against composed at the benchmark sizes, best of several runs (release: `cargo test
/// --release -p torchscale-kernels --test attention -- --ignored --nocapture`).
#[test]
#[ignore]
fn timing() {
    use std::time::Instant;
    let sizes = [
        (8, 256, 8, 64, true),
        (8, 32, 4, 16, true),
        (8, 32, 4, 16, false),
    ];
    for (b, t, h, d, causal_mask) in sizes {
        let c = h * d;
        let x = var(20, &[b, t, c], 1.0, DType::F32);
        let kx = var(21, &[b, t, c], 1.0, DType::F32);
        let vx = var(22, &[b, t, c], 1.0, DType::F32);
        let o = opts(d, causal_mask.then(|| causal(t, t, DType::F32)), None);
        let best_ms = |fused: bool, backward: bool| -> f64 {
            with_fused(fused, || {
                let step = || {
                    let split = |x: &Tensor| x.reshape((b, t, h, d)).unwrap();
                    let y = attention(&split(&x), &split(&kx), &split(&vx), &o).unwrap();
                    if backward {
                        let _ = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    }
                };
                step();
                let iters = if t > 100 { 5 } else { 100 };
                (0..iters)
                    .map(|_| {
                        let start = Instant::now();
                        step();
                        start.elapsed().as_secs_f64() * 1e3
                    })
                    .fold(f64::MAX, f64::min)
            })
        };
        // Alternating rounds, best of all: both paths see the same allocator state (glibc
        // raises its mmap threshold once big buffers are freed, which changes page faults).
        let mut best = [f64::MAX; 4];
        for _ in 0..3 {
            for (i, (fused, backward)) in
                [(true, false), (false, false), (true, true), (false, true)]
                    .into_iter()
                    .enumerate()
            {
                best[i] = best[i].min(best_ms(fused, backward));
            }
        }
        for (what, f, c) in [("fwd", best[0], best[1]), ("fwd+bwd", best[2], best[3])] {
            println!(
                "B={b} T=S={t} H={h} d={d} causal={causal_mask} {what}: fused {f:.3} ms, \
                 composed {c:.3} ms, {:.2}x",
                c / f
            );
        }
    }
}
