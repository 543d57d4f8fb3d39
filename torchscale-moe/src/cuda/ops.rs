//! Dispatch and combine as candle custom ops with backwards: [`dispatch`] (`[S, C] -> [R, C]`)
//! and [`combine`] (`[R, C]`, gate `[S, k]` `-> [S, C]`). On CUDA they launch the kernels of
//! `kernels/moe_dispatch.cu`; on the CPU they run the same arithmetic ([`super::host`]).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};
use torchscale_core::{Error, Result};

use super::host;
use super::index::DispatchIndex;

/// Which of the five index ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `x [S, C] -> buf [R, C]`, a copy into the buffer.
    Dispatch,
    /// `buf [R, C] -> [S, C]`, the unweighted sum (dispatch's backward).
    Gather,
    /// `(x [S, C], w [S, k]) -> [R, C]`, weighted copy (combine's backward for `buf`).
    WeightedScatter,
    /// `(buf [R, C], w [S, k]) -> [S, C]`.
    Combine,
    /// `(gout [S, C], buf [R, C]) -> [S, k]` (combine's backward for `w`).
    GateGrad,
}

/// One index op bound to its [`DispatchIndex`].
#[derive(Debug, Clone)]
pub(crate) struct IndexOp {
    pub index: Arc<DispatchIndex>,
    pub kind: Kind,
}

/// Scatters the rows of `x: [S, C]` into the `[R, C]` buffer of `index` (empty rows zero).
/// Backward: the unweighted gather of the buffer's gradient.
pub fn dispatch(x: &Tensor, index: &Arc<DispatchIndex>) -> Result<Tensor> {
    let (s, c) = x.dims2()?;
    check_tokens(s, index)?;
    if index.num_rows == 0 || c == 0 {
        return Ok(Tensor::zeros((index.num_rows, c), x.dtype(), x.device())?);
    }
    Ok(x.contiguous()?.apply_op1(IndexOp {
        index: index.clone(),
        kind: Kind::Dispatch,
    })?)
}

/// `out[s] = Σ_j gate[s, j] · buf[rows[s k + j]]` over kept choices; `buf: [R, C]`,
/// `gate: [S, k]` (cast to `buf`'s dtype, as [`crate::DispatchPlan::combine`] does).
/// Backward: the gate-weighted scatter of the output gradient for `buf`, and for `gate` the
/// dot products of the output gradient with the rows.
pub fn combine(buf: &Tensor, gate: &Tensor, index: &Arc<DispatchIndex>) -> Result<Tensor> {
    let (r, c) = buf.dims2()?;
    if r != index.num_rows {
        return Err(Error::shape(
            "buf",
            format!("[{}, C]", index.num_rows),
            buf.dims(),
        ));
    }
    if gate.dims() != [index.num_tokens, index.k] {
        return Err(Error::shape(
            "gate",
            format!("[{}, {}]", index.num_tokens, index.k),
            gate.dims(),
        ));
    }
    if r == 0 || c == 0 {
        return Ok(Tensor::zeros(
            (index.num_tokens, c),
            buf.dtype(),
            buf.device(),
        )?);
    }
    let gate = gate.to_dtype(buf.dtype())?.contiguous()?;
    Ok(buf.contiguous()?.apply_op2(
        &gate,
        IndexOp {
            index: index.clone(),
            kind: Kind::Combine,
        },
    )?)
}

fn check_tokens(s: usize, index: &DispatchIndex) -> Result<()> {
    if s != index.num_tokens {
        return Err(Error::shape(
            "x",
            format!("[{}, C]", index.num_tokens),
            &[s],
        ));
    }
    Ok(())
}

type CResult<T> = candle_core::Result<T>;

fn msg(s: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(s.into())
}

/// `(start, end, dims)` of a contiguous rank-2 layout.
pub(crate) fn contiguous2(l: &Layout, what: &str) -> CResult<(usize, usize, usize, usize)> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| msg(format!("{what}: needs a contiguous tensor")))?;
    match l.dims() {
        [r, c] => Ok((a, b, *r, *c)),
        d => Err(msg(format!("{what}: expected rank 2, got {d:?}"))),
    }
}

impl IndexOp {
    /// The output shape for inputs of `rows1` rows (and `rows2` for two-input ops) of width
    /// `c`, after checking the inputs against the index.
    pub(crate) fn out_shape(
        &self,
        rows1: usize,
        c: usize,
        second: Option<(usize, usize)>,
    ) -> CResult<Shape> {
        let ix = &self.index;
        let (s, k, r) = (ix.num_tokens, ix.k, ix.num_rows);
        let (want1, want2) = match self.kind {
            Kind::Dispatch => (s, None),
            Kind::Gather => (r, None),
            Kind::WeightedScatter => (s, Some((s, k))),
            Kind::Combine => (r, Some((s, k))),
            Kind::GateGrad => (s, Some((r, c))),
        };
        if rows1 != want1 || second != want2 {
            return Err(msg(format!(
                "{:?}: inputs [{rows1}, {c}] / {second:?} do not fit the index (S {s}, k {k}, R {r})",
                self.kind
            )));
        }
        Ok(match self.kind {
            Kind::Dispatch | Kind::WeightedScatter => (r, c).into(),
            Kind::Gather | Kind::Combine => (s, c).into(),
            Kind::GateGrad => (s, k).into(),
        })
    }

    fn host<T: WithDType>(&self, a: &[T], b: Option<&[T]>, c: usize) -> CResult<Vec<T>> {
        let rows = self.index.rows.to_vec1::<u32>()?;
        let k = self.index.k;
        Ok(match self.kind {
            Kind::Dispatch => host::scatter(a, &self.index.inv.to_vec1::<u32>()?, None, k, c),
            Kind::WeightedScatter => host::scatter(a, &self.index.inv.to_vec1::<u32>()?, b, k, c),
            Kind::Gather => host::gather(a, &rows, None, k, c),
            Kind::Combine => host::gather(a, &rows, b, k, c),
            Kind::GateGrad => {
                let b = b.ok_or_else(|| msg("gate grad needs two inputs"))?;
                host::gate_grad(a, b, &rows, k, c)
            }
        })
    }

    fn name_of(&self) -> &'static str {
        match self.kind {
            Kind::Dispatch => "moe-dispatch",
            Kind::Gather => "moe-gather",
            Kind::WeightedScatter => "moe-weighted-scatter",
            Kind::Combine => "moe-combine",
            Kind::GateGrad => "moe-gate-grad",
        }
    }

    fn with(&self, kind: Kind) -> Self {
        Self {
            index: self.index.clone(),
            kind,
        }
    }
}

macro_rules! host_dtypes {
    ($s1:expr, $s2:expr, |$a:ident, $b:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32($a), $b) => {
                let $b = $b.map(|s| s.as_slice::<f32>()).transpose()?;
                CpuStorage::F32($body)
            }
            (CpuStorage::BF16($a), $b) => {
                let $b = $b.map(|s| s.as_slice()).transpose()?;
                CpuStorage::BF16($body)
            }
            (CpuStorage::F16($a), $b) => {
                let $b = $b.map(|s| s.as_slice()).transpose()?;
                CpuStorage::F16($body)
            }
            (CpuStorage::F64($a), $b) => {
                let $b = $b.map(|s| s.as_slice::<f64>()).transpose()?;
                CpuStorage::F64($body)
            }
            (s, _) => {
                return Err(msg(format!(
                    "moe index op: unsupported dtype {:?}",
                    s.dtype()
                )))
            }
        }
    };
}

impl CustomOp1 for IndexOp {
    fn name(&self) -> &'static str {
        self.name_of()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (a0, a1, rows, c) = contiguous2(l, self.name_of())?;
        let shape = self.out_shape(rows, c, None)?;
        let out = host_dtypes!(s, None::<&CpuStorage>, |a, b| self.host(
            &a[a0..a1],
            b,
            c
        )?);
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        super::launch::run(self, (s, l), None)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let back = match self.kind {
            Kind::Dispatch => Kind::Gather,
            _ => return Ok(None),
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&self.with(back))?))
    }
}

impl CustomOp2 for IndexOp {
    fn name(&self) -> &'static str {
        self.name_of()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (a0, a1, rows, c) = contiguous2(l1, self.name_of())?;
        let (b0, b1, r2, c2) = contiguous2(l2, self.name_of())?;
        let shape = self.out_shape(rows, c, Some((r2, c2)))?;
        if s1.dtype() != s2.dtype() {
            return Err(msg(format!("{}: mixed dtypes", self.name_of())));
        }
        let out = host_dtypes!(s1, Some(s2), |a, b| self.host(
            &a[a0..a1],
            b.map(|b| &b[b0..b1]),
            c
        )?);
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        super::launch::run(self, (s1, l1), Some((s2, l2)))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        if self.kind != Kind::Combine {
            return Ok((None, None));
        }
        let grad = grad.contiguous()?;
        let gbuf = grad.apply_op2_no_bwd(arg2, &self.with(Kind::WeightedScatter))?;
        let ggate = grad.apply_op2_no_bwd(arg1, &self.with(Kind::GateGrad))?;
        Ok((Some(gbuf), Some(ggate)))
    }
}
