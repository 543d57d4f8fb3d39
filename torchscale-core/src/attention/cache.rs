//! The incremental decoding cache of one self-attention layer.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Keys and values seen so far, `[B, H, S, d]`; keys are stored before the xPos rotation.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Cached keys.
    pub prev_key: Option<Tensor>,
    /// Cached values.
    pub prev_value: Option<Tensor>,
}

impl KvCache {
    /// Number of cached time steps (0 for a key tensor that is not `[B, H, S, d]`, which
    /// [`KvCache::check`] reports).
    pub fn len(&self) -> usize {
        self.prev_key
            .as_ref()
            .and_then(|k| k.dims().get(2).copied())
            .unwrap_or(0)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache's batch size, if it holds anything.
    pub fn batch(&self) -> Option<usize> {
        self.prev_key
            .as_ref()
            .and_then(|k| k.dims().first().copied())
    }

    /// Checks the cache against the attention module that will extend it: keys and values both
    /// present or both absent, each `[batch, heads, S, head_dim]` with the same `S`, in `dtype`.
    /// `what` names the cache in errors (`incremental_state.layers[1]`). Returns `S`.
    pub fn check(
        &self,
        what: &str,
        batch: usize,
        heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Result<usize> {
        let (k, v) = match (&self.prev_key, &self.prev_value) {
            (None, None) => return Ok(0),
            (Some(k), Some(v)) => (k, v),
            (k, _) => {
                let (has, lacks) = if k.is_some() {
                    ("prev_key", "prev_value")
                } else {
                    ("prev_value", "prev_key")
                };
                return Err(Error::invalid(
                    what,
                    format!("holds a {has} but no {lacks}"),
                ));
            }
        };
        let want = format!("[{batch}, {heads}, S, {head_dim}]");
        let s = match k.dims() {
            [b, h, s, d] if (*b, *h, *d) == (batch, heads, head_dim) => *s,
            got => return Err(Error::shape(format!("{what}.prev_key"), want, got)),
        };
        if v.dims() != [batch, heads, s, head_dim] {
            return Err(Error::shape(
                format!("{what}.prev_value"),
                format!("[{batch}, {heads}, {s}, {head_dim}] (as prev_key)"),
                v.dims(),
            ));
        }
        for (name, t) in [("prev_key", k), ("prev_value", v)] {
            if t.dtype() != dtype {
                return Err(Error::DType {
                    what: format!("{what}.{name}"),
                    expected: dtype,
                    got: t.dtype(),
                });
            }
        }
        Ok(s)
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

    /// Reorders the batch (beam search): row `i` becomes old row `order[i]`. `order` is checked
    /// first (see [`check_order`]); a bad one leaves the cache as it was.
    pub fn reorder(&mut self, order: &Tensor) -> Result<()> {
        if let Some(b) = self.batch() {
            check_order(order, "order", b)?;
        }
        let k = match &self.prev_key {
            Some(k) => Some(k.index_select(order, 0)?),
            None => None,
        };
        let v = match &self.prev_value {
            Some(v) => Some(v.index_select(order, 0)?),
            None => None,
        };
        self.prev_key = k;
        self.prev_value = v;
        Ok(())
    }
}

/// Checks a beam-search `order` against a batch of `batch` rows, naming it `what`: u8, u32 or
/// i64 (the index dtypes candle gathers with), 1-D, every index in `0..batch`. Its length may
/// differ from `batch` (a batch widened to beams).
pub fn check_order(order: &Tensor, what: &str, batch: usize) -> Result<()> {
    if !matches!(order.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Err(Error::invalid(
            what,
            format!(
                "indices must be u8, u32 or i64, got {}",
                crate::error::describe(what, order)
            ),
        ));
    }
    if order.rank() != 1 {
        return Err(Error::shape(
            what,
            "[N] (one index per new row)",
            order.dims(),
        ));
    }
    let idx = order.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if let Some((i, &bad)) = idx
        .iter()
        .enumerate()
        .find(|(_, &x)| x < 0 || x as u64 >= batch as u64)
    {
        return Err(Error::invalid(
            what,
            format!("index {bad} at [{i}] is out of range for a batch of {batch}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cache(b: usize, s: usize) -> KvCache {
        let k = Tensor::zeros((b, 2, s, 4), DType::F32, &Device::Cpu).unwrap();
        KvCache {
            prev_key: Some(k.clone()),
            prev_value: Some(k),
        }
    }

    #[test]
    fn check_names_the_part_at_fault() {
        let c = cache(3, 5);
        assert_eq!(c.check("c", 3, 2, 4, DType::F32).unwrap(), 5);
        let e = c.check("c", 2, 2, 4, DType::F32).unwrap_err();
        assert!(
            matches!(&e, Error::Shape { what, .. } if what == "c.prev_key"),
            "{e}"
        );
        let e = c.check("c", 3, 2, 4, DType::F16).unwrap_err();
        assert!(
            matches!(&e, Error::DType { what, .. } if what == "c.prev_key"),
            "{e}"
        );
        let half = KvCache {
            prev_key: c.prev_key.clone(),
            prev_value: None,
        };
        assert!(half.check("c", 3, 2, 4, DType::F32).is_err());
        let flat = KvCache {
            prev_key: Some(Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()),
            prev_value: None,
        };
        assert_eq!(flat.len(), 0);
    }

    #[test]
    fn reorder_checks_the_order_and_keeps_the_cache_on_error() {
        let mut c = cache(3, 5);
        for bad in [
            Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap(),
            Tensor::new(&[[0u32, 1]], &Device::Cpu).unwrap(),
            Tensor::new(&[0u32, 3], &Device::Cpu).unwrap(),
            Tensor::new(&[0i64, -1], &Device::Cpu).unwrap(),
        ] {
            let e = c.reorder(&bad).unwrap_err();
            assert!(e.to_string().contains("order"), "{e}");
            assert_eq!(c.batch(), Some(3));
        }
        c.reorder(&Tensor::new(&[2u32, 2, 0, 1], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(c.batch(), Some(4));
    }
}
