//! [`LocalGroup`]: `world` ranks as threads of one process, a test double for [`Collective`].
//!
//! Tests of distributed code (data parallel gradients, ZeRO-1 shards, expert-parallel MoE) run
//! every rank on its own thread with its own `LocalGroup` handle, without MPI or GPUs. It is not
//! a backend to train with: every rank computes every reduction itself.
//!
//! - **CPU tensors.** Any other device is an [`Error::Collective`].
//! - **Checked.** Every rank's call is compared with the others': the same operation in the same
//!   order, and the shapes and dtypes the operation needs to agree. A mismatch is an error on every
//!   rank, naming the operation, the rank that reports it and what differs.
//! - **Reproducible.** Sums run in rank order (`t_0 + t_1 + ...`), so every rank gets bitwise the
//!   same result, run after run. f32, f64 and integer dtypes are summed in their own dtype; bf16
//!   and f16 are summed in f32 and rounded back once (what the MPI backend does too).
//! - **No hang.** A wait gives up after a timeout (60 s unless [`LocalGroup::with_timeout`] says
//!   otherwise). [`Collective::abort`], a timeout, or a rank thread that panics while holding its
//!   handle poisons the group: every pending and future collective on every rank fails with an
//!   error naming the failing rank and why. A rank whose handle was dropped normally has left:
//!   a collective that waits for it fails at once.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use torchscale_core::{local_group::LocalGroup, Collective};
//!
//! # fn main() -> torchscale_core::Result<()> {
//! let sums = LocalGroup::run(3, |g| {
//!     let t = Tensor::new(&[g.rank() as f32, 1.0], &Device::Cpu)?;
//!     Ok(g.all_reduce_sum(&t)?.to_vec1::<f32>()?)
//! });
//! for s in sums {
//!     assert_eq!(s?, vec![3.0, 3.0]);
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::collective::Collective;
use crate::{Error, Result};

/// How long a collective waits for the other ranks unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// One rank's handle on an in-process group of `world_size` ranks (see the [module](self)).
///
/// Not `Clone`: each rank holds exactly one handle, and dropping it tells the others that the
/// rank has left (or, while its thread panics, that it failed).
#[derive(Debug)]
pub struct LocalGroup {
    rank: usize,
    world: usize,
    timeout: Duration,
    shared: Arc<Shared>,
    /// The number of collectives this rank has entered: the key of its next round.
    seq: Mutex<u64>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct State {
    rounds: HashMap<u64, Round>,
    /// The first failure: (rank, reason). Once set, every collective fails.
    poisoned: Option<(usize, String)>,
    /// Ranks whose handle was dropped normally.
    left: Vec<bool>,
}

/// One collective call: what each rank brought, and how many ranks have taken their result.
#[derive(Debug)]
struct Round {
    calls: Vec<Option<Call>>,
    taken: usize,
}

/// What a rank brought to a round.
#[derive(Debug, Clone)]
struct Call {
    op: &'static str,
    root: usize,
    tensors: Vec<Tensor>,
}

impl LocalGroup {
    /// A group of `world` ranks with the default timeout; element `r` is rank `r`'s handle.
    /// `world` 0 gives no handles.
    pub fn new(world: usize) -> Vec<LocalGroup> {
        Self::with_timeout(world, DEFAULT_TIMEOUT)
    }

    /// A group of `world` ranks whose collectives wait at most `timeout` for the others.
    pub fn with_timeout(world: usize, timeout: Duration) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                left: vec![false; world],
                ..State::default()
            }),
            wake: Condvar::new(),
        });
        (0..world)
            .map(|rank| LocalGroup {
                rank,
                world,
                timeout,
                shared: shared.clone(),
                seq: Mutex::new(0),
            })
            .collect()
    }

    /// Runs `f` on `world` threads, one per rank, each with its own handle, and returns the
    /// results in rank order. A rank that panics gets an [`Error::Collective`] (op `run`) with
    /// the panic message; the other ranks' collectives fail instead of waiting for it.
    pub fn run<T, F>(world: usize, f: F) -> Vec<Result<T>>
    where
        T: Send,
        F: Fn(&LocalGroup) -> Result<T> + Sync,
    {
        Self::run_with_timeout(world, DEFAULT_TIMEOUT, f)
    }

    /// [`LocalGroup::run`] with a timeout for every wait.
    pub fn run_with_timeout<T, F>(world: usize, timeout: Duration, f: F) -> Vec<Result<T>>
    where
        T: Send,
        F: Fn(&LocalGroup) -> Result<T> + Sync,
    {
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = Self::with_timeout(world, timeout)
                .into_iter()
                .map(|g| s.spawn(move || f(&g)))
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| {
                    h.join().unwrap_or_else(|payload| {
                        Err(Error::Collective {
                            op: "run".into(),
                            rank,
                            reason: format!("rank {rank} panicked: {}", panic_message(&*payload)),
                        })
                    })
                })
                .collect()
        })
    }

    /// The timeout of this handle's waits.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn err(&self, op: &str, reason: impl Into<String>) -> Error {
        Error::Collective {
            op: op.into(),
            rank: self.rank,
            reason: reason.into(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic inside our own critical sections cannot leave the state half-written in a way
        // that matters (each is a few assignments), so a poisoned mutex is still usable.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn poison(&self, reason: String) {
        let mut st = self.lock();
        if st.poisoned.is_none() {
            st.poisoned = Some((self.rank, reason));
        }
        drop(st);
        self.shared.wake.notify_all();
    }

    /// Deposits this rank's call and waits for every rank's; returns all calls in rank order.
    fn exchange(&self, op: &'static str, root: usize, tensors: &[Tensor]) -> Result<Vec<Call>> {
        for (i, t) in tensors.iter().enumerate() {
            if !matches!(t.device(), Device::Cpu) {
                return Err(self.err(
                    op,
                    format!(
                        "tensor {i} is on {:?}; LocalGroup takes CPU tensors",
                        t.device()
                    ),
                ));
            }
        }
        // Our own copy: a caller's Var may be updated in place while other ranks still read it.
        let tensors = tensors
            .iter()
            .map(|t| t.copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let seq = {
            let mut s = self.seq.lock().unwrap_or_else(|p| p.into_inner());
            let cur = *s;
            *s += 1;
            cur
        };
        let deadline = Instant::now() + self.timeout;
        let mut st = self.lock();
        if let Some((r, why)) = &st.poisoned {
            return Err(self.err(op, failed_rank(*r, why)));
        }
        let world = self.world;
        st.rounds
            .entry(seq)
            .or_insert_with(|| Round {
                calls: vec![None; world],
                taken: 0,
            })
            .calls[self.rank] = Some(Call { op, root, tensors });
        self.shared.wake.notify_all();
        loop {
            if let Some((r, why)) = &st.poisoned {
                return Err(self.err(op, failed_rank(*r, why)));
            }
            // Only the last rank to take its result removes a round, and we have not.
            let round = st
                .rounds
                .get_mut(&seq)
                .ok_or_else(|| self.err(op, format!("internal: round {seq} vanished")))?;
            let missing: Vec<usize> = (0..world).filter(|&r| round.calls[r].is_none()).collect();
            if missing.is_empty() {
                let calls: Vec<Call> = round.calls.iter().flatten().cloned().collect();
                round.taken += 1;
                if round.taken == world {
                    st.rounds.remove(&seq);
                }
                return Ok(calls);
            }
            if let Some(&gone) = missing.iter().find(|&&r| st.left[r]) {
                return Err(self.err(
                    op,
                    format!("rank {gone} has left the group (its handle was dropped)"),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                let reason = format!(
                    "timed out after {:?} in `{op}` waiting for ranks {missing:?}",
                    self.timeout
                );
                drop(st);
                self.poison(reason.clone());
                return Err(self.err(op, reason));
            }
            st = self
                .shared
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Checks that every rank called `op` (with the same root); the error is the same on all.
    fn check_ops(&self, op: &str, calls: &[Call]) -> Result<()> {
        for (r, c) in calls.iter().enumerate() {
            if c.op != op {
                return Err(self.err(
                    op,
                    format!(
                        "rank {r} called `{}` where rank {} called `{op}`",
                        c.op, self.rank
                    ),
                ));
            }
            if c.root != calls[0].root {
                return Err(self.err(
                    op,
                    format!(
                        "rank {r} named root {} where rank 0 named root {}",
                        c.root, calls[0].root
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks that every rank's single tensor has rank 0's shape and dtype.
    fn check_same(&self, op: &str, calls: &[Call]) -> Result<()> {
        let first = &calls[0].tensors[0];
        for (r, c) in calls.iter().enumerate().skip(1) {
            let t = &c.tensors[0];
            if t.dims() != first.dims() {
                return Err(self.err(
                    op,
                    format!(
                        "rank {r} has shape {:?} where rank 0 has {:?}",
                        t.dims(),
                        first.dims()
                    ),
                ));
            }
            if t.dtype() != first.dtype() {
                return Err(self.err(
                    op,
                    format!(
                        "rank {r} has dtype {:?} where rank 0 has {:?}",
                        t.dtype(),
                        first.dtype()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The sum over ranks, in rank order; bf16 and f16 are summed in f32 and rounded back.
    fn sum_in_rank_order(calls: &[Call]) -> Result<Tensor> {
        let dtype = calls[0].tensors[0].dtype();
        let acc_dtype = match dtype {
            DType::BF16 | DType::F16 => DType::F32,
            other => other,
        };
        let mut acc = calls[0].tensors[0].to_dtype(acc_dtype)?;
        for c in &calls[1..] {
            acc = acc.add(&c.tensors[0].to_dtype(acc_dtype)?)?;
        }
        Ok(acc.to_dtype(dtype)?)
    }
}

impl Collective for LocalGroup {
    fn backend(&self) -> &'static str {
        "local"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_reduce_sum";
        let calls = self.exchange(OP, 0, std::slice::from_ref(t))?;
        self.check_ops(OP, &calls)?;
        self.check_same(OP, &calls)?;
        Self::sum_in_rank_order(&calls)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_gather";
        if t.rank() == 0 {
            return Err(self.err(OP, "a scalar has no dimension 0 to gather along"));
        }
        let calls = self.exchange(OP, 0, std::slice::from_ref(t))?;
        self.check_ops(OP, &calls)?;
        self.check_same(OP, &calls)?;
        let parts: Vec<&Tensor> = calls.iter().map(|c| &c.tensors[0]).collect();
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "reduce_scatter_sum";
        let rows = t.dims().first().copied().unwrap_or(0);
        if t.rank() == 0 || rows % self.world != 0 {
            return Err(self.err(
                OP,
                format!(
                    "shape {:?}: dimension 0 must be a multiple of the world size {}",
                    t.dims(),
                    self.world
                ),
            ));
        }
        let calls = self.exchange(OP, 0, std::slice::from_ref(t))?;
        self.check_ops(OP, &calls)?;
        self.check_same(OP, &calls)?;
        let n = rows / self.world;
        // Only this rank's block is summed: the same additions, in the same order, as a full sum.
        let blocks: Vec<Call> = calls
            .iter()
            .map(|c| {
                Ok(Call {
                    op: c.op,
                    root: c.root,
                    tensors: vec![c.tensors[0].narrow(0, self.rank * n, n)?],
                })
            })
            .collect::<Result<_>>()?;
        Self::sum_in_rank_order(&blocks)
    }

    fn all_to_all(&self, chunks: &[Tensor]) -> Result<Vec<Tensor>> {
        const OP: &str = "all_to_all";
        if chunks.len() != self.world {
            return Err(self.err(
                OP,
                format!(
                    "{} chunks for a world of {} ranks (one per rank)",
                    chunks.len(),
                    self.world
                ),
            ));
        }
        if let Some((i, _)) = chunks.iter().enumerate().find(|(_, c)| c.rank() == 0) {
            return Err(self.err(OP, format!("chunk {i} is a scalar; chunks need rows")));
        }
        let calls = self.exchange(OP, 0, chunks)?;
        self.check_ops(OP, &calls)?;
        // Every chunk of every rank: rank 0's chunk 0 trailing dims and dtype.
        let first = &calls[0].tensors[0];
        for (r, c) in calls.iter().enumerate() {
            for (d, t) in c.tensors.iter().enumerate() {
                if t.dims()[1..] != first.dims()[1..] {
                    return Err(self.err(
                        OP,
                        format!(
                            "rank {r}'s chunk for rank {d} has shape {:?}; trailing dimensions \
                             must match rank 0's chunk 0 {:?}",
                            t.dims(),
                            first.dims()
                        ),
                    ));
                }
                if t.dtype() != first.dtype() {
                    return Err(self.err(
                        OP,
                        format!(
                            "rank {r}'s chunk for rank {d} has dtype {:?} where rank 0's chunk 0 \
                             has {:?}",
                            t.dtype(),
                            first.dtype()
                        ),
                    ));
                }
            }
        }
        Ok(calls.iter().map(|c| c.tensors[self.rank].clone()).collect())
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        const OP: &str = "broadcast";
        if root >= self.world {
            return Err(self.err(OP, format!("root {root} >= world size {}", self.world)));
        }
        let calls = self.exchange(OP, root, std::slice::from_ref(t))?;
        self.check_ops(OP, &calls)?;
        self.check_same(OP, &calls)?;
        Ok(calls[root].tensors[0].clone())
    }

    fn barrier(&self) -> Result<()> {
        const OP: &str = "barrier";
        let calls = self.exchange(OP, 0, &[])?;
        self.check_ops(OP, &calls)
    }

    fn abort(&self, reason: &str) {
        self.poison(format!("aborted: {reason}"));
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.poison("panicked".into());
        } else {
            let mut st = self.lock();
            if let Some(l) = st.left.get_mut(self.rank) {
                *l = true;
            }
            drop(st);
            self.shared.wake.notify_all();
        }
    }
}

fn failed_rank(rank: usize, why: &str) -> String {
    format!("rank {rank} failed: {why}")
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
