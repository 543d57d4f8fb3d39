//! The CUDA 13.0 toolkit from PyPI and the link folder that lets rustc link against it on a
//! machine without a GPU driver.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The pip meta-package pin: nvcc 13.0.88 emits PTX ISA 9.0, the newest the GPU machines'
/// driver 580 (CUDA 13.0) JIT-compiles; a newer nvcc would make PTX that driver rejects.
pub const TOOLKIT_PIN: &str = "cuda-toolkit[nvcc,crt,nvvm,cccl,cudart,cublas,curand,nvrtc]==13.0.2";

/// NCCL for torchscale-dist's `nccl` feature (linked, then loaded as `libnccl.so.2`): cudarc
/// 0.19's `nccl` feature binds NCCL 2.30's API.
pub const NCCL_PIN: &str = "nvidia-nccl-cu13==2.30.7";

/// Where the toolkit lives: `venv/` (pip) and `link/` (the link folder).
#[derive(Debug, Clone)]
pub struct Toolkit {
    /// The folder holding `venv/` and `link/`.
    pub base: PathBuf,
}

impl Toolkit {
    /// The pip venv.
    pub fn venv(&self) -> PathBuf {
        self.base.join("venv")
    }

    /// The link folder: unversioned `.so` links and the `libcuda.so` stub.
    pub fn link_dir(&self) -> PathBuf {
        self.base.join("link")
    }

    /// The CUDA root inside the venv (`bin/ include/ lib/ nvvm/`), if installed.
    pub fn cuda_home(&self) -> Option<PathBuf> {
        let lib = self.venv().join("lib");
        let entries = std::fs::read_dir(&lib).ok()?;
        entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/nvidia/cu13"))
            .find(|p| p.join("bin/nvcc").exists())
    }

    /// `libnccl.so.2` of the NCCL wheel inside the venv, if installed.
    pub fn nccl_lib(&self) -> Option<PathBuf> {
        let entries = std::fs::read_dir(self.venv().join("lib")).ok()?;
        entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/nvidia/nccl/lib/libnccl.so.2"))
            .find(|p| p.exists())
    }

    /// Installs the pinned toolkit unless nvcc is already there, and NCCL unless its library
    /// is; returns the CUDA root.
    pub fn ensure_installed(&self) -> Result<PathBuf> {
        if let Some(home) = self.cuda_home() {
            self.ensure_nccl()?;
            return Ok(home);
        }
        std::fs::create_dir_all(&self.base)?;
        tracing::info!(
            "installing {TOOLKIT_PIN} into {} (pip, once)",
            crate::paths::shown(&self.venv())
        );
        run(Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(self.venv()))?;
        let pip = self.venv().join("bin/pip");
        run(Command::new(&pip).args(["install", "-q", "--upgrade", "pip"]))?;
        run(Command::new(&pip).args(["install", "-q", TOOLKIT_PIN, NCCL_PIN]))?;
        self.ensure_nccl()?;
        self.cuda_home()
            .context("pip installed the toolkit but nvidia/cu13/bin/nvcc is missing")
    }

    /// Installs [`NCCL_PIN`] into the venv unless `libnccl.so.2` is there; returns its path.
    pub fn ensure_nccl(&self) -> Result<PathBuf> {
        if let Some(lib) = self.nccl_lib() {
            return Ok(lib);
        }
        tracing::info!("installing {NCCL_PIN} (pip, once)");
        run(Command::new(self.venv().join("bin/pip")).args(["install", "-q", NCCL_PIN]))?;
        self.nccl_lib()
            .context("pip installed NCCL but nvidia/nccl/lib/libnccl.so.2 is missing")
    }

    /// Writes the link folder: `lib{cublas,cublasLt,cudart,nvrtc,curand,nccl}.so` links to the
    /// wheels' versioned libraries, and a `libcuda.so` stub (SONAME `libcuda.so.1`) defining
    /// every driver entry point as a function returning CUDA_ERROR_NO_DEVICE. Only the SONAME
    /// and symbol names reach the binaries; the GPU machine's driver provides the real one.
    /// The stub is rebuilt whenever its symbol list changes (cudarc's `_v2` entry points come
    /// from cudarc's sources, which cargo must have fetched first: see [`super::build`]).
    pub fn ensure_link_dir(&self, cuda_home: &Path) -> Result<PathBuf> {
        let dir = self.link_dir();
        std::fs::create_dir_all(&dir)?;
        let libs = [
            ("cublas", "13"),
            ("cublasLt", "13"),
            ("cudart", "13"),
            ("nvrtc", "13"),
            ("curand", "10"),
        ];
        for (name, ver) in libs {
            let target = cuda_home.join(format!("lib/lib{name}.so.{ver}"));
            if !target.exists() {
                bail!("{} is missing from the toolkit", target.display());
            }
            let link = dir.join(format!("lib{name}.so"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link)?;
        }
        let nccl = self.ensure_nccl()?;
        let link = dir.join("libnccl.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&nccl, &link)?;
        let stub = dir.join("libcuda.so");
        let mut names = driver_symbols(&cuda_home.join("include/cuda.h"))?;
        let cudarc = cudarc_symbols()?;
        if cudarc.is_empty() {
            bail!("cudarc's sources are not in cargo's registry: run `cargo fetch` first");
        }
        names.extend(cudarc);
        names.sort();
        names.dedup();
        let src: String = names
            .iter()
            .map(|n| format!("int {n}(void) {{ return 100; }}\n"))
            .collect();
        let c = dir.join("libcuda_stub.c");
        let same = std::fs::read_to_string(&c).is_ok_and(|old| old == src);
        if !stub.exists() || !same {
            std::fs::write(&c, src)?;
            run(Command::new("gcc")
                .args(["-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o"])
                .arg(&stub)
                .arg(&c))?;
        }
        Ok(dir)
    }
}

/// `cu*` entry points declared in `cuda.h` (`CUresult CUDAAPI cuName(`).
fn driver_symbols(cuda_h: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(cuda_h).with_context(|| cuda_h.display().to_string())?;
    Ok(text
        .split("CUresult CUDAAPI ")
        .skip(1)
        .filter_map(ident)
        .filter(|n| n.starts_with("cu"))
        .collect())
}

/// `cu*` functions of cudarc's driver bindings (`pub unsafe fn cuName(`), from the registry
/// sources cargo fetched; empty when none is found (cuda.h then covers what cudarc calls).
fn cudarc_symbols() -> Result<Vec<String>> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let mut out = Vec::new();
    let Ok(registries) = std::fs::read_dir(home.join("registry/src")) else {
        return Ok(out);
    };
    for reg in registries.filter_map(|e| e.ok()) {
        let Ok(crates) = std::fs::read_dir(reg.path()) else {
            continue;
        };
        for c in crates.filter_map(|e| e.ok()) {
            if !c.file_name().to_string_lossy().starts_with("cudarc-0.19.") {
                continue;
            }
            let sys = c.path().join("src/driver/sys/mod.rs");
            if let Ok(text) = std::fs::read_to_string(sys) {
                out.extend(
                    text.split("pub unsafe fn ")
                        .skip(1)
                        .filter_map(ident)
                        .filter(|n| n.starts_with("cu")),
                );
            }
        }
    }
    Ok(out)
}

fn ident(s: &str) -> Option<String> {
    let n: String = s
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!n.is_empty()).then_some(n)
}

/// Runs `cmd`, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idents_stop_at_the_parenthesis() {
        assert_eq!(
            ident("cuMemAlloc_v2(CUdeviceptr *p"),
            Some("cuMemAlloc_v2".into())
        );
        assert_eq!(ident("(x"), None);
    }
}
