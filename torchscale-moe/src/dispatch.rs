//! Dispatch and combine by index: tokens are gathered into expert buffers with `index_select`
//! and expert outputs are added back with `index_add` (both have working backwards in candle),
//! instead of torchscale's dense `[S, E, capacity]` one-hot einsums. The dense form is kept
//! ([`dense_combine`]) for comparison and benchmarks.

use candle_core::{DType, Tensor};
use torchscale_core::{Error, Result, Routing};

/// Where every kept choice of a [`Routing`] goes, ordered by expert and slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    /// Number of tokens S.
    pub num_tokens: usize,
    /// Number of experts E.
    pub num_experts: usize,
    /// Slots per expert.
    pub capacity: usize,
    /// Kept choices per expert.
    pub counts: Vec<usize>,
    /// Token of each kept choice.
    pub tokens: Vec<u32>,
    /// Slot of each kept choice in its expert's buffer.
    pub slots: Vec<u32>,
    /// Expert of each kept choice.
    pub experts: Vec<u32>,
    /// Index `s * k + j` of each kept choice into the routing's `[S, k]` gate.
    pub choices: Vec<u32>,
}

impl DispatchPlan {
    /// The plan of `r`. Errors when `r` is inconsistent (`k = 0`, per-choice vectors of
    /// different lengths, a gate that is not `[S, k]`), a kept choice names an expert or slot out
    /// of range, or two kept choices share a slot (a `Router` bug).
    pub fn new(r: &Routing) -> Result<Self> {
        check_routing(r)?;
        let s = r.num_tokens();
        let mut kept: Vec<(u32, u32, u32, u32)> = r
            .kept_choices()
            .into_iter()
            .map(|(t, j, e, slot)| (e as u32, slot as u32, t as u32, (t * r.k + j) as u32))
            .collect();
        kept.sort_unstable();
        let mut counts = vec![0usize; r.num_experts];
        for w in kept.windows(2) {
            if w[0].0 == w[1].0 && w[0].1 == w[1].1 {
                return Err(Error::invalid(
                    "routing",
                    format!("expert {} slot {} is taken twice", w[0].0, w[0].1),
                ));
            }
        }
        for &(e, slot, _, _) in &kept {
            if e as usize >= r.num_experts || slot as usize >= r.capacity {
                return Err(Error::invalid(
                    "routing",
                    format!(
                        "expert {e} slot {slot} outside {} experts x {} slots",
                        r.num_experts, r.capacity
                    ),
                ));
            }
            counts[e as usize] += 1;
        }
        Ok(Self {
            num_tokens: s,
            num_experts: r.num_experts,
            capacity: r.capacity,
            counts,
            experts: kept.iter().map(|k| k.0).collect(),
            slots: kept.iter().map(|k| k.1).collect(),
            tokens: kept.iter().map(|k| k.2).collect(),
            choices: kept.iter().map(|k| k.3).collect(),
        })
    }

    /// Number of kept choices K.
    pub fn num_kept(&self) -> usize {
        self.tokens.len()
    }

    /// Start of each expert's rows in [`Self::gather_compact`]'s output.
    pub fn offsets(&self) -> Vec<usize> {
        self.counts
            .iter()
            .scan(0, |acc, &c| {
                let o = *acc;
                *acc += c;
                Some(o)
            })
            .collect()
    }

    /// `[K, C]`: the token of every kept choice, expert by expert (no empty slots).
    pub fn gather_compact(&self, x: &Tensor) -> Result<Tensor> {
        let idx = Tensor::from_slice(&self.tokens, self.num_kept(), x.device())?;
        Ok(x.index_select(&idx, 0)?)
    }

    /// `[E * capacity, C]`: torchscale's dispatched buffer, row `e * capacity + c` holding the
    /// token in slot `c` of expert `e`, zero where the slot is empty.
    pub fn gather_buffer(&self, x: &Tensor) -> Result<Tensor> {
        let (s, c) = x.dims2()?;
        // An extra zero row stands for every empty slot.
        let zero = Tensor::zeros((1, c), x.dtype(), x.device())?;
        let ext = Tensor::cat(&[x, &zero], 0)?;
        let mut src = vec![s as u32; self.num_experts * self.capacity];
        for (i, &t) in self.tokens.iter().enumerate() {
            src[self.experts[i] as usize * self.capacity + self.slots[i] as usize] = t;
        }
        let idx = Tensor::from_vec(src, self.num_experts * self.capacity, x.device())?;
        Ok(ext.index_select(&idx, 0)?)
    }

    /// Row `e * capacity + slot` of every kept choice, in plan order.
    pub fn buffer_rows(&self) -> Vec<u32> {
        self.experts
            .iter()
            .zip(&self.slots)
            .map(|(&e, &c)| e * self.capacity as u32 + c)
            .collect()
    }

    /// `[S, C]`: `out[s] = Σ_kept gate[s, j] · rows[i]`, where `rows: [K, C]` holds the expert
    /// output of each kept choice in plan order and `gate` is the routing's `[S, k]` weights.
    /// Tokens with no kept choice get 0.
    pub fn combine(&self, rows: &Tensor, gate: &Tensor) -> Result<Tensor> {
        let c = rows.dim(1)?;
        let out = Tensor::zeros((self.num_tokens, c), rows.dtype(), rows.device())?;
        if self.num_kept() == 0 {
            return Ok(out);
        }
        let dev = rows.device();
        let choices = Tensor::from_slice(&self.choices, self.num_kept(), dev)?;
        let w = gate
            .flatten_all()?
            .index_select(&choices, 0)?
            .to_dtype(rows.dtype())?;
        let contrib = rows.broadcast_mul(&w.unsqueeze(1)?)?;
        let tokens = Tensor::from_slice(&self.tokens, self.num_kept(), dev)?;
        Ok(out.index_add(&tokens, &contrib, 0)?)
    }
}

/// Checks what indexing by `r` relies on: `k > 0` (choices are `token * k + j`), one expert,
/// slot and status per choice and `S * k` of them, a `[S, k]` gate, and kept choices whose expert
/// and slot lie within `E` experts x `capacity` slots. A hand-built or buggy routing is then a
/// typed error, never a division by zero or an index out of bounds.
fn check_routing(r: &Routing) -> Result<()> {
    let n = r.status.len();
    if r.k == 0 {
        return Err(Error::invalid(
            "routing",
            "k = 0: every token needs at least one choice slot",
        ));
    }
    if r.expert.len() != n || r.slot.len() != n || !n.is_multiple_of(r.k) {
        return Err(Error::invalid(
            "routing",
            format!(
                "{} experts, {} slots and {n} statuses for k = {}: they must be equal, a multiple \
                 of k",
                r.expert.len(),
                r.slot.len(),
                r.k
            ),
        ));
    }
    let s = n / r.k;
    if r.gate.dims() != [s, r.k] {
        return Err(Error::shape(
            "routing gate",
            format!("[{s}, {}]", r.k),
            r.gate.dims(),
        ));
    }
    for (i, st) in r.status.iter().enumerate() {
        let (e, slot) = (r.expert[i] as usize, r.slot[i] as usize);
        if st.is_kept() && (e >= r.num_experts || slot >= r.capacity) {
            return Err(Error::invalid(
                "routing",
                format!(
                    "choice {i} keeps expert {e} slot {slot}, outside {} experts x {} slots",
                    r.num_experts, r.capacity
                ),
            ));
        }
    }
    Ok(())
}

/// torchscale's dense combine weights `[S, E * capacity]` (in the graph of the gate):
/// `gate[s, j]` at column `e_j * capacity + slot_j` of every kept choice, 0 elsewhere.
/// Errors as [`DispatchPlan::new`] on an inconsistent routing.
pub fn dense_combine(r: &Routing) -> Result<Tensor> {
    check_routing(r)?;
    let s = r.num_tokens();
    let width = r.num_experts * r.capacity;
    let dev = r.gate.device();
    let mut out: Option<Tensor> = None;
    for j in 0..r.k {
        let mut onehot = vec![0u8; s * width];
        for t in 0..s {
            let i = t * r.k + j;
            if r.status[i].is_kept() {
                onehot[t * width + r.expert[i] as usize * r.capacity + r.slot[i] as usize] = 1;
            }
        }
        let onehot = Tensor::from_vec(onehot, (s, width), dev)?.to_dtype(r.gate.dtype())?;
        let term = r.gate.narrow(1, j, 1)?.broadcast_mul(&onehot)?;
        out = Some(match out {
            None => term,
            Some(o) => (o + term)?,
        });
    }
    out.ok_or_else(|| Error::invalid("routing", "k = 0"))
}

/// torchscale's dispatch mask `[S, E * capacity]` (1 where a kept choice sits), as `dtype`.
/// Errors as [`DispatchPlan::new`] on an inconsistent routing.
pub fn dense_dispatch_mask(r: &Routing, dtype: DType) -> Result<Tensor> {
    check_routing(r)?;
    let s = r.num_tokens();
    let width = r.num_experts * r.capacity;
    let mut m = vec![0u8; s * width];
    for (t, _j, e, slot) in r.kept_choices() {
        m[t * width + e * r.capacity + slot] = 1;
    }
    Ok(Tensor::from_vec(m, (s, width), r.gate.device())?.to_dtype(dtype)?)
}
