//! The call header every rank sends before a collective: which operation, the dtype and shape,
//! the root, and whether the call is valid on that rank.
//!
//! Engines like MPI neither compare calls across ranks nor return errors (a mismatch corrupts
//! memory or hangs). One small all-gather of headers before each collective lets every rank run
//! the same checks on the same data and so fail together, with the same message, instead of
//! leaving a rank alone inside the engine. Pure data, so it is tested without MPI.

use candle_core::{DType, Tensor};
use torchscale_core::{Error, Result};

/// Number of `u64` words in a header.
pub const HEADER_WORDS: usize = 16;
/// The most dimensions a header can describe.
pub const MAX_DIMS: usize = 8;

const OP: usize = 0;
const FAULT: usize = 1;
const DTYPE: usize = 2;
const ROOT: usize = 3;
const NDIM: usize = 4;
const DIMS: usize = 5;

/// The collectives, as numbered in a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`torchscale_core::Collective::all_reduce_sum`].
    AllReduceSum = 1,
    /// [`torchscale_core::Collective::all_gather`].
    AllGather = 2,
    /// [`torchscale_core::Collective::reduce_scatter_sum`].
    ReduceScatterSum = 3,
    /// [`torchscale_core::Collective::all_to_all`].
    AllToAll = 4,
    /// [`torchscale_core::Collective::broadcast`].
    Broadcast = 5,
    /// [`torchscale_core::Collective::barrier`].
    Barrier = 6,
}

impl Op {
    /// The trait method's name, used in errors.
    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduceSum => "all_reduce_sum",
            Op::AllGather => "all_gather",
            Op::ReduceScatterSum => "reduce_scatter_sum",
            Op::AllToAll => "all_to_all",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }

    fn from_code(code: u64) -> Option<Op> {
        [
            Op::AllReduceSum,
            Op::AllGather,
            Op::ReduceScatterSum,
            Op::AllToAll,
            Op::Broadcast,
            Op::Barrier,
        ]
        .into_iter()
        .find(|op| *op as u64 == code)
    }

    /// What must agree across ranks besides the operation and root.
    fn rule(self) -> Rule {
        match self {
            Op::AllToAll => Rule::TrailingDims,
            Op::Barrier => Rule::Nothing,
            _ => Rule::Shape,
        }
    }
}

enum Rule {
    Shape,
    TrailingDims,
    Nothing,
}

/// Why a rank cannot take part in a collective; sent in its header so the others fail too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A tensor is not on the device the backend takes.
    Device = 1,
    /// The dtype is not one the backend moves or reduces.
    DType = 2,
    /// More than [`MAX_DIMS`] dimensions.
    TooManyDims = 3,
    /// A scalar, or dimension 0 not a multiple of the world size (reduce-scatter).
    Rows = 4,
    /// Not one chunk per rank (all-to-all).
    ChunkCount = 5,
    /// Chunks of one rank disagree on trailing dimensions or dtype (all-to-all).
    ChunkShapes = 6,
    /// The root is not a rank.
    Root = 7,
    /// More elements than the engine's 32-bit counts hold.
    TooLarge = 8,
}

impl Fault {
    fn from_code(code: u64) -> Option<Fault> {
        [
            Fault::Device,
            Fault::DType,
            Fault::TooManyDims,
            Fault::Rows,
            Fault::ChunkCount,
            Fault::ChunkShapes,
            Fault::Root,
            Fault::TooLarge,
        ]
        .into_iter()
        .find(|f| *f as u64 == code)
    }

    fn describe(self) -> &'static str {
        match self {
            Fault::Device => "a tensor on a device this backend does not take",
            Fault::DType => "a dtype this backend does not support",
            Fault::TooManyDims => "a tensor with more than 8 dimensions",
            Fault::Rows => "a scalar, or rows that do not split evenly over the ranks",
            Fault::ChunkCount => "not one chunk per rank",
            Fault::ChunkShapes => "chunks that disagree on trailing dimensions or dtype",
            Fault::Root => "a root that is not a rank",
            Fault::TooLarge => "more elements than 32-bit counts hold",
        }
    }
}

/// The dtypes a header names (code = index + 1); 0 is "none" (a barrier, or a faulty call).
const DTYPES: [DType; 7] = [
    DType::U8,
    DType::U32,
    DType::I64,
    DType::BF16,
    DType::F16,
    DType::F32,
    DType::F64,
];

/// The header code of `dtype`, if headers can name it.
pub fn dtype_code(dtype: DType) -> Option<u64> {
    DTYPES
        .iter()
        .position(|d| *d == dtype)
        .map(|i| i as u64 + 1)
}

fn dtype_name(code: u64) -> String {
    match code.checked_sub(1).and_then(|i| DTYPES.get(i as usize)) {
        Some(d) => format!("{d:?}"),
        None => format!("dtype #{code}"),
    }
}

/// A header under construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header([u64; HEADER_WORDS]);

impl Header {
    /// A valid call of `op` with `root` (0 where the op has none) and no tensor yet.
    pub fn new(op: Op, root: usize) -> Self {
        let mut w = [0u64; HEADER_WORDS];
        w[OP] = op as u64;
        w[ROOT] = root as u64;
        Header(w)
    }

    /// The same header with `root` as the root.
    pub fn with_root(mut self, root: usize) -> Self {
        self.0[ROOT] = root as u64;
        self
    }

    /// Describes `t` (its dtype and `dims`, which are its shape or, for all-to-all, its trailing
    /// dimensions); records a fault if headers cannot describe it.
    pub fn describe(mut self, dtype: DType, dims: &[usize]) -> Self {
        match dtype_code(dtype) {
            Some(code) => self.0[DTYPE] = code,
            None => return self.fault(Fault::DType),
        }
        if dims.len() > MAX_DIMS {
            return self.fault(Fault::TooManyDims);
        }
        self.0[NDIM] = dims.len() as u64;
        for (i, d) in dims.iter().enumerate() {
            self.0[DIMS + i] = *d as u64;
        }
        self
    }

    /// Describes a single tensor by its full shape.
    pub fn tensor(self, t: &Tensor) -> Self {
        self.describe(t.dtype(), t.dims())
    }

    /// Marks the call as one this rank cannot take part in (the first fault wins).
    pub fn fault(mut self, fault: Fault) -> Self {
        if self.0[FAULT] == 0 {
            self.0[FAULT] = fault as u64;
        }
        self
    }

    /// The fault recorded, if any.
    pub fn faulted(&self) -> Option<Fault> {
        Fault::from_code(self.0[FAULT])
    }

    /// The words to send.
    pub fn words(&self) -> &[u64; HEADER_WORDS] {
        &self.0
    }
}

fn dims_of(h: &[u64]) -> Vec<u64> {
    let n = (h[NDIM] as usize).min(MAX_DIMS);
    h[DIMS..DIMS + n].to_vec()
}

/// Checks the headers of all ranks (`all.len() == world * HEADER_WORDS`, in rank order) for
/// `op` as called on rank `me`. Every rank runs this on the same words, so every rank reaches the
/// same verdict; `local` is this rank's own error for its own fault, which is more precise than
/// what the others can say.
pub fn check(op: Op, me: usize, all: &[u64], local: Option<Error>) -> Result<()> {
    let err = |reason: String| Error::Collective {
        op: op.name().into(),
        rank: me,
        reason,
    };
    if !all.len().is_multiple_of(HEADER_WORDS) || all.is_empty() {
        return Err(err(format!("internal: {} header words", all.len())));
    }
    let headers: Vec<&[u64]> = all.chunks(HEADER_WORDS).collect();
    for (r, h) in headers.iter().enumerate() {
        if h[OP] != op as u64 {
            let theirs = Op::from_code(h[OP]).map_or("an unknown operation", Op::name);
            return Err(err(format!(
                "rank {r} called `{theirs}` where rank {me} called `{}`",
                op.name()
            )));
        }
    }
    // A rank that faulted itself has the most precise error: its own.
    if let (Some(local), Some(h)) = (local, headers.get(me)) {
        if h[FAULT] != 0 {
            return Err(local);
        }
    }
    for (r, h) in headers.iter().enumerate() {
        if let Some(fault) = Fault::from_code(h[FAULT]) {
            return Err(err(format!(
                "rank {r} could not take part: it passed {}",
                fault.describe()
            )));
        }
    }
    let first = headers[0];
    for (r, h) in headers.iter().enumerate().skip(1) {
        if h[ROOT] != first[ROOT] {
            return Err(err(format!(
                "rank {r} named root {} where rank 0 named root {}",
                h[ROOT], first[ROOT]
            )));
        }
        if h[DTYPE] != first[DTYPE] {
            return Err(err(format!(
                "rank {r} has dtype {} where rank 0 has {}",
                dtype_name(h[DTYPE]),
                dtype_name(first[DTYPE])
            )));
        }
        match op.rule() {
            Rule::Shape if dims_of(h) != dims_of(first) => {
                return Err(err(format!(
                    "rank {r} has shape {:?} where rank 0 has {:?}",
                    dims_of(h),
                    dims_of(first)
                )));
            }
            Rule::TrailingDims if dims_of(h) != dims_of(first) => {
                return Err(err(format!(
                    "rank {r}'s chunks have trailing dimensions {:?} where rank 0's have {:?}",
                    dims_of(h),
                    dims_of(first)
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The error a backend reports for `op` on `rank`.
#[cfg(feature = "mpi")]
pub(crate) fn op_error(op: Op, rank: usize, reason: impl Into<String>) -> Error {
    Error::Collective {
        op: op.name().into(),
        rank,
        reason: reason.into(),
    }
}

/// The error behind a fault that [`Header::tensor`] recorded for `t` (a dtype no backend moves,
/// too many dimensions), if any: the device-independent part of every backend's local checks.
#[cfg(feature = "mpi")]
pub(crate) fn tensor_error(op: Op, rank: usize, h: &Header, t: &Tensor) -> Option<Error> {
    let reason = match h.faulted() {
        Some(Fault::DType) => format!(
            "dtype {:?} is not supported (u8, u32, i64, bf16, f16, f32, f64)",
            t.dtype()
        ),
        Some(Fault::TooManyDims) => {
            format!("shape {:?} has more than {MAX_DIMS} dimensions", t.dims())
        }
        _ => return None,
    };
    Some(op_error(op, rank, reason))
}

/// The checks of an all-to-all's chunks that every backend shares: one chunk per rank, each with
/// rows, all with chunk 0's trailing dimensions and dtype, each passing the backend's `local`
/// checks. On a fault, the faulted header and this rank's error; `None` when they pass.
#[cfg(feature = "mpi")]
pub(crate) fn all_to_all_chunks(
    rank: usize,
    world: usize,
    chunks: &[Tensor],
    local: impl Fn(&Tensor) -> (Header, Option<Error>),
) -> Option<(Header, Option<Error>)> {
    let op = Op::AllToAll;
    let h = || Header::new(op, 0);
    let fail = |fault, reason: String| Some((h().fault(fault), Some(op_error(op, rank, reason))));
    if chunks.len() != world {
        return fail(
            Fault::ChunkCount,
            format!(
                "{} chunks for a world of {world} ranks (one per rank)",
                chunks.len()
            ),
        );
    }
    for (i, c) in chunks.iter().enumerate() {
        if c.rank() == 0 {
            return fail(
                Fault::Rows,
                format!("chunk {i} is a scalar; chunks need rows"),
            );
        }
        if c.dims()[1..] != chunks[0].dims()[1..] || c.dtype() != chunks[0].dtype() {
            return fail(
                Fault::ChunkShapes,
                format!(
                    "chunk {i} is {:?} {:?} where chunk 0 is {:?} {:?}",
                    c.dtype(),
                    c.dims(),
                    chunks[0].dtype(),
                    chunks[0].dims()
                ),
            );
        }
        let (ch, e) = local(c);
        if let Some(fault) = ch.faulted() {
            return Some((h().fault(fault), e));
        }
    }
    None
}

/// The header of a valid all-to-all: chunk 0's dtype and trailing dimensions.
#[cfg(feature = "mpi")]
pub(crate) fn all_to_all_header(chunks: &[Tensor]) -> Header {
    let first = &chunks[0];
    Header::new(Op::AllToAll, 0).describe(first.dtype(), &first.dims()[1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gather(headers: &[Header]) -> Vec<u64> {
        headers.iter().flat_map(|h| h.words().to_vec()).collect()
    }

    fn reason(r: Result<()>) -> String {
        match r {
            Err(Error::Collective { reason, .. }) => reason,
            other => panic!("expected Error::Collective, got {other:?}"),
        }
    }

    #[test]
    fn agreeing_calls_pass() {
        let h = Header::new(Op::AllReduceSum, 0).describe(DType::F32, &[2, 3]);
        let all = gather(&[h.clone(), h.clone(), h]);
        for me in 0..3 {
            check(Op::AllReduceSum, me, &all, None).unwrap();
        }
    }

    #[test]
    fn a_different_shape_is_named_with_both_shapes() {
        let a = Header::new(Op::AllGather, 0).describe(DType::F32, &[2, 3]);
        let b = Header::new(Op::AllGather, 0).describe(DType::F32, &[4, 3]);
        let all = gather(&[a.clone(), a, b]);
        let r = reason(check(Op::AllGather, 1, &all, None));
        assert_eq!(r, "rank 2 has shape [4, 3] where rank 0 has [2, 3]");
    }

    #[test]
    fn all_to_all_compares_trailing_dims_only() {
        let a = Header::new(Op::AllToAll, 0).describe(DType::F32, &[8]);
        let b = Header::new(Op::AllToAll, 0).describe(DType::F32, &[9]);
        check(Op::AllToAll, 0, &gather(&[a.clone(), a.clone()]), None).unwrap();
        let r = reason(check(Op::AllToAll, 0, &gather(&[a, b]), None));
        assert_eq!(
            r,
            "rank 1's chunks have trailing dimensions [9] where rank 0's have [8]"
        );
    }

    #[test]
    fn dtype_root_and_op_mismatches_are_named() {
        let a = Header::new(Op::Broadcast, 0).describe(DType::F32, &[2]);
        let b = Header::new(Op::Broadcast, 0).describe(DType::BF16, &[2]);
        let r = reason(check(Op::Broadcast, 0, &gather(&[a.clone(), b]), None));
        assert_eq!(r, "rank 1 has dtype BF16 where rank 0 has F32");
        let c = Header::new(Op::Broadcast, 1).describe(DType::F32, &[2]);
        let r = reason(check(Op::Broadcast, 0, &gather(&[a.clone(), c]), None));
        assert_eq!(r, "rank 1 named root 1 where rank 0 named root 0");
        let d = Header::new(Op::Barrier, 0);
        let r = reason(check(Op::Broadcast, 0, &gather(&[a, d]), None));
        assert_eq!(r, "rank 1 called `barrier` where rank 0 called `broadcast`");
    }

    #[test]
    fn a_fault_fails_every_rank_and_the_faulty_rank_keeps_its_own_error() {
        let ok = Header::new(Op::ReduceScatterSum, 0).describe(DType::F32, &[4, 2]);
        let bad = Header::new(Op::ReduceScatterSum, 0).fault(Fault::Rows);
        let all = gather(&[ok, bad]);
        let r = reason(check(Op::ReduceScatterSum, 0, &all, None));
        assert_eq!(
            r,
            "rank 1 could not take part: it passed a scalar, or rows that do not split evenly \
             over the ranks"
        );
        let own = Error::invalid("t", "3 rows for 2 ranks");
        let e = check(Op::ReduceScatterSum, 1, &all, Some(own)).unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
    }

    #[test]
    fn headers_refuse_what_they_cannot_describe() {
        let h = Header::new(Op::AllGather, 0).describe(DType::F32, &[1; 9]);
        assert_eq!(h.faulted(), Some(Fault::TooManyDims));
        assert_eq!(dtype_code(DType::F32), Some(6));
        // The first fault wins.
        let h = Header::new(Op::AllGather, 0)
            .fault(Fault::Device)
            .fault(Fault::Root);
        assert_eq!(h.faulted(), Some(Fault::Device));
    }
}
