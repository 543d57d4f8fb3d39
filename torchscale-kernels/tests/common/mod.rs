//! Helpers shared by the kernel tests: seeded inputs, and fused-against-composed comparisons of
//! values and gradients.

#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use torchscale_kernels::with_fused;

/// A seeded pseudo-random `[dims]` tensor of `dtype`, values in about N(0, scale^2) (ChaCha8 and
/// `rand_distr`: tests must not depend on candle's unseeded generator).
pub fn randn(seed: u64, dims: &[usize], scale: f32, dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal) * scale)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A variable with [`randn`] values.
pub fn var(seed: u64, dims: &[usize], scale: f32, dtype: DType) -> Var {
    Var::from_tensor(&randn(seed, dims, scale, dtype)).unwrap()
}

/// max |a - b| and max |b| over all elements, in f64.
pub fn max_diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let mut d = 0f64;
    let mut m = 0f64;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.is_nan(), y.is_nan(), "NaN in one path only");
        if !x.is_nan() {
            d = d.max((x - y).abs());
            m = m.max(y.abs());
        }
    }
    (d, m)
}

/// Asserts `|a - b| <= tol * max(1, max|b|)` element-wise, naming `what`.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let (d, m) = max_diff(a, b);
    assert!(
        d <= tol * m.max(1.0),
        "{what}: max |fused - composed| = {d:e} (max |composed| {m:e}, tol {tol:e})"
    );
}

/// Gradients of one input on the fused and the composed path.
pub type GradPair = (Option<Tensor>, Option<Tensor>);

/// Runs `f` with the fused kernels on and off; returns (fused output, composed output) and the
/// gradients of `sum(output * weight)` with respect to each of `wrt`, fused then composed.
pub fn both_paths(
    wrt: &[&Tensor],
    f: impl Fn() -> Result<Tensor>,
) -> ((Tensor, Tensor), Vec<GradPair>) {
    let run = |on: bool| {
        with_fused(on, || {
            let y = f().unwrap();
            let w = randn(99, y.dims(), 1.0, DType::F32)
                .to_dtype(y.dtype())
                .unwrap();
            let loss = (y.to_dtype(DType::F32).unwrap() * w.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<Option<Tensor>> = wrt.iter().map(|t| grads.get(t).cloned()).collect();
            (y, g)
        })
    };
    let (yf, gf) = run(true);
    let (yc, gc) = run(false);
    ((yf, yc), gf.into_iter().zip(gc).collect())
}

/// [`both_paths`] then [`assert_close`] on the outputs and on every gradient, each of which must
/// exist on both paths.
pub fn check(what: &str, wrt: &[&Tensor], tol: f64, f: impl Fn() -> Result<Tensor>) {
    let ((yf, yc), grads) = both_paths(wrt, f);
    assert_eq!(yf.dtype(), yc.dtype(), "{what}: output dtype");
    assert_close(&format!("{what} forward"), &yf, &yc, tol);
    for (i, (gf, gc)) in grads.into_iter().enumerate() {
        let gf = gf.unwrap_or_else(|| panic!("{what}: fused path gave input {i} no gradient"));
        let gc = gc.unwrap_or_else(|| panic!("{what}: composed path gave input {i} no gradient"));
        assert_close(&format!("{what} gradient {i}"), &gf, &gc, tol);
    }
}

/// Per `(batch, query row)` of a `[b, t]` grid: true when every one of the `s` keys is masked
/// (`-inf` in the `[t, s]` mask or padded in the `[b, s]` padding mask): a fully masked row.
pub fn dead_rows(
    mask: Option<&Tensor>,
    pad: Option<&Tensor>,
    (b, t, s): (usize, usize, usize),
) -> Vec<bool> {
    let m: Option<Vec<f32>> = mask.map(|m| {
        let m = m.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        m.to_vec1().unwrap()
    });
    let p: Option<Vec<f32>> = pad.map(|p| {
        let p = p.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        p.to_vec1().unwrap()
    });
    let closed = |bi: usize, ti: usize, j: usize| {
        m.as_ref()
            .is_some_and(|m| m[ti * s + j] == f32::NEG_INFINITY)
            || p.as_ref().is_some_and(|p| p[bi * s + j] != 0.0)
    };
    (0..b * t)
        .map(|i| (0..s).all(|j| closed(i / t, i % t, j)))
        .collect()
}

/// Asserts that `y` (`[b, t, ...]`) is exactly zero in the rows `dead` marks (row `bi * t + ti`)
/// and finite everywhere.
pub fn assert_dead_rows_zero(what: &str, y: &Tensor, dead: &[bool]) {
    let v = y
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(v.len() % dead.len(), 0, "{what}: {:?} rows", y.dims());
    let w = v.len() / dead.len();
    assert!(v.iter().all(|x| x.is_finite()), "{what}: not finite");
    for (r, row) in v.chunks(w).enumerate() {
        if dead[r] {
            assert!(row.iter().all(|&x| x == 0.0), "{what}: row {r} is not zero");
        }
    }
}

/// Asserts that every element of `y` is finite.
pub fn assert_finite(what: &str, y: &Tensor) {
    let v = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let v = v.to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()), "{what}: not finite");
}
