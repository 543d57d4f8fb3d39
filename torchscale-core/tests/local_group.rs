//! LocalGroup against local references: every collective with 1, 2 and 3 ranks, uneven
//! all-to-all with empty chunks, and the failures (abort, panic, timeout, a rank that left,
//! mismatched calls) ending every rank quickly with an error that names the culprit.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use torchscale_core::{Collective, Error, LocalGroup, Result};

/// What rank `rank` contributes: values every rank can recompute from (rank, seed).
fn data(rank: usize, seed: usize, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| ((rank * 7 + seed * 13 + i * 3) % 17) as f32 * 0.37 - 2.5)
        .collect()
}

fn tensor(rank: usize, seed: usize, rows: usize, cols: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        data(rank, seed, rows, cols),
        (rows, cols),
        &Device::Cpu,
    )?)
}

/// The sum over ranks, added in rank order as the group promises.
fn reference_sum(world: usize, seed: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut acc = data(0, seed, rows, cols);
    for r in 1..world {
        for (a, b) in acc.iter_mut().zip(data(r, seed, rows, cols)) {
            *a += b;
        }
    }
    acc
}

fn all_ok<T: std::fmt::Debug>(results: Vec<Result<T>>) -> Vec<T> {
    results
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r}: {e}")))
        .collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The error of a rank, as text, with its kind checked.
fn collective_err<T: std::fmt::Debug>(r: Result<T>) -> (String, usize, String) {
    match r {
        Err(Error::Collective { op, rank, reason }) => (op, rank, reason),
        other => panic!("expected Error::Collective, got {other:?}"),
    }
}

#[test]
fn all_reduce_sum_matches_the_rank_order_sum() {
    for world in 1..=3 {
        let out = all_ok(LocalGroup::run(world, |g| {
            assert_eq!((g.world_size(), g.backend()), (world, "local"));
            g.all_reduce_sum(&tensor(g.rank(), 1, 3, 5)?)
        }));
        let want = reference_sum(world, 1, 3, 5);
        for t in &out {
            assert_eq!(t.dims(), &[3, 5]);
            assert_eq!(flat(t), want, "world {world}");
        }
    }
}

#[test]
fn all_reduce_sum_adds_in_rank_order_bitwise() {
    // (1e8 + 1) - 1e8 is 0 in f32, 1e8 + (1 - 1e8) is 1: only rank order gives 0.
    let vals = [1e8f32, 1.0, -1e8];
    let out = all_ok(LocalGroup::run(3, |g| {
        g.all_reduce_sum(&Tensor::new(&[vals[g.rank()]], &Device::Cpu)?)
    }));
    for t in &out {
        assert_eq!(flat(t), vec![0.0]);
    }
}

#[test]
fn all_reduce_sum_of_bf16_and_f16_sums_in_f32_and_rounds_once() {
    for dtype in [DType::BF16, DType::F16] {
        let out = all_ok(LocalGroup::run(3, |g| {
            g.all_reduce_sum(&tensor(g.rank(), 2, 2, 4)?.to_dtype(dtype)?)
        }));
        // The reference: each rank's value rounded to the dtype, summed in f32, rounded once.
        let mut acc = vec![0f32; 8];
        for r in 0..3 {
            let v = flat(
                &tensor(r, 2, 2, 4)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            );
            for (a, b) in acc.iter_mut().zip(v) {
                *a += b;
            }
        }
        let want = flat(
            &Tensor::from_vec(acc, 8, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        );
        for t in &out {
            assert_eq!(t.dtype(), dtype);
            assert_eq!(flat(&t.to_dtype(DType::F32).unwrap()), want, "{dtype:?}");
        }
    }
}

#[test]
fn all_reduce_sum_of_integers_stays_exact() {
    let out = all_ok(LocalGroup::run(3, |g| {
        g.all_reduce_sum(&Tensor::new(&[g.rank() as i64 + 1, 1 << 40], &Device::Cpu)?)
    }));
    for t in &out {
        assert_eq!(t.to_vec1::<i64>().unwrap(), vec![6, 3 << 40]);
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for world in 1..=3 {
        let out = all_ok(LocalGroup::run(world, |g| {
            g.all_gather(&tensor(g.rank(), 3, 2, 3)?)
        }));
        let want: Vec<f32> = (0..world).flat_map(|r| data(r, 3, 2, 3)).collect();
        for t in &out {
            assert_eq!(t.dims(), &[2 * world, 3]);
            assert_eq!(flat(t), want);
        }
    }
}

#[test]
fn reduce_scatter_sum_gives_each_rank_its_block_of_the_sum() {
    for world in 1..=3 {
        let rows = 2 * world;
        let out = all_ok(LocalGroup::run(world, |g| {
            g.reduce_scatter_sum(&tensor(g.rank(), 4, rows, 3)?)
        }));
        let sum = reference_sum(world, 4, rows, 3);
        for (r, t) in out.iter().enumerate() {
            assert_eq!(t.dims(), &[2, 3]);
            assert_eq!(
                flat(t),
                sum[r * 6..(r + 1) * 6].to_vec(),
                "world {world} rank {r}"
            );
        }
    }
}

#[test]
fn reduce_scatter_rejects_rows_not_divisible_by_the_world() {
    let out = LocalGroup::run(2, |g| g.reduce_scatter_sum(&tensor(g.rank(), 0, 3, 2)?));
    for (r, res) in out.into_iter().enumerate() {
        let (op, rank, reason) = collective_err(res);
        assert_eq!((op.as_str(), rank), ("reduce_scatter_sum", r));
        assert!(
            reason.contains("[3, 2]") && reason.contains("world size 2"),
            "{reason}"
        );
    }
}

/// Rows rank `from` sends to rank `to`: uneven, zero for some pairs.
fn rows_between(from: usize, to: usize) -> usize {
    (from * 2 + to * 3) % 4
}

#[test]
fn all_to_all_moves_uneven_chunks_including_empty_ones() {
    for world in 1..=3 {
        let out = all_ok(LocalGroup::run(world, |g| {
            let chunks = (0..world)
                .map(|to| tensor(g.rank() * 10 + to, 5, rows_between(g.rank(), to), 4))
                .collect::<Result<Vec<_>>>()?;
            g.all_to_all(&chunks)
        }));
        let mut zero_rows = 0;
        for (me, got) in out.iter().enumerate() {
            assert_eq!(got.len(), world);
            for (from, t) in got.iter().enumerate() {
                let rows = rows_between(from, me);
                zero_rows += usize::from(rows == 0);
                assert_eq!(t.dims(), &[rows, 4], "world {world}: {from} -> {me}");
                assert_eq!(flat(t), data(from * 10 + me, 5, rows, 4));
            }
        }
        assert!(zero_rows > 0, "world {world} must exercise an empty chunk");
    }
}

#[test]
fn all_to_all_checks_chunk_count_and_trailing_dims() {
    let out = LocalGroup::run(2, |g| g.all_to_all(&[tensor(0, 0, 1, 2)?]));
    for res in out {
        assert!(collective_err(res).2.contains("1 chunks for a world of 2"));
    }
    let out = LocalGroup::run(2, |g| {
        let cols = if g.rank() == 1 { 3 } else { 2 };
        g.all_to_all(&[tensor(0, 0, 1, 2)?, tensor(0, 0, 1, cols)?])
    });
    for res in out {
        let reason = collective_err(res).2;
        assert!(
            reason.contains("rank 1's chunk for rank 1 has shape [1, 3]"),
            "{reason}"
        );
    }
}

#[test]
fn broadcast_delivers_the_roots_tensor_from_every_root() {
    for world in 1..=3 {
        for root in 0..world {
            let out = all_ok(LocalGroup::run(world, |g| {
                g.broadcast(&tensor(g.rank(), 6, 2, 2)?, root)
            }));
            for t in &out {
                assert_eq!(flat(t), data(root, 6, 2, 2));
            }
        }
    }
    let out = LocalGroup::run(2, |g| g.broadcast(&tensor(0, 0, 1, 1)?, 2));
    for res in out {
        assert!(collective_err(res).2.contains("root 2 >= world size 2"));
    }
    // Ranks that disagree on the root would each receive something else: an error instead.
    let out = LocalGroup::run(2, |g| g.broadcast(&tensor(0, 0, 1, 1)?, g.rank()));
    for res in out {
        assert!(collective_err(res)
            .2
            .contains("rank 1 named root 1 where rank 0 named root 0"));
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    let start = Instant::now();
    let out = all_ok(LocalGroup::run(3, |g| {
        if g.rank() == 2 {
            std::thread::sleep(Duration::from_millis(150));
        }
        g.barrier()?;
        Ok(start.elapsed())
    }));
    for t in out {
        assert!(t >= Duration::from_millis(150), "{t:?}");
    }
}

#[test]
fn many_collectives_in_sequence_stay_paired() {
    let out = all_ok(LocalGroup::run(3, |g| {
        let mut acc = 0f32;
        for step in 0..50 {
            let t = Tensor::new(&[(g.rank() * 100 + step) as f32], &Device::Cpu)?;
            acc += g.all_reduce_sum(&t)?.to_vec1::<f32>()?[0];
        }
        Ok(acc)
    }));
    // Step s sums to 300 + 3s; over 50 steps 15000 + 3 * 1225.
    for a in out {
        assert_eq!(a, 15000.0 + 3.0 * 1225.0);
    }
}

#[test]
fn mismatched_shapes_dtypes_and_ops_fail_on_every_rank() {
    let out = LocalGroup::run(3, |g| {
        let rows = if g.rank() == 2 { 4 } else { 2 };
        g.all_reduce_sum(&tensor(g.rank(), 0, rows, 3)?)
    });
    for (r, res) in out.into_iter().enumerate() {
        let (op, rank, reason) = collective_err(res);
        assert_eq!((op.as_str(), rank), ("all_reduce_sum", r));
        assert!(
            reason.contains("rank 2 has shape [4, 3] where rank 0 has [2, 3]"),
            "{reason}"
        );
    }
    let out = LocalGroup::run(2, |g| {
        let dt = if g.rank() == 1 {
            DType::F64
        } else {
            DType::F32
        };
        g.all_gather(&tensor(g.rank(), 0, 2, 3)?.to_dtype(dt)?)
    });
    for res in out {
        let reason = collective_err(res).2;
        assert!(
            reason.contains("rank 1 has dtype F64 where rank 0 has F32"),
            "{reason}"
        );
    }
    let out = LocalGroup::run(2, |g| {
        if g.rank() == 0 {
            g.all_gather(&tensor(0, 0, 1, 1)?).map(|_| ())
        } else {
            g.barrier()
        }
    });
    for res in out {
        let reason = collective_err(res).2;
        assert!(reason.contains("rank 1 called `barrier`"), "{reason}");
    }
}

#[test]
fn an_aborting_rank_stops_the_others_quickly_with_its_name_and_reason() {
    let start = Instant::now();
    let out = LocalGroup::run(3, |g| {
        if g.rank() == 1 {
            // Let the others block first, so that a pending wait is what gets woken.
            std::thread::sleep(Duration::from_millis(100));
            g.abort("loss is NaN");
            return Err(Error::invalid("loss", "NaN"));
        }
        g.all_reduce_sum(&tensor(g.rank(), 0, 2, 2)?)?;
        g.barrier()
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    for (r, res) in out.into_iter().enumerate() {
        if r == 1 {
            assert!(matches!(res, Err(Error::Invalid { .. })));
            continue;
        }
        let (op, rank, reason) = collective_err(res);
        assert_eq!((op.as_str(), rank), ("all_reduce_sum", r));
        assert_eq!(reason, "rank 1 failed: aborted: loss is NaN");
    }
}

#[test]
fn collectives_after_an_abort_fail_at_once() {
    let out = LocalGroup::run(2, |g| {
        g.barrier()?;
        if g.rank() == 0 {
            g.abort("disk full");
        }
        // Rank 1 may reach this before or after the abort: either way it must not hang.
        g.barrier()?;
        g.barrier()
    });
    let reason = collective_err(out.into_iter().nth(1).unwrap()).2;
    assert_eq!(reason, "rank 0 failed: aborted: disk full");
}

#[test]
fn a_panicking_rank_poisons_the_group() {
    let start = Instant::now();
    let out = LocalGroup::run(3, |g| {
        if g.rank() == 2 {
            std::thread::sleep(Duration::from_millis(50));
            panic!("index out of bounds in rank 2");
        }
        g.barrier()
    });
    assert!(start.elapsed() < Duration::from_secs(5));
    let out: Vec<_> = out.into_iter().map(collective_err).collect();
    assert_eq!(out[0].2, "rank 2 failed: panicked");
    assert_eq!(out[1].2, "rank 2 failed: panicked");
    assert_eq!(out[2].0, "run");
    assert!(out[2]
        .2
        .contains("rank 2 panicked: index out of bounds in rank 2"));
}

#[test]
fn a_missing_rank_times_out_and_is_named() {
    let start = Instant::now();
    let out = LocalGroup::run_with_timeout(3, Duration::from_millis(200), |g| {
        if g.rank() == 0 {
            // Busy elsewhere (not dropped): the others can only time out.
            std::thread::sleep(Duration::from_millis(600));
            return g.barrier();
        }
        g.barrier()
    });
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let out: Vec<_> = out.into_iter().map(collective_err).collect();
    for (_, _, reason) in &out[1..] {
        assert!(reason.contains("waiting for ranks [0]"), "{reason}");
    }
    // Rank 0 arrives late into a poisoned group and is told why.
    assert!(out[0].2.contains("timed out after 200ms"), "{}", out[0].2);
}

#[test]
fn a_rank_that_left_is_named_at_once() {
    let start = Instant::now();
    let mut handles = LocalGroup::new(2);
    let g1 = handles.pop().unwrap();
    let g0 = handles.pop().unwrap();
    drop(g1);
    let (op, rank, reason) = collective_err(g0.barrier());
    assert_eq!((op.as_str(), rank), ("barrier", 0));
    assert!(reason.contains("rank 1 has left"), "{reason}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(g0.timeout(), torchscale_core::local_group::DEFAULT_TIMEOUT);
}

#[test]
fn a_rank_that_returns_an_error_before_the_exchange_does_not_hang_the_others() {
    // The expert-parallel case: one rank fails (say, a bad batch) between two collectives and
    // returns; its handle is dropped with its thread, so the others fail at once instead of
    // waiting out the (long) timeout.
    let start = Instant::now();
    let out = LocalGroup::run_with_timeout(3, Duration::from_secs(300), |g| {
        let t = Tensor::new(&[g.rank() as f32], &Device::Cpu)?;
        g.all_reduce_sum(&t)?;
        if g.rank() == 1 {
            return Err(Error::invalid("batch", "rank 1 failed before the exchange"));
        }
        g.all_to_all(&[t.clone(), t.clone(), t])
    });
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(out[1]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("rank 1 failed"));
    for (r, res) in out.into_iter().enumerate().filter(|(r, _)| *r != 1) {
        let (op, rank, reason) = collective_err(res);
        assert_eq!((op.as_str(), rank), ("all_to_all", r));
        assert!(reason.contains("rank 1 has left"), "{reason}");
    }
}

#[test]
fn works_as_a_trait_object() {
    let out = all_ok(LocalGroup::run(2, |g| {
        let c: &dyn Collective = g;
        c.all_gather(&Tensor::new(&[c.rank() as f32], &Device::Cpu)?)
    }));
    for t in &out {
        assert_eq!(flat(t), vec![0.0, 1.0]);
    }
}
