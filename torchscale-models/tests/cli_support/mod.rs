//! Runs the built example binaries. Cargo gives integration tests no path to examples, so the
//! binary is built (a no-op when `cargo test` already built it) next to this test's own profile
//! folder and run from there; its stdout and stderr are pipes, not terminals.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// `target/<profile>` of this test binary (`target/<profile>/deps/<test>-<hash>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary under target/<profile>/deps")
        .to_path_buf()
}

/// The path of example `name`, built with this package's features for this test's profile.
pub fn example(name: &str) -> PathBuf {
    // One build at a time: parallel tests would only queue on cargo's lock.
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = profile_dir();
    let target = dir.parent().expect("target folder");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "torchscale-models",
        "--example",
        name,
    ])
    .arg("--target-dir")
    .arg(target)
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let features: Vec<&str> = [
        ("cuda", cfg!(feature = "cuda")),
        ("mkl", cfg!(feature = "mkl")),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(f, _)| *f)
    .collect();
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    let out = cmd.output().expect("running cargo build");
    assert!(
        out.status.success(),
        "building example {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "{} was not built", bin.display());
    bin
}

/// The result of one run: exit code, stdout and stderr as text.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs example `name` with `args` in the repository root (where `data/` lives), stdout and
/// stderr piped, `RUST_LOG` unset.
pub fn run(name: &str, args: &[&str]) -> Run {
    let out: Output = Command::new(example(name))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .env_remove("RUST_LOG")
        .output()
        .expect("running the example");
    Run {
        code: out.status.code().expect("exited, not killed by a signal"),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    }
}

/// The fields of a fairseq-style log line `step N/T | key value | ...` as (key, value) pairs.
pub fn fields(line: &str) -> Vec<(String, String)> {
    line.split(" | ")
        .filter_map(|f| {
            let (k, v) = f.trim().split_once(' ')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}
