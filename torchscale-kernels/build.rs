//! Compiles `kernels/*.cu` to PTX, only when the `cuda` feature is on: the default CPU build
//! never looks for nvcc and needs no CUDA toolkit.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`. The PTX targets
//! `compute_$CUDA_COMPUTE_CAP` (digits only; default 80: PTX is JIT-compiled by the driver for
//! the GPU at hand, so it also runs on Hopper; `cargo xtask cuda build` sets 90).

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The kernel sources, each compiled to `$OUT_DIR/<name>.ptx`.
const KERNELS: &[&str] = &["norm", "softmax", "gelu", "cross_entropy", "adamw"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = nvcc();
    let digits: String = env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let cap = if digits.is_empty() {
        "80".into()
    } else {
        digits
    };
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in KERNELS {
        let src = format!("kernels/{name}.cu");
        let ptx = out_dir.join(format!("{name}.ptx"));
        // No --use_fast_math: erff, expf, logf, sqrtf and division stay accurate, and AdamW's
        // explicitly rounded operations must match the host's bit for bit.
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                &format!("-arch=compute_{cap}"),
                "-O3",
                "-std=c++17",
            ])
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{} failed on {src} ({s})", nvcc.display()),
            Err(e) => panic!(
                "cannot run nvcc ({}): {e}; the `cuda` feature needs the CUDA toolkit \
                 (`cargo xtask cuda build` installs one)",
                nvcc.display()
            ),
        }
    }
}

/// `$NVCC`, `$CUDA_HOME/bin/nvcc` or plain `nvcc`.
fn nvcc() -> PathBuf {
    if let Some(p) = env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin").join("nvcc");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nvcc")
}
