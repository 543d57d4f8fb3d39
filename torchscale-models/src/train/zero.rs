//! ZeRO stage 1 (fairscale's OSS): the AdamW moments sharded over the ranks of a data-parallel
//! group. The parameters, laid end to end as one flat f32 vector, are cut into `world_size`
//! contiguous slices; each rank keeps the moments of its own slice, updates that slice from the
//! (all-reduced) gradients and all-gathers the updated parameters after the step.
//!
//! As with [`super::AdamW`], a step is all or nothing: each rank checks the updates of its slice
//! before writing anything, the ranks exchange their verdicts, and all of them refuse the step if
//! any update anywhere would leave a non-finite value.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use torchscale_core::{Collective, Error, Result};
use torchscale_kernels::adamw::{adamw_check, adamw_composed, adamw_update, AdamWStep};
use torchscale_kernels::fused_enabled;

use super::optimizer::{
    check_lr, check_moment, count_tensor, read_count, EXP_AVG, EXP_AVG_SQ, NUM_UPDATES, STEP,
};
use super::{default_decay, AdamWConfig, SkipReason};

/// One parameter in the flat vector.
#[derive(Debug)]
struct Entry {
    name: String,
    var: Var,
    decay: bool,
    /// Updates of this parameter (the same on every rank: gradient presence is agreed).
    step: u64,
    /// First element in the flat vector.
    offset: usize,
}

/// AdamW with its moments sharded over `comm`'s ranks; every rank calls [`ZeroAdamW::step`],
/// [`ZeroAdamW::state`] and [`ZeroAdamW::load_state`] together (they are collectives).
///
/// The update of each element is [`super::AdamW`]'s, operation for operation, so a sharded run
/// equals a single-process one given the same gradients. [`ZeroAdamW::state`] gathers the whole
/// state in [`super::AdamW::state`]'s format: a checkpoint written on N ranks loads on M ranks, or
/// into a plain [`super::AdamW`].
#[derive(Debug)]
pub struct ZeroAdamW {
    cfg: AdamWConfig,
    comm: Arc<dyn Collective>,
    entries: Vec<Entry>,
    /// Elements of the flat vector.
    total: usize,
    /// Elements per shard (the last ones padded): `ceil(total / world)`.
    shard: usize,
    /// This rank's first moment, `shard` values (zeros past `total`).
    m: Vec<f32>,
    /// This rank's second moment.
    v: Vec<f32>,
    num_updates: u64,
}

impl ZeroAdamW {
    /// Shards the moments of `params` (grouped by [`default_decay`]) over `comm`'s ranks; every
    /// rank must pass the same parameters in the same order.
    pub fn new(
        params: Vec<(String, Var)>,
        cfg: AdamWConfig,
        comm: Arc<dyn Collective>,
    ) -> Result<Self> {
        // Validation (config, dtypes, duplicate names) as the plain optimizer does it.
        super::AdamW::new(params.clone(), cfg)?;
        let mut offset = 0;
        let entries: Vec<Entry> = params
            .into_iter()
            .map(|(name, var)| {
                let e = Entry {
                    decay: default_decay(&name, var.dims()),
                    offset,
                    name,
                    step: 0,
                    var,
                };
                offset += e.var.elem_count();
                e
            })
            .collect();
        let world = comm.world_size().max(1);
        let shard = offset.div_ceil(world);
        Ok(Self {
            cfg,
            comm,
            entries,
            total: offset,
            shard,
            m: vec![0.0; shard],
            v: vec![0.0; shard],
            num_updates: 0,
        })
    }

    /// The hyper-parameters (with the current learning rate).
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Sets the learning rate of the next steps; a NaN, infinite or negative rate is an
    /// [`Error::Config`] for `lr` and changes nothing.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.cfg.lr = lr;
        Ok(())
    }

    /// Number of updates applied so far (refused steps excluded).
    pub fn num_updates(&self) -> u64 {
        self.num_updates
    }

    /// This rank's slice of the flat parameter vector, `[start, end)`.
    pub fn own_range(&self) -> (usize, usize) {
        let start = (self.comm.rank() * self.shard).min(self.total);
        (start, (start + self.shard).min(self.total))
    }

    /// Moment values this rank holds (its shard, with padding).
    pub fn shard_len(&self) -> usize {
        self.shard
    }

    fn hp(&self, decay: bool, step: u64) -> AdamWStep {
        let c = &self.cfg;
        AdamWStep {
            lr: c.lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: if decay { c.weight_decay } else { 0.0 },
            step,
        }
    }

    /// Parts of entries inside this rank's range: (entry, start in the entry, length, start in
    /// the shard).
    fn segments(&self) -> Vec<(usize, usize, usize, usize)> {
        let (lo, hi) = self.own_range();
        let mut out = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let (a, b) = (e.offset.max(lo), (e.offset + e.var.elem_count()).min(hi));
            if a < b {
                out.push((i, a - e.offset, b - a, a - lo));
            }
        }
        out
    }

    /// One update of every parameter with a gradient in `grads` (gradients must be the same on
    /// every rank, as after an all-reduce): this rank's slice, then an all-gather.
    ///
    /// All or nothing on every rank together, as [`super::AdamW::step`]: `None` when applied,
    /// `Some(SkipReason::Update)` naming the first parameter (in flat order) whose update would
    /// leave a non-finite value, with nothing changed on any rank.
    pub fn step(&mut self, grads: &GradStore) -> Result<Option<SkipReason>> {
        let _span = tracing::debug_span!("zero_step", update = self.num_updates + 1).entered();
        self.cfg.validate()?;
        let mut steps = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let g = grads.get(&e.var);
            if let Some(g) = g {
                if g.dims() != e.var.dims() {
                    return Err(Error::shape(
                        format!("gradient of `{}`", e.name),
                        format!("{:?}", e.var.dims()),
                        g.dims(),
                    ));
                }
            }
            steps.push(e.step + u64::from(g.is_some()));
        }
        // Phase 1: this rank's updates are checked (fused: a read-only pass) or computed aside
        // (composed); nothing is written.
        let segments = self.segments();
        let fused = |p: &Tensor| fused_enabled() && p.device().is_cpu();
        let mut computed: Vec<Option<[Vec<f32>; 3]>> = Vec::with_capacity(segments.len());
        let mut bad: Option<usize> = None;
        for &(i, a, n, s) in &segments {
            let e = &self.entries[i];
            let Some(g) = grads.get(&e.var) else {
                computed.push(None);
                continue;
            };
            let p = e.var.as_tensor().detach().flatten_all()?.narrow(0, a, n)?;
            let g = g.flatten_all()?.narrow(0, a, n)?;
            let h = self.hp(e.decay, steps[i]);
            let (m, v) = (&self.m[s..s + n], &self.v[s..s + n]);
            let finite = if fused(&p) {
                computed.push(None);
                adamw_check(&p.contiguous()?, &g, m, v, &h)?
            } else {
                let host = |x: &[f32]| Tensor::from_slice(x, n, p.device());
                let (p, m, v) = adamw_composed(&p, &g, &host(m)?, &host(v)?, &h)?;
                let to_host = |t: Tensor| -> Result<Vec<f32>> {
                    Ok(t.to_dtype(DType::F32)?
                        .to_device(&Device::Cpu)?
                        .to_vec1::<f32>()?)
                };
                let out = [to_host(p)?, to_host(m)?, to_host(v)?];
                let finite = out.iter().flatten().all(|x| x.is_finite());
                computed.push(Some(out));
                finite
            };
            if !finite && bad.is_none() {
                bad = Some(i);
            }
        }
        if let Some(i) = self.agree(bad)? {
            return Ok(Some(SkipReason::Update {
                name: self.entries[i].name.clone(),
            }));
        }
        // Phase 2: the checked updates, for real.
        let mut shard = vec![0f32; self.shard];
        for (&(i, a, n, s), computed) in segments.iter().zip(computed) {
            let e = &self.entries[i];
            let p = e.var.as_tensor().detach().flatten_all()?.narrow(0, a, n)?;
            let out = match (grads.get(&e.var), computed) {
                (None, _) => p.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                (Some(_), Some([p, m, v])) => {
                    self.m[s..s + n].copy_from_slice(&m);
                    self.v[s..s + n].copy_from_slice(&v);
                    p
                }
                (Some(g), None) => {
                    let g = g.flatten_all()?.narrow(0, a, n)?;
                    let h = self.hp(e.decay, steps[i]);
                    let (m, v) = (&mut self.m[s..s + n], &mut self.v[s..s + n]);
                    // A fresh contiguous copy, updated in place by the kernel the plain
                    // optimizer runs on whole parameters.
                    let p = p.copy()?;
                    adamw_update(&p, &g, m, v, &h)?;
                    p.to_dtype(DType::F32)?.to_vec1::<f32>()?
                }
            };
            shard[s..s + n].copy_from_slice(&out);
        }
        let full = self.gather(shard)?;
        for (e, step) in self.entries.iter_mut().zip(steps) {
            if step != e.step {
                let n = e.var.elem_count();
                let p = Tensor::from_slice(
                    &full[e.offset..e.offset + n],
                    e.var.shape(),
                    e.var.device(),
                )?
                .to_dtype(e.var.dtype())?;
                e.var.set(&p)?;
                e.step = step;
            }
        }
        self.num_updates += 1;
        Ok(None)
    }

    /// Every rank's first refused entry (by index), agreed: the refused entry of the lowest rank
    /// that has one (ranks hold increasing slices, so it is the first in flat order), or `None`
    /// when every rank can apply its updates. A collective: every rank calls it.
    fn agree(&self, bad: Option<usize>) -> Result<Option<usize>> {
        // `index + 1` (0 = none) in two f32 halves of 24 bits, each exact.
        let code = bad.map_or(0, |i| i as u64 + 1);
        let row = [(code >> 24) as f32, (code & 0xFF_FFFF) as f32];
        let t = Tensor::from_slice(&row, 2, &Device::Cpu)?;
        let all = self.comm.all_gather(&t)?.to_vec1::<f32>()?;
        for pair in all.chunks(2) {
            let code = ((pair[0] as u64) << 24) | pair.get(1).map_or(0, |x| *x as u64);
            if code != 0 {
                let i = (code - 1) as usize;
                if i >= self.entries.len() {
                    return Err(Error::Collective {
                        op: "all_gather".into(),
                        rank: self.comm.rank(),
                        reason: format!("a rank refused entry {i} of {}", self.entries.len()),
                    });
                }
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Every rank's shard end to end (padding dropped): the flat vector.
    fn gather(&self, shard: Vec<f32>) -> Result<Vec<f32>> {
        let t = Tensor::from_vec(shard, self.shard, &Device::Cpu)?;
        let mut all = self.comm.all_gather(&t)?.to_vec1::<f32>()?;
        if all.len() < self.total {
            return Err(Error::Collective {
                op: "all_gather".into(),
                rank: self.comm.rank(),
                reason: format!(
                    "{} values back, the flat vector has {}",
                    all.len(),
                    self.total
                ),
            });
        }
        all.truncate(self.total);
        Ok(all)
    }

    /// The whole optimizer state (all ranks' shards gathered), in [`super::AdamW::state`]'s
    /// names and shapes. A collective: every rank calls it.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let m = self.gather(self.m.clone())?;
        let v = self.gather(self.v.clone())?;
        let cpu = Device::Cpu;
        let mut out = HashMap::with_capacity(3 * self.entries.len() + 1);
        for e in &self.entries {
            let r = e.offset..e.offset + e.var.elem_count();
            let shape = e.var.shape();
            out.insert(
                format!("{EXP_AVG}{}", e.name),
                Tensor::from_slice(&m[r.clone()], shape, &cpu)?,
            );
            out.insert(
                format!("{EXP_AVG_SQ}{}", e.name),
                Tensor::from_slice(&v[r], shape, &cpu)?,
            );
            out.insert(format!("{STEP}{}", e.name), count_tensor(e.step)?);
        }
        out.insert(NUM_UPDATES.to_string(), count_tensor(self.num_updates)?);
        Ok(out)
    }

    /// Takes this rank's slice of a whole state (from [`ZeroAdamW::state`] on any number of
    /// ranks, or [`super::AdamW::state`]); every key is checked as the plain optimizer does
    /// (values included: every rank checks every moment, so all ranks fail together).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: String| state.get(&key).cloned().ok_or(Error::MissingTensor { key });
        let mut known: std::collections::HashSet<String> = self
            .entries
            .iter()
            .flat_map(|e| [EXP_AVG, EXP_AVG_SQ, STEP].map(|p| format!("{p}{}", e.name)))
            .collect();
        known.insert(NUM_UPDATES.to_string());
        if let Some(key) = state.keys().find(|k| !known.contains(*k)) {
            return Err(Error::UnexpectedTensor { key: key.clone() });
        }
        let (mut m, mut v) = (vec![0f32; self.shard], vec![0f32; self.shard]);
        let mut steps = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            steps.push(read_count(state, &format!("{STEP}{}", e.name))?);
        }
        for (i, a, n, s) in self.segments() {
            let e = &self.entries[i];
            for (prefix, dst) in [(EXP_AVG, &mut m), (EXP_AVG_SQ, &mut v)] {
                let key = format!("{prefix}{}", e.name);
                let t = get(key.clone())?;
                if t.dims() != e.var.dims() {
                    return Err(Error::TensorShape {
                        key,
                        expected: e.var.dims().to_vec(),
                        got: t.dims().to_vec(),
                    });
                }
                let part = t.flatten_all()?.narrow(0, a, n)?.to_dtype(DType::F32)?;
                dst[s..s + n].copy_from_slice(&part.to_vec1::<f32>()?);
            }
        }
        // Keys of entries outside this rank's slice are still required, with sound values.
        for e in &self.entries {
            for prefix in [EXP_AVG, EXP_AVG_SQ] {
                let key = format!("{prefix}{}", e.name);
                let t = get(key.clone())?;
                if t.dims() != e.var.dims() {
                    return Err(Error::TensorShape {
                        key,
                        expected: e.var.dims().to_vec(),
                        got: t.dims().to_vec(),
                    });
                }
                check_moment(&key, &t, prefix == EXP_AVG_SQ)?;
            }
        }
        let num_updates = read_count(state, NUM_UPDATES)?;
        (self.m, self.v, self.num_updates) = (m, v, num_updates);
        for (e, s) in self.entries.iter_mut().zip(steps) {
            e.step = s;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "zero_tests.rs"]
mod tests;
