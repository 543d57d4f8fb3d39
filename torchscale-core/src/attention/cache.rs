//! The incremental decoding cache of one self-attention layer.

use candle_core::Tensor;

use crate::Result;

/// Keys and values seen so far, `[B, H, S, d]`; keys are stored before the xPos rotation.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Cached keys.
    pub prev_key: Option<Tensor>,
    /// Cached values.
    pub prev_value: Option<Tensor>,
}

impl KvCache {
    /// Number of cached time steps.
    pub fn len(&self) -> usize {
        self.prev_key.as_ref().map(|k| k.dims()[2]).unwrap_or(0)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends new keys/values along time and returns the full ones.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = match &self.prev_key {
            Some(p) => Tensor::cat(&[p, k], 2)?,
            None => k.clone(),
        };
        let v = match &self.prev_value {
            Some(p) => Tensor::cat(&[p, v], 2)?,
            None => v.clone(),
        };
        self.prev_key = Some(k.clone());
        self.prev_value = Some(v.clone());
        Ok((k, v))
    }

    /// Reorders the batch (beam search): row `i` becomes old row `order[i]`.
    pub fn reorder(&mut self, order: &Tensor) -> Result<()> {
        if let Some(k) = &self.prev_key {
            self.prev_key = Some(k.index_select(order, 0)?);
        }
        if let Some(v) = &self.prev_value {
            self.prev_value = Some(v.index_select(order, 0)?);
        }
        Ok(())
    }
}
