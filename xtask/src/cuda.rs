//! `cargo xtask cuda build|run`: the reproducible CUDA build on a machine without a GPU, and
//! running what it packed on the GPU machine.
//!
//! `build` installs the pinned CUDA 13.0 toolkit from PyPI into `target/cuda-sdk/venv`, writes
//! the link folder `target/cuda-sdk/link` (see [`toolkit::Toolkit::ensure_link_dir`]), builds
//! the `cuda_*` tests and examples of the [`CUDA_CRATES`] (torchscale-moe's MoE kernels,
//! torchscale-kernels' fused kernels) with their `cuda` features in release into `target/cuda`
//! (never touching the CPU builds in `target/`), and torchscale-dist's NCCL test
//! ([`NCCL_TEST`], feature `nccl`: NCCL from PyPI, OpenMPI from the system), and packs them
//! stripped and xz-compressed with `run.sh` into `target/cuda-carry` (carry that folder to the
//! GPU machine).
//! `run` executes `run.sh` there: unxz, `LD_LIBRARY_PATH` at the pip CUDA 13 and NCCL
//! libraries, the tests, the NCCL test (under mpirun, only where 2 or more GPUs are visible;
//! with one it says it skipped it), then the benchmarks. On a machine without cargo,
//! `bash target/cuda-carry/run.sh` does the same.

pub mod pack;
pub mod toolkit;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Result};
use clap::{Subcommand, ValueEnum};

use toolkit::Toolkit;

use crate::paths::shown;

/// `cargo xtask cuda <build|run>`.
#[derive(Debug, Clone, Subcommand)]
pub enum CudaCmd {
    /// Install the pinned CUDA toolkit and NCCL (pip, under target/cuda-sdk), build the `cuda_*`
    /// tests and examples and the NCCL test in release into target/cuda and pack them (no GPU
    /// needed)
    Build {
        /// Folder to pack into [default: target/cuda-carry]
        #[arg(long, visible_alias = "dir", value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Run what `cuda build` packed (on the GPU machine): the tests, the benchmarks, or both
    Run {
        /// Folder `cuda build` packed into [default: target/cuda-carry]
        #[arg(long, visible_alias = "out", value_name = "DIR")]
        dir: Option<PathBuf>,
        /// What to run
        #[arg(value_enum, default_value_t = What::All)]
        what: What,
    },
}

/// What `cuda run` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum What {
    /// The `cuda_*` tests and the NCCL test.
    Tests,
    /// The `cuda_*` examples (benchmarks).
    Bench,
    /// Tests, then benchmarks.
    All,
}

/// GPU compute capability the build targets (H100/H200).
pub const COMPUTE_CAP: &str = "90";
/// cudarc's CUDA API level, pinned to the GPU machines' driver (CUDA 13.0).
pub const CUDARC_VERSION: &str = "13000";
/// The crates whose `cuda` feature is built and whose `cuda_*` tests and examples are packed.
pub const CUDA_CRATES: [&str; 2] = ["torchscale-moe", "torchscale-kernels"];
/// torchscale-dist's NcclCollective test (feature `nccl`, 2+ GPUs, launches itself under
/// mpirun), packed with kind `nccl`.
pub const NCCL_TEST: &str = "nccl_collectives";
/// One packed binary: `kind` is `tests`, `nccl` or `bench`, `krate` the folder of the crate it belongs
/// to (the tests run from there, as cargo runs them), `path` the executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// `tests`, `nccl` (the NCCL test: 2+ GPUs, mpirun) or `bench`.
    pub kind: String,
    /// The crate's folder name in the workspace (`torchscale-moe` when cargo did not say).
    pub krate: String,
    /// The executable cargo built.
    pub path: PathBuf,
}

/// The workspace root (the parent of xtask/).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

/// Runs `cargo xtask cuda build` or `cargo xtask cuda run`.
pub fn main(cmd: CudaCmd) -> Result<()> {
    let root = workspace_root();
    let carry = |d: Option<PathBuf>| d.unwrap_or_else(|| root.join("target/cuda-carry"));
    match cmd {
        CudaCmd::Build { out } => build(&root, &carry(out)),
        CudaCmd::Run { dir, what } => {
            let what = what.to_possible_value().expect("no skipped variant");
            toolkit::run(
                Command::new("bash")
                    .arg(carry(dir).join("run.sh"))
                    .arg(what.get_name()),
            )
        }
    }
}

/// Installs the toolkit, builds and packs into `out`.
pub fn build(root: &Path, out: &Path) -> Result<()> {
    let tk = Toolkit {
        base: root.join("target/cuda-sdk"),
    };
    let home = tk.ensure_installed()?;
    // The libcuda stub lists cudarc's driver entry points from its sources: fetch them first.
    toolkit::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root)
            .args(["fetch", "--quiet"]),
    )?;
    let link = tk.ensure_link_dir(&home)?;
    tracing::info!("building the cuda_* tests and examples (release, target/cuda)");
    let mut bins = cargo_build(root, &home, &link)?;
    if bins.is_empty() {
        bail!("cargo built no cuda_* test or example");
    }
    tracing::info!("building torchscale-dist's {NCCL_TEST} (feature nccl, release, target/cuda)");
    let nccl = cargo_build_nccl(root, &home, &link)?;
    if !nccl.iter().any(|a| a.kind == "nccl") {
        bail!("cargo built no {NCCL_TEST}");
    }
    bins.extend(nccl);
    sort(&mut bins);
    tracing::info!("packing {} binaries (strip, xz)", bins.len());
    let size = pack::pack(&bins, out)?;
    for a in &bins {
        println!("{:5} {:18} {}", a.kind, a.krate, shown(&a.path));
    }
    println!(
        "packed {} binaries into {} ({:.1} MiB); carry it and run `bash {}/run.sh`",
        bins.len(),
        shown(out),
        size as f64 / (1024.0 * 1024.0),
        out.strip_prefix(root).unwrap_or(out).display()
    );
    Ok(())
}

/// The environment of a CUDA build: nvcc on PATH, CUDA_HOME, the compute capability, cudarc's
/// API level, the link folder on LIBRARY_PATH and the separate target dir.
pub fn cuda_command(root: &Path, home: &Path, link: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    let path = std::env::var("PATH").unwrap_or_default();
    let lib = std::env::var("LIBRARY_PATH").unwrap_or_default();
    let join = |a: &Path, rest: &str| {
        if rest.is_empty() {
            a.display().to_string()
        } else {
            format!("{}:{rest}", a.display())
        }
    };
    cmd.current_dir(root)
        .env("CUDA_HOME", home)
        .env("PATH", join(&home.join("bin"), &path))
        .env("CUDA_COMPUTE_CAP", COMPUTE_CAP)
        .env("CUDARC_CUDA_VERSION", CUDARC_VERSION)
        .env("LIBRARY_PATH", join(link, &lib))
        .env("CARGO_TARGET_DIR", root.join("target/cuda"));
    cmd
}

/// Builds the `cuda_*` tests and examples of the [`CUDA_CRATES`] with their `cuda` features.
fn cargo_build(root: &Path, home: &Path, link: &Path) -> Result<Vec<Artifact>> {
    let mut cmd = cuda_command(root, home, link);
    cmd.args(["build", "--release"]);
    for krate in CUDA_CRATES {
        cmd.args(["-p", krate]);
    }
    let features: Vec<String> = CUDA_CRATES.iter().map(|k| format!("{k}/cuda")).collect();
    cmd.args(["--features", &features.join(",")])
        .args([
            "--tests",
            "--examples",
            "--message-format=json-render-diagnostics",
        ])
        .stdout(Stdio::piped());
    let output = cmd.spawn()?.wait_with_output()?;
    if !output.status.success() {
        bail!("the CUDA build failed ({})", output.status);
    }
    artifacts(&String::from_utf8_lossy(&output.stdout))
}

/// Builds torchscale-dist's [`NCCL_TEST`] with its `nccl` feature (OpenMPI's headers and
/// libclang for rsmpi, as for the `mpi` feature; libnccl from the link folder).
fn cargo_build_nccl(root: &Path, home: &Path, link: &Path) -> Result<Vec<Artifact>> {
    let mut cmd = cuda_command(root, home, link);
    cmd.args([
        "build",
        "--release",
        "-p",
        "torchscale-dist",
        "--features",
        "torchscale-dist/nccl",
        "--test",
        NCCL_TEST,
        "--message-format=json-render-diagnostics",
    ])
    .stdout(Stdio::piped());
    let output = cmd.spawn()?.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "the NCCL build failed ({}); it needs libopenmpi-dev and libclang-dev",
            output.status
        );
    }
    artifacts(&String::from_utf8_lossy(&output.stdout))
}

/// The `cuda_*` executables and the [`NCCL_TEST`] in cargo's JSON messages.
pub fn artifacts(json_lines: &str) -> Result<Vec<Artifact>> {
    let mut out = Vec::new();
    for line in json_lines.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(exe), Some(name)) = (v["executable"].as_str(), v["target"]["name"].as_str())
        else {
            continue;
        };
        if !name.starts_with("cuda_") && name != NCCL_TEST {
            continue;
        }
        let is_example = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|x| x == "example"));
        let kind = match (is_example, name == NCCL_TEST) {
            (true, _) => "bench",
            (false, true) => "nccl",
            (false, false) => "tests",
        };
        let krate = v["manifest_path"]
            .as_str()
            .and_then(|m| Path::new(m).parent()?.file_name()?.to_str())
            .unwrap_or("torchscale-moe");
        out.push(Artifact {
            kind: kind.to_string(),
            krate: krate.to_string(),
            path: PathBuf::from(exe),
        });
    }
    sort(&mut out);
    Ok(out)
}

/// Tests, then the NCCL test, then benchmarks (run.sh runs them in this order), then by crate
/// and path.
fn sort(bins: &mut [Artifact]) {
    let rank = |kind: &str| match kind {
        "tests" => 0,
        "nccl" => 1,
        _ => 2,
    };
    bins.sort_by(|a, b| {
        let key = |x: &Artifact| (rank(&x.kind), x.krate.clone(), x.path.clone());
        key(a).cmp(&key(b))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_cuda_executables_from_cargo_json() {
        let lines = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"cuda_kernels","kind":["test"]},"executable":"/t/cuda_kernels-1"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"golden","kind":["test"]},"executable":"/t/golden-2"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"cuda_bench","kind":["example"]},"executable":"/t/cuda_bench"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"cuda_x","kind":["lib"]},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","manifest_path":"/w/torchscale-kernels/Cargo.toml","target":{"name":"cuda_fused","kind":["test"]},"executable":"/t/cuda_fused-3"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","manifest_path":"/w/torchscale-dist/Cargo.toml","target":{"name":"nccl_collectives","kind":["test"]},"executable":"/t/nccl_collectives-4"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","manifest_path":"/w/torchscale-dist/Cargo.toml","target":{"name":"mpi_collectives","kind":["test"]},"executable":"/t/mpi_collectives-5"}"#,
            "\nnot json\n"
        );
        let a = artifacts(lines).unwrap();
        let art = |kind: &str, krate: &str, path: &str| Artifact {
            kind: kind.to_string(),
            krate: krate.to_string(),
            path: PathBuf::from(path),
        };
        assert_eq!(
            a,
            vec![
                art("tests", "torchscale-kernels", "/t/cuda_fused-3"),
                art("tests", "torchscale-moe", "/t/cuda_kernels-1"),
                art("nccl", "torchscale-dist", "/t/nccl_collectives-4"),
                art("bench", "torchscale-moe", "/t/cuda_bench"),
            ]
        );
    }
}
