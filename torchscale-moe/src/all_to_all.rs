//! A differentiable all-to-all over a [`Collective`] (torchscale's `_AllToAll`): the forward
//! pass sends rows of one buffer to every rank, the backward pass sends the gradients of the
//! received rows back where they came from by the reverse all-to-all.
//!
//! A real engine (MPI, NCCL) copies bytes, so the tensors it returns are outside the autograd
//! graph; [`all_to_all_rows`] joins the received buffer to the sent one through a candle custom
//! op whose backward is itself a collective. Every rank therefore takes part in the backward
//! exchange when it runs `backward()`, in the same order as the forward exchanges (reversed),
//! which holds as long as every rank builds the same graph.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use torchscale_core::{Collective, Error, Result};

/// Sends rows `send_rows[..r].sum() .. send_rows[..=r].sum()` of `x` (dimension 0) to rank `r`
/// and returns the rows received from every rank, concatenated in rank order, with the number
/// of rows received from each rank. Differentiable: the gradient of `x` is the reverse
/// all-to-all of the gradient of the result.
///
/// Every rank must call it at the same point, with `send_rows.len() == world_size` and
/// `send_rows` summing to `x.dim(0)`; rows may be uneven and zero.
pub fn all_to_all_rows(
    comm: &Arc<dyn Collective>,
    x: &Tensor,
    send_rows: &[usize],
) -> Result<(Tensor, Vec<usize>)> {
    let world = comm.world_size();
    if send_rows.len() != world {
        return Err(Error::invalid(
            "send_rows",
            format!(
                "{world} ranks need {world} row counts, got {}",
                send_rows.len()
            ),
        ));
    }
    let rows = x.dim(0)?;
    if send_rows.iter().sum::<usize>() != rows {
        return Err(Error::invalid(
            "send_rows",
            format!("row counts {send_rows:?} do not sum to the buffer's {rows} rows"),
        ));
    }
    let received = comm.all_to_all(&split_rows(&x.detach(), send_rows)?)?;
    let recv_rows = received
        .iter()
        .map(|t| Ok(t.dim(0)?))
        .collect::<Result<Vec<_>>>()?;
    // The custom op hands a clone of this buffer's storage over as the result, so the buffer
    // must start at offset 0 and be contiguous.
    let recv = Tensor::cat(&received, 0)?;
    let recv = if recv.is_contiguous() && recv.layout().start_offset() == 0 {
        recv
    } else {
        recv.force_contiguous()?
    };
    let op = AllToAllOp {
        comm: comm.clone(),
        send_rows: send_rows.to_vec(),
        recv_rows: recv_rows.clone(),
    };
    Ok((x.apply_op2(&recv.detach(), op)?, recv_rows))
}

/// `x` cut along dimension 0 into contiguous blocks of `rows[r]` rows.
fn split_rows(x: &Tensor, rows: &[usize]) -> Result<Vec<Tensor>> {
    let mut start = 0;
    rows.iter()
        .map(|&n| {
            let t = x.narrow(0, start, n)?.contiguous()?;
            start += n;
            Ok(t)
        })
        .collect()
}

/// `apply_op2(sent, received)`: the value is `received` (already exchanged); the backward
/// pass exchanges the gradient in the opposite direction and gives it all to `sent`.
struct AllToAllOp {
    comm: Arc<dyn Collective>,
    send_rows: Vec<usize>,
    recv_rows: Vec<usize>,
}

/// The received buffer's storage, after checking that it is compact (offset 0, contiguous), so
/// that the clone is exactly the result.
fn take_received<S: BackendStorage>(s: &S, l: &Layout) -> candle_core::Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("all_to_all: the received buffer is not compact")
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp2 for AllToAllOp {
    fn name(&self) -> &'static str {
        "all_to_all"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        take_received(s2, l2)
    }

    // Whichever crate turns candle's CUDA or Metal backend on, the exchanged buffer is handed
    // over the same way (without those backends these storages are candle's stand-ins).
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        take_received(s2, l2)
    }

    fn metal_fwd(
        &self,
        _s1: &candle_core::MetalStorage,
        _l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        take_received(s2, l2)
    }

    fn bwd(
        &self,
        _sent: &Tensor,
        _received: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let back = self
            .comm
            .all_to_all(&split_rows(grad_res, &self.recv_rows)?)?;
        for (from, (t, &want)) in back.iter().zip(&self.send_rows).enumerate() {
            if t.dim(0)? != want {
                return Err(Error::Collective {
                    op: "all_to_all backward".into(),
                    rank: self.comm.rank(),
                    reason: format!(
                        "rank {from} sent back {} gradient rows for the {want} rows sent to it",
                        t.dim(0)?
                    ),
                }
                .into());
            }
        }
        Ok((Some(Tensor::cat(&back, 0)?), None))
    }
}
