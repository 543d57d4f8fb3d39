//! Token and learned position embeddings (torchscale's `TextEmbedding`, `PositionalEmbedding`).

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::{Error, Result};

/// `TextEmbedding`: a `[V, C]` table (key `weight`), N(0, C^-0.5) init, padding row zero and kept
/// at zero gradient.
#[derive(Debug, Clone)]
pub struct TokenEmbedding {
    weight: Tensor,
    padding_idx: Option<u32>,
}

impl TokenEmbedding {
    /// Builds a `[vocab, dim]` table.
    pub fn new(vocab: usize, dim: usize, padding_idx: Option<u32>, vb: VarBuilder) -> Result<Self> {
        let std = (dim as f64).powf(-0.5);
        let weight = vb.get_with_hints(
            (vocab, dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        if let Some(p) = padding_idx {
            if (p as usize) < vocab && weight.dtype() == DType::F32 {
                // Zero the padding row in place, as nn.Embedding(padding_idx=...) does.
                let mut rows: Vec<f32> = weight.flatten_all()?.to_vec1()?;
                let (s, e) = (p as usize * dim, (p as usize + 1) * dim);
                let row = &rows[s..e];
                if row.iter().any(|v| *v != 0.0) {
                    rows[s..e].iter_mut().for_each(|v| *v = 0.0);
                    let fresh = Tensor::from_vec(rows, (vocab, dim), weight.device())?;
                    // The tensor handed out by the VarBuilder aliases the Var's storage.
                    weight.slice_set(&fresh, 0, 0)?;
                }
            }
        }
        Ok(Self {
            weight,
            padding_idx,
        })
    }

    /// The table.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `[B, T]` ids (any integer dtype) to `[B, T, C]`; bad ids are an error for `tokens`
    /// (see [`check_token_ids`]).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_named(ids, "tokens")
    }

    /// As [`TokenEmbedding::forward`], with errors naming the input `what`
    /// (`prev_output_tokens`, `src_tokens`, ...).
    pub fn forward_named(&self, ids: &Tensor, what: &str) -> Result<Tensor> {
        check_token_ids(ids, what, self.vocab_size())?;
        if !ids.device().same_device(self.weight.device()) {
            return Err(Error::invalid(
                what,
                format!(
                    "is on {:?} but the embedding table is on {:?}",
                    ids.device().location(),
                    self.weight.device().location()
                ),
            ));
        }
        // In range and non-negative, so the cast cannot wrap.
        let ids = ids.to_dtype(DType::U32)?;
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let mut e = self.weight.index_select(&flat, 0)?;
        if let Some(p) = self.padding_idx {
            // Multiplying by the non-pad mask keeps the padding row's gradient at zero.
            let keep = flat.ne(p)?.to_dtype(e.dtype())?.unsqueeze(1)?;
            e = e.broadcast_mul(&keep)?;
        }
        Ok(e.reshape((b, t, self.weight.dim(1)?))?)
    }
}

/// Checks that `ids` hold integers ([`Error::Invalid`] naming `what` otherwise): the part of
/// [`check_token_ids`] that needs no read of the values.
pub fn check_token_dtype(ids: &Tensor, what: &str) -> Result<()> {
    if !ids.dtype().is_int() {
        return Err(Error::invalid(
            what,
            format!(
                "token ids must be integers (u8, u32, i16, i32 or i64), got {}",
                crate::error::describe(what, ids)
            ),
        ));
    }
    Ok(())
}

/// Checks `ids` as token ids of a `vocab`-word vocabulary, naming the input `what` on failure:
/// an integer dtype ([`Error::Invalid`]; a float id would be truncated silently), rank 2
/// `[B, T]` ([`Error::Shape`]), and every id in `0..vocab` ([`Error::Invalid`] naming the first
/// bad id and where it is). One device-to-host read of the extremes; the ids themselves are only
/// read back when one is out of range.
pub fn check_token_ids(ids: &Tensor, what: &str, vocab: usize) -> Result<()> {
    check_token_dtype(ids, what)?;
    let dt = ids.dtype();
    if ids.rank() != 2 {
        return Err(Error::shape(what, "[B, T]", ids.dims()));
    }
    if ids.elem_count() == 0 {
        return Ok(());
    }
    let flat = ids.flatten_all()?;
    let (lo, hi) = match dt {
        DType::U8 | DType::U32 => (
            0,
            flat.to_dtype(DType::U32)?.max(0)?.to_scalar::<u32>()? as i64,
        ),
        _ => {
            let f = flat.to_dtype(DType::I64)?;
            let ends = Tensor::stack(&[f.min(0)?, f.max(0)?], 0)?.to_vec1::<i64>()?;
            (ends[0], ends[1])
        }
    };
    let vocab_i = i64::try_from(vocab).unwrap_or(i64::MAX);
    if lo >= 0 && hi < vocab_i {
        return Ok(());
    }
    let all = flat.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    let cols = ids.dims()[1];
    let (i, id) = all
        .iter()
        .enumerate()
        .find(|(_, &v)| v < 0 || v >= vocab_i)
        .map(|(i, &v)| (i, v))
        .unwrap_or((0, hi));
    Err(Error::invalid(
        what,
        format!(
            "token id {id} at [{}, {}] is out of range for vocabulary {vocab} ({})",
            i / cols,
            i % cols,
            crate::error::describe(what, ids)
        ),
    ))
}

/// `PositionalEmbedding`: learned absolute positions; position `t` reads row `t + 2`.
#[derive(Debug, Clone)]
pub struct PositionEmbedding {
    weight: Tensor,
}

/// fairseq's offset: rows 0 and 1 are never used.
pub const POSITION_OFFSET: usize = 2;

impl PositionEmbedding {
    /// A table for `max_positions` positions (`max_positions + 2` rows), N(0, 1) init.
    pub fn new(max_positions: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        let rows = max_positions.checked_add(POSITION_OFFSET).ok_or_else(|| {
            Error::config(
                "max_positions",
                format!("{max_positions} positions overflow the table's row count"),
            )
        })?;
        let weight = vb.get_with_hints(
            (rows, dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        Ok(Self { weight })
    }

    /// The largest number of positions the table covers.
    pub fn max_positions(&self) -> usize {
        self.weight.dims()[0].saturating_sub(POSITION_OFFSET)
    }

    /// Rows for positions `start .. start + len`, as `[1, len, C]`.
    pub fn forward(&self, start: usize, len: usize) -> Result<Tensor> {
        if start + len > self.max_positions() {
            return Err(Error::invalid(
                "tokens",
                format!(
                    "sequence of {} positions exceeds the position table's {}",
                    start + len,
                    self.max_positions()
                ),
            ));
        }
        Ok(self
            .weight
            .narrow(0, start + POSITION_OFFSET, len)?
            .unsqueeze(0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::ParamStore;
    use candle_core::Device;

    #[test]
    fn a_table_too_large_to_count_is_an_error() {
        let store = ParamStore::new(0);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let e = PositionEmbedding::new(usize::MAX, 4, vb.pp("p")).unwrap_err();
        assert!(
            matches!(&e, Error::Config { field, .. } if field == "max_positions"),
            "{e}"
        );
        // Rows that count, elements that do not: the store refuses them.
        assert!(PositionEmbedding::new(usize::MAX / 2, 4, vb.pp("q")).is_err());
        assert!(TokenEmbedding::new(usize::MAX / 2, 4, Some(1), vb.pp("t")).is_err());
        assert!(store.named_vars().is_empty());
    }
}
