//! Every NcclCollective collective against a local reference on CUDA tensors, one GPU per rank,
//! and a rank that aborts. Needs 2 or more GPUs: without them it FAILS (it is not run by CI, only
//! by the CUDA run script, `cargo xtask cuda run`, which skips it on a machine with one GPU).
//!
//! Without a launcher this binary is the driver: it counts the GPUs, starts itself under
//! `mpirun -np N` for N from 2 to min(GPUs, 4) and once more for the abort case, and fails
//! unless every rank passes every check. Under mpirun it is one rank, on GPU `local_rank()`.
//! Values are multiples of 1/4 far from the precision limits of every dtype used (bf16
//! included), so sums are exact in any order and compared bitwise.

mod support;
use support::checks::{data, expect, flat, reason, rows_between, sum_ref};

use std::process::ExitCode;
use std::time::Duration;

use candle_core::cuda::cudarc::driver::CudaContext;
use candle_core::{DType, Device, IndexOp, Tensor};
use torchscale_core::{Collective, Error, Result};
use torchscale_dist::NcclCollective;

/// Far above what NCCL's start and the checks take, far below a hang.
const LIMIT: Duration = Duration::from_secs(240);

fn main() -> ExitCode {
    if torchscale_dist::launched_by_mpirun() {
        let case = std::env::args().nth(1).unwrap_or_default();
        return rank_main(&case);
    }
    let gpus = match CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) => {
            println!(
                "FAILED: nccl_collectives needs 2 or more GPUs and finds no usable CUDA driver \
                 here ({e:?}); run it on a machine with 2+ GPUs (cargo xtask cuda run)"
            );
            return ExitCode::FAILURE;
        }
    };
    if gpus < 2 {
        println!(
            "FAILED: nccl_collectives needs 2 or more GPUs (NCCL takes one GPU per rank) and \
             this machine has {gpus}"
        );
        return ExitCode::FAILURE;
    }
    let mut ok = true;
    for np in 2..=gpus.min(4) {
        let out = support::mpirun(np, &["checks"], LIMIT);
        let passed = (0..np)
            .filter(|r| out.text.contains(&format!("rank {r}: all checks passed")))
            .count();
        let good = out.success() && passed == np;
        println!(
            "mpirun -np {np} (NCCL, {gpus} GPUs): {} ({passed}/{np} ranks passed, {:.1} s)",
            if good { "ok" } else { "FAILED" },
            out.elapsed.as_secs_f64()
        );
        if !good || np == 2 {
            // The NCCL version and devices line of each rank, and everything on failure.
            println!("{}", out.text);
        }
        ok &= good;
    }
    let needle = "rank 1 aborts the MPI job: loss is NaN at step 3";
    let out = support::mpirun(2, &["abort"], LIMIT);
    let problems: Vec<&str> = [
        (out.status.is_none(), "did not end in time"),
        (out.success(), "exited with status 0"),
        (!out.text.contains(needle), "output lacks the abort message"),
        (
            out.text.contains("rank 0: collective returned"),
            "rank 0's collective completed",
        ),
    ]
    .into_iter()
    .filter_map(|(bad, what)| bad.then_some(what))
    .collect();
    println!(
        "abort case: {} ({:.1} s)",
        if problems.is_empty() { "ok" } else { "FAILED" },
        out.elapsed.as_secs_f64()
    );
    if !problems.is_empty() {
        println!("  {}\n{}", problems.join("; "), out.text);
        ok = false;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn rank_main(case: &str) -> ExitCode {
    let comm = match NcclCollective::init_on_local_gpu() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("init failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rank = comm.rank();
    if case == "abort" {
        return abort_case(&comm);
    }
    println!(
        "rank {rank}: NCCL {:?} on {:?}",
        NcclCollective::library_version(),
        comm.device().location()
    );
    let mut failures = 0;
    for (name, check) in CHECKS {
        match check(&comm) {
            Ok(()) => println!("rank {rank}: ok {name}"),
            Err(e) => {
                println!("rank {rank}: FAILED {name}: {e}");
                failures += 1;
            }
        }
    }
    if failures > 0 {
        comm.abort(&format!("{failures} checks failed"));
    }
    println!("rank {rank}: all checks passed");
    ExitCode::SUCCESS
}

fn abort_case(comm: &NcclCollective) -> ExitCode {
    if comm.rank() == 1 {
        // Let rank 0 wait inside its collective first.
        std::thread::sleep(Duration::from_millis(500));
        comm.abort("loss is NaN at step 3");
    }
    let r = Tensor::new(&[1f32], comm.device())
        .map_err(Error::from)
        .and_then(|t| comm.all_reduce_sum(&t))
        .and_then(|s| Ok(s.to_vec1::<f32>()?));
    println!("rank 0: collective returned {r:?}");
    ExitCode::SUCCESS
}

type Check = fn(&NcclCollective) -> Result<()>;

const CHECKS: &[(&str, Check)] = &[
    ("rank and size", rank_and_size),
    ("all_reduce_sum u8/u32/i64/f32/f64/bf16/f16", all_reduce),
    (
        "all_reduce_sum of views (offset, transposed)",
        all_reduce_views,
    ),
    ("all_gather", all_gather),
    ("reduce_scatter_sum", reduce_scatter),
    ("all_to_all uneven with empty chunks", all_to_all_uneven),
    ("broadcast from every root", broadcast),
    ("barrier and a long sequence", sequence),
    ("mismatched shapes fail on every rank", mismatched_shapes),
    ("a CPU tensor fails on every rank", cpu_tensor),
    ("an invalid call fails on every rank", invalid_call),
];

fn tensor(c: &NcclCollective, rank: usize, seed: usize, dims: &[usize]) -> Result<Tensor> {
    let n = dims.iter().product();
    Ok(Tensor::from_vec(data(rank, seed, n), dims, c.device())?)
}

fn rank_and_size(c: &NcclCollective) -> Result<()> {
    let env = |v: &str| std::env::var(v).ok().and_then(|s| s.parse::<usize>().ok());
    expect("rank", Some(c.rank()), env("OMPI_COMM_WORLD_RANK"))?;
    expect("size", Some(c.world_size()), env("OMPI_COMM_WORLD_SIZE"))?;
    expect("backend", c.backend(), "nccl")?;
    expect("device is CUDA", c.device().is_cuda(), true)
}

fn all_reduce(c: &NcclCollective) -> Result<()> {
    let (r, w) = (c.rank(), c.world_size());
    let t = tensor(c, r, 1, &[3, 5])?;
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        let s = c.all_reduce_sum(&t.to_dtype(dtype)?)?;
        expect("dtype", s.dtype(), dtype)?;
        expect("device", s.device().is_cuda(), true)?;
        expect("shape", s.dims().to_vec(), vec![3, 5])?;
        expect(&format!("{dtype:?} sum"), flat(&s)?, sum_ref(w, 1, 15))?;
    }
    let big = Tensor::new(&[r as i64 + 1, 1 << 40], c.device())?;
    let want = vec![(w * (w + 1) / 2) as i64, (w as i64) << 40];
    expect("i64 sum", c.all_reduce_sum(&big)?.to_vec1::<i64>()?, want)?;
    let counts = Tensor::new(&[r as u32 * 3, 7], c.device())?;
    let want = vec![3 * (w * (w - 1) / 2) as u32, 7 * w as u32];
    expect(
        "u32 sum",
        c.all_reduce_sum(&counts)?.to_vec1::<u32>()?,
        want,
    )?;
    let bytes = Tensor::new(&[r as u8, 1], c.device())?;
    let want = vec![(w * (w - 1) / 2) as u8, w as u8];
    expect("u8 sum", c.all_reduce_sum(&bytes)?.to_vec1::<u8>()?, want)?;
    let s = c.all_reduce_sum(&Tensor::new(2.5f32, c.device())?)?;
    expect("scalar", s.to_scalar::<f32>()?, 2.5 * w as f32)
}

fn all_reduce_views(c: &NcclCollective) -> Result<()> {
    let w = c.world_size();
    // Rows 1..3 of a [4, 6] tensor: a view that starts at an offset into its storage.
    let base = tensor(c, c.rank(), 7, &[4, 6])?;
    let s = c.all_reduce_sum(&base.i(1..3)?)?;
    expect("offset view", flat(&s)?, sum_ref(w, 7, 24)[6..18].to_vec())?;
    // A transposed (non-contiguous) view is reduced in its logical order.
    let s = c.all_reduce_sum(&base.t()?)?;
    let want = Tensor::from_vec(sum_ref(w, 7, 24), (4, 6), &Device::Cpu)?.t()?;
    expect("shape", s.dims().to_vec(), vec![6, 4])?;
    expect("transposed view", flat(&s)?, flat(&want)?)
}

fn all_gather(c: &NcclCollective) -> Result<()> {
    let w = c.world_size();
    let g = c.all_gather(&tensor(c, c.rank(), 3, &[2, 3])?)?;
    expect("shape", g.dims().to_vec(), vec![2 * w, 3])?;
    let want: Vec<f32> = (0..w).flat_map(|r| data(r, 3, 6)).collect();
    expect("f32 gather", flat(&g)?, want.clone())?;
    let g = c.all_gather(&tensor(c, c.rank(), 3, &[2, 3])?.to_dtype(DType::BF16)?)?;
    expect("bf16 dtype", g.dtype(), DType::BF16)?;
    expect("bf16 gather", flat(&g)?, want)?;
    let g = c.all_gather(&Tensor::new(&[c.rank() as u8], c.device())?)?;
    expect("u8 gather", g.to_vec1::<u8>()?, (0..w as u8).collect())
}

fn reduce_scatter(c: &NcclCollective) -> Result<()> {
    let (r, w) = (c.rank(), c.world_size());
    let t = tensor(c, r, 4, &[2 * w, 3])?;
    let want = sum_ref(w, 4, 6 * w)[r * 6..(r + 1) * 6].to_vec();
    for dtype in [DType::F32, DType::BF16] {
        let s = c.reduce_scatter_sum(&t.to_dtype(dtype)?)?;
        expect("dtype", s.dtype(), dtype)?;
        expect("shape", s.dims().to_vec(), vec![2, 3])?;
        expect(&format!("{dtype:?} block"), flat(&s)?, want.clone())?;
    }
    Ok(())
}

fn all_to_all_uneven(c: &NcclCollective) -> Result<()> {
    let (me, w) = (c.rank(), c.world_size());
    let chunks = (0..w)
        .map(|to| tensor(c, me * 10 + to, 5, &[rows_between(me, to), 2, 2]))
        .collect::<Result<Vec<_>>>()?;
    let got = c.all_to_all(&chunks)?;
    expect("chunks", got.len(), w)?;
    for (from, t) in got.iter().enumerate() {
        let rows = rows_between(from, me);
        expect("chunk shape", t.dims().to_vec(), vec![rows, 2, 2])?;
        expect("chunk data", flat(t)?, data(from * 10 + me, 5, rows * 4))?;
    }
    // Integers move too; rank 0 sends nothing at all and still receives.
    let chunks = (0..w)
        .map(|to| {
            let n = if me == 0 { 0 } else { to + 1 };
            Tensor::from_vec(vec![(me * 100 + to) as i64; n], n, c.device())
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let got = c.all_to_all(&chunks)?;
    for (from, t) in got.iter().enumerate() {
        let n = if from == 0 { 0 } else { me + 1 };
        expect(
            "i64 chunk",
            t.to_vec1::<i64>()?,
            vec![(from * 100 + me) as i64; n],
        )?;
    }
    // bf16, and a rank (the last) that receives nothing while it sends.
    let last = w - 1;
    let chunks = (0..w)
        .map(|to| {
            let rows = if to == last { 0 } else { 2 };
            Ok(tensor(c, me + to, 8, &[rows, 3])?.to_dtype(DType::BF16)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let got = c.all_to_all(&chunks)?;
    for (from, t) in got.iter().enumerate() {
        let rows = if me == last { 0 } else { 2 };
        expect("bf16 chunk shape", t.dims().to_vec(), vec![rows, 3])?;
        expect("bf16 chunk", flat(t)?, data(from + me, 8, rows * 3))?;
    }
    Ok(())
}

fn broadcast(c: &NcclCollective) -> Result<()> {
    for root in 0..c.world_size() {
        let b = c.broadcast(&tensor(c, c.rank(), 6, &[2, 2])?, root)?;
        expect(&format!("from root {root}"), flat(&b)?, data(root, 6, 4))?;
    }
    Ok(())
}

fn sequence(c: &NcclCollective) -> Result<()> {
    let w = c.world_size() as f32;
    let mut acc = 0.0;
    for step in 0..100 {
        c.barrier()?;
        let t = Tensor::new(&[(c.rank() * 1000 + step) as f32], c.device())?;
        acc += c.all_reduce_sum(&t)?.to_vec1::<f32>()?[0];
    }
    let ranks = w * (w - 1.0) / 2.0;
    expect("sum over steps", acc, 100.0 * 1000.0 * ranks + w * 4950.0)
}

fn mismatched_shapes(c: &NcclCollective) -> Result<()> {
    let rows = if c.rank() == 1 { 4 } else { 2 };
    let r = reason(c.all_reduce_sum(&tensor(c, c.rank(), 0, &[rows, 3])?))?;
    expect(
        "reason",
        r.as_str(),
        "rank 1 has shape [4, 3] where rank 0 has [2, 3]",
    )?;
    let dt = if c.rank() == 1 {
        DType::F64
    } else {
        DType::F32
    };
    let r = reason(c.all_gather(&tensor(c, c.rank(), 0, &[2])?.to_dtype(dt)?))?;
    expect(
        "reason",
        r.as_str(),
        "rank 1 has dtype F64 where rank 0 has F32",
    )?;
    let s = c.all_reduce_sum(&Tensor::new(&[1f32], c.device())?)?;
    expect("after", s.to_vec1::<f32>()?, vec![c.world_size() as f32])
}

fn cpu_tensor(c: &NcclCollective) -> Result<()> {
    // Rank 0 passes a CPU tensor: its own error names the device, the others learn of it.
    let dev = if c.rank() == 0 {
        Device::Cpu
    } else {
        c.device().clone()
    };
    let t = Tensor::new(&[1f32, 2.0], &dev)?;
    let r = reason(c.all_reduce_sum(&t))?;
    if c.rank() == 0 {
        if !r.contains("NcclCollective takes CUDA tensors") {
            return Err(Error::invalid("own reason", r));
        }
    } else {
        expect(
            "reason",
            r.as_str(),
            "rank 0 could not take part: it passed a tensor on a device this backend does not take",
        )?;
    }
    let s = c.all_reduce_sum(&Tensor::new(&[1f32], c.device())?)?;
    expect("after", s.to_vec1::<f32>()?, vec![c.world_size() as f32])
}

fn invalid_call(c: &NcclCollective) -> Result<()> {
    let w = c.world_size();
    let n = if c.rank() == 0 { w - 1 } else { w };
    let chunks = vec![tensor(c, 0, 0, &[1, 2])?; n];
    let r = reason(c.all_to_all(&chunks))?;
    let want = if c.rank() == 0 {
        format!("{n} chunks for a world of {w} ranks (one per rank)")
    } else {
        "rank 0 could not take part: it passed not one chunk per rank".to_string()
    };
    expect("reason", r, want)?;
    let r = reason(c.broadcast(&tensor(c, 0, 0, &[1])?, w))?;
    expect("root", r, format!("root {w} >= world size {w}"))?;
    let r = reason(c.reduce_scatter_sum(&tensor(c, 0, 0, &[w + 1, 2])?))?;
    expect(
        "rows",
        r,
        format!(
            "shape [{}, 2]: dimension 0 must be a multiple of the world size {w}",
            w + 1
        ),
    )?;
    let s = c.all_reduce_sum(&Tensor::new(&[1f32], c.device())?)?;
    expect("after", s.to_vec1::<f32>()?, vec![w as f32])
}
