//! Clipping with experts spread over ranks (torchscale-core's `LocalGroup`, ranks as threads):
//! each rank holds the replicated dense gradients and its own experts' gradients, and clips
//! exactly as one process holding all of them.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use torchscale_clip::{ExpertParallel, GlobalNorm, SparseClip};
use torchscale_core::{Collective, GradClipper, LocalGroup};

const EXPERTS: usize = 4;

/// The gradient of dense tensor `i` (0, 1) or expert `j` (2 + j): smooth, distinct values.
fn grad_values(i: usize, scale: f32) -> Vec<f32> {
    (0..6)
        .map(|k| scale * ((i * 7 + k * 3) as f32 * 0.37).sin())
        .collect()
}

/// Vars for `ids` and a GradStore whose gradient of each is `grad_values(id)`, with a NaN in
/// that of `nan_id`.
fn store(ids: &[usize], scale: f32, nan_id: Option<usize>) -> (Vec<Var>, GradStore) {
    let dev = Device::Cpu;
    let vars: Vec<Var> = ids
        .iter()
        .map(|_| Var::new(&[1f32; 6], &dev).unwrap())
        .collect();
    let mut loss = Tensor::new(0f32, &dev).unwrap();
    for (&i, v) in ids.iter().zip(&vars) {
        let mut g = grad_values(i, scale);
        if Some(i) == nan_id {
            g[0] = f32::NAN;
        }
        let g = Tensor::new(g.as_slice(), &dev).unwrap();
        loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    (vars, loss.backward().unwrap())
}

/// The gradients of `vars` after clipping.
fn values(grads: &GradStore, vars: &[Var]) -> Vec<Vec<f32>> {
    vars.iter()
        .map(|v| grads.get(v).unwrap().to_vec1().unwrap())
        .collect()
}

/// A clipper over `comm` (boxed, as a trainer keeps it).
type MakeClip = fn(Arc<dyn Collective>) -> Box<dyn GradClipper>;

/// Clips on one process (dense 0, 1 and every expert) with `single`, and on `world` ranks each
/// holding the dense gradients and experts `rank * E / W ..` with `parallel`; checks that the
/// norm, the coefficient and every gradient agree. Returns the largest relative norm error and
/// whether the gradients were clipped.
fn check(
    world: usize,
    scale: f32,
    nan_rank: Option<usize>,
    single: &dyn GradClipper,
    parallel: MakeClip,
) -> (f64, bool) {
    let per = EXPERTS / world;
    let nan_expert = nan_rank.map(|r| 2 + r * per);
    let all: Vec<usize> = (0..2 + EXPERTS).collect();
    let (vars, mut g) = store(&all, scale, nan_expert);
    let want = single.clip(&mut g, &vars[..2], &vars[2..]).unwrap();
    let want_grads = values(&g, &vars);
    let results = std::thread::scope(|sc| {
        let hs: Vec<_> = LocalGroup::new(world)
            .into_iter()
            .map(|group| {
                sc.spawn(move || {
                    let r = group.rank();
                    let clip = parallel(Arc::new(group));
                    let mut ids = vec![0, 1];
                    ids.extend((r * per..(r + 1) * per).map(|j| 2 + j));
                    let (vars, mut g) = store(&ids, scale, nan_expert);
                    let rep = clip.clip(&mut g, &vars[..2], &vars[2..]).unwrap();
                    (ids, rep, values(&g, &vars))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let mut worst = 0f64;
    for (r, (ids, rep, got)) in results.into_iter().enumerate() {
        if nan_rank.is_some() {
            assert!(!want.total_norm.is_finite());
            assert!(!rep.total_norm.is_finite(), "rank {r}: {rep:?}");
            assert_eq!((rep.coef, rep.clipped), (1.0, false), "rank {r}");
        } else {
            let rel = (rep.total_norm - want.total_norm).abs() / want.total_norm;
            assert!(
                rel <= 1e-6,
                "rank {r}: norm {} vs {}",
                rep.total_norm,
                want.total_norm
            );
            worst = worst.max(rel);
            assert!(
                (rep.coef - want.coef).abs() <= 1e-6 * want.coef,
                "rank {r}: {rep:?} vs {want:?}"
            );
            assert_eq!(rep.clipped, want.clipped, "rank {r}");
        }
        for (k, &i) in ids.iter().enumerate() {
            for (a, b) in got[k].iter().zip(&want_grads[i]) {
                let same = (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-6 * b.abs().max(1.0);
                assert!(
                    same,
                    "rank {r} gradient {i}: {:?} vs {:?}",
                    got[k], want_grads[i]
                );
            }
        }
    }
    (worst, want.clipped)
}

fn sparse(comm: Arc<dyn Collective>) -> Box<dyn GradClipper> {
    Box::new(ExpertParallel::new(SparseClip::new(1.0, EXPERTS, 2), comm))
}

fn sparse_compat(comm: Arc<dyn Collective>) -> Box<dyn GradClipper> {
    Box::new(ExpertParallel::new(
        SparseClip::torchscale_compat(1.0, EXPERTS, 2),
        comm,
    ))
}

fn sparse_off(comm: Arc<dyn Collective>) -> Box<dyn GradClipper> {
    Box::new(ExpertParallel::new(SparseClip::new(0.0, EXPERTS, 2), comm))
}

fn global(comm: Arc<dyn Collective>) -> Box<dyn GradClipper> {
    Box::new(ExpertParallel::new(GlobalNorm::new(1.0), comm))
}

#[test]
fn sparse_clip_over_ranks_equals_one_process() {
    // Clipped (norm well above 1) and not clipped (scale 0.05).
    for (scale, clipped) in [(1.0, true), (0.05, false)] {
        let want = SparseClip::new(1.0, EXPERTS, 2);
        for world in [2, 4] {
            let (w, c) = check(world, scale, None, &want, sparse);
            assert_eq!(c, clipped);
            eprintln!("sparse clip, {world} ranks, scale {scale}: relative norm error {w:e}");
        }
        let compat = SparseClip::torchscale_compat(1.0, EXPERTS, 2);
        assert_eq!(check(2, scale, None, &compat, sparse_compat).1, clipped);
    }
    // max_norm 0 only measures.
    check(2, 1.0, None, &SparseClip::new(0.0, EXPERTS, 2), sparse_off);
}

#[test]
fn global_norm_over_ranks_equals_one_process() {
    for (scale, clipped) in [(1.0, true), (0.05, false)] {
        let (w, c) = check(2, scale, None, &GlobalNorm::new(1.0), global);
        assert_eq!(c, clipped);
        eprintln!("global norm, 2 ranks, scale {scale}: relative norm error {w:e}");
    }
}

#[test]
fn a_nan_expert_gradient_on_one_rank_is_seen_by_every_rank() {
    check(2, 1.0, Some(1), &SparseClip::new(1.0, EXPERTS, 2), sparse);
    check(2, 1.0, Some(0), &GlobalNorm::new(1.0), global);
}
