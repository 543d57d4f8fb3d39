//! Operand access for the per-head kernels: strided f32 [`View`]s of the inputs, the [`Scatter`]
//! buffers and [`Dest`]inations the (batch, head) tasks write into, and per-thread [`Scratch`].

use std::borrow::Cow;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

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

    /// The offsets of element `[b, r0, h, 0]` and of the last of rows `r0..r0 + n`, columns
    /// `0..d`, checked against the data (an error, not a panic, if a layout were inconsistent).
    fn span(&self, (b, h): (usize, usize), r0: usize, n: usize, d: usize) -> Result<usize> {
        let start = self.off + b * self.st[0] + r0 * self.st[1] + h * self.st[2];
        let last = start + (n.max(1) - 1) * self.st[1] + (d.max(1) - 1) * self.st[3];
        if n > 0 && d > 0 && last >= self.data.len() {
            bail!("attention: operand view out of range");
        }
        Ok(start)
    }

    /// `dst[i * ld + c] = scale * x[r0 + i, c]` for rows `i < n` of head `(b, h)`, columns
    /// `c < d`, and 0 in columns `d..ld` (the kernels read whole 16-lane chunks).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn copy_rows(
        &self,
        bh: (usize, usize),
        (r0, n, d): (usize, usize, usize),
        scale: f32,
        dst: &mut [f32],
        ld: usize,
    ) -> Result<()> {
        let start = self.span(bh, r0, n, d)?;
        let (rs, cs) = (self.st[1], self.st[3]);
        for (i, row) in dst.chunks_exact_mut(ld).take(n).enumerate() {
            let (x, pad) = row.split_at_mut(d);
            let src = &self.data[start + i * rs..];
            if cs == 1 {
                for (o, &v) in x.iter_mut().zip(&src[..d]) {
                    *o = scale * v;
                }
            } else {
                for (c, o) in x.iter_mut().enumerate() {
                    *o = scale * src[c * cs];
                }
            }
            pad.fill(0.0);
        }
        Ok(())
    }

    /// Rows `r0..r0 + n` (columns `0..d`) of head `(b, h)` as a slice from the first and its
    /// row stride, when the columns are contiguous.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn row_block(
        &self,
        bh: (usize, usize),
        (r0, n, d): (usize, usize, usize),
    ) -> Result<Option<(&[f32], usize)>> {
        let start = self.span(bh, r0, n, d)?;
        Ok((self.st[3] == 1).then(|| (&self.data[start..], self.st[1])))
    }

    /// `dst[c * lanes + i] = scale * x[r0 + i, c]` (rows of head `(b, h)` transposed) for
    /// `i < n`, `c < d`, and 0 in lanes `n..lanes`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn copy_cols(
        &self,
        bh: (usize, usize),
        (r0, n, d): (usize, usize, usize),
        scale: f32,
        dst: &mut [f32],
        lanes: usize,
    ) -> Result<()> {
        let start = self.span(bh, r0, n, d)?;
        let (rs, cs) = (self.st[1], self.st[3]);
        for (c, col) in dst.chunks_exact_mut(lanes).take(d).enumerate() {
            let (x, pad) = col.split_at_mut(n);
            for (i, o) in x.iter_mut().enumerate() {
                *o = scale * self.data[start + i * rs + c * cs];
            }
            pad.fill(0.0);
        }
        Ok(())
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
    _buf: PhantomData<&'a mut [MaybeUninit<f32>]>,
}

// SAFETY: `put` only writes through the pointer, each task to its own elements (see `put`), and
// the borrow of the buffer outlives every task.
unsafe impl Send for Scatter<'_> {}
unsafe impl Sync for Scatter<'_> {}

impl<'a> Scatter<'a> {
    /// The pointer to element `start`, after checking that `rows` rows of stride `ld` with `n`
    /// elements each from there lie in the buffer.
    fn block(&self, start: usize, ld: usize, (rows, n): (usize, usize)) -> Result<*mut f32> {
        if rows > 0 && start + (rows - 1) * ld + n > self.len {
            bail!("attention: output block out of range");
        }
        // SAFETY: `start <= len` when the block is in range (or empty: then unused).
        Ok(unsafe { self.ptr.add(start.min(self.len)) })
    }

    /// A buffer whose elements the tasks will write (the caller reads it only after they all
    /// have: the forward and backward write every element of their destinations).
    pub fn new(v: &'a mut [MaybeUninit<f32>]) -> Self {
        Self {
            ptr: v.as_mut_ptr().cast(),
            len: v.len(),
            _buf: PhantomData,
        }
    }

    /// Copies the first `n` of each `src_ld` elements of `src` (the rows of a block) to
    /// `start + r * ld`. Callers give each task of one call different elements (see [`Dest`]),
    /// so no element is written twice.
    fn put(&self, start: usize, ld: usize, (src, src_ld): (&[f32], usize), n: usize) -> Result<()> {
        self.block(start, ld, (src.len() / src_ld.max(1), n))?;
        if n > src_ld {
            bail!("attention: output rows wider than their source");
        }
        for (r, row) in src.chunks_exact(src_ld.max(1)).enumerate() {
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
    pub fn put(&self, bh: (usize, usize), r0: usize, src: &[f32]) -> Result<()> {
        self.put_ld(bh, r0, src, self.d)
    }

    /// [`Dest::put_ld`] by the direct kernels' AVX-512 row copy (no `memcpy` call per short row).
    #[cfg(target_arch = "x86_64")]
    pub fn put_lanes(
        &self,
        kn: super::lanes::Avx512,
        (b, h): (usize, usize),
        r0: usize,
        src: &[f32],
        src_ld: usize,
    ) -> Result<()> {
        let start = self.base + (b * self.len + r0) * self.ld + h * self.d;
        let rows = src.len() / src_ld.max(1);
        let dst = self.buf.block(start, self.ld, (rows, self.d))?;
        // SAFETY: `block` checked that the rows lie in the buffer; head `h` of each row belongs
        // to this task alone (see `Dest`).
        unsafe { kn.store_rows((src, src_ld), (rows, self.d), (dst, self.ld)) }
    }

    /// Writes the first `d` of every `src_ld` elements of `src` as rows `r0..` of head `(b, h)`.
    pub fn put_ld(
        &self,
        (b, h): (usize, usize),
        r0: usize,
        src: &[f32],
        src_ld: usize,
    ) -> Result<()> {
        let start = self.base + (b * self.len + r0) * self.ld + h * self.d;
        self.buf.put(start, self.ld, (src, src_ld), self.d)
    }
}

/// Scratch buffers of one (batch, head) task: probabilities and their gradients (`p`, `ds`),
/// softmax statistics, a block of output rows, the `dk` and `dv` sums; the direct kernels of
/// small heads also copy their operands here (`k`, `v`, `q` and `g` as rows, `qt` and `gt`
/// transposed).
#[derive(Default)]
pub(super) struct Scratch {
    pub p: Vec<f32>,
    pub stats: Vec<f32>,
    pub ds: Vec<f32>,
    pub rows: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub qt: Vec<f32>,
    pub qr: Vec<f32>,
    pub gt: Vec<f32>,
    pub gr: Vec<f32>,
}

/// Grows `v` to at least `n` elements.
fn fit(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

impl Scratch {
    /// Room for the gemm path: blocks of `rows` query rows over `s` keys of head dim `d` (the
    /// backward needs three more buffers).
    pub fn reserve_gemm(&mut self, (rows, s, d, backward): (usize, usize, usize, bool)) {
        fit(&mut self.p, rows * s);
        fit(&mut self.stats, 2 * rows);
        fit(&mut self.rows, rows * d);
        if backward {
            fit(&mut self.ds, rows * s);
            fit(&mut self.dk, s * d);
            fit(&mut self.dv, s * d);
        }
    }

    /// Room for the direct kernels: groups of `lanes` query rows over `s` keys, head dim `d`
    /// padded to `dp`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn reserve_small(
        &mut self,
        (lanes, s, d, dp, backward): (usize, usize, usize, usize, bool),
    ) {
        fit(&mut self.p, s * lanes);
        fit(&mut self.stats, 2 * lanes);
        fit(&mut self.rows, lanes * dp);
        fit(&mut self.k, s * dp);
        fit(&mut self.v, s * dp);
        fit(&mut self.qt, d * lanes);
        if backward {
            fit(&mut self.ds, s * lanes);
            fit(&mut self.dk, s * dp);
            fit(&mut self.dv, s * dp);
            fit(&mut self.qr, lanes * dp);
            fit(&mut self.gt, d * lanes);
            fit(&mut self.gr, lanes * dp);
        }
    }

    /// Floats held.
    fn held(&self) -> usize {
        [
            &self.p,
            &self.ds,
            &self.rows,
            &self.dk,
            &self.dv,
            &self.stats,
            &self.k,
            &self.v,
            &self.qt,
            &self.qr,
            &self.gt,
            &self.gr,
        ]
        .map(|v| v.len())
        .iter()
        .sum()
    }
}

/// Scratch above this many floats is freed after use rather than kept by its thread.
const KEEP: usize = 4 << 20;

thread_local! {
    /// Kept between calls: fresh buffers on every call cost as much in page faults as the
    /// softmax itself.
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs `f` with this thread's scratch, grown by `grow` first.
pub(super) fn with_scratch<R>(grow: impl Fn(&mut Scratch), f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut sc) => {
            grow(&mut sc);
            let r = f(&mut sc);
            if sc.held() > KEEP {
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
