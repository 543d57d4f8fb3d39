//! Collective bandwidth over message sizes: `MpiCollective` (our `Collective` layer: header
//! check, tensor copies) against the raw rsmpi call on the same buffer sizes.
//!
//! ```text
//! cargo build --release -p torchscale-dist --features mpi --example collective_bench
//! mpirun -np 2 --oversubscribe --allow-run-as-root -x RAYON_NUM_THREADS=1 -x CANDLE_NUM_THREADS=1 \
//!     target/release/examples/collective_bench --json /tmp/collectives.json
//! ```
//!
//! Sizes follow NCCL-tests: `bytes` is the whole per-rank buffer — the tensor that is all-reduced,
//! the gathered output of an all-gather, the input of a reduce-scatter, everything a rank sends
//! in an all-to-all (bytes/n to each rank, itself included). Elements are f32. Per size and path
//! the time of one iteration is the slowest rank's (each iteration starts after a barrier), and
//! the table gives the median over `--iters`. Algorithm bandwidth is bytes / time; bus bandwidth
//! multiplies it by 2(n-1)/n for all-reduce and (n-1)/n for the others, which makes the figures
//! comparable with the link's speed.
//!
//! The raw all-to-all is MPI's even `MPI_Alltoall`; ours also exchanges the row counts first,
//! because `Collective::all_to_all` takes uneven chunks (MoE routing).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Parser, ValueEnum};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use serde::Serialize;
use torchscale_core::Collective;
use torchscale_dist::header::HEADER_WORDS;
use torchscale_dist::MpiCollective;

// The allocator train_lm runs on: our layer's fresh buffers reuse freed pages instead of
// faulting them in on every call, as they would in a training step.
#[global_allocator]
static ALLOC: torchscale_kernels::alloc::Allocator = torchscale_kernels::alloc::Allocator {};

/// Bandwidth of MpiCollective's collectives (and the raw MPI calls) over message sizes; run under
/// mpirun with 2 or more ranks.
#[derive(Parser, Debug)]
#[command(name = "collective_bench")]
struct Args {
    /// Message sizes in bytes (suffixes K/KiB, M/MiB, G/GiB; comma-separated); replaces
    /// --min/--max.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Smallest size when --sizes is not given.
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    min: usize,
    /// Largest size when --sizes is not given.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    max: usize,
    /// Ratio between consecutive sizes from --min to --max.
    #[arg(long, default_value_t = 4)]
    factor: usize,
    /// Timed iterations per size and path.
    #[arg(long, default_value_t = 30)]
    iters: usize,
    /// Untimed iterations first (the first one also checks the results).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Collectives to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "all_reduce,all_to_all,all_gather,reduce_scatter"
    )]
    ops: Vec<BenchOp>,
    /// Measure only our layer, not the raw MPI call.
    #[arg(long)]
    no_raw: bool,
    /// Also write the results as JSON to this file (rank 0).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// A measured collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
enum BenchOp {
    AllReduce,
    AllToAll,
    AllGather,
    ReduceScatter,
}

impl BenchOp {
    fn name(self) -> &'static str {
        match self {
            BenchOp::AllReduce => "all_reduce",
            BenchOp::AllToAll => "all_to_all",
            BenchOp::AllGather => "all_gather",
            BenchOp::ReduceScatter => "reduce_scatter",
        }
    }

    /// NCCL-tests' factor from algorithm to bus bandwidth on `n` ranks.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            BenchOp::AllReduce => 2.0 * (n - 1.0) / n,
            _ => (n - 1.0) / n,
        }
    }
}

/// `4096`, `4K`, `4KiB`, `64M`, `1G` (binary multiples) as bytes.
fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a number of bytes, e.g. 4096, 4KiB, 64M"))?;
    let mult: usize = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (K, M, G)")),
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("`{s}`: size must be positive and fit in usize"))
}

/// The sizes to measure: --sizes, or --min times powers of --factor up to --max.
fn sizes(args: &Args) -> Result<Vec<usize>> {
    if !args.sizes.is_empty() {
        return Ok(args.sizes.clone());
    }
    if args.factor < 2 {
        bail!("--factor must be at least 2, got {}", args.factor);
    }
    if args.min > args.max {
        bail!("--min {} is larger than --max {}", args.min, args.max);
    }
    let mut out = vec![];
    let mut s = args.min;
    while s <= args.max {
        out.push(s);
        match s.checked_mul(args.factor) {
            Some(next) => s = next,
            None => break,
        }
    }
    Ok(out)
}

/// Elements (f32) of the per-rank buffer: rounded down so that n ranks split it evenly.
fn elems(bytes: usize, world: usize) -> usize {
    bytes / 4 / world * world
}

/// `x` bytes in KiB/MiB/GiB for the table.
fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// One measured (op, size, path).
#[derive(Serialize, Debug, Clone)]
struct Row {
    op: BenchOp,
    /// "torchscale" (MpiCollective through the Collective trait) or "raw" (rsmpi on the buffers).
    path: &'static str,
    bytes: usize,
    median_us: f64,
    /// Our layer's local work alone (copies, fresh buffer), median; only on "torchscale" rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    local_us: Option<f64>,
    min_us: f64,
    algbw_gbs: f64,
    busbw_gbs: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    world: usize,
    mpi_library: String,
    iters: usize,
    warmup: usize,
    /// The header all-gather alone, median µs.
    header_us: f64,
    rows: &'a [Row],
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Fails unless every value of `got` equals `want(index)`.
fn check(what: &str, got: &[f32], want: impl Fn(usize) -> f32) -> Result<()> {
    if let Some((i, &g)) = got.iter().enumerate().find(|&(i, &g)| g != want(i)) {
        bail!("{what}: element {i} is {g}, expected {}", want(i));
    }
    Ok(())
}

/// One op at one size: the buffers of both paths, filled with `rank + 1` so results are checkable.
struct Case<'a> {
    op: BenchOp,
    coll: &'a MpiCollective,
    world_comm: &'a SimpleCommunicator,
    n: usize,
    rank: usize,
    /// Elements of the whole per-rank buffer.
    len: usize,
    tensor: Tensor,
    chunks: Vec<Tensor>,
    send: Vec<f32>,
    recv: Vec<f32>,
}

impl<'a> Case<'a> {
    fn new(
        op: BenchOp,
        coll: &'a MpiCollective,
        world_comm: &'a SimpleCommunicator,
        len: usize,
    ) -> Result<Self> {
        let (n, rank) = (coll.world_size(), coll.rank());
        let v = (rank + 1) as f32;
        let part = len / n;
        let (in_len, out_len) = match op {
            BenchOp::AllReduce | BenchOp::AllToAll => (len, len),
            BenchOp::AllGather => (part, len),
            BenchOp::ReduceScatter => (len, part),
        };
        let tensor = Tensor::full(v, in_len, &Device::Cpu)?;
        let chunks = if op == BenchOp::AllToAll {
            (0..n)
                .map(|j| tensor.narrow(0, j * part, part))
                .collect::<candle_core::Result<_>>()?
        } else {
            vec![]
        };
        Ok(Case {
            op,
            coll,
            world_comm,
            n,
            rank,
            len,
            tensor,
            chunks,
            send: vec![v; in_len],
            recv: vec![0.0; out_len],
        })
    }

    /// Our layer; checks the result when `verify`.
    fn ours(&self, verify: bool) -> Result<()> {
        let (n, part) = (self.n, self.len / self.n);
        let total = (n * (n + 1) / 2) as f32;
        let what = format!("{} {} (torchscale)", self.op.name(), self.len * 4);
        match self.op {
            BenchOp::AllReduce => {
                let out = self.coll.all_reduce_sum(&self.tensor)?;
                if verify {
                    check(&what, &out.to_vec1::<f32>()?, |_| total)?;
                }
            }
            BenchOp::AllGather => {
                let out = self.coll.all_gather(&self.tensor)?;
                if verify {
                    check(&what, &out.to_vec1::<f32>()?, |i| (i / part + 1) as f32)?;
                }
            }
            BenchOp::ReduceScatter => {
                let out = self.coll.reduce_scatter_sum(&self.tensor)?;
                if verify {
                    check(&what, &out.to_vec1::<f32>()?, |_| total)?;
                }
            }
            BenchOp::AllToAll => {
                let out = self.coll.all_to_all(&self.chunks)?;
                if verify {
                    let flat = Tensor::cat(&out, 0)?.to_vec1::<f32>()?;
                    check(&what, &flat, |i| (i / part + 1) as f32)?;
                }
            }
        }
        Ok(())
    }

    /// The local work our layer adds around the MPI call, timed alone (no communication): the
    /// input tensor copied to a buffer (the chunks concatenated first, for all-to-all), a fresh
    /// output buffer written once (the page faults the MPI call pays there), a tensor made of it.
    fn local(&self) -> Result<()> {
        let input = match self.op {
            BenchOp::AllToAll => Tensor::cat(&self.chunks, 0)?,
            _ => self.tensor.clone(),
        };
        let send = input.to_vec1::<f32>()?;
        let mut out = vec![0f32; self.recv.len()];
        out.fill(1.0);
        std::hint::black_box((&send, &mut out));
        let t = Tensor::from_vec(out, self.recv.len(), &Device::Cpu)?;
        std::hint::black_box(t);
        Ok(())
    }

    /// The rsmpi call on preallocated buffers; checks the result when `verify`.
    fn raw(&mut self, verify: bool) -> Result<()> {
        let (n, part) = (self.n, self.len / self.n);
        let total = (n * (n + 1) / 2) as f32;
        let c = self.world_comm;
        let sum = SystemOperation::sum();
        match self.op {
            BenchOp::AllReduce => c.all_reduce_into(&self.send[..], &mut self.recv[..], sum),
            BenchOp::AllGather => c.all_gather_into(&self.send[..], &mut self.recv[..]),
            BenchOp::ReduceScatter => {
                c.reduce_scatter_block_into(&self.send[..], &mut self.recv[..], sum)
            }
            BenchOp::AllToAll => c.all_to_all_into(&self.send[..], &mut self.recv[..]),
        }
        if verify {
            let what = format!(
                "{} {} (raw, rank {})",
                self.op.name(),
                self.len * 4,
                self.rank
            );
            match self.op {
                BenchOp::AllReduce | BenchOp::ReduceScatter => check(&what, &self.recv, |_| total)?,
                BenchOp::AllGather | BenchOp::AllToAll => {
                    check(&what, &self.recv, |i| (i / part + 1) as f32)?
                }
            }
        }
        Ok(())
    }
}

/// Per-iteration times (seconds) of the slowest rank: our layer, the raw call and our layer's
/// local work alone, interleaved so that all three see the same machine load.
fn measure(case: &mut Case, args: &Args) -> Result<[Vec<f64>; 3]> {
    let (mut ours, mut raw, mut local) = (vec![], vec![], vec![]);
    for it in 0..args.warmup + args.iters {
        let verify = it == 0;
        if !args.no_raw {
            case.world_comm.barrier();
            let t0 = Instant::now();
            case.raw(verify)?;
            raw.push(t0.elapsed().as_secs_f64());
        }
        case.world_comm.barrier();
        let t0 = Instant::now();
        case.ours(verify)?;
        ours.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        case.local()?;
        local.push(t0.elapsed().as_secs_f64());
    }
    let slowest = |v: Vec<f64>| -> Vec<f64> {
        let mut out = vec![0.0; v.len()];
        case.world_comm
            .all_reduce_into(&v[..], &mut out[..], SystemOperation::max());
        out.split_off(args.warmup.min(out.len()))
    };
    Ok([slowest(ours), slowest(raw), slowest(local)])
}

/// Median time (seconds, slowest rank) of the check before every call of our layer, alone: the
/// all-gather of one header of `HEADER_WORDS` u64 per rank.
fn header_time(world_comm: &SimpleCommunicator, n: usize, args: &Args) -> f64 {
    let header = [0u64; HEADER_WORDS];
    let mut all = vec![0u64; HEADER_WORDS * n];
    let mut times = vec![];
    for _ in 0..args.warmup + args.iters {
        world_comm.barrier();
        let t0 = Instant::now();
        world_comm.all_gather_into(&header[..], &mut all[..]);
        times.push(t0.elapsed().as_secs_f64());
    }
    let mut slowest = vec![0.0; times.len()];
    world_comm.all_reduce_into(&times[..], &mut slowest[..], SystemOperation::max());
    median(&mut slowest[args.warmup..])
}

fn row(op: BenchOp, path: &'static str, bytes: usize, n: usize, mut t: Vec<f64>) -> Row {
    let min = t.iter().copied().fold(f64::INFINITY, f64::min);
    let med = median(&mut t);
    let algbw = bytes as f64 / med / 1e9;
    Row {
        op,
        path,
        bytes,
        median_us: med * 1e6,
        local_us: None,
        min_us: min * 1e6,
        algbw_gbs: algbw,
        busbw_gbs: algbw * op.bus_factor(n),
    }
}

fn run(coll: &MpiCollective, args: &Args) -> Result<()> {
    let n = coll.world_size();
    if n < 2 {
        bail!("run under mpirun with 2 or more ranks (this is a world of {n})");
    }
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let world_comm = SimpleCommunicator::world();
    let header_us = header_time(&world_comm, n, args) * 1e6;
    let mut rows = vec![];
    for &op in &args.ops {
        for &bytes in &sizes(args)? {
            let len = elems(bytes, n);
            if len == 0 {
                bail!("{bytes} bytes is less than one f32 per rank");
            }
            let mut case = Case::new(op, coll, &world_comm, len)?;
            let [ours, raw, mut local] = measure(&mut case, args)?;
            let bytes = len * 4;
            if !raw.is_empty() {
                rows.push(row(op, "raw", bytes, n, raw));
            }
            let mut r = row(op, "torchscale", bytes, n, ours);
            r.local_us = Some(median(&mut local) * 1e6);
            rows.push(r);
        }
    }
    if coll.rank() == 0 {
        print_table(&rows, n, header_us, args);
        if let Some(path) = &args.json {
            let report = Report {
                world: n,
                mpi_library: MpiCollective::library_version()
                    .trim_end_matches(char::from(0))
                    .trim()
                    .to_string(),
                iters: args.iters,
                warmup: args.warmup,
                header_us,
                rows: &rows,
            };
            let text = serde_json::to_string_pretty(&report)?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

fn print_table(rows: &[Row], n: usize, header_us: f64, args: &Args) {
    println!(
        "{n} ranks, f32, median of {} iterations (slowest rank each), {} warm-up; \
         header all-gather alone: {header_us:.2} µs",
        args.iters, args.warmup
    );
    println!(
        "| op | size | raw µs | raw busbw GB/s | torchscale µs | torchscale busbw GB/s | torchscale / raw | local µs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for ours in rows.iter().filter(|r| r.path == "torchscale") {
        let raw = rows
            .iter()
            .find(|r| r.path == "raw" && r.op == ours.op && r.bytes == ours.bytes);
        let (raw_us, raw_bw, ratio) = match raw {
            Some(r) => (
                format!("{:.1}", r.median_us),
                format!("{:.2}", r.busbw_gbs),
                format!("{:.2}×", ours.median_us / r.median_us),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        println!(
            "| {} | {} | {raw_us} | {raw_bw} | {:.1} | {:.2} | {ratio} | {:.1} |",
            ours.op.name(),
            human(ours.bytes),
            ours.median_us,
            ours.busbw_gbs,
            ours.local_us.unwrap_or(f64::NAN),
        );
    }
}

fn main() -> Result<()> {
    torchscale_kernels::alloc::keep_freed_memory();
    let args = Args::parse();
    let coll = MpiCollective::init()?;
    if let Err(e) = run(&coll, &args) {
        // Ends every rank: a failing rank must not leave the others in a collective.
        coll.abort(&format!("collective_bench: {e:#}"));
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("4X").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn default_sweep_is_4kib_to_64mib_by_4() {
        let args = Args::parse_from(["collective_bench"]);
        let s = sizes(&args).unwrap();
        assert_eq!(s.len(), 8);
        assert_eq!(s[0], 4096);
        assert_eq!(s[7], 64 << 20);
        assert!(s.windows(2).all(|w| w[1] == 4 * w[0]));
        assert_eq!(args.ops.len(), 4);
        let given = Args::parse_from([
            "collective_bench",
            "--sizes",
            "1K,3M",
            "--ops",
            "all_gather",
        ]);
        assert_eq!(sizes(&given).unwrap(), vec![1024, 3 << 20]);
        assert_eq!(given.ops, vec![BenchOp::AllGather]);
    }

    #[test]
    fn bus_factors_follow_nccl_tests() {
        assert_eq!(BenchOp::AllReduce.bus_factor(2), 1.0);
        assert_eq!(BenchOp::AllReduce.bus_factor(4), 1.5);
        assert_eq!(BenchOp::AllGather.bus_factor(4), 0.75);
        assert_eq!(BenchOp::AllToAll.bus_factor(2), 0.5);
        assert_eq!(elems(4096, 3), 1023);
        let r = row(
            BenchOp::AllReduce,
            "raw",
            1 << 20,
            2,
            vec![3e-3, 1e-3, 2e-3],
        );
        assert!((r.median_us - 2000.0).abs() < 1e-9);
        assert!((r.min_us - 1000.0).abs() < 1e-9);
        assert!((r.algbw_gbs - (1 << 20) as f64 / 2e-3 / 1e9).abs() < 1e-12);
        assert_eq!(r.busbw_gbs, r.algbw_gbs);
    }
}
