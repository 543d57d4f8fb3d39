//! [`NcclCollective`]: [`Collective`] on NCCL (through cudarc, candle's `nccl` feature) for CUDA
//! tensors, bootstrapped and checked over MPI.

use std::sync::{Mutex, MutexGuard, TryLockError};

use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda::cudarc::nccl::{self, Comm, Id, NcclType, ReduceOp};
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use torchscale_core::{Collective, Error, Result};

use crate::header::{self, Fault, Header, Op};
use crate::MpiCollective;

/// Bytes of an NCCL unique id (`ncclUniqueId`).
const ID_BYTES: usize = 128;

/// One rank of an NCCL communicator over the ranks of an MPI job, one GPU per rank.
///
/// - **Tensors** are CUDA tensors on this rank's device ([`NcclCollective::device`]); a tensor
///   elsewhere is an [`Error::Collective`] on every rank. Dtypes: u8, u32, i64, bf16, f16, f32,
///   f64, all reduced natively by NCCL (bf16 and f16 sums stay 16-bit, as NCCL does them).
/// - **Bootstrap.** Rank 0 creates the NCCL unique id and broadcasts it over MPI; every rank then
///   joins the communicator on its device's stream, so NCCL's work is ordered with candle's
///   kernels on that stream.
/// - **Checked.** Before each collective the ranks all-gather a header over MPI (the same
///   headers as [`MpiCollective`]), so a mismatch or an invalid call is an error on every rank
///   instead of a hang inside NCCL.
/// - **Uneven all-to-all.** NCCL has no all-to-all with counts: the row counts travel over MPI,
///   then every rank posts its sends and receives in one NCCL group.
/// - **No hang.** [`Collective::abort`] aborts the NCCL communicator (`ncclCommAbort`, unless a
///   collective of this rank holds it), prints the rank and the reason and ends the job with
///   `MPI_Abort`. A failure after the ranks agreed (a CUDA or NCCL error, with the others
///   already inside NCCL) does the same, and so does a panic, through the hook
///   [`MpiCollective::init`] installs.
/// - **Asynchronous.** Results are enqueued on the device's stream like any candle kernel;
///   [`Collective::barrier`] waits for this rank's queued work before it meets the others.
pub struct NcclCollective {
    // Dropped first: cudarc's Comm ends the communicator (ncclCommAbort) before MPI finalises.
    comm: Mutex<Option<Comm>>,
    device: CudaDevice,
    cuda: Device,
    rank: usize,
    world: usize,
    mpi: MpiCollective,
}

// SAFETY: the NCCL communicator is only used under `comm`'s lock, one call at a time, which NCCL
// allows from any thread; the CUDA device and the MPI handle are Send + Sync themselves.
unsafe impl Send for NcclCollective {}
// SAFETY: as above; every method that calls NCCL takes the lock first.
unsafe impl Sync for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.cuda.location())
            .finish()
    }
}

/// The element types NCCL moves and candle stores on CUDA.
trait Elem: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits {}
impl<T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits> Elem for T {}

/// Calls `$self.$method::<T>(args)` with `T` the element type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $self:ident . $method:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::U8 => $self.$method::<u8>($($arg),*),
            DType::U32 => $self.$method::<u32>($($arg),*),
            DType::I64 => $self.$method::<i64>($($arg),*),
            DType::BF16 => $self.$method::<half::bf16>($($arg),*),
            DType::F16 => $self.$method::<half::f16>($($arg),*),
            DType::F32 => $self.$method::<f32>($($arg),*),
            DType::F64 => $self.$method::<f64>($($arg),*),
            other => Err(Error::invalid(
                "tensor",
                format!("dtype {other:?} is not supported by NcclCollective"),
            )),
        }
    };
}

fn nccl_err(e: nccl::result::NcclError) -> Error {
    Error::invalid("nccl", format!("{e:?}"))
}

/// This process's rank among the ranks of its node, as the launcher tells it (0 if none does).
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

impl NcclCollective {
    /// Initialises MPI ([`MpiCollective::init`]) and joins the NCCL communicator on GPU
    /// [`local_rank`] of this node (one GPU per rank: start as many ranks per node as it has
    /// GPUs). Errors on every rank if any rank has no such GPU.
    pub fn init_on_local_gpu() -> Result<Self> {
        let mpi = MpiCollective::init()?;
        // The first line only: candle's error text may carry a backtrace.
        let device = Device::new_cuda(local_rank())
            .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_string());
        Self::bootstrap(mpi, device)
    }

    /// Joins the NCCL communicator of all the ranks of `mpi`, this one on `device` (a CUDA
    /// device; a different GPU on every rank of a node, as NCCL requires). Collective: every
    /// rank calls it; if `device` is not a CUDA device on some rank, or rank 0 cannot create the
    /// NCCL id, every rank returns an error naming that rank.
    pub fn new(mpi: MpiCollective, device: &Device) -> Result<Self> {
        Self::bootstrap(mpi, Ok(device.clone()))
    }

    fn bootstrap(mpi: MpiCollective, device: std::result::Result<Device, String>) -> Result<Self> {
        let (rank, world) = (mpi.rank(), mpi.world_size());
        let fail = |reason: String| Error::Collective {
            op: "init".into(),
            rank,
            reason,
        };
        // Status 0: ready; 1: no CUDA device; 2: rank 0 could not create the id.
        let mut local: Option<String> = None;
        let cuda = match device {
            // NCCL joins on the thread's current CUDA context: make it this device's.
            Ok(Device::Cuda(d)) => match d.cuda_stream().context().bind_to_thread() {
                Ok(()) => Some(d),
                Err(e) => {
                    local = Some(format!("cannot use CUDA device {:?}: {e:?}", d.id()));
                    None
                }
            },
            Ok(other) => {
                local = Some(format!(
                    "device {:?} is not a CUDA device",
                    other.location()
                ));
                None
            }
            Err(e) => {
                local = Some(format!("no CUDA device: {e}"));
                None
            }
        };
        let mut status = u8::from(local.is_some());
        let mut id_bytes = vec![0u8; ID_BYTES];
        if rank == 0 && local.is_none() {
            match Id::new() {
                Ok(id) => {
                    // c_char is i8 or u8 by platform: the bytes travel as they are.
                    for (b, c) in id_bytes.iter_mut().zip(id.internal().iter()) {
                        *b = *c as u8;
                    }
                }
                Err(e) => {
                    local = Some(format!("cannot create the NCCL unique id: {e:?}"));
                    status = 2;
                }
            }
        }
        let statuses = mpi
            .all_gather(&Tensor::new(&[status], &Device::Cpu)?)?
            .to_vec1::<u8>()?;
        if let Some((r, s)) = statuses.iter().enumerate().find(|(_, s)| **s != 0) {
            return Err(fail(match (&local, statuses[rank] != 0) {
                (Some(own), true) => own.clone(),
                _ if *s == 1 => format!("rank {r} has no CUDA device"),
                _ => format!("rank {r} could not create the NCCL unique id"),
            }));
        }
        let id_bytes = mpi
            .broadcast(&Tensor::from_vec(id_bytes, ID_BYTES, &Device::Cpu)?, 0)?
            .to_vec1::<u8>()?;
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (c, b) in internal.iter_mut().zip(id_bytes) {
            *c = b as std::ffi::c_char;
        }
        let Some(device) = cuda else {
            return Err(fail("internal: no device after agreement".into()));
        };
        let comm = match Comm::from_rank(device.cuda_stream(), rank, world, Id::uninit(internal)) {
            Ok(c) => c,
            // The others may be waiting inside NCCL's bootstrap for this rank: end the job.
            Err(e) => {
                mpi.abort(&format!("ncclCommInitRank failed: {e:?}"));
                // MPI_Abort does not return; should a library return from it, end this process.
                std::process::abort()
            }
        };
        let cuda = Device::Cuda(device.clone());
        Ok(NcclCollective {
            comm: Mutex::new(Some(comm)),
            device,
            cuda,
            rank,
            world,
            mpi,
        })
    }

    /// The CUDA device this rank's tensors live on.
    pub fn device(&self) -> &Device {
        &self.cuda
    }

    /// The MPI handle under the communicator, for CPU-side collectives over the same ranks.
    pub fn mpi(&self) -> &MpiCollective {
        &self.mpi
    }

    /// The NCCL library's version (for logs), as NCCL encodes it (2.30.7 is 23007).
    pub fn library_version() -> Result<i32> {
        nccl::result::get_nccl_version().map_err(nccl_err)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Comm>> {
        // The lock guards the order of NCCL calls; a panic that poisoned it has already ended
        // the job through the MPI panic hook.
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, op: Op, reason: impl Into<String>) -> Error {
        header::op_error(op, self.rank, reason)
    }

    /// The communicator, unless this rank aborted it.
    fn live<'a>(&self, op: Op, g: &'a MutexGuard<'_, Option<Comm>>) -> Result<&'a Comm> {
        g.as_ref()
            .ok_or_else(|| self.err(op, "the NCCL communicator was aborted"))
    }

    /// Runs the part of `op` after the ranks agreed. A failure there leaves the other ranks
    /// inside NCCL, so it ends the job instead of returning.
    fn agreed<R>(&self, op: Op, f: impl FnOnce() -> Result<R>) -> R {
        // Collectives may come from any thread: NCCL and candle run on this device's context.
        let bound = self
            .device
            .cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| Error::invalid("cuda", format!("{e:?}")));
        match bound.and_then(|()| f()) {
            Ok(r) => r,
            Err(e) => self.abort_with(&format!(
                "{} failed after every rank agreed: {e}",
                op.name()
            )),
        }
    }

    /// This rank's part of a header for one tensor: the local checks every op shares.
    fn local_checks(&self, op: Op, t: &Tensor) -> (Header, Option<Error>) {
        let h = Header::new(op, 0).tensor(t);
        if !t.device().same_device(&self.cuda) {
            let e = self.err(
                op,
                format!(
                    "tensor on {:?}; NcclCollective takes CUDA tensors on {:?}",
                    t.device().location(),
                    self.cuda.location()
                ),
            );
            return (h.fault(Fault::Device), Some(e));
        }
        let e = header::tensor_error(op, self.rank, &h, t);
        (h, e)
    }

    /// A fresh tensor of `dims` on this rank's device, holding `out`.
    fn wrap<T: Elem>(&self, out: CudaSlice<T>, dims: &[usize]) -> Tensor {
        let storage = CudaStorage::wrap_cuda_slice(out, self.device.clone());
        Tensor::from_storage(Storage::Cuda(storage), dims, BackpropOp::none(), false)
    }

    fn alloc<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.device.alloc_zeros::<T>(n)?)
    }

    fn all_reduce_t<T: Elem>(&self, comm: &Comm, t: &Tensor) -> Result<Tensor> {
        with_view::<T, _>(t, |v| {
            let mut out = self.alloc::<T>(v.len())?;
            comm.all_reduce(&v, &mut out, &ReduceOp::Sum)
                .map_err(nccl_err)?;
            Ok(self.wrap(out, t.dims()))
        })
    }

    fn all_gather_t<T: Elem>(&self, comm: &Comm, t: &Tensor) -> Result<Tensor> {
        with_view::<T, _>(t, |v| {
            let mut out = self.alloc::<T>(v.len() * self.world)?;
            comm.all_gather(&v, &mut out).map_err(nccl_err)?;
            let mut dims = t.dims().to_vec();
            dims[0] *= self.world;
            Ok(self.wrap(out, &dims))
        })
    }

    fn reduce_scatter_t<T: Elem>(&self, comm: &Comm, t: &Tensor) -> Result<Tensor> {
        with_view::<T, _>(t, |v| {
            let mut out = self.alloc::<T>(v.len() / self.world)?;
            comm.reduce_scatter(&v, &mut out, &ReduceOp::Sum)
                .map_err(nccl_err)?;
            let mut dims = t.dims().to_vec();
            dims[0] /= self.world;
            Ok(self.wrap(out, &dims))
        })
    }

    fn broadcast_t<T: Elem>(&self, comm: &Comm, t: &Tensor, root: usize) -> Result<Tensor> {
        with_view::<T, _>(t, |v| {
            let mut out = self.alloc::<T>(v.len())?;
            comm.broadcast(Some(&v), &mut out, root as i32)
                .map_err(nccl_err)?;
            Ok(self.wrap(out, t.dims()))
        })
    }

    /// Every rank's sends and receives in one NCCL group; returns what arrived from each rank
    /// (`recv_rows[r]` rows from rank `r`), in one buffer of `[total rows, trailing...]`.
    /// `send` holds the chunks one after the other (`None` when this rank sends nothing);
    /// returns `None` when it receives nothing. No zero-sized buffer is ever allocated.
    fn exchange_t<T: Elem>(
        &self,
        comm: &Comm,
        send: Option<&Tensor>,
        send_rows: &[usize],
        recv_rows: &[usize],
        row_len: usize,
    ) -> Result<Option<CudaSlice<T>>> {
        let recv_total: usize = recv_rows.iter().sum::<usize>() * row_len;
        let mut out = if recv_total > 0 {
            Some(self.alloc::<T>(recv_total)?)
        } else {
            None
        };
        let mut post = |v: Option<CudaView<'_, T>>| -> Result<()> {
            nccl::group_start().map_err(nccl_err)?;
            // group_end must follow group_start whatever fails in between.
            let mut first: Option<Error> = None;
            let mut start = 0;
            for (peer, &rows) in send_rows.iter().enumerate() {
                let n = rows * row_len;
                if let (true, Some(v)) = (n > 0, v.as_ref()) {
                    if let Err(e) = comm.send(&v.slice(start..start + n), peer as i32) {
                        first.get_or_insert(nccl_err(e));
                    }
                }
                start += n;
            }
            if let Some(out) = out.as_mut() {
                let mut start = 0;
                for (peer, &rows) in recv_rows.iter().enumerate() {
                    let n = rows * row_len;
                    if n > 0 {
                        if let Err(e) = comm.recv(&mut out.slice_mut(start..start + n), peer as i32)
                        {
                            first.get_or_insert(nccl_err(e));
                        }
                    }
                    start += n;
                }
            }
            let end = nccl::group_end().map_err(nccl_err);
            match (first, end) {
                (Some(e), _) | (None, Err(e)) => Err(e),
                (None, Ok(_)) => Ok(()),
            }
        };
        match send {
            Some(t) => with_view::<T, _>(t, |v| post(Some(v)))?,
            None => post(None)?,
        }
        Ok(out)
    }

    fn all_to_all_checks(&self, chunks: &[Tensor]) -> (Header, Option<Error>) {
        let local = |c: &Tensor| self.local_checks(Op::AllToAll, c);
        match header::all_to_all_chunks(self.rank, self.world, chunks, local) {
            None => (header::all_to_all_header(chunks), None),
            Some(fault) => fault,
        }
    }

    fn abort_with(&self, reason: &str) -> ! {
        // Abort NCCL first so that this process's queued NCCL work stops; if another thread of
        // this rank is inside a collective it holds the lock, and MPI_Abort ends it anyway.
        match self.comm.try_lock() {
            Ok(mut g) => drop(g.take()),
            Err(TryLockError::Poisoned(p)) => drop(p.into_inner().take()),
            Err(TryLockError::WouldBlock) => {}
        }
        self.mpi.abort(reason);
        // MPI_Abort does not return; should a library return from it, end this process.
        std::process::abort()
    }
}

/// Runs `f` on the elements of the CUDA tensor `t` (made contiguous) as a device view.
fn with_view<T: Elem, R>(t: &Tensor, f: impl FnOnce(CudaView<'_, T>) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(Error::invalid("tensor", "not a CUDA tensor"));
    };
    let slice = s.as_cuda_slice::<T>()?;
    let start = layout.start_offset();
    f(slice.slice(start..start + t.elem_count()))
}

impl Collective for NcclCollective {
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = Op::AllReduceSum;
        let g = self.lock();
        let comm = self.live(op, &g)?;
        let (h, local) = self.local_checks(op, t);
        self.mpi.agree_header(op, h, local)?;
        if t.elem_count() == 0 {
            return Ok(t.clone());
        }
        Ok(self.agreed(op, || by_dtype!(t.dtype(), self.all_reduce_t(comm, t))))
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let op = Op::AllGather;
        let g = self.lock();
        let comm = self.live(op, &g)?;
        let (mut h, mut local) = self.local_checks(op, t);
        if t.rank() == 0 {
            h = h.fault(Fault::Rows);
            local = local.or(Some(
                self.err(op, "a scalar has no dimension 0 to gather along"),
            ));
        }
        self.mpi.agree_header(op, h, local)?;
        if t.elem_count() == 0 {
            // Empty everywhere (shapes agree): a reshaped view, no zero-sized allocation.
            let mut dims = t.dims().to_vec();
            dims[0] *= self.world;
            return Ok(t.reshape(dims)?);
        }
        Ok(self.agreed(op, || by_dtype!(t.dtype(), self.all_gather_t(comm, t))))
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = Op::ReduceScatterSum;
        let g = self.lock();
        let comm = self.live(op, &g)?;
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
        self.mpi.agree_header(op, h, local)?;
        if t.elem_count() == 0 {
            return Ok(t.narrow(0, 0, rows / self.world)?);
        }
        Ok(self.agreed(op, || by_dtype!(t.dtype(), self.reduce_scatter_t(comm, t))))
    }

    fn all_to_all(&self, chunks: &[Tensor]) -> Result<Vec<Tensor>> {
        let op = Op::AllToAll;
        let g = self.lock();
        let comm = self.live(op, &g)?;
        let (h, local) = self.all_to_all_checks(chunks);
        self.mpi.agree_header(op, h, local)?;
        // Valid everywhere: one chunk per rank, same trailing dims and dtype on every rank.
        Ok(self.agreed(op, || {
            let trailing = chunks[0].dims()[1..].to_vec();
            let row_len: usize = trailing.iter().product();
            let send_rows: Vec<usize> = chunks.iter().map(|c| c.dims()[0]).collect();
            // Row r of the gathered matrix is what rank r sends to each rank.
            let mine: Vec<i64> = send_rows.iter().map(|&r| r as i64).collect();
            let matrix = self
                .mpi
                .all_gather(&Tensor::from_vec(mine, (1, self.world), &Device::Cpu)?)?
                .flatten_all()?
                .to_vec1::<i64>()?;
            let recv_rows: Vec<usize> = (0..self.world)
                .map(|from| matrix[from * self.world + self.rank] as usize)
                .collect();
            let mut dims = vec![recv_rows.iter().sum::<usize>()];
            dims.extend_from_slice(&trailing);
            // Nothing moves anywhere when rows are empty (row_len is the same on every rank).
            let all = if row_len == 0 {
                chunks[0].reshape(dims)?
            } else {
                let send = if send_rows.iter().any(|&r| r > 0) {
                    Some(Tensor::cat(chunks, 0)?)
                } else {
                    None
                };
                by_dtype!(
                    chunks[0].dtype(),
                    self.exchange_all(
                        comm,
                        send.as_ref(),
                        &send_rows,
                        &recv_rows,
                        row_len,
                        chunks,
                        &dims
                    )
                )?
            };
            let mut out = Vec::with_capacity(self.world);
            let mut start = 0;
            for &r in &recv_rows {
                out.push(all.narrow(0, start, r)?);
                start += r;
            }
            Ok(out)
        }))
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let op = Op::Broadcast;
        let g = self.lock();
        let comm = self.live(op, &g)?;
        let (h, mut local) = self.local_checks(op, t);
        let mut h = h.with_root(root);
        if root >= self.world {
            h = h.fault(Fault::Root);
            local = local.or(Some(
                self.err(op, format!("root {root} >= world size {}", self.world)),
            ));
        }
        self.mpi.agree_header(op, h, local)?;
        if t.elem_count() == 0 {
            return Ok(t.clone());
        }
        Ok(self.agreed(op, || by_dtype!(t.dtype(), self.broadcast_t(comm, t, root))))
    }

    fn barrier(&self) -> Result<()> {
        let op = Op::Barrier;
        let g = self.lock();
        self.live(op, &g)?;
        // This rank's queued work (NCCL's included) is done before it meets the others.
        if let Err(e) = self.device.cuda_stream().synchronize() {
            // The others wait for this rank; its GPU is unusable: end the job.
            self.abort_with(&format!("barrier: the CUDA stream failed: {e:?}"));
        }
        self.mpi.agree_header(op, Header::new(op, 0), None)
    }

    fn abort(&self, reason: &str) {
        self.abort_with(reason)
    }
}

impl NcclCollective {
    /// [`Self::exchange_t`], wrapped as one tensor of `dims`.
    #[allow(clippy::too_many_arguments)]
    fn exchange_all<T: Elem>(
        &self,
        comm: &Comm,
        send: Option<&Tensor>,
        send_rows: &[usize],
        recv_rows: &[usize],
        row_len: usize,
        chunks: &[Tensor],
        dims: &[usize],
    ) -> Result<Tensor> {
        match self.exchange_t::<T>(comm, send, send_rows, recv_rows, row_len)? {
            Some(out) => Ok(self.wrap(out, dims)),
            // Nothing arrives: an empty view of a chunk, no zero-sized allocation.
            None => Ok(chunks[0].narrow(0, 0, 0)?.reshape(dims)?),
        }
    }
}
