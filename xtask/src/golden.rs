//! Reading golden parity files (the format of `testdata/golden/FORMAT.md`) and comparing tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor};

/// One golden file: metadata and tensors.
pub struct GoldenFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// `__metadata__`.
    pub meta: HashMap<String, String>,
    /// Every tensor by key.
    pub tensors: HashMap<String, Tensor>,
}

impl GoldenFile {
    /// Reads a file.
    pub fn load(path: &Path) -> Result<Self> {
        let (tensors, meta) = torchscale_models::checkpoint::read_safetensors(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            meta,
            tensors,
        })
    }

    /// The case kind (from the metadata, never from the file name).
    pub fn kind(&self) -> &str {
        self.meta.get("kind").map(String::as_str).unwrap_or("?")
    }

    /// A metadata field parsed as JSON.
    pub fn json(&self, field: &str) -> Result<serde_json::Value> {
        let s = self
            .meta
            .get(field)
            .ok_or_else(|| anyhow!("metadata has no `{field}`"))?;
        serde_json::from_str(s).with_context(|| format!("metadata `{field}` is not JSON"))
    }

    /// The first word of a metadata field (e.g. `config_class`).
    pub fn word(&self, field: &str) -> &str {
        self.meta
            .get(field)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("")
    }

    /// A tensor by key.
    pub fn get(&self, key: &str) -> Result<&Tensor> {
        self.tensors
            .get(key)
            .ok_or_else(|| anyhow!("file has no tensor `{key}`"))
    }

    /// The model parameters and buffers: keys without `input.`, `expect.`, `grad.`, `grad_laux.`.
    pub fn weights(&self, strip_prefix: &str) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter(|(k, _)| !is_data_key(k))
            .filter_map(|(k, v)| {
                k.strip_prefix(strip_prefix)
                    .map(|k| (k.to_string(), v.clone()))
            })
            .collect()
    }

    /// Keys starting with `prefix`, sorted.
    pub fn keys_with(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<_> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

fn is_data_key(k: &str) -> bool {
    ["input.", "expect.", "grad.", "grad_laux."]
        .iter()
        .any(|p| k.starts_with(p))
}

/// `|got - want| <= atol + rtol * |want|`, element-wise.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    /// Absolute part.
    pub atol: f64,
    /// Relative part.
    pub rtol: f64,
}

impl Tolerance {
    /// FORMAT.md's strict forward tolerance.
    pub const STRICT_FORWARD: Tolerance = Tolerance {
        atol: 5e-6,
        rtol: 1e-5,
    };
    /// FORMAT.md's default forward tolerance.
    pub const DEFAULT_FORWARD: Tolerance = Tolerance {
        atol: 1e-4,
        rtol: 1e-4,
    };
    /// Scalars (losses, l_aux, norms).
    pub const SCALAR: Tolerance = Tolerance {
        atol: 0.0,
        rtol: 1e-5,
    };
    /// FORMAT.md's strict gradient tolerance for a file whose largest gradient is `g`.
    pub fn strict_grad(g: f64) -> Tolerance {
        Tolerance {
            atol: 2e-6 * g.max(1.0),
            rtol: 1e-4,
        }
    }
    /// FORMAT.md's default gradient tolerance.
    pub fn default_grad(g: f64) -> Tolerance {
        Tolerance {
            atol: 1e-4 * g.max(1.0),
            rtol: 1e-3,
        }
    }
}

/// The result of comparing one tensor.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The key compared.
    pub key: String,
    /// Largest absolute error.
    pub max_abs: f64,
    /// Largest relative error over entries of at least 1% of the reference's largest magnitude.
    pub max_rel: f64,
    /// All entries within tolerance (and shapes equal).
    pub pass: bool,
    /// Why it failed, when not a numeric miss (shape, NaN).
    pub note: Option<String>,
}

/// Compares `got` to `want` element-wise.
pub fn compare(key: &str, got: &Tensor, want: &Tensor, tol: Tolerance) -> Result<Comparison> {
    if got.dims() != want.dims() {
        return Ok(Comparison {
            key: key.into(),
            max_abs: f64::INFINITY,
            max_rel: f64::INFINITY,
            pass: false,
            note: Some(format!(
                "shape {:?} != expected {:?}",
                got.dims(),
                want.dims()
            )),
        });
    }
    let g: Vec<f64> = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let w: Vec<f64> = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let wmax = w.iter().fold(0f64, |m, v| m.max(v.abs()));
    let (mut max_abs, mut max_rel, mut pass, mut note) = (0f64, 0f64, true, None);
    for (a, b) in g.iter().zip(&w) {
        let d = (a - b).abs();
        if !d.is_finite() && a != b {
            pass = false;
            note = Some("non-finite value".to_string());
            max_abs = f64::INFINITY;
            continue;
        }
        max_abs = max_abs.max(d);
        if b.abs() >= 0.01 * wmax && b.abs() > 0.0 {
            max_rel = max_rel.max(d / b.abs());
        }
        if d > tol.atol + tol.rtol * b.abs() {
            pass = false;
        }
    }
    Ok(Comparison {
        key: key.into(),
        max_abs,
        max_rel,
        pass,
        note,
    })
}

/// Compares integer / mask tensors exactly.
pub fn compare_exact(key: &str, got: &Tensor, want: &Tensor) -> Result<Comparison> {
    let mut c = compare(
        key,
        got,
        want,
        Tolerance {
            atol: 0.0,
            rtol: 0.0,
        },
    )?;
    if !c.pass && c.note.is_none() {
        c.note = Some("integer outputs differ".into());
    }
    Ok(c)
}

/// Every `*.safetensors` file under the given files or folders, sorted.
pub fn collect_files(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        if a.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(a)
                .with_context(|| format!("reading {}", a.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            v.sort();
            out.extend(v);
        } else if a.exists() {
            out.push(a.clone());
        } else {
            anyhow::bail!("no such file or folder: {}", a.display());
        }
    }
    Ok(out)
}
