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

    /// `[B, T]` ids (any integer dtype) to `[B, T, C]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let vocab = self.vocab_size();
        let ids = ids.to_dtype(DType::U32)?;
        let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if ids.elem_count() > 0 && max >= vocab {
            return Err(Error::invalid(
                "tokens",
                format!("token id {max} is out of range for vocabulary {vocab}"),
            ));
        }
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
        let weight = vb.get_with_hints(
            (max_positions + POSITION_OFFSET, dim),
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
