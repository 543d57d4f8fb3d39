//! `cargo xtask <command>`: the workflows of torchscale-rs (`cargo xtask --help` lists them).

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};
use xtask::bench::{BenchCmd, MoeArgs, TrainArgs};
use xtask::cuda::CudaCmd;
use xtask::deepnet::DeepnetArgs;
use xtask::export_check::{ExportCheckArgs, Options, RefSetupArgs};
use xtask::fuzz::FuzzArgs;
use xtask::parity::ParityArgs;
use xtask::scaling::ScalingArgs;
use xtask::sparseclip::SparseclipArgs;
use xtask::stability::StabilityArgs;

#[global_allocator]
static ALLOC: torchscale_kernels::alloc::Allocator = torchscale_kernels::alloc::Allocator {};

/// Workflows of torchscale-rs: parity with PyTorch torchscale, export checks, the stability
/// experiment, benchmarks and the CUDA build. Run from the repository root.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    version,
    propagate_version = true,
    after_help = "Progress is logged on stderr; RUST_LOG sets the level (default: info for xtask, \
                  warn for the libraries)."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    Parity(ParityArgs),
    ExportCheck(ExportCheckArgs),
    RefSetup(RefSetupArgs),
    Stability(StabilityArgs),
    Deepnet(DeepnetArgs),
    Scaling(ScalingArgs),
    Sparseclip(SparseclipArgs),
    /// Benchmarks: `moe` (dispatch paths), `train` (whole training steps), `routing` (routers)
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The CUDA build (on a machine without a GPU) and running it (on the GPU machine)
    #[command(subcommand)]
    Cuda(CudaCmd),
    Fuzz(FuzzArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    torchscale_kernels::alloc::keep_freed_memory();
    torchscale_kernels::runtime::one_compute_pool();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            // As clap words its errors; the backtrace only when asked for.
            eprintln!("error: {e:#}");
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
                eprintln!("\n{}", e.backtrace());
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; a failed check (parity) is exit status 1 without an error message.
fn run(command: Cmd) -> Result<ExitCode> {
    match command {
        Cmd::Parity(args) => {
            return Ok(if xtask::parity::main(&args)? {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Cmd::ExportCheck(args) => xtask::export_check::main(&Options::from(args))?,
        Cmd::RefSetup(args) => xtask::export_check::setup::main(&args)?,
        Cmd::Stability(args) => {
            let opts = usage(&["stability"], StabilityArgs::into_opts(args));
            xtask::stability::main(&opts)?;
        }
        Cmd::Deepnet(args) => {
            let opts = usage(&["deepnet"], DeepnetArgs::into_opts(args));
            xtask::deepnet::main(&opts)?;
        }
        Cmd::Scaling(args) => {
            let opts = usage(&["scaling"], ScalingArgs::into_opts(args));
            xtask::scaling::main(&opts)?;
        }
        Cmd::Sparseclip(args) => {
            let opts = usage(&["sparseclip"], SparseclipArgs::into_opts(args));
            xtask::sparseclip::main(&opts)?;
        }
        Cmd::Bench(BenchCmd::Moe(args)) => {
            let opts = usage(&["bench", "moe"], MoeArgs::into_opts(args));
            xtask::bench::moe::main(&opts)?
        }
        Cmd::Bench(BenchCmd::Train(args)) => {
            // Validate here so that a bad combination is a usage error (exit 2), as in clap.
            usage(&["bench", "train"], TrainArgs::into_opts(args.clone()));
            xtask::bench::train::main(args)?
        }
        Cmd::Bench(BenchCmd::Routing(args)) => {
            xtask::bench::routing::main(args)?;
        }
        Cmd::Cuda(cmd) => xtask::cuda::main(cmd)?,
        Cmd::Fuzz(args) => return xtask::fuzz::main(&args),
    }
    Ok(ExitCode::SUCCESS)
}

/// Logs on stderr (stdout carries the results), filtered by RUST_LOG, colored on a terminal only;
/// beside it, the experiments' timing of the trainer's spans (`xtask::experiment::timing`).
fn init_logging() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,xtask=info"));
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_filter(filter);
    tracing_subscriber::registry()
        .with(log)
        .with(xtask::experiment::timing::layer())
        .init();
}

/// The value, or a usage error (exit status 2) of the subcommand at `path` with the message.
fn usage<T>(path: &[&str], r: Result<T>) -> T {
    r.unwrap_or_else(|e| {
        let mut cmd = Cli::command();
        cmd.build();
        let mut sub = &mut cmd;
        for name in path {
            sub = sub.find_subcommand_mut(name).expect("a subcommand of Cli");
        }
        sub.error(ErrorKind::ValueValidation, format!("{e:#}"))
            .exit()
    })
}
