//! Operand access for the per-head kernels: strided f32 [`View`]s of the inputs, the [`Scatter`]
//! buffers and [`Dest`]inations the (batch, head) tasks write into, and per-thread [`Scratch`].

use std::borrow::Cow;
use std::cell::RefCell;
use std::marker::PhantomData;

use candle_core::{bail, CpuStorage, Layout, Result, Storage};

use crate::cpu::as_f32;
use crate::gemm::Mat;

/// The CPU storage behind a tensor.
pub(super) fn cpu(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Ok(s),
        _ => bail!("fused attention called on a non-CPU tensor"),
    }
}

/// Row-major strides of a contiguous `[_, a, b, c]` tensor.
fn dense([_, a, b, c]: [usize; 4]) -> [usize; 4] {
    [a * b * c, b * c, c, 1]
}

/// A `[B, len, H, d]` operand as f32 with its strides: f32 storage is read in place whatever its
/// layout, other dtypes are converted to a contiguous copy.
pub(super) struct View<'a> {
    data: Cow<'a, [f32]>,
    off: usize,
    st: [usize; 4],
}

impl<'a> View<'a> {
    /// The operand stored in `s` under the rank-4 layout `l`.
    pub fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        let dims: [usize; 4] = match *l.dims() {
            [a, b, c, d] => [a, b, c, d],
            _ => bail!("attention: operand {:?} is not rank 4", l.dims()),
        };
        Ok(match s {
            CpuStorage::F32(v) => View {
                data: Cow::Borrowed(v.as_slice()),
                off: l.start_offset(),
                st: match *l.stride() {
                    [a, b, c, d] => [a, b, c, d],
                    _ => dense(dims),
                },
            },
            _ => View {
                data: as_f32(s, l)?,
                off: 0,
                st: dense(dims),
            },
        })
    }

    /// Element `[b, r, h, i]` at `data[off + b * st[0] + r * st[1] + h * st[2] + i * st[3]]`.
    pub fn strided(data: &'a [f32], off: usize, st: [usize; 4]) -> Self {
        View {
            data: Cow::Borrowed(data),
            off,
            st,
        }
    }

    /// A contiguous `[B, len, H, d]` operand.
    pub fn from_slice(data: &'a [f32], dims: [usize; 4]) -> Self {
        Self::strided(data, 0, dense(dims))
    }

    /// The slice from element `[b, r0, h, 0]` on (empty when out of range: matmul then errors).
    fn at(&self, b: usize, h: usize, r0: usize) -> &[f32] {
        let i = self.off + b * self.st[0] + r0 * self.st[1] + h * self.st[2];
        self.data.get(i..).unwrap_or(&[])
    }

    /// Rows `r0..` of head `(b, h)` as a `[len, d]` matrix.
    pub fn rows(&self, b: usize, h: usize, r0: usize) -> Mat<'_> {
        Mat {
            data: self.at(b, h, r0),
            rs: self.st[1],
            cs: self.st[3],
        }
    }

    /// Rows `r0..` of head `(b, h)` transposed, as a `[d, len]` matrix.
    pub fn cols(&self, b: usize, h: usize, r0: usize) -> Mat<'_> {
        Mat {
            data: self.at(b, h, r0),
            rs: self.st[3],
            cs: self.st[1],
        }
    }
}

/// An output buffer the (batch, head) tasks write into concurrently, each to its own elements,
/// through raw pointers only so that no two tasks hold overlapping `&mut` slices.
pub(super) struct Scatter<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: `put` only writes through the pointer, each task to its own elements (see `put`), and
// the borrow of the buffer outlives every task.
unsafe impl Send for Scatter<'_> {}
unsafe impl Sync for Scatter<'_> {}

impl<'a> Scatter<'a> {
    pub fn new(v: &'a mut [f32]) -> Self {
        Self {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            _buf: PhantomData,
        }
    }

    /// Copies the rows of `src` (row length `n`) to `start + r * ld`. Callers give each task of
    /// one call different elements (see [`Dest`]), so no element is written twice.
    fn put(&self, start: usize, ld: usize, src: &[f32], n: usize) -> Result<()> {
        let rows = src.len() / n.max(1);
        if rows > 0 && start + (rows - 1) * ld + n > self.len {
            bail!("attention: output block out of range");
        }
        for (r, row) in src.chunks_exact(n).enumerate() {
            // SAFETY: in bounds (checked above); disjoint from other tasks' writes.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), self.ptr.add(start + r * ld), n) };
        }
        Ok(())
    }
}

/// Where one `[B, len, H, d]` result goes in a [`Scatter`] buffer: element `[b, r, h, i]` at
/// `base + (b * len + r) * ld + h * d + i`. Head `h` owns columns `base + h * d..` of every row,
/// so the tasks of one call, one per (batch, head), never write the same element; several
/// destinations can share one buffer at different `base`s (the packed q, k, v gradients).
pub(super) struct Dest<'a> {
    pub buf: &'a Scatter<'a>,
    pub base: usize,
    pub ld: usize,
    pub len: usize,
    pub d: usize,
}

impl Dest<'_> {
    /// Writes `src` (`[rows, d]`) as rows `r0..` of head `(b, h)`.
    pub fn put(&self, (b, h): (usize, usize), r0: usize, src: &[f32]) -> Result<()> {
        let start = self.base + (b * self.len + r0) * self.ld + h * self.d;
        self.buf.put(start, self.ld, src, self.d)
    }
}

/// Scratch buffers of one (batch, head) task.
#[derive(Default)]
pub(super) struct Scratch {
    pub p: Vec<f32>,
    pub stats: Vec<f32>,
    pub ds: Vec<f32>,
    pub rows: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// Scratch above this many floats is freed after use rather than kept by its thread.
const KEEP: usize = 4 << 20;

thread_local! {
    /// Kept between calls: fresh buffers on every call cost as much in page faults as the
    /// softmax itself.
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs `f` with this thread's scratch, grown to `rows` query rows over `s` keys of head dim `d`
/// (the backward needs three more buffers).
pub(super) fn with_scratch<R>(
    (rows, s, d, backward): (usize, usize, usize, bool),
    f: impl FnOnce(&mut Scratch) -> R,
) -> R {
    let grow = |sc: &mut Scratch| {
        let fit = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        };
        fit(&mut sc.p, rows * s);
        fit(&mut sc.stats, 2 * rows);
        fit(&mut sc.rows, rows * d);
        if backward {
            fit(&mut sc.ds, rows * s);
            fit(&mut sc.dk, s * d);
            fit(&mut sc.dv, s * d);
        }
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut sc) => {
            grow(&mut sc);
            let r = f(&mut sc);
            let held = [&sc.p, &sc.ds, &sc.rows, &sc.dk, &sc.dv, &sc.stats].map(|v| v.len());
            if held.iter().sum::<usize>() > KEEP {
                *sc = Scratch::default();
            }
            r
        }
        Err(_) => {
            let mut sc = Scratch::default();
            grow(&mut sc);
            f(&mut sc)
        }
    })
}
