//! Data parallel gradients: per-step statistics agreed by all ranks, and the gradient sums
//! all-reduced in flat f32 buckets (one collective call per bucket, as PyTorch's DDP does).

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};
use torchscale_clip::{GlobalNorm, SparseClip};
use torchscale_core::{ClipReport, Collective, Error, GradClipper, Result};

use super::ClipMode;

/// PyTorch DDP's default bucket: 25 MiB of f32 gradients.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Gradient bucketing of `numels` (parameters in order, `None` for one without a gradient):
/// consecutive parameters fill a bucket until it holds at least `bucket_bytes` of f32, so a
/// parameter larger than a bucket travels alone. Returns the parameter indices of each bucket.
pub fn bucket_plan(numels: &[Option<usize>], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let (mut cur, mut bytes) = (Vec::new(), 0usize);
    for (i, n) in numels.iter().enumerate() {
        let Some(n) = n else { continue };
        cur.push(i);
        bytes += 4 * n;
        if bytes >= bucket_bytes.max(1) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// What every rank knows about a step after [`DataParallel::agree`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GlobalStats {
    /// Summed NLL over all ranks.
    pub nll: f64,
    /// Tokens over all ranks.
    pub ntokens: usize,
    /// The first rank whose loss was not finite.
    pub bad_loss_rank: Option<usize>,
    /// Per parameter: whether any rank has a gradient for it.
    pub present: Vec<bool>,
}

/// A data-parallel group as the trainer uses it: the communicator, the bucket size and the
/// parameters that are not all-reduced (expert-parallel experts live on one rank each).
#[derive(Debug, Clone)]
pub(crate) struct DataParallel {
    pub comm: Arc<dyn Collective>,
    pub bucket_bytes: usize,
    pub local: HashSet<TensorId>,
}

/// `x` as two f32 whose sum is `x` to about 48 bits, so that a host-side f64 sum of the
/// gathered halves keeps the single-process precision of the NLL.
fn split_f64(x: f64) -> [f32; 2] {
    let hi = x as f32;
    [hi, (x - hi as f64) as f32]
}

impl DataParallel {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn gather_rows(&self, row: Vec<f32>) -> Result<Vec<Vec<f32>>> {
        let n = row.len();
        let t = Tensor::from_vec(row, n, &candle_core::Device::Cpu)?;
        let all = self.comm.all_gather(&t)?.to_vec1::<f32>()?;
        if all.len() != n * self.world() {
            return Err(Error::Collective {
                op: "all_gather".into(),
                rank: self.rank(),
                reason: format!(
                    "{} values back for {} ranks of {n}",
                    all.len(),
                    self.world()
                ),
            });
        }
        Ok(all.chunks(n).map(<[f32]>::to_vec).collect())
    }

    /// One all-gather of each rank's (NLL, token count, loss verdict, gradient presence).
    pub fn agree(
        &self,
        nll: f64,
        ntokens: usize,
        bad_loss: bool,
        present: &[bool],
    ) -> Result<GlobalStats> {
        // Token counts travel as two exact 24-bit halves (f32 holds integers up to 2^24).
        let mut row = Vec::with_capacity(5 + present.len());
        row.extend(split_f64(nll));
        row.push((ntokens >> 24) as f32);
        row.push((ntokens & 0xFF_FFFF) as f32);
        row.push(f32::from(u8::from(bad_loss)));
        row.extend(present.iter().map(|&p| f32::from(u8::from(p))));
        let rows = self.gather_rows(row)?;
        let mut out = GlobalStats {
            nll: 0.0,
            ntokens: 0,
            bad_loss_rank: None,
            present: vec![false; present.len()],
        };
        for (r, row) in rows.iter().enumerate() {
            out.nll += row[0] as f64 + row[1] as f64;
            out.ntokens += ((row[2] as usize) << 24) + row[3] as usize;
            if row[4] != 0.0 && out.bad_loss_rank.is_none() {
                out.bad_loss_rank = Some(r);
            }
            for (p, &f) in out.present.iter_mut().zip(&row[5..]) {
                *p |= f != 0.0;
            }
        }
        Ok(out)
    }

    /// The first rank (if any) that wants to skip the step, the same answer on every rank.
    pub fn agree_skip(&self, skip: bool) -> Result<Option<usize>> {
        let rows = self.gather_rows(vec![f32::from(u8::from(skip))])?;
        Ok(rows.iter().position(|r| r[0] != 0.0))
    }

    /// Replaces the gradient sums of the all-reduced parameters (those `present` on some rank
    /// and not local) by their sum over ranks times `scale`, in f32 buckets; a parameter with no
    /// gradient on this rank contributes zeros. Returns the number of buckets (= calls).
    pub fn all_reduce_grads(
        &self,
        grads: &mut GradStore,
        params: &[(String, Var)],
        present: &[bool],
        scale: f64,
    ) -> Result<usize> {
        let numels: Vec<Option<usize>> = params
            .iter()
            .zip(present)
            .map(|((_, v), &p)| (p && !self.local.contains(&v.id())).then(|| v.elem_count()))
            .collect();
        let plan = bucket_plan(&numels, self.bucket_bytes);
        for bucket in &plan {
            let _span = tracing::trace_span!("all_reduce_bucket", params = bucket.len()).entered();
            let mut flat = Vec::with_capacity(bucket.len());
            for &i in bucket {
                let v = &params[i].1;
                flat.push(match grads.get(v) {
                    Some(g) => g.flatten_all()?.to_dtype(DType::F32)?,
                    None => Tensor::zeros(v.elem_count(), DType::F32, v.device())?,
                });
            }
            let sum = self.comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
            // The single-process trainer multiplies each gradient sum by the same f32 factor.
            let sum = if scale != 1.0 {
                sum.affine(scale, 0.0)?
            } else {
                sum
            };
            let mut off = 0;
            for &i in bucket {
                let v = &params[i].1;
                let n = v.elem_count();
                let g = sum
                    .narrow(0, off, n)?
                    .reshape(v.shape())?
                    .to_dtype(v.dtype())?;
                grads.insert(v, g);
                off += n;
            }
        }
        Ok(plan.len())
    }
}

/// Clipping when some parameters are not all-reduced: the all-reduced part of the norm is the
/// same on every rank, the local part's square is summed over ranks, and the coefficient
/// `min(1, max_norm / (total + 1e-6))` (in f32, as the clippers compute it) scales every
/// gradient (SparseClip's local experts count `1 / max(W, E)` in the norm, as its own do).
pub(crate) fn clip_with_local(
    dp: &DataParallel,
    mode: ClipMode,
    grads: &mut GradStore,
    dense: &[Var],
    expert: &[Var],
) -> Result<ClipReport> {
    let world = dp.world();
    let is_local = |v: &&Var| dp.local.contains(&v.id());
    let split =
        |vs: &[Var]| -> (Vec<Var>, Vec<Var>) { vs.iter().cloned().partition(|v| !is_local(&v)) };
    let (rep_dense, loc_dense) = split(dense);
    let (rep_expert, loc_expert) = split(expert);
    // Clippers with clipping off only measure.
    let (max_norm, measure): (f64, Box<dyn GradClipper>) = match mode {
        ClipMode::GlobalNorm(m) => (m, Box::new(GlobalNorm::new(0.0))),
        ClipMode::SparseClip {
            max_norm,
            num_experts,
        } => (max_norm, Box::new(SparseClip::new(0.0, num_experts, world))),
    };
    let replicated = measure.clip(grads, &rep_dense, &rep_expert)?.total_norm as f32;
    let local = measure.clip(grads, &loc_dense, &loc_expert)?.total_norm as f32;
    let local_sq = Tensor::new(&[local * local], &candle_core::Device::Cpu)?;
    let local_sq = dp.comm.all_reduce_sum(&local_sq)?.to_vec1::<f32>()?[0];
    let total = (replicated * replicated + local_sq).sqrt();
    let coef =
        (max_norm > 0.0 && total.is_finite()).then(|| (max_norm as f32 / (total + 1e-6)).min(1.0));
    if let Some(c) = coef.filter(|c| *c < 1.0) {
        for v in dense.iter().chain(expert) {
            if let Some(g) = grads.get(v) {
                let g = g.affine(c as f64, 0.0)?;
                grads.insert(v, g);
            }
        }
    }
    let coef = coef.map_or(1.0, f64::from);
    Ok(ClipReport {
        total_norm: total as f64,
        coef,
        clipped: coef < 1.0,
    })
}
