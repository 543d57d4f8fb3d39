//! xPos (length-extrapolatable rotary embedding), as torchscale applies it to q and k.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// ζ_m of heads of width `head_dim`, in f32 as torchscale computes it.
fn zeta(m: usize, head_dim: usize) -> f32 {
    let d = head_dim as f32;
    ((2 * m) as f32 + 0.4 * d) / (1.4 * d)
}

/// xPos for one attention module; the buffer `scale` (ζ_m = (2m + 0.4d)/(1.4d)) is saved as
/// `xpos.scale` so checkpoints load into torchscale.
#[derive(Debug, Clone)]
pub struct Xpos {
    head_dim: usize,
    scale_base: f64,
    zeta: Vec<f32>,
}

impl Xpos {
    /// For heads of even width `head_dim`. A `scale_base` that is not finite and positive is an
    /// [`Error::Config`] naming `xpos_scale_base` (its scales would be NaN or infinite).
    pub fn new(head_dim: usize, scale_base: f64) -> Result<Self> {
        if !(scale_base.is_finite() && scale_base > 0.0) {
            return Err(Error::config(
                "xpos_scale_base",
                format!("must be finite and > 0, got {scale_base}"),
            ));
        }
        let zeta = (0..head_dim / 2).map(|m| zeta(m, head_dim)).collect();
        Ok(Self {
            head_dim,
            scale_base,
            zeta,
        })
    }

    /// Checks that `positions` positions (a model's longest sequence) keep every xPos scale and
    /// its inverse finite in f32, as [`Xpos::forward`] needs: an [`Error::Config`] naming
    /// `xpos_scale_base` otherwise. The scale `zeta^(pos / scale_base)` grows with
    /// `positions / scale_base`: `scale_base = 1` overflows f32 from about 140 positions, and the
    /// keys' `1 / scale` then multiplies the queries' `inf` into NaN scores.
    /// Allocates nothing: only ζ_0 bounds the scales, so a config's head width, however large,
    /// is checked before any model is built.
    pub fn check_positions(head_dim: usize, scale_base: f64, positions: usize) -> Result<()> {
        Self::new(0, scale_base)?;
        let first = Self {
            head_dim,
            scale_base,
            zeta: if head_dim >= 2 {
                vec![zeta(0, head_dim)]
            } else {
                Vec::new()
            },
        };
        first.check_len(positions, DType::F32)
    }

    /// The [`Xpos::check_positions`] test for `n` positions in `dtype` (f16 overflows sooner).
    fn check_len(&self, n: usize, dtype: DType) -> Result<()> {
        // zeta is smallest at m = 0 and the exponent most extreme at the first and last
        // positions: those two scales bound all the others.
        let Some(&zeta) = self.zeta.first() else {
            return Ok(());
        };
        if n == 0 {
            return Ok(());
        }
        let min_pos = (-(n as i64)).div_euclid(2);
        let max_pos = min_pos + n as i64 - 1;
        let limit = match dtype {
            DType::F16 => 65504.0f32,
            DType::BF16 => 3.389_531_4e38,
            _ => f32::MAX,
        };
        let fits = |pos: i64| {
            let s = zeta.powf(pos as f32 / self.scale_base as f32);
            s.abs() <= limit && (1.0 / s).abs() <= limit
        };
        if fits(min_pos) && fits(max_pos) {
            return Ok(());
        }
        Err(Error::config(
            "xpos_scale_base",
            format!(
                "scale base {} overflows the xPos scale ({dtype:?}) at {n} positions: use a \
                 larger scale base or shorter sequences",
                self.scale_base
            ),
        ))
    }

    /// The `scale` buffer, `[d/2]`.
    pub fn scale_buffer(&self, dev: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.zeta.clone(), self.zeta.len(), dev)?)
    }

    /// Rotates and scales `x: [B, H, L, d]`: positions are the last `L` of `L + offset`;
    /// `downscale` (keys) uses 1/scale. Positions whose scale overflows `x`'s dtype are an
    /// [`Error::Config`] naming `xpos_scale_base` (see [`Xpos::check_positions`]), not NaN.
    pub fn forward(&self, x: &Tensor, offset: usize, downscale: bool) -> Result<Tensor> {
        let (b, h, l, d) = x.dims4()?;
        let half = self.head_dim / 2;
        let n = l + offset;
        self.check_len(n, x.dtype())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_base_must_be_finite_and_positive() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = Xpos::new(8, bad).unwrap_err();
            assert!(matches!(&e, Error::Config { field, .. } if field == "xpos_scale_base"));
        }
        assert!(Xpos::new(8, 512.0).is_ok());
    }

    #[test]
    fn overflowing_positions_are_a_config_error_not_nan() {
        // torchscale's default base covers far more than any model's positions.
        assert!(Xpos::check_positions(16, 512.0, 8192).is_ok());
        // Base 1: fine for short sequences, overflows f32 past about 140 positions.
        assert!(Xpos::check_positions(16, 1.0, 64).is_ok());
        let e = Xpos::check_positions(16, 1.0, 1024).unwrap_err();
        assert!(e.to_string().contains("xpos_scale_base"), "{e}");
        let x = Xpos::new(16, 1.0).unwrap();
        let q = Tensor::ones((1, 2, 200, 16), DType::F32, &Device::Cpu).unwrap();
        let e = x.forward(&q, 0, false).unwrap_err();
        assert!(matches!(&e, Error::Config { field, .. } if field == "xpos_scale_base"));
        // Within range the scaled queries and keys stay finite.
        for down in [false, true] {
            let y = x.forward(&q.narrow(2, 0, 64).unwrap(), 0, down).unwrap();
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(y.iter().all(|v| v.is_finite()));
        }
        // f16 overflows much sooner than f32.
        let h = q.narrow(2, 0, 64).unwrap().to_dtype(DType::F16).unwrap();
        assert!(x.forward(&h, 0, false).is_err());
    }

    #[test]
    fn check_positions_agrees_with_the_module_and_allocates_nothing() {
        // Same verdicts as the built module's own check, across widths and lengths.
        for (d, base, n) in [
            (16, 1.0, 140),
            (16, 1.0, 141),
            (64, 2.0, 300),
            (6, 512.0, 1 << 20),
        ] {
            let built = Xpos::new(d, base).unwrap().check_len(n, DType::F32).is_ok();
            assert_eq!(
                Xpos::check_positions(d, base, n).is_ok(),
                built,
                "{d} {base} {n}"
            );
        }
        // A head wider than memory is checked at once (the module would need 2^61 floats).
        assert!(Xpos::check_positions(1 << 62, 512.0, 1024).is_ok());
        assert!(Xpos::check_positions(1 << 62, 1.0, 1024).is_err());
        assert!(Xpos::check_positions(16, 0.0, 8).is_err());
    }
}
