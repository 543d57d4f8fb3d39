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

use std::sync::{Arc, Barrier, Mutex};

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

struct Shared {
    /// `mailbox[from][to]`.
    mailbox: Mutex<Vec<Vec<Option<Tensor>>>>,
    barrier: Barrier,
}

/// `W` ranks in one process, one thread each; all-to-all through shared memory.
#[derive(Clone)]
pub struct InProcessGroup {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for InProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessGroup")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

impl InProcessGroup {
    /// One handle per rank; give handle `r` to the thread playing rank `r`. Every rank must
    /// take part in every all-to-all, or the others wait forever.
    pub fn new(world: usize) -> Vec<InProcessGroup> {
        let shared = Arc::new(Shared {
            mailbox: Mutex::new(vec![vec![None; world]; world]),
            barrier: Barrier::new(world.max(1)),
        });
        (0..world)
            .map(|rank| InProcessGroup {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl ExpertComm for InProcessGroup {
    fn world_size(&self) -> usize {
        self.world
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn all_to_all(&self, chunks: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if chunks.len() != self.world {
            return Err(Error::invalid(
                "chunks",
                format!(
                    "{} ranks need {} chunks, got {}",
                    self.world,
                    self.world,
                    chunks.len()
                ),
            ));
        }
        let poisoned = || Error::invalid("InProcessGroup", "mailbox lock poisoned");
        {
            let mut mb = self.shared.mailbox.lock().map_err(|_| poisoned())?;
            for (to, c) in chunks.into_iter().enumerate() {
                mb[self.rank][to] = Some(c);
            }
        }
        // Everyone has posted.
        self.shared.barrier.wait();
        let received = {
            let mut mb = self.shared.mailbox.lock().map_err(|_| poisoned())?;
            (0..self.world)
                .map(|from| mb[from][self.rank].take())
                .collect::<Option<Vec<_>>>()
        };
        // Everyone has collected: the mailbox may be reused.
        self.shared.barrier.wait();
        received.ok_or_else(|| Error::invalid("InProcessGroup", "a rank posted no chunk"))
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
