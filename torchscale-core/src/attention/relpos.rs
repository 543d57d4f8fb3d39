//! T5-style relative position bias, bucketed as torchscale does (always bidirectional).

use candle_core::{Device, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::Result;

/// The bucket of relative position `n = query - key`.
///
/// Keys to the right of the query (`n < 0`) use the upper half. The log branch is evaluated in f32,
/// as torch does, so that values on a bucket boundary truncate the same way.
pub fn relative_position_bucket(n: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if n < 0 { half } else { 0 };
    let n = n.abs();
    let exact = half / 2;
    if n < exact {
        bucket += n;
    } else {
        let ratio = (n as f32 / exact as f32).ln();
        let denom = (max_distance as f64 / exact as f64).ln();
        let large = exact + (ratio / denom as f32 * (half - exact) as f32) as i64;
        bucket += large.min(half - 1);
    }
    bucket as usize
}

/// The `[num_buckets, H]` table (key `relative_attention_bias.weight`), shared by all layers.
#[derive(Debug, Clone)]
pub struct RelativePositionBias {
    table: Tensor,
    num_buckets: usize,
    max_distance: usize,
}

impl RelativePositionBias {
    /// Builds the table under `vb` (N(0, 1) init, as `nn.Embedding`).
    pub fn new(
        num_buckets: usize,
        max_distance: usize,
        num_heads: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let table = vb.pp("relative_attention_bias").get_with_hints(
            (num_buckets, num_heads),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        Ok(Self {
            table,
            num_buckets,
            max_distance,
        })
    }

    /// The bias `[H, qlen, klen]` for queries at `step .. step + qlen` and keys at `0 .. klen`.
    pub fn forward(&self, qlen: usize, klen: usize, step: usize) -> Result<Tensor> {
        let idx = bucket_indices(
            qlen,
            klen,
            step,
            self.num_buckets,
            self.max_distance,
            self.table.device(),
        )?;
        let h = self.table.dim(1)?;
        let vals = self.table.index_select(&idx, 0)?; // [q*k, H]
        Ok(vals
            .reshape((qlen, klen, h))?
            .permute((2, 0, 1))?
            .contiguous()?)
    }
}

fn bucket_indices(
    qlen: usize,
    klen: usize,
    step: usize,
    nb: usize,
    md: usize,
    dev: &Device,
) -> Result<Tensor> {
    let mut idx = Vec::with_capacity(qlen * klen);
    for i in 0..qlen {
        for j in 0..klen {
            idx.push(relative_position_bucket((step + i) as i64 - j as i64, nb, md) as u32);
        }
    }
    Ok(Tensor::from_vec(idx, qlen * klen, dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_16_8() {
        // 16 buckets, max distance 8: half = 8, exact = 4.
        assert_eq!(relative_position_bucket(0, 16, 8), 0);
        assert_eq!(relative_position_bucket(3, 16, 8), 3);
        assert_eq!(relative_position_bucket(-1, 16, 8), 9);
        // n = 4: 4 + trunc(ln(1)/ln(2)*4) = 4; n = 6: 4 + trunc(ln 1.5/ln 2 * 4) = 6; n = 8 -> 8 -> clamp 7.
        assert_eq!(relative_position_bucket(4, 16, 8), 4);
        assert_eq!(relative_position_bucket(6, 16, 8), 6);
        assert_eq!(relative_position_bucket(8, 16, 8), 7);
        assert_eq!(relative_position_bucket(-8, 16, 8), 15);
    }
}
