//! The verdict: our outputs against torchscale's, per model.

use std::path::Path;

use anyhow::{anyhow, Result};
use torchscale_models::checkpoint::read_safetensors;

use super::{OURS_FILE, REFERENCE_FILE};
use crate::golden::{compare, Comparison, Tolerance};

/// The comparison of one model.
#[derive(Debug, Clone)]
pub struct ModelReport {
    /// The case name.
    pub name: String,
    /// Per compared output.
    pub comparisons: Vec<Comparison>,
}

impl ModelReport {
    /// Every output within tolerance (and at least one compared).
    pub fn pass(&self) -> bool {
        !self.comparisons.is_empty() && self.comparisons.iter().all(|c| c.pass)
    }
    /// One line per model: errors per output and the verdict.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{:<28} {}",
            self.name,
            if self.pass() { "PASS" } else { "FAIL" }
        );
        for c in &self.comparisons {
            s.push_str(&format!(
                "  {}: max_abs={:.3e} max_rel={:.3e}",
                c.key, c.max_abs, c.max_rel
            ));
            if let Some(n) = &c.note {
                s.push_str(&format!(" ({n})"));
            }
        }
        s
    }
}

/// Compares `work/ours.safetensors` with `work/torchscale.safetensors`.
pub fn compare_dir(name: &str, work: &Path, tol: Tolerance) -> Result<ModelReport> {
    let (ours, _) = read_safetensors(&work.join(OURS_FILE))?;
    let (theirs, _) = read_safetensors(&work.join(REFERENCE_FILE))?;
    let mut keys: Vec<&String> = ours.keys().filter(|k| k.starts_with("ours.")).collect();
    keys.sort();
    let mut comparisons = Vec::new();
    for key in keys {
        let short = &key["ours.".len()..];
        let want = theirs
            .get(short)
            .ok_or_else(|| anyhow!("{}: no `{short}`", work.join(REFERENCE_FILE).display()))?;
        comparisons.push(compare(short, &ours[key], want, tol)?);
    }
    Ok(ModelReport {
        name: name.to_string(),
        comparisons,
    })
}
