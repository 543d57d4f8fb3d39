//! Packing the CUDA binaries for the GPU machine: strip + xz, a manifest, the run script.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::toolkit::run;
use super::Artifact;

/// The device tool carries at most this much per call.
pub const CARRY_LIMIT: u64 = 64 * 1024 * 1024;

/// The run script written next to the packed binaries (runs them with no Rust toolchain).
pub const RUN_SCRIPT: &str = include_str!("../../scripts/cuda-run.sh");

/// `cuda_kernels-0123abcd` -> `cuda_kernels` (cargo's hash suffix removed).
pub fn stem(file_name: &str) -> String {
    match file_name.rsplit_once('-') {
        Some((head, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            head.to_string()
        }
        _ => file_name.to_string(),
    }
}

/// Strips and xz-compresses each of `bins` into `out` as `<stem>.xz`, writes `MANIFEST` (one
/// `kind stem crate` per line) and `run.sh`; returns the folder's total size in bytes.
pub fn pack(bins: &[Artifact], out: &Path) -> Result<u64> {
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| out.display().to_string())?;
    }
    std::fs::create_dir_all(out)?;
    let mut manifest = String::new();
    let mut names: Vec<String> = Vec::new();
    for a in bins {
        let name = stem(
            &a.path
                .file_name()
                .context("binary without a name")?
                .to_string_lossy(),
        );
        if names.contains(&name) {
            bail!("two packed binaries are both named {name}: rename one of the targets");
        }
        names.push(name.clone());
        let stripped = out.join(&name);
        run(Command::new("strip").arg("-o").arg(&stripped).arg(&a.path))?;
        run(Command::new("xz").args(["-T0", "-9", "-f"]).arg(&stripped))?;
        manifest.push_str(&format!("{} {name} {}\n", a.kind, a.krate));
    }
    std::fs::write(out.join("MANIFEST"), manifest)?;
    std::fs::write(out.join("run.sh"), RUN_SCRIPT)?;
    let total = dir_size(out)?;
    if total > CARRY_LIMIT {
        bail!(
            "{} holds {total} bytes, over the 64 MiB carry limit",
            out.display()
        );
    }
    Ok(total)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        total += e?.metadata()?.len();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::stem;

    #[test]
    fn stems_drop_only_cargo_hashes() {
        assert_eq!(stem("cuda_kernels-0123456789abcdef"), "cuda_kernels");
        assert_eq!(stem("cuda_bench"), "cuda_bench");
        assert_eq!(stem("torchscale_moe-12"), "torchscale_moe-12");
    }
}
