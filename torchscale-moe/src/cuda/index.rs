//! Where each routing choice goes in an expert buffer, as the `u32` index tensors the kernels
//! read.

use candle_core::{Device, Tensor};
use torchscale_core::{Error, Result, Routing};

/// Marks a choice that is not kept (in `rows`) or a buffer row with no token (in `inv`).
pub const NONE: u32 = u32::MAX;

/// The index tensors of a dispatch/combine pair, on the data's device.
///
/// Choice `i = s * k + j` (token `s`, choice `j`) fills buffer row `rows[i]` (or [`NONE`]);
/// `inv[r]` is the choice filling row `r` (or [`NONE`]).
#[derive(Debug, Clone)]
pub struct DispatchIndex {
    /// `[S * k]` buffer row of each choice.
    pub rows: Tensor,
    /// `[R]` choice of each buffer row.
    pub inv: Tensor,
    /// Tokens S.
    pub num_tokens: usize,
    /// Choices per token k.
    pub k: usize,
    /// Buffer rows R.
    pub num_rows: usize,
}

/// The two buffer layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// torchscale's `[E * capacity, C]`: row `e * capacity + slot`, empty slots zero.
    Capacity,
    /// `[K, C]` with K the kept choices: expert `e`'s tokens in rows `offset_e ..
    /// offset_e + n_e` by slot (kept slots of an expert are always `0 .. n_e`).
    Compact,
}

impl DispatchIndex {
    /// The index of `r` in `layout`, built on the host and copied to `device`.
    pub fn from_routing(r: &Routing, layout: Layout, device: &Device) -> Result<Self> {
        let (rows, num_rows) = host_rows(r, layout)?;
        Self::from_host_rows(rows, r.k, num_rows, device)
    }

    /// The index from host `rows` (`[S * k]`, [`NONE`] for dropped choices).
    pub fn from_host_rows(rows: Vec<u32>, k: usize, num_rows: usize, dev: &Device) -> Result<Self> {
        if k == 0 || rows.len() % k != 0 {
            return Err(Error::shape("rows", format!("[S * {k}]"), &[rows.len()]));
        }
        let inv = inverse(&rows, num_rows)?;
        Ok(Self {
            num_tokens: rows.len() / k,
            k,
            num_rows,
            rows: Tensor::from_vec(rows.clone(), rows.len(), dev)?,
            inv: Tensor::from_vec(inv, num_rows, dev)?,
        })
    }
}

/// `rows` of every choice of `r` in `layout`, and the number of buffer rows.
pub fn host_rows(r: &Routing, layout: Layout) -> Result<(Vec<u32>, usize)> {
    let mut counts = vec![0usize; r.num_experts];
    for (_, _, e, _) in r.kept_choices() {
        counts[e] += 1;
    }
    let offsets: Vec<usize> = counts
        .iter()
        .scan(0, |acc, &c| {
            let o = *acc;
            *acc += c;
            Some(o)
        })
        .collect();
    let mut rows = vec![NONE; r.expert.len()];
    for (i, row) in rows.iter_mut().enumerate() {
        if !r.status[i].is_kept() {
            continue;
        }
        let (e, slot) = (r.expert[i] as usize, r.slot[i] as usize);
        if e >= r.num_experts || slot >= r.capacity {
            return Err(Error::invalid(
                "routing",
                format!("choice {i}: expert {e} slot {slot} out of range"),
            ));
        }
        *row = match layout {
            Layout::Capacity => (e * r.capacity + slot) as u32,
            Layout::Compact => {
                if slot >= counts[e] {
                    return Err(Error::invalid(
                        "routing",
                        format!("expert {e}: kept slot {slot} with {} kept", counts[e]),
                    ));
                }
                (offsets[e] + slot) as u32
            }
        };
    }
    let n = match layout {
        Layout::Capacity => r.num_experts * r.capacity,
        Layout::Compact => counts.iter().sum(),
    };
    Ok((rows, n))
}

/// `inv[rows[i]] = i`; errors when a row is out of range or taken twice.
pub fn inverse(rows: &[u32], num_rows: usize) -> Result<Vec<u32>> {
    let mut inv = vec![NONE; num_rows];
    for (i, &r) in rows.iter().enumerate() {
        if r == NONE {
            continue;
        }
        let slot = inv
            .get_mut(r as usize)
            .ok_or_else(|| Error::invalid("rows", format!("choice {i}: row {r} >= {num_rows}")))?;
        if *slot != NONE {
            return Err(Error::invalid("rows", format!("row {r} is taken twice")));
        }
        *slot = i as u32;
    }
    Ok(inv)
}
