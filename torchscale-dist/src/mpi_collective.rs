//! [`MpiCollective`]: [`Collective`] on MPI (the `mpi` crate, rsmpi 0.8), for CPU tensors.

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use mpi::collective::SystemOperation;
use mpi::datatype::{Equivalence, Partition, PartitionMut};
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;
use torchscale_core::{Collective, Error, Result};

use crate::header::{self, Fault, Header, Op, HEADER_WORDS};

/// The MPI communicator of this process: one per process, from [`MpiCollective::init`].
///
/// - **Tensors** are CPU tensors (others are an error on every rank). Dtypes: u8, u32, i64,
///   f32, f64 natively; bf16 and f16 are moved as 16-bit words and, for the sums, reduced in
///   f32 (MPI has no 16-bit float sum) and rounded back once.
/// - **Checked.** Before each collective the ranks all-gather a small header (operation, dtype,
///   shape, root, and whether the call is valid on that rank), so a mismatch or an invalid call on
///   one rank is an [`Error::Collective`] on every rank, naming the rank and what differs, instead
///   of memory corruption or a hang inside MPI. It costs one 128-byte all-gather per call.
/// - **No hang.** [`Collective::abort`] prints the rank and reason to stderr and ends the whole
///   job with `MPI_Abort`; [`MpiCollective::init`] installs a panic hook that does the same for a
///   panic on any thread, so that no rank waits for a dead one.
/// - **Sums** are MPI's `MPI_SUM`: the order of additions is the MPI library's, reproducible
///   for a given world size and library, not necessarily rank order.
/// - **Threads.** MPI runs at `MPI_THREAD_SERIALIZED`; calls from several threads are serialised
///   by a lock, so the handle is `Send + Sync` and can be shared (`Arc`).
///
/// Dropping the handle frees its communicator and finalises MPI (after which MPI cannot be
/// initialised again in this process).
pub struct MpiCollective {
    // Fields drop in order: the communicator is freed before the universe finalises MPI.
    comm: SimpleCommunicator,
    lock: Mutex<()>,
    rank: usize,
    world: usize,
    _universe: Universe,
}

// SAFETY: the communicator handle is only used under `lock`, and MPI was initialised with at
// least MPI_THREAD_SERIALIZED, which allows calls from any thread one at a time.
unsafe impl Send for MpiCollective {}
// SAFETY: as above; every method that calls MPI takes `lock` first.
unsafe impl Sync for MpiCollective {}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

impl MpiCollective {
    /// Initialises MPI (`MPI_Init_thread`, serialised threads) and returns the handle on a
    /// duplicate of `MPI_COMM_WORLD` (so our collectives never match a user's own MPI traffic).
    ///
    /// Installs a panic hook (after the one already there) that, on a panic on any thread of this
    /// process, prints the rank and calls `MPI_Abort`: the other ranks end instead of waiting.
    ///
    /// Errors if MPI was already initialised in this process (one handle per process) or does not
    /// offer serialised threads. Started without `mpirun`, MPI runs as a world of one rank.
    pub fn init() -> Result<Self> {
        let fail = |reason: String| Error::Collective {
            op: "init".into(),
            rank: 0,
            reason,
        };
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| fail("MPI is already initialised in this process".into()))?;
        if threading < Threading::Serialized {
            return Err(fail(format!(
                "the MPI library offers {threading:?} threads; serialised calls are needed"
            )));
        }
        let world_comm = universe.world();
        let rank = usize::try_from(world_comm.rank()).map_err(|e| fail(e.to_string()))?;
        let world = usize::try_from(world_comm.size()).map_err(|e| fail(e.to_string()))?;
        let comm = world_comm.duplicate();
        install_panic_abort(rank);
        Ok(MpiCollective {
            comm,
            lock: Mutex::new(()),
            rank,
            world,
            _universe: universe,
        })
    }

    /// The MPI library's version string (for logs).
    pub fn library_version() -> String {
        mpi::environment::library_version().unwrap_or_else(|e| format!("(unreadable: {e})"))
    }

    fn guard(&self) -> MutexGuard<'_, ()> {
        // The lock guards no data, only the order of calls: a panic that poisoned it changes
        // nothing (and has already aborted the job through the hook).
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, op: Op, reason: impl Into<String>) -> Error {
        header::op_error(op, self.rank, reason)
    }

    /// All-gathers the headers and checks them: afterwards every rank knows the call is valid
    /// everywhere, or every rank returns an error.
    fn agree(&self, op: Op, header: Header, local: Option<Error>) -> Result<()> {
        let mut all = vec![0u64; HEADER_WORDS * self.world];
        self.comm.all_gather_into(&header.words()[..], &mut all[..]);
        header::check(op, self.rank, &all, local)
    }

    /// Checks `header` against every rank's over MPI, for a collective that another engine
    /// (NCCL) then runs: afterwards the call is valid on every rank, or every rank has an error.
    #[cfg(feature = "nccl")]
    pub(crate) fn agree_header(&self, op: Op, header: Header, local: Option<Error>) -> Result<()> {
        let _g = self.guard();
        self.agree(op, header, local)
    }

    /// This rank's part of a header for one tensor: the local checks every op shares.
    fn local_checks(&self, op: Op, t: &Tensor) -> (Header, Option<Error>) {
        let h = Header::new(op, 0).tensor(t);
        if !matches!(t.device(), Device::Cpu) {
            let e = self.err(
                op,
                format!(
                    "tensor on {:?}; MpiCollective takes CPU tensors",
                    t.device()
                ),
            );
            return (h.fault(Fault::Device), Some(e));
        }
        if Count::try_from(t.elem_count()).is_err() {
            let e = self.err(
                op,
                format!("{} elements exceed MPI's 32-bit counts", t.elem_count()),
            );
            return (h.fault(Fault::TooLarge), Some(e));
        }
        let e = header::tensor_error(op, self.rank, &h, t);
        (h, e)
    }
}

/// A tensor's elements as an MPI buffer. bf16 and f16 travel as their 16-bit patterns.
enum Host {
    U8(Vec<u8>),
    U32(Vec<u32>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bits16(Vec<u16>, DType),
}

impl Host {
    fn of(t: &Tensor) -> Result<Host> {
        let flat = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::U8 => Host::U8(flat.to_vec1()?),
            DType::U32 => Host::U32(flat.to_vec1()?),
            DType::I64 => Host::I64(flat.to_vec1()?),
            DType::F32 => Host::F32(flat.to_vec1()?),
            DType::F64 => Host::F64(flat.to_vec1()?),
            DType::BF16 => Host::Bits16(
                flat.to_vec1::<half::bf16>()?
                    .into_iter()
                    .map(half::bf16::to_bits)
                    .collect(),
                DType::BF16,
            ),
            DType::F16 => Host::Bits16(
                flat.to_vec1::<half::f16>()?
                    .into_iter()
                    .map(half::f16::to_bits)
                    .collect(),
                DType::F16,
            ),
            other => {
                return Err(Error::invalid(
                    "tensor",
                    format!("dtype {other:?} is not supported by MpiCollective"),
                ))
            }
        })
    }

    fn into_tensor(self, dims: &[usize]) -> Result<Tensor> {
        let dev = &Device::Cpu;
        Ok(match self {
            Host::U8(v) => Tensor::from_vec(v, dims, dev)?,
            Host::U32(v) => Tensor::from_vec(v, dims, dev)?,
            Host::I64(v) => Tensor::from_vec(v, dims, dev)?,
            Host::F32(v) => Tensor::from_vec(v, dims, dev)?,
            Host::F64(v) => Tensor::from_vec(v, dims, dev)?,
            Host::Bits16(v, DType::BF16) => Tensor::from_vec(
                v.into_iter().map(half::bf16::from_bits).collect::<Vec<_>>(),
                dims,
                dev,
            )?,
            Host::Bits16(v, _) => Tensor::from_vec(
                v.into_iter().map(half::f16::from_bits).collect::<Vec<_>>(),
                dims,
                dev,
            )?,
        })
    }
}

/// Runs `$body` with `$v` bound to the buffer of `$host` (whatever its element type) and wraps
/// the `Vec` it returns back in the same variant.
macro_rules! map_host {
    ($host:expr, $v:ident => $body:expr) => {
        match $host {
            Host::U8($v) => Host::U8($body),
            Host::U32($v) => Host::U32($body),
            Host::I64($v) => Host::I64($body),
            Host::F32($v) => Host::F32($body),
            Host::F64($v) => Host::F64($body),
            Host::Bits16($v, d) => Host::Bits16($body, d),
        }
    };
}

/// The dtype a sum runs in: 16-bit floats are summed in f32 (MPI has no 16-bit float sum).
fn sum_dtype(d: DType) -> DType {
    match d {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

fn zeros<T: Equivalence + Default + Clone>(n: usize) -> Vec<T> {
    vec![T::default(); n]
}

/// Exclusive prefix sums: displacements for MPI's varcount calls.
fn displacements(counts: &[Count]) -> Vec<Count> {
    counts
        .iter()
        .scan(0, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect()
}

impl Collective for MpiCollective {
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = Op::AllReduceSum;
        let _g = self.guard();
        let (h, local) = self.local_checks(op, t);
        self.agree(op, h, local)?;
        let host = Host::of(&t.to_dtype(sum_dtype(t.dtype()))?)?;
        let sum = map_host!(host, v => {
            let mut out = zeros(v.len());
            self.comm.all_reduce_into(&v[..], &mut out[..], SystemOperation::sum());
            out
        });
        Ok(sum.into_tensor(t.dims())?.to_dtype(t.dtype())?)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let op = Op::AllGather;
        let _g = self.guard();
        let (mut h, mut local) = self.local_checks(op, t);
        if t.rank() == 0 {
            h = h.fault(Fault::Rows);
            local = local.or(Some(
                self.err(op, "a scalar has no dimension 0 to gather along"),
            ));
        }
        self.agree(op, h, local)?;
        let host = Host::of(t)?;
        let world = self.world;
        let out = map_host!(host, v => {
            let mut out = zeros(v.len() * world);
            self.comm.all_gather_into(&v[..], &mut out[..]);
            out
        });
        let mut dims = t.dims().to_vec();
        dims[0] *= self.world;
        out.into_tensor(&dims)
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = Op::ReduceScatterSum;
        let _g = self.guard();
        let (mut h, mut local) = self.local_checks(op, t);
        let rows = t.dims().first().copied().unwrap_or(0);
        if t.rank() == 0 || rows % self.world != 0 {
            h = h.fault(Fault::Rows);
            local = local.or(Some(self.err(
                op,
                format!(
                    "shape {:?}: dimension 0 must be a multiple of the world size {}",
                    t.dims(),
                    self.world
                ),
            )));
        }
        self.agree(op, h, local)?;
        let host = Host::of(&t.to_dtype(sum_dtype(t.dtype()))?)?;
        let world = self.world;
        let out = map_host!(host, v => {
            let mut out = zeros(v.len() / world);
            self.comm.reduce_scatter_block_into(&v[..], &mut out[..], SystemOperation::sum());
            out
        });
        let mut dims = t.dims().to_vec();
        dims[0] /= self.world;
        Ok(out.into_tensor(&dims)?.to_dtype(t.dtype())?)
    }

    fn all_to_all(&self, chunks: &[Tensor]) -> Result<Vec<Tensor>> {
        let op = Op::AllToAll;
        let _g = self.guard();
        let (h, local) = self.all_to_all_checks(chunks);
        self.agree(op, h, local)?;
        // Valid everywhere: one chunk per rank, same trailing dims and dtype on every rank.
        let trailing = chunks[0].dims()[1..].to_vec();
        let row_len: usize = trailing.iter().product();
        let send_rows: Vec<Count> = chunks
            .iter()
            .map(|c| Count::try_from(c.dims()[0]).unwrap_or(Count::MAX))
            .collect();
        let mut recv_rows: Vec<Count> = zeros(self.world);
        self.comm
            .all_to_all_into(&send_rows[..], &mut recv_rows[..]);
        let to_elems = |rows: &[Count]| -> Option<Vec<Count>> {
            rows.iter()
                .map(|&r| usize::try_from(r).ok()?.checked_mul(row_len))
                .map(|n| Count::try_from(n?).ok())
                .collect()
        };
        let (Some(send_counts), Some(recv_counts)) = (to_elems(&send_rows), to_elems(&recv_rows))
        else {
            let reason = "all_to_all: element counts exceed MPI's 32-bit counts";
            self.abort_with(reason);
        };
        let recv_total: i64 = recv_counts.iter().map(|&c| i64::from(c)).sum();
        if recv_total > i64::from(Count::MAX) {
            // The senders' counts were valid but their sum is not: every rank learns it too late
            // to agree on an error, so end the job rather than leave anyone waiting.
            self.abort_with("all_to_all: the received rows exceed MPI's 32-bit counts");
        }
        let send_displs = displacements(&send_counts);
        let recv_displs = displacements(&recv_counts);
        let send = Host::of(&Tensor::cat(chunks, 0)?)?;
        let recv = map_host!(send, v => {
            let mut out = zeros(recv_total as usize);
            let sbuf = Partition::new(&v[..], &send_counts[..], &send_displs[..]);
            let mut rbuf = PartitionMut::new(&mut out[..], &recv_counts[..], &recv_displs[..]);
            self.comm.all_to_all_varcount_into(&sbuf, &mut rbuf);
            out
        });
        let mut dims = vec![0usize];
        dims.extend_from_slice(&trailing);
        let total_rows: usize = recv_rows.iter().map(|&r| r as usize).sum();
        dims[0] = total_rows;
        let all = recv.into_tensor(&dims)?;
        let mut out = Vec::with_capacity(self.world);
        let mut start = 0usize;
        for &r in &recv_rows {
            let r = r as usize;
            out.push(all.narrow(0, start, r)?);
            start += r;
        }
        Ok(out)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let op = Op::Broadcast;
        let _g = self.guard();
        let (h, mut local) = self.local_checks(op, t);
        let mut h = h.with_root(root);
        if root >= self.world {
            h = h.fault(Fault::Root);
            local = local.or(Some(
                self.err(op, format!("root {root} >= world size {}", self.world)),
            ));
        }
        self.agree(op, h, local)?;
        let host = Host::of(t)?;
        let root = root as mpi::Rank;
        let out = map_host!(host, v => {
            let mut v = v;
            self.comm.process_at_rank(root).broadcast_into(&mut v[..]);
            v
        });
        out.into_tensor(t.dims())
    }

    fn barrier(&self) -> Result<()> {
        let op = Op::Barrier;
        let _g = self.guard();
        self.agree(op, Header::new(op, 0), None)?;
        self.comm.barrier();
        Ok(())
    }

    fn abort(&self, reason: &str) {
        self.abort_with(reason)
    }
}

impl MpiCollective {
    fn all_to_all_checks(&self, chunks: &[Tensor]) -> (Header, Option<Error>) {
        let op = Op::AllToAll;
        let local = |c: &Tensor| self.local_checks(op, c);
        if let Some(fault) = header::all_to_all_chunks(self.rank, self.world, chunks, local) {
            return fault;
        }
        let h = Header::new(op, 0);
        let total: usize = chunks.iter().map(Tensor::elem_count).sum();
        if Count::try_from(total).is_err() {
            let e = self.err(op, format!("{total} elements exceed MPI's 32-bit counts"));
            return (h.fault(Fault::TooLarge), Some(e));
        }
        (header::all_to_all_header(chunks), None)
    }

    fn abort_with(&self, reason: &str) -> ! {
        abort_job(self.rank, reason)
    }
}

/// Prints who fails and why, then ends every rank of the job.
fn abort_job(rank: usize, reason: &str) -> ! {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "torchscale-dist: rank {rank} aborts the MPI job: {reason}"
    );
    let _ = err.flush();
    drop(err);
    SimpleCommunicator::world().abort(1)
}

fn install_panic_abort(rank: usize) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
            abort_job(rank, &format!("panicked: {info}"));
        }
    }));
}
