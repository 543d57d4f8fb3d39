//! `cargo xtask <command>`: parity, ...

use std::path::PathBuf;

use anyhow::{bail, Result};
use xtask::parity::{run_all, TolMode};

#[global_allocator]
static ALLOC: torchscale_kernels::alloc::Allocator = torchscale_kernels::alloc::Allocator {};

const USAGE: &str = "usage: cargo xtask parity [--tolerance strict|default] [FILE|DIR]...
       cargo xtask export-check [--python PATH] [--checkpoint DIR] [--out DIR] [--tolerance strict|default]
       cargo xtask cuda build [--out DIR] | cargo xtask cuda run [--dir DIR] [tests|bench|all]
       cargo xtask stability [--quick] [--layers N] [--dim D] [--steps S] [--lr X] [--warmup W] [--batch B] [--seq T] [--techniques a,b,..] [--seed N] [--out DIR]";

fn main() -> Result<()> {
    torchscale_kernels::alloc::keep_freed_memory();
    torchscale_kernels::runtime::one_compute_pool();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        bail!("{USAGE}")
    };
    match cmd.as_str() {
        "parity" => parity(&args[1..]),
        "bench" => xtask::bench::main(&args[1..]),
        "export-check" => xtask::export_check::main(&args[1..]),
        "stability" => xtask::stability::main(&args[1..]),
        "cuda" => xtask::cuda::main(&args[1..]),
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
}

fn parity(args: &[String]) -> Result<()> {
    let mut mode = TolMode::Strict;
    let mut paths = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tolerance" => {
                mode = match it.next().map(String::as_str) {
                    Some("strict") => TolMode::Strict,
                    Some("default") => TolMode::Default,
                    _ => bail!("--tolerance takes strict or default"),
                }
            }
            p => paths.push(PathBuf::from(p)),
        }
    }
    if paths.is_empty() {
        paths.push(PathBuf::from("testdata/golden"));
    }
    let files = xtask::golden::collect_files(&paths)?;
    let (_, failed, _) = run_all(&files, mode);
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
