//! Every MpiCollective collective against a local reference, on 2 and 3 ranks.
//!
//! `cargo test -p torchscale-dist --features mpi` runs this binary without a launcher: it then
//! starts itself under `mpirun -np 2` and `-np 3` and fails unless every rank passes every check.
//! Under mpirun (OMPI_COMM_WORLD_SIZE set) it is one rank: each rank computes what the others
//! sent from (rank, seed), so the reference needs no communication. Values are multiples of 1/4
//! far from f32's precision limit, so sums are exact in any order and compared bitwise.

mod support;
use support as mpi_launch;
use support::checks::{data, expect, flat, reason, rows_between, sum_ref};

use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};
use torchscale_core::{Collective, Error, Result};
use torchscale_dist::MpiCollective;

fn main() -> ExitCode {
    if !torchscale_dist::launched_by_mpirun() {
        let mut ok = true;
        for np in [2, 3] {
            let out = mpi_launch::mpirun(np, &[], std::time::Duration::from_secs(120));
            let passed = (0..np)
                .filter(|r| out.text.contains(&format!("rank {r}: all checks passed")))
                .count();
            let good = out.success() && passed == np;
            println!(
                "mpirun -np {np}: {} ({passed}/{np} ranks passed, {:.1} s)",
                if good { "ok" } else { "FAILED" },
                out.elapsed.as_secs_f64()
            );
            if !good {
                println!("{}", out.text);
                ok = false;
            }
        }
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let comm = match MpiCollective::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("init failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rank = comm.rank();
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
        // The others may be waiting in a later check: end the job, with the reason.
        comm.abort(&format!("{failures} checks failed"));
    }
    println!("rank {rank}: all checks passed");
    ExitCode::SUCCESS
}

type Check = fn(&MpiCollective) -> Result<()>;

const CHECKS: &[(&str, Check)] = &[
    ("rank and size", rank_and_size),
    ("all_reduce_sum f32/f64/i64/u32", all_reduce_native),
    ("all_reduce_sum bf16/f16 in f32", all_reduce_half),
    ("all_gather", all_gather),
    ("reduce_scatter_sum", reduce_scatter),
    ("all_to_all uneven with empty chunks", all_to_all_uneven),
    ("broadcast from every root", broadcast),
    ("barrier and a long sequence", sequence),
    ("mismatched shapes fail on every rank", mismatched_shapes),
    ("an invalid call fails on every rank", invalid_call),
];

fn tensor(rank: usize, seed: usize, dims: &[usize]) -> Result<Tensor> {
    let n = dims.iter().product();
    Ok(Tensor::from_vec(data(rank, seed, n), dims, &Device::Cpu)?)
}

fn rank_and_size(c: &MpiCollective) -> Result<()> {
    let env = |v: &str| std::env::var(v).ok().and_then(|s| s.parse::<usize>().ok());
    expect("rank", Some(c.rank()), env("OMPI_COMM_WORLD_RANK"))?;
    expect("size", Some(c.world_size()), env("OMPI_COMM_WORLD_SIZE"))?;
    expect("backend", c.backend(), "mpi")
}

fn all_reduce_native(c: &MpiCollective) -> Result<()> {
    let (r, w) = (c.rank(), c.world_size());
    let t = tensor(r, 1, &[3, 5])?;
    let s = c.all_reduce_sum(&t)?;
    expect("f32 shape", s.dims().to_vec(), vec![3, 5])?;
    expect("f32 sum", flat(&s)?, sum_ref(w, 1, 15))?;
    let s = c.all_reduce_sum(&t.to_dtype(DType::F64)?)?;
    expect("f64 dtype", s.dtype(), DType::F64)?;
    expect("f64 sum", flat(&s)?, sum_ref(w, 1, 15))?;
    let big = Tensor::new(&[r as i64 + 1, 1 << 40], &Device::Cpu)?;
    let want = vec![(w * (w + 1) / 2) as i64, (w as i64) << 40];
    expect("i64 sum", c.all_reduce_sum(&big)?.to_vec1::<i64>()?, want)?;
    let counts = Tensor::new(&[r as u32 * 3, 7], &Device::Cpu)?;
    let want = vec![3 * (w * (w - 1) / 2) as u32, 7 * w as u32];
    expect(
        "u32 sum",
        c.all_reduce_sum(&counts)?.to_vec1::<u32>()?,
        want,
    )?;
    // A scalar (a loss, a token count) is reduced too.
    let s = c.all_reduce_sum(&Tensor::new(2.5f32, &Device::Cpu)?)?;
    expect("scalar", s.to_scalar::<f32>()?, 2.5 * w as f32)
}

fn all_reduce_half(c: &MpiCollective) -> Result<()> {
    let w = c.world_size();
    for dtype in [DType::BF16, DType::F16] {
        let t = tensor(c.rank(), 2, &[2, 4])?.to_dtype(dtype)?;
        let s = c.all_reduce_sum(&t)?;
        expect("dtype", s.dtype(), dtype)?;
        // Quarter multiples below 16 are exact in bf16 and f16, and so are their sums here.
        expect(&format!("{dtype:?} sum"), flat(&s)?, sum_ref(w, 2, 8))?;
    }
    Ok(())
}

fn all_gather(c: &MpiCollective) -> Result<()> {
    let w = c.world_size();
    let g = c.all_gather(&tensor(c.rank(), 3, &[2, 3])?)?;
    expect("shape", g.dims().to_vec(), vec![2 * w, 3])?;
    let want: Vec<f32> = (0..w).flat_map(|r| data(r, 3, 6)).collect();
    expect("f32 gather", flat(&g)?, want.clone())?;
    // 16-bit floats travel as bit patterns: exact.
    let g = c.all_gather(&tensor(c.rank(), 3, &[2, 3])?.to_dtype(DType::BF16)?)?;
    expect("bf16 gather", flat(&g)?, want)?;
    let g = c.all_gather(&Tensor::new(&[c.rank() as u8], &Device::Cpu)?)?;
    expect("u8 gather", g.to_vec1::<u8>()?, (0..w as u8).collect())
}

fn reduce_scatter(c: &MpiCollective) -> Result<()> {
    let (r, w) = (c.rank(), c.world_size());
    let t = tensor(r, 4, &[2 * w, 3])?;
    let s = c.reduce_scatter_sum(&t)?;
    expect("shape", s.dims().to_vec(), vec![2, 3])?;
    expect(
        "block",
        flat(&s)?,
        sum_ref(w, 4, 6 * w)[r * 6..(r + 1) * 6].to_vec(),
    )?;
    let s = c.reduce_scatter_sum(&t.to_dtype(DType::BF16)?)?;
    expect("bf16 dtype", s.dtype(), DType::BF16)?;
    expect(
        "bf16 block",
        flat(&s)?,
        sum_ref(w, 4, 6 * w)[r * 6..(r + 1) * 6].to_vec(),
    )
}

fn all_to_all_uneven(c: &MpiCollective) -> Result<()> {
    let (me, w) = (c.rank(), c.world_size());
    let chunks = (0..w)
        .map(|to| tensor(me * 10 + to, 5, &[rows_between(me, to), 2, 2]))
        .collect::<Result<Vec<_>>>()?;
    let got = c.all_to_all(&chunks)?;
    expect("chunks", got.len(), w)?;
    let mut empty = 0;
    for (from, t) in got.iter().enumerate() {
        let rows = rows_between(from, me);
        empty += usize::from(rows == 0);
        expect("chunk shape", t.dims().to_vec(), vec![rows, 2, 2])?;
        expect("chunk data", flat(t)?, data(from * 10 + me, 5, rows * 4))?;
    }
    // Across ranks some chunk is empty (rank 0 sends 0 rows to itself).
    let empties = c.all_reduce_sum(&Tensor::new(&[empty as u32], &Device::Cpu)?)?;
    if empties.to_vec1::<u32>()?[0] == 0 {
        return Err(Error::invalid(
            "rows_between",
            "no empty chunk was exercised",
        ));
    }
    // Integers move too, and a rank may send nothing at all.
    let chunks = (0..w)
        .map(|to| {
            let n = if me == 0 { 0 } else { to + 1 };
            Tensor::from_vec(vec![(me * 100 + to) as i64; n], n, &Device::Cpu)
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
    Ok(())
}

fn broadcast(c: &MpiCollective) -> Result<()> {
    for root in 0..c.world_size() {
        let b = c.broadcast(&tensor(c.rank(), 6, &[2, 2])?, root)?;
        expect(&format!("from root {root}"), flat(&b)?, data(root, 6, 4))?;
    }
    Ok(())
}

fn sequence(c: &MpiCollective) -> Result<()> {
    let w = c.world_size() as f32;
    let mut acc = 0.0;
    for step in 0..100 {
        c.barrier()?;
        let t = Tensor::new(&[(c.rank() * 1000 + step) as f32], &Device::Cpu)?;
        acc += c.all_reduce_sum(&t)?.to_vec1::<f32>()?[0];
    }
    // Step s sums to 1000 * (0 + 1 + ... + (w-1)) + w * s.
    let ranks = w * (w - 1.0) / 2.0;
    expect("sum over steps", acc, 100.0 * 1000.0 * ranks + w * 4950.0)
}

fn mismatched_shapes(c: &MpiCollective) -> Result<()> {
    let rows = if c.rank() == 1 { 4 } else { 2 };
    let r = reason(c.all_reduce_sum(&tensor(c.rank(), 0, &[rows, 3])?))?;
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
    let r = reason(c.all_gather(&tensor(c.rank(), 0, &[2])?.to_dtype(dt)?))?;
    expect(
        "reason",
        r.as_str(),
        "rank 1 has dtype F64 where rank 0 has F32",
    )?;
    // The communicator is still usable afterwards.
    let s = c.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu)?)?;
    expect("after", s.to_vec1::<f32>()?, vec![c.world_size() as f32])
}

fn invalid_call(c: &MpiCollective) -> Result<()> {
    // Rank 0 passes one chunk too few; it gets its own precise error, the others learn of it.
    let n = if c.rank() == 0 {
        c.world_size() - 1
    } else {
        c.world_size()
    };
    let chunks = vec![tensor(0, 0, &[1, 2])?; n];
    match c.all_to_all(&chunks) {
        Err(Error::Collective { reason, .. }) if c.rank() == 0 => {
            let want = format!(
                "{n} chunks for a world of {} ranks (one per rank)",
                c.world_size()
            );
            expect("own reason", reason, want)?;
        }
        Err(Error::Collective { reason, .. }) => {
            expect(
                "reason",
                reason.as_str(),
                "rank 0 could not take part: it passed not one chunk per rank",
            )?;
        }
        other => {
            return Err(Error::invalid(
                "all_to_all",
                format!("expected an error, got {other:?}"),
            ))
        }
    }
    let r = reason(c.broadcast(&tensor(0, 0, &[1])?, c.world_size()))?;
    expect(
        "root",
        r,
        format!("root {0} >= world size {0}", c.world_size()),
    )?;
    let s = c.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu)?)?;
    expect("after", s.to_vec1::<f32>()?, vec![c.world_size() as f32])
}
