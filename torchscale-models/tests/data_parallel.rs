//! Data parallel training and ZeRO-1 with ranks as threads (`LocalGroup`): two ranks equal one
//! process on the same global batch, ZeRO-1 equals plain AdamW, checkpoints move between world
//! sizes, the NaN guard and clipping decide once for all ranks, gradients travel in buckets.
//!
//! The reference is one process that runs the global batch as two accumulated micro-batches
//! (rank 0's rows, then rank 1's): it adds the same two f32 gradient sums in the same order as
//! the rank-order all-reduce, so two ranks must match it bit for bit. One process running the
//! global batch in one micro-batch sums the rows in another order; that difference is rounding
//! alone and is bounded below against the accumulated run's own difference.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use torchscale_core::local_group::LocalGroup;
use torchscale_core::{Collective, Result};
use torchscale_models::config::DecoderConfig;
use torchscale_models::data::{ByteCorpus, BYTE_VOCAB};
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::randomness::mix_seed;
use torchscale_models::train::{
    bucket_plan, AdamWConfig, ClipMode, InverseSqrt, MicroBatch, Schedule, SkipReason, StepReport,
    Trainer, TrainerConfig,
};
use torchscale_models::ParamStore;

const SEED: u64 = 11;
const BATCH: usize = 4;
const SEQ: usize = 32;

fn corpus() -> ByteCorpus {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/kjv.txt");
    ByteCorpus::from_file(&path, 0.05).unwrap()
}

/// No dropout: masks drawn for a whole batch cannot match masks drawn per rank.
fn tiny() -> DecoderConfig {
    DecoderConfig::default()
        .with_vocab_size(BYTE_VOCAB as i64)
        .with_embed_dim(32)
        .with_heads(2)
        .with_ffn_dim(64)
        .with_layers(2)
        .with_max_positions(64)
        .with_share_input_output_embed(true)
        .with_subln(true)
        .with_dropout(0.0)
        .with_attention_dropout(0.0)
}

/// How a run is laid out.
#[derive(Clone, Copy, Debug)]
struct Layout {
    world: usize,
    zero1: bool,
    /// One process only: the global batch in one micro-batch instead of two halves.
    whole: bool,
    bucket_bytes: usize,
}

impl Layout {
    fn ranks(world: usize) -> Self {
        Self {
            world,
            zero1: false,
            whole: false,
            bucket_bytes: 25 << 20,
        }
    }
    fn zero(world: usize) -> Self {
        Self {
            zero1: true,
            ..Self::ranks(world)
        }
    }
}

/// What one rank ends with.
#[derive(Debug)]
struct RankOut {
    reports: Vec<StepReport>,
    weights: Vec<(String, Vec<f32>)>,
    state: HashMap<String, Tensor>,
}

/// Where a run starts: weights and trainer state of an earlier one.
#[derive(Clone)]
struct Start {
    weights: Vec<(String, Vec<f32>)>,
    state: HashMap<String, Tensor>,
}

fn trainer(lm: &LanguageModel, comm: Arc<dyn Collective>, l: Layout) -> Result<Trainer> {
    let t = Trainer::new(
        &lm.store,
        &lm.model.expert_parameters(),
        TrainerConfig {
            seed: SEED,
            // Small enough that every step clips: the coefficient depends on the global norm.
            clip: ClipMode::GlobalNorm(0.5),
            max_consecutive_skips: 3,
        },
        AdamWConfig {
            lr: 3e-3,
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        Schedule::InverseSqrt(InverseSqrt::new(3e-3, 5)),
    )?
    .with_collective(comm)?
    .with_bucket_bytes(l.bucket_bytes)?;
    if l.zero1 {
        t.with_zero1()
    } else {
        Ok(t)
    }
}

fn weights(lm: &LanguageModel) -> Vec<(String, Vec<f32>)> {
    lm.store
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// One rank's part of a run of `steps` steps; `poison(step, rank)` returns a factor to multiply
/// the loss by (NaN to poison it) and whether to poison the gradient only.
fn rank_run(
    comm: Arc<dyn Collective>,
    l: Layout,
    start: Option<&Start>,
    steps: u64,
    poison: &(dyn Fn(u64, usize) -> Option<bool> + Sync),
) -> Result<RankOut> {
    let data = corpus();
    let lm = LanguageModel::new(tiny(), 5)?;
    let rank = comm.rank();
    let mut t = trainer(&lm, comm, l)?;
    if let Some(s) = start {
        for ((name, var), (n2, w)) in lm.store.named_vars().iter().zip(&s.weights) {
            assert_eq!(name, n2);
            var.set(&Tensor::from_slice(w, var.shape(), &Device::Cpu)?)?;
        }
        t.load_state(&s.state)?;
    }
    let loss_cfg = LossConfig::default();
    let end = t.step_index() + steps;
    let mut reports = Vec::new();
    while t.step_index() < end {
        let micro = if l.world == 1 && !l.whole { 2 } else { 1 };
        let r = t.step(micro, |ctx| {
            // The global batch of the step is drawn from micro-batch 0's seed in every layout.
            let seed = mix_seed(mix_seed(SEED, ctx.step), 0);
            let (i, tg) = if l.whole {
                data.train_batch(BATCH, SEQ, seed, &Device::Cpu)?
            } else {
                let (part, parts) = if l.world == 1 {
                    (ctx.micro, 2)
                } else {
                    (ctx.rank, ctx.world_size)
                };
                data.train_batch_part(BATCH, SEQ, seed, part, parts, &Device::Cpu)?
            };
            let mut mb = lm.micro_batch(&i, &tg, true, &loss_cfg, seed)?;
            match poison(ctx.step, rank) {
                Some(true) => {
                    // A finite loss whose gradient is NaN: sqrt'(0) = inf, times (1 - 1).
                    let w = lm.store.named_vars()[0].1.as_tensor().clone();
                    let z = w.sub(&w.clone())?.sqrt()?.sum_all()?;
                    mb.loss_sum = (mb.loss_sum + z)?;
                }
                Some(false) => mb.loss_sum = (mb.loss_sum * f64::NAN)?,
                None => {}
            }
            Ok(mb)
        })?;
        reports.push(r);
    }
    Ok(RankOut {
        reports,
        weights: weights(&lm),
        state: t.state()?,
    })
}

fn no_poison(_: u64, _: usize) -> Option<bool> {
    None
}

/// Runs every rank of `l` (threads for more than one) and returns their results in rank order.
fn run_with(
    l: Layout,
    start: Option<&Start>,
    steps: u64,
    wrap: &(dyn Fn(LocalGroup) -> Arc<dyn Collective> + Sync),
    poison: &(dyn Fn(u64, usize) -> Option<bool> + Sync),
) -> Vec<RankOut> {
    if l.world == 1 {
        let comm: Arc<dyn Collective> = Arc::new(torchscale_core::collective::SingleProcess);
        return vec![rank_run(comm, l, start, steps, poison).unwrap()];
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::new(l.world)
            .into_iter()
            .map(|g| {
                let comm = wrap(g);
                s.spawn(move || rank_run(comm, l, start, steps, poison))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread").unwrap())
            .collect()
    })
}

fn run(l: Layout, start: Option<&Start>, steps: u64) -> Vec<RankOut> {
    run_with(l, start, steps, &|g| Arc::new(g), &no_poison)
}

fn start_of(out: &RankOut) -> Start {
    Start {
        weights: out.weights.clone(),
        state: out.state.clone(),
    }
}

fn losses(out: &RankOut) -> Vec<f64> {
    out.reports.iter().map(|r| r.nll).collect()
}

fn state_values(s: &HashMap<String, Tensor>) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<_> = s
        .iter()
        .map(|(k, t)| {
            let t = t
                .flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            (k.clone(), t.to_vec1::<f32>().unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Bitwise equality of two runs' reports, weights and whole optimizer state.
fn assert_same(a: &RankOut, b: &RankOut, what: &str) {
    assert_eq!(a.reports, b.reports, "{what}: reports");
    assert!(a.weights == b.weights, "{what}: weights differ");
    assert!(
        state_values(&a.state) == state_values(&b.state),
        "{what}: optimizer state differs"
    );
}

#[test]
fn two_ranks_equal_one_process_on_the_same_global_batch() {
    let one = run(Layout::ranks(1), None, 10);
    let two = run(Layout::ranks(2), None, 10);
    // Every step clipped, with the global norm.
    assert!(one[0].reports.iter().all(|r| r.clip_coef < 1.0));
    for r in &two {
        assert_same(r, &one[0], "2 ranks vs 1 process (two micro-batches)");
    }
    assert_eq!(two[0].reports[0].ntokens, BATCH * SEQ);

    // One micro-batch of the whole batch: other summation order inside the matmuls.
    let whole = run(
        Layout {
            whole: true,
            ..Layout::ranks(1)
        },
        None,
        10,
    );
    let (a, b) = (losses(&two[0]), losses(&whole[0]));
    let loss_rel = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) / y).abs())
        .fold(0f64, f64::max);
    // Weights: the difference against how far training moved them, and the largest one.
    let init = weights(&LanguageModel::new(tiny(), 5).unwrap());
    let (mut diff2, mut moved2, mut max_abs) = (0f64, 0f64, 0f32);
    for (((_, a), (_, b)), (_, w0)) in two[0].weights.iter().zip(&whole[0].weights).zip(&init) {
        for ((x, y), z) in a.iter().zip(b).zip(w0) {
            diff2 += f64::from(x - y).powi(2);
            moved2 += f64::from(y - z).powi(2);
            max_abs = max_abs.max((x - y).abs());
        }
    }
    let w_rel = (diff2 / moved2).sqrt();
    eprintln!(
        "2 ranks vs one micro-batch after 10 steps: losses rel {loss_rel:.2e}, \
         |dw| / |w10 - w0| {w_rel:.2e}, max |dw| {max_abs:.2e}"
    );
    // Measured: 5.0e-8 (an ulp of the f32 loss sums), 2.7e-4 and 2.6e-4. AdamW divides by
    // sqrt(v), so a rounding-level gradient change on an element whose gradient is near zero
    // moves it by up to lr (3e-3) per step; the bounds leave that room, no more.
    assert!(loss_rel < 1e-6, "{loss_rel}");
    assert!(w_rel < 1e-3, "{w_rel}");
    assert!(max_abs < 1e-3, "{max_abs}");
}

#[test]
fn zero1_equals_plain_adamw() {
    let plain = run(Layout::ranks(1), None, 10);
    let zero2 = run(Layout::zero(2), None, 10);
    for r in &zero2 {
        assert_same(r, &plain[0], "ZeRO-1 on 2 ranks vs AdamW on 1");
    }
    let zero1 = run(Layout::zero(1), None, 10);
    assert_same(&zero1[0], &plain[0], "ZeRO-1 on 1 rank vs AdamW");
}

#[test]
fn checkpoints_move_between_world_sizes() {
    let straight = run(Layout::zero(2), None, 10);
    // 2 ranks (ZeRO-1) for 5 steps, then 1 process (plain AdamW) for 5.
    let first = run(Layout::zero(2), None, 5);
    let s = start_of(&first[0]);
    let resumed = run(Layout::ranks(1), Some(&s), 5);
    assert_eq!(resumed[0].reports[0].step, 5);
    assert_eq!(losses(&resumed[0]), losses(&straight[0])[5..]);
    assert!(resumed[0].weights == straight[0].weights);
    assert!(state_values(&resumed[0].state) == state_values(&straight[0].state));
    // The same on 2 ranks, with and without ZeRO-1.
    for l in [Layout::zero(2), Layout::ranks(2)] {
        let resumed = run(l, Some(&s), 5);
        for r in &resumed {
            assert_eq!(losses(r), losses(&straight[0])[5..], "{l:?}");
            assert!(r.weights == straight[0].weights, "{l:?}");
        }
    }
    // 1 process for 5 steps, then 2 ranks with ZeRO-1.
    let first = run(Layout::ranks(1), None, 5);
    let resumed = run(Layout::zero(2), Some(&start_of(&first[0])), 5);
    for r in &resumed {
        assert_eq!(losses(r), losses(&straight[0])[5..]);
        assert!(r.weights == straight[0].weights);
        assert!(state_values(&r.state) == state_values(&straight[0].state));
    }
}

#[test]
fn the_guard_skips_on_every_rank() {
    let clean = run(Layout::ranks(2), None, 4);
    // Rank 1's gradient is NaN at step 1 (its loss is finite).
    let nan_grad = run_with(
        Layout::ranks(2),
        None,
        4,
        &|g| Arc::new(g),
        &|step, rank| (step == 1 && rank == 1).then_some(true),
    );
    // Rank 1's loss is NaN at step 2.
    let nan_loss = run_with(Layout::zero(2), None, 4, &|g| Arc::new(g), &|step, rank| {
        (step == 2 && rank == 1).then_some(false)
    });
    for (out, bad) in [(&nan_grad, 1), (&nan_loss, 2)] {
        for r in out.iter() {
            let skipped: Vec<bool> = r.reports.iter().map(|x| x.skipped.is_some()).collect();
            let want: Vec<bool> = (0..4).map(|s| s == bad).collect();
            assert_eq!(skipped, want);
        }
        // Both ranks hold the same weights; the skipped step changed nothing.
        assert!(out[0].weights == out[1].weights);
        assert_ne!(out[0].weights, clean[0].weights);
    }
    assert!(matches!(
        nan_grad[0].reports[1].skipped,
        Some(SkipReason::GradNorm { .. })
    ));
    assert_eq!(
        nan_loss[0].reports[2].skipped,
        Some(SkipReason::OtherRank { rank: 1 })
    );
    assert!(matches!(
        nan_loss[1].reports[2].skipped,
        Some(SkipReason::Loss { .. })
    ));
    // Both ranks counted 3 updates in 4 steps.
    let updates = |o: &RankOut| {
        o.state["num_updates"]
            .to_vec1::<i64>()
            .unwrap()
            .first()
            .copied()
    };
    assert_eq!(updates(&nan_loss[0]), Some(3));
    assert_eq!(updates(&nan_loss[1]), Some(3));
}

/// Counts the all-reduce calls of a rank.
#[derive(Debug)]
struct Counting {
    inner: LocalGroup,
    all_reduce: Arc<AtomicUsize>,
}

impl Collective for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.all_reduce.fetch_add(1, Ordering::SeqCst);
        self.inner.all_reduce_sum(t)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.inner.all_gather(t)
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.inner.reduce_scatter_sum(t)
    }
    fn all_to_all(&self, chunks: &[Tensor]) -> Result<Vec<Tensor>> {
        self.inner.all_to_all(chunks)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.inner.broadcast(t, root)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}

#[test]
fn gradients_travel_in_buckets() {
    let lm = LanguageModel::new(tiny(), 5).unwrap();
    let numels: Vec<Option<usize>> = lm
        .store
        .named_vars()
        .iter()
        .map(|(_, v)| Some(v.elem_count()))
        .collect();
    let bytes = 8192;
    let plan = bucket_plan(&numels, bytes);
    // Every parameter once, in order; only the last bucket may be under the size.
    let flat: Vec<usize> = plan.iter().flatten().copied().collect();
    assert_eq!(flat, (0..numels.len()).collect::<Vec<_>>());
    for b in &plan[..plan.len() - 1] {
        let sum: usize = b.iter().map(|&i| 4 * numels[i].unwrap()).sum();
        let without_last: usize = b[..b.len() - 1]
            .iter()
            .map(|&i| 4 * numels[i].unwrap())
            .sum();
        assert!(sum >= bytes && without_last < bytes, "{b:?}");
    }
    assert!(plan.len() > 3, "{}", plan.len());

    let counts: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    let next = AtomicUsize::new(0);
    let wrap = |g: LocalGroup| -> Arc<dyn Collective> {
        let c = counts[next.fetch_add(1, Ordering::SeqCst)].clone();
        Arc::new(Counting {
            inner: g,
            all_reduce: c,
        })
    };
    let l = Layout {
        bucket_bytes: bytes,
        ..Layout::ranks(2)
    };
    let out = run_with(l, None, 3, &wrap, &no_poison);
    let reference = run(Layout::ranks(1), None, 3);
    for (r, c) in out.iter().zip(&counts) {
        // One all-reduce per bucket per step, and the same result as one big bucket.
        assert_eq!(c.load(Ordering::SeqCst), 3 * plan.len());
        assert_same(r, &reference[0], "small buckets");
    }
}

/// Two ranks: `a` all-reduced, `b` local to each rank (an expert-parallel expert): the clipping
/// norm sums `b`'s squares over the ranks.
#[test]
fn clipping_sums_local_gradients_over_ranks() {
    let x = [[1f32, -2.0, 0.5], [3.0, 0.25, -1.0]];
    let y = [[0.5f32, 4.0], [-6.0, 1.5]];
    let out: Vec<(StepReport, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .map(|g| {
                s.spawn(move || -> Result<(StepReport, Vec<f32>)> {
                    let r = g.rank();
                    let store = ParamStore::new(3);
                    let vb = store.var_builder(candle_core::DType::F32, &Device::Cpu);
                    let a = vb.get(3, "a")?;
                    let b = vb.get(2, "b")?;
                    let b0 = b.to_vec1::<f32>()?;
                    let mut t = Trainer::new(
                        &store,
                        &[],
                        TrainerConfig {
                            clip: ClipMode::GlobalNorm(0.1),
                            ..TrainerConfig::default()
                        },
                        AdamWConfig::default(),
                        // The first update at the peak rate (no warm-up from 0).
                        Schedule::InverseSqrt(InverseSqrt {
                            warmup_init_lr: 1e-3,
                            ..InverseSqrt::new(1e-3, 1)
                        }),
                    )?
                    .with_collective(Arc::new(g))?
                    .with_local_params(std::slice::from_ref(&b))?;
                    let rep = t.step(1, |_| {
                        let xa = Tensor::new(&x[r], &Device::Cpu)?;
                        let yb = Tensor::new(&y[r], &Device::Cpu)?;
                        let loss = ((&a * xa)?.sum_all()? + (&b * yb)?.sum_all()?)?;
                        Ok(MicroBatch {
                            loss_sum: loss,
                            nll_sum: 0.0,
                            ntokens: 1,
                            grads: None,
                        })
                    })?;
                    let moved: Vec<f32> = b0
                        .iter()
                        .zip(b.to_vec1::<f32>()?)
                        .map(|(p, q)| q - p)
                        .collect();
                    Ok((rep, moved))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    // Gradients over 2 tokens: a gets (x0 + x1) / 2 on both ranks, b gets y_r / 2 on rank r.
    let mut sq = 0f64;
    for (p, q) in x[0].iter().zip(&x[1]) {
        sq += (f64::from(p + q) / 2.0).powi(2);
    }
    for row in y {
        sq += row
            .iter()
            .map(|v| (f64::from(*v) / 2.0).powi(2))
            .sum::<f64>();
    }
    let want = sq.sqrt();
    for (rep, _) in &out {
        assert!(
            ((rep.grad_norm - want) / want).abs() < 1e-6,
            "{} vs {want}",
            rep.grad_norm
        );
        assert!((rep.clip_coef - 0.1 / (want + 1e-6)).abs() < 1e-6);
        assert_eq!(rep.ntokens, 2);
    }
    // b is local: each rank moved its own copy against its own gradient's sign.
    for (r, (_, moved)) in out.iter().enumerate() {
        for (m, g) in moved.iter().zip(y[r]) {
            assert!(
                *m != 0.0 && m.signum() == -g.signum(),
                "rank {r}: {moved:?}"
            );
        }
    }
}

/// A rank whose step fails aborts the group: the other rank gets an error, not a hang.
#[test]
fn a_failing_rank_stops_the_others() {
    let out: Vec<Result<RankOut>> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .map(|g| {
                let comm: Arc<dyn Collective> = Arc::new(g);
                s.spawn(move || {
                    let rank = comm.rank();
                    let data = corpus();
                    let lm = LanguageModel::new(tiny(), 5)?;
                    let mut t = trainer(&lm, comm, Layout::ranks(2))?;
                    for step in 0..3u64 {
                        t.step(1, |ctx| {
                            if step == 1 && rank == 1 {
                                return Err(torchscale_core::Error::invalid("batch", "unreadable"));
                            }
                            let (i, tg) =
                                data.train_batch_part(BATCH, SEQ, ctx.seed, rank, 2, &Device::Cpu)?;
                            lm.micro_batch(&i, &tg, true, &LossConfig::default(), ctx.seed)
                        })?;
                    }
                    unreachable!("step 1 fails on both ranks")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(out[1]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("unreadable"));
    let e = out[0].as_ref().unwrap_err();
    assert!(
        matches!(e, torchscale_core::Error::Collective { .. }) && e.to_string().contains("rank 1"),
        "{e}"
    );
}
