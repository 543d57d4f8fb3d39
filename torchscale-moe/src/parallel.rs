//! The expert-parallelism seam: with `W` ranks each owning `E / W` experts, the dispatched
//! buffers are exchanged with one all-to-all before the experts and one after (torchscale's
//! `_AllToAll` on the expert group).
//!
//! [`CollectiveComm`] runs the exchange on any [`Collective`] (MPI, NCCL, the in-process
//! `LocalGroup`) as a differentiable op ([`crate::all_to_all::all_to_all_rows`]): this is the
//! one to use in a distributed run. [`SingleProcess`] is the one-rank case (torchscale needs
//! `torch.distributed` even there); [`InProcessGroup`] is an older test double that runs `W`
//! ranks as threads and hands the tensors themselves over, so that one autograd graph spans the
//! ranks.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use torchscale_core::{Collective, Error, Result};

use crate::all_to_all::all_to_all_rows;

/// A collective over the ranks that share one MoE layer's experts.
pub trait ExpertComm: Send + Sync {
    /// Number of ranks W.
    fn world_size(&self) -> usize;
    /// This rank, in `0..W`.
    fn rank(&self) -> usize;
    /// Sends `chunks[r]` to rank `r` and returns the chunk received from each rank, in rank
    /// order. Every rank calls it with `W` chunks; chunks of one call have the same shape on
    /// every rank. Must keep tensors differentiable where the backend can (the in-process one
    /// does: it hands over the tensors themselves).
    fn all_to_all(&self, chunks: Vec<Tensor>) -> Result<Vec<Tensor>>;
}

/// One rank: all-to-all is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl ExpertComm for SingleProcess {
    fn world_size(&self) -> usize {
        1
    }
    fn rank(&self) -> usize {
        0
    }
    fn all_to_all(&self, chunks: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if chunks.len() != 1 {
            return Err(Error::invalid(
                "chunks",
                format!("one rank needs 1 chunk, got {}", chunks.len()),
            ));
        }
        Ok(chunks)
    }
}

/// Any [`Collective`] as the MoE layer's communicator: the all-to-all goes through the engine
/// and stays differentiable (its backward is the reverse all-to-all of the gradients, through
/// the same collective).
#[derive(Debug, Clone)]
pub struct CollectiveComm {
    comm: Arc<dyn Collective>,
}

impl CollectiveComm {
    /// Wraps a communicator whose ranks share one MoE layer's experts.
    pub fn new(comm: Arc<dyn Collective>) -> Self {
        Self { comm }
    }

    /// The wrapped communicator.
    pub fn collective(&self) -> &Arc<dyn Collective> {
        &self.comm
    }
}

impl ExpertComm for CollectiveComm {
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn all_to_all(&self, chunks: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let rows = chunks
            .iter()
            .map(|t| Ok(t.dim(0)?))
            .collect::<Result<Vec<_>>>()?;
        if chunks.is_empty() {
            return Err(Error::invalid(
                "chunks",
                "all_to_all needs one chunk per rank",
            ));
        }
        // One op on the concatenated buffer: one exchange forward, one backward.
        let (recv, recv_rows) = all_to_all_rows(&self.comm, &Tensor::cat(&chunks, 0)?, &rows)?;
        let mut start = 0;
        recv_rows
            .iter()
            .map(|&n| {
                let t = recv.narrow(0, start, n)?;
                start += n;
                Ok(t)
            })
            .collect()
    }
}

/// How long an in-process all-to-all waits for the other ranks unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The state every rank's handle shares.
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    timeout: Duration,
}

#[derive(Default)]
struct State {
    /// Open exchanges by sequence number (each rank numbers its own calls).
    rounds: HashMap<u64, Round>,
    /// Ranks all of whose handles were dropped: an exchange missing one of them fails.
    left: Vec<bool>,
    /// The first abort or timeout, `(rank, reason)`: every pending and later exchange fails.
    aborted: Option<(usize, String)>,
}

/// One exchange: what each rank posted, and how many have collected.
struct Round {
    /// `mail[from][to]`, `None` once collected.
    mail: Vec<Vec<Option<Tensor>>>,
    posted: Vec<bool>,
    collected: usize,
}

/// One rank's membership, shared by the clones of its handle: dropping the last one (the rank
/// returned, failed or panicked) tells the others that the rank has left.
struct Member {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
    /// The number of exchanges this rank has entered: the key of its next one.
    seq: Mutex<u64>,
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut st = lock(&self.shared.state);
        if let Some(l) = st.left.get_mut(self.rank) {
            *l = true;
        }
        drop(st);
        self.shared.wake.notify_all();
    }
}

/// The state, even if a thread panicked while holding it (each critical section is a few
/// assignments that leave it consistent).
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `W` ranks in one process, one thread each; all-to-all through shared memory.
///
/// An exchange never hangs: when a rank's handles are all dropped (its thread returned early,
/// with an error or a panic), every exchange still waiting for it fails at once; when a rank
/// calls [`InProcessGroup::abort`], every pending and later exchange of every rank fails; and as
/// a last resort (a rank that neither calls nor drops its handle) a wait gives up after the
/// timeout ([`DEFAULT_TIMEOUT`] unless [`InProcessGroup::with_timeout`] says otherwise) and
/// aborts the group.
#[derive(Clone)]
pub struct InProcessGroup {
    member: Arc<Member>,
}

impl std::fmt::Debug for InProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessGroup")
            .field("rank", &self.member.rank)
            .field("world", &self.member.world)
            .finish()
    }
}

impl InProcessGroup {
    /// One handle per rank; give handle `r` (or clones of it) to the thread playing rank `r`.
    pub fn new(world: usize) -> Vec<InProcessGroup> {
        Self::with_timeout(world, DEFAULT_TIMEOUT)
    }

    /// [`InProcessGroup::new`] whose exchanges wait at most `timeout` for the other ranks.
    pub fn with_timeout(world: usize, timeout: Duration) -> Vec<InProcessGroup> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                left: vec![false; world],
                ..State::default()
            }),
            wake: Condvar::new(),
            timeout,
        });
        (0..world)
            .map(|rank| InProcessGroup {
                member: Arc::new(Member {
                    rank,
                    world,
                    shared: shared.clone(),
                    seq: Mutex::new(0),
                }),
            })
            .collect()
    }

    /// Fails every pending and later exchange of every rank with `reason` (a rank that hit an
    /// error but keeps its handle calls this so that the others stop waiting for it).
    pub fn abort(&self, reason: &str) {
        self.set_aborted(format!("aborted: {reason}"));
    }

    fn set_aborted(&self, reason: String) {
        let shared = &self.member.shared;
        let mut st = lock(&shared.state);
        if st.aborted.is_none() {
            st.aborted = Some((self.member.rank, reason));
        }
        drop(st);
        shared.wake.notify_all();
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Collective {
            op: "all_to_all".into(),
            rank: self.member.rank,
            reason: reason.into(),
        }
    }
}

impl ExpertComm for InProcessGroup {
    fn world_size(&self) -> usize {
        self.member.world
    }
    fn rank(&self) -> usize {
        self.member.rank
    }
    fn all_to_all(&self, chunks: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let (rank, world) = (self.member.rank, self.member.world);
        if chunks.len() != world {
            return Err(Error::invalid(
                "chunks",
                format!("{world} ranks need {world} chunks, got {}", chunks.len()),
            ));
        }
        let seq = {
            let mut s = self.member.seq.lock().unwrap_or_else(|p| p.into_inner());
            *s += 1;
            *s - 1
        };
        let shared = &self.member.shared;
        let deadline = Instant::now() + shared.timeout;
        let mut st = lock(&shared.state);
        let round = st.rounds.entry(seq).or_insert_with(|| Round {
            mail: vec![vec![None; world]; world],
            posted: vec![false; world],
            collected: 0,
        });
        for (to, c) in chunks.into_iter().enumerate() {
            round.mail[rank][to] = Some(c);
        }
        round.posted[rank] = true;
        shared.wake.notify_all();
        loop {
            if let Some((r, why)) = &st.aborted {
                return Err(self.err(format!("rank {r} failed: {why}")));
            }
            let round = st
                .rounds
                .get_mut(&seq)
                .ok_or_else(|| self.err(format!("internal: exchange {seq} vanished")))?;
            let missing: Vec<usize> = (0..world).filter(|&r| !round.posted[r]).collect();
            if missing.is_empty() {
                let received = (0..world)
                    .map(|from| round.mail[from][rank].take())
                    .collect::<Option<Vec<_>>>();
                round.collected += 1;
                if round.collected == world {
                    st.rounds.remove(&seq);
                }
                return received.ok_or_else(|| self.err("internal: a chunk was taken twice"));
            }
            if let Some(&gone) = missing.iter().find(|&&r| st.left[r]) {
                return Err(self.err(format!(
                    "rank {gone} has left the group (its handles were dropped) before \
                     exchange {seq}"
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                let reason = format!(
                    "timed out after {:?} in exchange {seq} waiting for ranks {missing:?}",
                    shared.timeout
                );
                drop(st);
                self.set_aborted(reason.clone());
                return Err(self.err(reason));
            }
            st = shared
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The largest of every rank's `capacity`: one all-to-all of a `[1, 1]` f32 tensor on `device`
/// (exact below 2^24), outside the autograd graph. Every rank must call it at the same point.
pub(crate) fn agree_capacity(
    comm: &dyn ExpertComm,
    capacity: usize,
    device: &candle_core::Device,
) -> Result<usize> {
    let mine = Tensor::full(capacity as f32, (1, 1), device)?;
    let all = comm.all_to_all(vec![mine; comm.world_size()])?;
    let mut best = capacity;
    for t in all {
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        match v.as_slice() {
            [c] if c.is_finite() && *c >= 0.0 => best = best.max(*c as usize),
            _ => return Err(Error::shape("capacity exchange", "[1, 1]", t.dims())),
        }
    }
    Ok(best)
}

/// The experts owned by `rank`: `rank * E / W .. (rank + 1) * E / W`.
pub fn local_experts(
    num_experts: usize,
    world: usize,
    rank: usize,
) -> Result<std::ops::Range<usize>> {
    if world == 0 || !num_experts.is_multiple_of(world) {
        return Err(Error::config(
            "moe_expert_count",
            format!("{num_experts} experts cannot be split evenly over {world} ranks"),
        ));
    }
    if rank >= world {
        return Err(Error::invalid(
            "rank",
            format!("{rank} >= world size {world}"),
        ));
    }
    let per = num_experts / world;
    Ok(rank * per..(rank + 1) * per)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn in_process_all_to_all_transposes_the_chunks() {
        let group = InProcessGroup::new(3);
        let got: Vec<Vec<f32>> = std::thread::scope(|sc| {
            let handles: Vec<_> = group
                .iter()
                .map(|g| {
                    sc.spawn(move || {
                        // Rank r sends 10 r + to to rank `to`.
                        let chunks = (0..3)
                            .map(|to| {
                                Tensor::new(&[(10 * g.rank() + to) as f32], &Device::Cpu).unwrap()
                            })
                            .collect();
                        let r = g.all_to_all(chunks).unwrap();
                        r.iter().map(|t| t.to_vec1::<f32>().unwrap()[0]).collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Rank r receives 10 from + r from each rank.
        assert_eq!(got[0], vec![0.0, 10.0, 20.0]);
        assert_eq!(got[2], vec![2.0, 12.0, 22.0]);
    }

    /// Rank `r`'s chunks for a world of `w`: one row each.
    fn chunks(r: usize, w: usize) -> Vec<Tensor> {
        (0..w)
            .map(|to| Tensor::new(&[(10 * r + to) as f32], &Device::Cpu).unwrap())
            .collect()
    }

    /// Runs `f(handle)` for every rank on its own thread (the handle moves in, so it is dropped
    /// when `f` returns); the results in rank order, with how long the slowest took.
    fn run<T: Send>(
        group: Vec<InProcessGroup>,
        f: impl Fn(InProcessGroup) -> T + Sync,
    ) -> (Vec<T>, std::time::Duration) {
        let start = Instant::now();
        let f = &f;
        let out = std::thread::scope(|sc| {
            let hs: Vec<_> = group.into_iter().map(|g| sc.spawn(move || f(g))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        (out, start.elapsed())
    }

    #[test]
    fn a_rank_that_fails_before_the_exchange_does_not_hang_the_others() {
        // Rank 1 returns (an error of its own) before its second exchange; a long timeout shows
        // that the others fail because it left, not because they waited it out.
        let group = InProcessGroup::with_timeout(3, Duration::from_secs(300));
        let (res, took) = run(group, |g| -> Result<()> {
            g.all_to_all(chunks(g.rank(), 3))?;
            if g.rank() == 1 {
                return Err(Error::invalid("rank 1", "failed before the exchange"));
            }
            g.all_to_all(chunks(g.rank(), 3))?;
            Ok(())
        });
        assert!(took < Duration::from_secs(30), "took {took:?}");
        assert!(res[1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("failed before"));
        for r in [0, 2] {
            let e = res[r].as_ref().unwrap_err().to_string();
            assert!(e.contains("rank 1 has left"), "rank {r}: {e}");
        }
    }

    #[test]
    fn a_panicking_rank_does_not_hang_the_others() {
        let group = InProcessGroup::with_timeout(2, Duration::from_secs(300));
        let (res, took) = run(group, |g| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if g.rank() == 0 {
                    // Moving the handle into the unwinding closure drops it while panicking.
                    let _g = g;
                    panic!("rank 0 panics");
                }
                g.all_to_all(chunks(1, 2)).map(|_| ())
            }))
        });
        assert!(took < Duration::from_secs(30), "took {took:?}");
        assert!(res[0].is_err());
        let e = res[1].as_ref().unwrap().as_ref().unwrap_err().to_string();
        assert!(e.contains("rank 0 has left"), "{e}");
    }

    #[test]
    fn abort_and_timeout_stop_waiting_ranks() {
        // A rank that keeps its handle but aborts: the others fail with its reason.
        let group = InProcessGroup::with_timeout(3, Duration::from_secs(300));
        let keep = group.clone();
        let (res, took) = run(group, |g| {
            if g.rank() == 2 {
                std::thread::sleep(Duration::from_millis(50));
                g.abort("bad batch");
                return Ok(());
            }
            g.all_to_all(chunks(g.rank(), 3)).map(|_| ())
        });
        drop(keep);
        assert!(took < Duration::from_secs(30), "took {took:?}");
        for r in [0, 1] {
            let e = res[r].as_ref().unwrap_err().to_string();
            assert!(
                e.contains("rank 2 failed: aborted: bad batch"),
                "rank {r}: {e}"
            );
        }
        // A rank that neither calls nor drops its handle: the wait times out, names it, and
        // later exchanges fail at once.
        let group = InProcessGroup::with_timeout(2, Duration::from_millis(200));
        let idle = group[1].clone();
        let e = group[0].all_to_all(chunks(0, 2)).unwrap_err().to_string();
        assert!(e.contains("timed out") && e.contains("[1]"), "{e}");
        let e = idle.all_to_all(chunks(1, 2)).unwrap_err().to_string();
        assert!(e.contains("timed out"), "{e}");
    }

    #[test]
    fn ranks_agree_on_the_largest_capacity() {
        let group = InProcessGroup::new(3);
        let got: Vec<usize> = std::thread::scope(|sc| {
            let handles: Vec<_> = group
                .iter()
                .map(|g| {
                    sc.spawn(move || agree_capacity(g, [4, 9, 2][g.rank()], &Device::Cpu).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got, vec![9, 9, 9]);
    }

    #[test]
    fn expert_ranges() {
        assert_eq!(local_experts(8, 4, 3).unwrap(), 6..8);
        assert!(local_experts(6, 4, 0).is_err());
        assert!(local_experts(8, 4, 4).is_err());
    }
}
