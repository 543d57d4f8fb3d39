//! The fused attention of separate `q: [B, T, H, d]` and `k, v: [B, S, H, d]` tensors, as a
//! candle `CustomOp3` that carries its own backward.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::heads::Heads;
use super::view::{cpu, Dest, Scatter, View};
use super::{AttentionOptions, Dims};
use crate::cpu::{as_f32, storage_from_f32, tensor_from_f32};
use crate::layer_norm::try_filled;

/// The fused op on three operands, read in place when f32.
pub(super) struct AttentionOp(Heads);

impl AttentionOp {
    pub fn new(dims: Dims, dtype: DType, opts: &AttentionOptions) -> Result<Self> {
        Ok(Self(Heads::new(dims, dtype, opts)?))
    }
}

/// A destination in `buf` for a `[B, len, H, d]` result stored as `[B, len, H * d]`.
fn dense<'a>(buf: &'a Scatter<'a>, dims: Dims, len: usize) -> Dest<'a> {
    let Dims { h, d, .. } = dims;
    Dest {
        buf,
        base: 0,
        ld: h * d,
        len,
        d,
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "torchscale-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.0.dims;
        let Dims { b, t, h, d, .. } = dims;
        let (q, k, v) = (View::new(s1, l1)?, View::new(s2, l2)?, View::new(s3, l3)?);
        // SAFETY: the forward writes every element of its destination.
        let (out, ()) = unsafe {
            try_filled(b * t * h * d, |out| {
                let buf = Scatter::new(out);
                self.0.forward((&q, &k, &v), &dense(&buf, dims, t))
            })?
        };
        Ok((
            storage_from_f32(out, s1.dtype())?,
            Shape::from((b, t, h * d)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = self.0.dims;
        let Dims { b, t, s, h, d } = dims;
        let want = [q.track_op(), k.track_op(), v.track_op()];
        if !want.iter().any(|w| *w) {
            return Ok((None, None, None));
        }
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (qv, kv, vv) = (
            View::new(cpu(&qs)?, ql)?,
            View::new(cpu(&ks)?, kl)?,
            View::new(cpu(&vs)?, vl)?,
        );
        let g = as_f32(cpu(&gs)?, gl)?;
        if g.len() != b * t * h * d {
            bail!(
                "attention: gradient {:?}, expected [{b}, {t}, {}]",
                grad.dims(),
                h * d
            );
        }
        let gv = View::from_slice(&g, [b, t, h, d]);
        // Only the wanted gradients get a buffer; the backward writes every element of each.
        let len = |i: usize, rows: usize| if want[i] { b * rows * h * d } else { 0 };
        // SAFETY: the backward writes every element of each wanted destination; unwanted ones
        // have no elements.
        let (dq, (dk, (dv, ()))) = unsafe {
            try_filled(len(0, t), |dq| {
                try_filled(len(1, s), |dk| {
                    try_filled(len(2, s), |dv| {
                        let (sq, sk, sv) = (Scatter::new(dq), Scatter::new(dk), Scatter::new(dv));
                        let dests = [
                            dense(&sq, dims, t),
                            dense(&sk, dims, s),
                            dense(&sv, dims, s),
                        ];
                        let pick = |i: usize| want[i].then_some(&dests[i]);
                        self.0
                            .backward((&qv, &kv, &vv, &gv), (pick(0), pick(1), pick(2)))
                    })
                })
            })?
        };
        drop((qs, ks, vs, gs));
        let dtype = q.dtype();
        let wrap = |on: bool, x: Vec<f32>, len: usize| -> Result<Option<Tensor>> {
            if on {
                Ok(Some(tensor_from_f32(x, (b, len, h, d), dtype)?))
            } else {
                Ok(None)
            }
        };
        Ok((
            wrap(want[0], dq, t)?,
            wrap(want[1], dk, s)?,
            wrap(want[2], dv, s)?,
        ))
    }
}
