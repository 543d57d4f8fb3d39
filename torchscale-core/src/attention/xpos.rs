//! xPos (length-extrapolatable rotary embedding), as torchscale applies it to q and k.

use candle_core::{Device, Tensor};

use crate::Result;

/// xPos for one attention module; the buffer `scale` (ζ_m = (2m + 0.4d)/(1.4d)) is saved as
/// `xpos.scale` so checkpoints load into torchscale.
#[derive(Debug, Clone)]
pub struct Xpos {
    head_dim: usize,
    scale_base: f64,
    zeta: Vec<f32>,
}

impl Xpos {
    /// For heads of even width `head_dim`.
    pub fn new(head_dim: usize, scale_base: f64) -> Self {
        let d = head_dim as f32;
        let zeta = (0..head_dim / 2)
            .map(|m| ((2 * m) as f32 + 0.4 * d) / (1.4 * d))
            .collect();
        Self {
            head_dim,
            scale_base,
            zeta,
        }
    }

    /// The `scale` buffer, `[d/2]`.
    pub fn scale_buffer(&self, dev: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.zeta.clone(), self.zeta.len(), dev)?)
    }

    /// Rotates and scales `x: [B, H, L, d]`: positions are the last `L` of `L + offset`;
    /// `downscale` (keys) uses 1/scale.
    pub fn forward(&self, x: &Tensor, offset: usize, downscale: bool) -> Result<Tensor> {
        let (b, h, l, d) = x.dims4()?;
        let half = self.head_dim / 2;
        let n = l + offset;
        let min_pos = (-(n as i64)).div_euclid(2);
        let mut cos = Vec::with_capacity(l * d);
        let mut sin = Vec::with_capacity(l * d);
        for j in offset..n {
            let p = (min_pos + j as i64) as f32 / self.scale_base as f32;
            for m in 0..half {
                // torch: inv_freq = 1 / 10000^(m / half) in f32, angle = j * inv_freq.
                let inv_freq = 1.0f32 / 10000f32.powf(m as f32 / half as f32);
                let angle = j as f32 * inv_freq;
                let mut s = self.zeta[m].powf(p);
                if downscale {
                    s = 1.0 / s;
                }
                let (c, sn) = (angle.cos() * s, angle.sin() * s);
                cos.extend([c, c]);
                sin.extend([sn, sn]);
            }
        }
        let dev = x.device();
        let cos = Tensor::from_vec(cos, (1, 1, l, d), dev)?.to_dtype(x.dtype())?;
        let sin = Tensor::from_vec(sin, (1, 1, l, d), dev)?.to_dtype(x.dtype())?;
        // rotate_every_two: (x0, x1, ..) -> (-x1, x0, ..)
        let pairs = x.reshape((b, h, l, half, 2))?;
        let x0 = pairs.narrow(4, 0, 1)?;
        let x1 = pairs.narrow(4, 1, 1)?;
        let rot = Tensor::cat(&[&x1.neg()?, &x0], 4)?.reshape((b, h, l, d))?;
        Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
    }
}
