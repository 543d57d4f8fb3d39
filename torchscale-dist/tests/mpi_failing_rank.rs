//! A failing rank ends the whole MPI job quickly, with a non-zero status and a message naming it.
//!
//! Without a launcher (a normal `cargo test -p torchscale-dist --features mpi`) this binary is
//! the driver: it starts itself under `mpirun -np 2` once per case and checks mpirun's exit
//! status, the time it took and its stderr. Under mpirun it is one rank of the case named by its
//! first argument: rank 1 calls `abort` (or panics, on another thread) while rank 0 waits inside
//! a collective that, without the abort, would never complete.

mod support;

use std::process::ExitCode;
use std::time::Duration;

use candle_core::{Device, Tensor};
use torchscale_core::Collective;
use torchscale_dist::MpiCollective;

/// Far above what an abort takes (about a second), far below a hang.
const LIMIT: Duration = Duration::from_secs(60);

const CASES: &[(&str, &str)] = &[
    ("abort", "rank 1 aborts the MPI job: loss is NaN at step 3"),
    ("panic", "rank 1 aborts the MPI job: panicked"),
];

fn main() -> ExitCode {
    if torchscale_dist::launched_by_mpirun() {
        let case = std::env::args().nth(1).unwrap_or_default();
        return rank_main(&case);
    }
    let mut ok = true;
    for (case, needle) in CASES {
        let out = support::mpirun(2, &[case], LIMIT);
        let problems: Vec<String> = [
            (
                out.status.is_none(),
                format!("did not end within {LIMIT:?}"),
            ),
            (out.success(), "exited with status 0".to_string()),
            (
                !out.text.contains(needle),
                format!("output lacks {needle:?}"),
            ),
            (
                out.text.contains("rank 0: collective returned"),
                "rank 0's collective completed".to_string(),
            ),
        ]
        .into_iter()
        .filter_map(|(bad, what)| bad.then_some(what))
        .collect();
        println!(
            "case {case}: {} (status {:?}, {:.1} s)",
            if problems.is_empty() { "ok" } else { "FAILED" },
            out.status.and_then(|s| s.code()),
            out.elapsed.as_secs_f64()
        );
        if !problems.is_empty() {
            println!("  {}\n{}", problems.join("; "), out.text);
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn rank_main(case: &str) -> ExitCode {
    let comm = match MpiCollective::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("init failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = comm.barrier() {
        eprintln!("barrier failed: {e}");
        return ExitCode::FAILURE;
    }
    if comm.rank() == 1 {
        // Let rank 0 block inside its all-reduce first.
        std::thread::sleep(Duration::from_millis(300));
        match case {
            "abort" => comm.abort("loss is NaN at step 3"),
            "panic" => {
                // On another thread: the hook must end the job even though main goes on.
                let _ = std::thread::spawn(|| panic!("a data loader thread failed")).join();
                std::thread::sleep(Duration::from_secs(3600));
            }
            other => eprintln!("unknown case {other:?}"),
        }
        return ExitCode::FAILURE;
    }
    let t = Tensor::new(&[1f32], &Device::Cpu).expect("a one-element tensor");
    let r = comm.all_reduce_sum(&t);
    println!("rank 0: collective returned {r:?}");
    ExitCode::SUCCESS
}
