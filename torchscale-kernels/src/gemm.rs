//! f32 matrix products on strided operands through the `gemm` crate (the same one candle uses),
//! so that transposed operands of the backward products are read in place, never copied.

use std::mem::MaybeUninit;

use candle_core::{bail, Result};

/// A matrix operand: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `[rows, cols]` matrix with row stride `ld`.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with row stride `ld`.
    pub fn transposed(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: ld,
        }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// Products below this many multiply-adds stay on the calling thread. From outside rayon's pool
/// a split wakes a worker, which on a virtual machine costs about what splitting a product of a
/// few tens of microseconds saves (the 48 x 64 decoder's 4M multiply-add FFN products ran no
/// faster split); from a worker the split is cheap, and a 256 x 64 x 256 product ran 1.7x faster
/// on two threads.
fn par_min_macs() -> usize {
    if crate::cpu::on_worker() {
        1 << 19
    } else {
        1 << 24
    }
}

/// Whether a product of this size is worth splitting over threads.
fn parallel(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= par_min_macs() {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst[m, n] (row stride ld) = scale * a[m, k] @ b[k, n] (+ dst if accumulate)`.
///
/// `threaded: false` keeps the product on the calling thread (for callers that already split
/// their work over threads).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
    threaded: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst_fits = (m - 1) * ld + n <= dst.len() && ld >= n;
    if !dst_fits || !a.fits(m, k) || !b.fits(k, n) {
        bail!("matmul operands too small for [{m}, {k}] @ [{k}, {n}]");
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ld..r * ld + n].fill(0.0);
            }
        }
        return Ok(());
    }
    let par = if threaded {
        parallel(m, n, k)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the product touches was bounds-checked above; `dst` is borrowed
    // mutably, so it cannot alias `a` or `b`.
    unsafe {
        raw(
            (m, n, k),
            dst.as_mut_ptr(),
            ld,
            accumulate,
            a,
            b,
            scale,
            par,
        )
    };
    Ok(())
}

/// gemm's `dst = scale * a @ b (+ dst if read_dst)` with `dst` row-major of row stride `ld`.
///
/// # Safety
/// `dst` holds `(m - 1) * ld + n` writable elements that alias neither operand, and the operands
/// hold `[m, k]` and `[k, n]` under their strides; `dst` is read only when `read_dst`.
#[allow(clippy::too_many_arguments)]
unsafe fn raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ld: usize,
    read_dst: bool,
    a: Mat,
    b: Mat,
    scale: f32,
    par: gemm::Parallelism,
) {
    // SAFETY: the caller's promise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ld as isize,
            read_dst,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// `dst[m, n] (row stride ld) = scale * a[m, k] @ b[k, n]` into memory that is never read (so
/// it may be uninitialised): every element of the `[m, n]` block is written (zeros when `k` is
/// 0); what lies between the rows when `ld > n` is left as it was.
pub(crate) fn matmul_uninit(
    (m, n, k): (usize, usize, usize),
    dst: &mut [MaybeUninit<f32>],
    ld: usize,
    a: Mat,
    b: Mat,
    scale: f32,
    threaded: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst_fits = (m - 1) * ld + n <= dst.len() && ld >= n;
    if !dst_fits || !a.fits(m, k) || !b.fits(k, n) {
        bail!("matmul operands too small for [{m}, {k}] @ [{k}, {n}]");
    }
    if k == 0 {
        for r in 0..m {
            dst[r * ld..r * ld + n].fill(MaybeUninit::new(0.0));
        }
        return Ok(());
    }
    let par = if threaded {
        parallel(m, n, k)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the product touches was bounds-checked above; `dst` is borrowed
    // mutably, so it cannot alias `a` or `b`; with `read_dst` false gemm never reads it.
    unsafe {
        raw(
            (m, n, k),
            dst.as_mut_ptr().cast::<f32>(),
            ld,
            false,
            a,
            b,
            scale,
            par,
        )
    };
    Ok(())
}

/// A fresh `[m, n]` row-major buffer holding `scale * a @ b`, never zero-filled first: the product
/// writes every element (a third of the time of a small kernel went to zeroing its output).
pub(crate) fn product(
    (m, n, k): (usize, usize, usize),
    a: Mat,
    b: Mat,
    scale: f32,
    threaded: bool,
) -> Result<Vec<f32>> {
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0f32; m * n]);
    }
    if !a.fits(m, k) || !b.fits(k, n) {
        bail!("matmul operands too small for [{m}, {k}] @ [{k}, {n}]");
    }
    let mut dst: Vec<MaybeUninit<f32>> = Vec::with_capacity(m * n);
    // SAFETY: `MaybeUninit` elements need no initialisation.
    unsafe { dst.set_len(m * n) };
    let par = if threaded {
        parallel(m, n, k)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the operands were bounds-checked above and `dst` holds `m * n` elements with row
    // stride `n`; with `read_dst` false the product never reads `dst`.
    unsafe {
        raw(
            (m, n, k),
            dst.as_mut_ptr().cast::<f32>(),
            n,
            false,
            a,
            b,
            scale,
            par,
        )
    };
    Ok(assume_written(dst))
}

/// `Vec<MaybeUninit<f32>>` → `Vec<f32>` without a copy.
///
/// Every element must have been written; callers state why in their SAFETY comment.
pub(crate) fn assume_written(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
    // SAFETY: same allocation, layout and length; `MaybeUninit<f32>` has the layout of `f32`, and
    // the caller guarantees that every element is initialised.
    unsafe { Vec::from_raw_parts(ptr.cast::<f32>(), len, cap) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_products_match_naive() {
        let (m, n, k) = (37, 29, 53);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
            .collect();
        for (am, bm) in [
            (Mat::rows(&a, k), Mat::rows(&b, n)),
            (Mat::transposed(&a, m), Mat::rows(&b, n)),
            (Mat::rows(&a, k), Mat::transposed(&b, k)),
        ] {
            let want = naive(m, n, k, am, bm);
            let mut got = vec![1f32; m * n];
            matmul((m, n, k), &mut got, n, false, am, bm, 1.0, true).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{g} vs {w}");
            }
            // Accumulating with a scale.
            matmul((m, n, k), &mut got, n, true, am, bm, -0.5, false).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - 0.5 * w).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn product_matches_naive_and_handles_empty() {
        let (m, n, k) = (19, 23, 31);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 3 % 17) as f32 - 8.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 11 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let (am, bm) = (Mat::transposed(&a, m), Mat::rows(&b, n));
        let want = naive(m, n, k, am, bm);
        let got = product((m, n, k), am, bm, 2.0, true).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - 2.0 * w).abs() < 1e-4);
        }
        assert_eq!(
            product((3, 4, 0), am, bm, 1.0, false).unwrap(),
            vec![0.0; 12]
        );
        assert!(product((m + 1, n, k), am, bm, 1.0, false).is_err());
    }

    #[test]
    fn uninit_destination_is_fully_written() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 - 2.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 - 3.0).collect();
        let (am, bm) = (Mat::rows(&a, k), Mat::rows(&b, n));
        let want = naive(m, n, k, am, bm);
        // Row stride n + 2: the gaps keep their values.
        let ld = n + 2;
        let mut dst = vec![MaybeUninit::new(-7.0f32); (m - 1) * ld + n];
        matmul_uninit((m, n, k), &mut dst, ld, am, bm, 1.0, true).unwrap();
        for r in 0..m {
            for c in 0..ld.min((m - 1) * ld + n - r * ld) {
                // SAFETY: every element was initialised above.
                let v = unsafe { dst[r * ld + c].assume_init() };
                if c < n {
                    assert!((v - want[r * n + c]).abs() < 1e-4);
                } else {
                    assert_eq!(v, -7.0);
                }
            }
        }
        matmul_uninit((m, n, 0), &mut dst, ld, am, bm, 1.0, false).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { dst[ld + 1].assume_init() }, 0.0);
        assert!(matmul_uninit((m, n + 3, k), &mut dst, ld, am, bm, 1.0, false).is_err());
    }

    #[test]
    fn short_operands_are_errors() {
        let a = vec![0f32; 5];
        let mut d = vec![0f32; 4];
        let e = matmul(
            (2, 2, 3),
            &mut d,
            2,
            false,
            Mat::rows(&a, 3),
            Mat::rows(&a, 2),
            1.0,
            false,
        );
        assert!(e.is_err());
    }
}
