//! The fused self-attention of a packed projection `qkv: [B, T, 3 * H * d]` (q, k and v side by
//! side in the last dimension), as a candle `CustomOp1`: the three operands are strided views
//! into the one storage, and the backward writes dq, dk and dv side by side into one
//! `[B, T, 3 * H * d]` gradient, so the graph holds one node where the unpacked path has three
//! narrows, three reshapes and three gradients.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::heads::Heads;
use super::view::{cpu, Dest, Scatter, View};
use super::{AttentionOptions, Dims};
use crate::cpu::{as_f32, storage_from_f32, tensor_from_f32};
use crate::layer_norm::try_filled;

/// The fused op on a packed projection.
pub(super) struct PackedOp(Heads);

impl PackedOp {
    /// `dims.s` must equal `dims.t` (self-attention).
    pub fn new(dims: Dims, dtype: DType, opts: &AttentionOptions) -> Result<Self> {
        Ok(Self(Heads::new(dims, dtype, opts)?))
    }

    /// The projection as f32 with the offset and strides of its `[B, T, 3C]` elements: f32
    /// storage is read in place whatever its layout, other dtypes are converted to one contiguous
    /// copy that the three views share.
    fn source<'a>(
        &self,
        s: &'a CpuStorage,
        l: &Layout,
    ) -> Result<(Cow<'a, [f32]>, usize, [usize; 3])> {
        let Dims { b, t, h, d, .. } = self.0.dims;
        let w = 3 * h * d;
        if l.dims() != [b, t, w] {
            bail!(
                "attention_packed: qkv {:?}, expected [{b}, {t}, {w}]",
                l.dims()
            );
        }
        Ok(match (s, l.stride()) {
            (CpuStorage::F32(v), &[s0, s1, s2]) => {
                (Cow::Borrowed(v.as_slice()), l.start_offset(), [s0, s1, s2])
            }
            _ => (as_f32(s, l)?, 0, [t * w, w, 1]),
        })
    }

    /// The `[B, T, H, d]` views of q, k and v in `data`: columns `0..C`, `C..2C`, `2C..3C`.
    fn views<'a>(&self, data: &'a [f32], off: usize, [s0, s1, s2]: [usize; 3]) -> [View<'a>; 3] {
        let Dims { h, d, .. } = self.0.dims;
        std::array::from_fn(|i| View::strided(data, off + i * h * d * s2, [s0, s1, d * s2, s2]))
    }
}

impl CustomOp1 for PackedOp {
    fn name(&self) -> &'static str {
        "torchscale-attention-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Dims { b, t, h, d, .. } = self.0.dims;
        let c = h * d;
        let (data, off, st) = self.source(s, l)?;
        let [q, k, v] = self.views(&data, off, st);
        // SAFETY: the forward writes every element of its destination.
        let (out, ()) = unsafe {
            try_filled(b * t * c, |out| {
                let buf = Scatter::new(out);
                let dest = Dest {
                    buf: &buf,
                    base: 0,
                    ld: c,
                    len: t,
                    d,
                };
                self.0.forward((&q, &k, &v), &dest)
            })?
        };
        Ok((storage_from_f32(out, s.dtype())?, Shape::from((b, t, c))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !qkv.track_op() {
            return Ok(None);
        }
        let Dims { b, t, h, d, .. } = self.0.dims;
        let c = h * d;
        let (xs, xl) = qkv.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (data, off, st) = self.source(cpu(&xs)?, xl)?;
        let [q, k, v] = self.views(&data, off, st);
        let g = as_f32(cpu(&gs)?, gl)?;
        if g.len() != b * t * c {
            bail!(
                "attention_packed: gradient {:?}, expected [{b}, {t}, {c}]",
                grad.dims()
            );
        }
        let gv = View::from_slice(&g, [b, t, h, d]);
        // dq, dk and dv side by side, each row of 3C written once by the backward.
        // SAFETY: the backward writes every element of the three destinations, which together
        // cover the buffer.
        let (dx, ()) = unsafe {
            try_filled(b * t * 3 * c, |dx| {
                let buf = Scatter::new(dx);
                let dests: [Dest; 3] = std::array::from_fn(|i| Dest {
                    buf: &buf,
                    base: i * c,
                    ld: 3 * c,
                    len: t,
                    d,
                });
                let [dq, dk, dv] = &dests;
                self.0
                    .backward((&q, &k, &v, &gv), (Some(dq), Some(dk), Some(dv)))
            })?
        };
        drop((xs, gs));
        Ok(Some(tensor_from_f32(dx, (b, t, 3 * c), qkv.dtype())?))
    }
}
