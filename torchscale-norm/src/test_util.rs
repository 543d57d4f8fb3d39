//! Helpers shared by the unit tests.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use torchscale_core::init::ParamStore;
use torchscale_core::linear::linear;
use torchscale_core::{Error, NormSpec, ParamRole, Result, Site, Stabilizer};

/// All values of a tensor, flattened.
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

/// `torch.nn.LayerNorm` of one row, in f64, written out.
pub fn hand_layer_norm(r: &[f64], w: &[f32], b: &[f32], eps: f64) -> Vec<f64> {
    let n = r.len() as f64;
    let mean = r.iter().sum::<f64>() / n;
    let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    r.iter()
        .enumerate()
        .map(|(j, v)| (v - mean) / (var + eps).sqrt() * w[j] as f64 + b[j] as f64)
        .collect()
}

/// A VarBuilder holding one LayerNorm `prefix.{weight,bias}`.
pub fn ln_vb(prefix: &str, w: &[f32], b: &[f32]) -> Result<VarBuilder<'static>> {
    let dev = Device::Cpu;
    let mut map = HashMap::new();
    map.insert(
        format!("{prefix}.weight"),
        Tensor::from_slice(w, w.len(), &dev)?,
    );
    map.insert(
        format!("{prefix}.bias"),
        Tensor::from_slice(b, b.len(), &dev)?,
    );
    Ok(VarBuilder::from_tensors(map, DType::F32, &dev))
}

/// A deterministic, irregular tensor.
fn pattern(shape: (usize, usize, usize), phase: f64) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.7 + phase).sin() * 1.5 + (i as f64 * 0.13).cos()) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Builds the residual of `site` from a fresh store, runs forward and backward through a
/// nonlinear sublayer, and checks that every parameter it created gets a nonzero gradient.
pub fn assert_norm_grads(stab: &dyn Stabilizer, site: Site) -> Result<()> {
    let store = ParamStore::new(7);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let spec = NormSpec {
        dim: 6,
        eps: 1e-5,
        multiway: false,
    };
    let res = stab.residual(site, spec, vb)?;
    let x = Var::from_tensor(&pattern((2, 3, 6), 0.0)?)?;
    let y = res.forward(x.as_tensor(), &mut |h| Ok((h.sqr()? * 0.5)?))?;
    let loss = (y * pattern((2, 3, 6), 1.0)?)?.sum_all()?;
    let grads = loss.backward()?;
    let vars = store.named_vars();
    assert_eq!(vars.len(), 2, "one LayerNorm: weight and bias");
    for (name, var) in vars {
        assert!(name.starts_with(site.norm_name()), "{name}");
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| Error::invalid(&name, "no gradient"))?;
        let mag = g.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(mag > 1e-4, "{name}: gradient magnitude {mag}");
    }
    let gx = grads
        .get(x.as_tensor())
        .map(|g| g.abs()?.sum_all()?.to_scalar::<f32>());
    assert!(
        matches!(gx, Some(Ok(m)) if m > 1e-4),
        "gradient must reach the input"
    );
    Ok(())
}

/// Checks the wiring of `stab` at `site` on an identity LayerNorm: pre-norm
/// (`pre = LN(x)`, `post = x + f`) or post-norm (`pre = x`, `post = LN(alpha·x + f)`).
pub fn assert_wiring(stab: &dyn Stabilizer, site: Site, pre_norm: bool, alpha: f64) -> Result<()> {
    let store = ParamStore::new(8);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let spec = NormSpec {
        dim: 5,
        eps: 1e-5,
        multiway: false,
    };
    let res = stab.residual(site, spec, vb)?;
    let x = pattern((1, 2, 5), 0.3)?;
    let f = pattern((1, 2, 5), 2.0)?;
    let xs = to_vec(&x)?;
    let fs = to_vec(&f)?;
    let br = torchscale_core::Branch::A;
    let pre = to_vec(&res.pre(&x, br)?)?;
    let post = to_vec(&res.post(&x, &f, br)?)?;
    let ones = [1.0f32; 5];
    let zeros = [0.0f32; 5];
    for row in 0..2 {
        let xr: Vec<f64> = xs[row * 5..row * 5 + 5].iter().map(|&v| v as f64).collect();
        let fr: Vec<f64> = fs[row * 5..row * 5 + 5].iter().map(|&v| v as f64).collect();
        let (want_pre, want_post) = if pre_norm {
            let sum: Vec<f64> = xr.iter().zip(&fr).map(|(a, b)| a + b).collect();
            (hand_layer_norm(&xr, &ones, &zeros, 1e-5), sum)
        } else {
            let r: Vec<f64> = xr.iter().zip(&fr).map(|(a, b)| alpha * a + b).collect();
            (xr.clone(), hand_layer_norm(&r, &ones, &zeros, 1e-5))
        };
        for j in 0..5 {
            approx::assert_abs_diff_eq!(pre[row * 5 + j] as f64, want_pre[j], epsilon = 1e-5);
            approx::assert_abs_diff_eq!(post[row * 5 + j] as f64, want_post[j], epsilon = 1e-5);
        }
    }
    Ok(())
}

/// Builds a `[256, 384]` Linear with the stabilizer's gain for (`site`, `role`) and checks
/// PyTorch's default init scaled by the gain: weight std `gain/sqrt(3·in)` within 5 standard
/// errors, mean 0 within 5 standard errors, bias inside and filling ±gain/√in.
pub fn assert_linear_std(
    stab: &dyn Stabilizer,
    site: Site,
    role: ParamRole,
    seed: u64,
) -> Result<()> {
    let (fan_in, fan_out) = (384usize, 256usize);
    let gain = stab.init_gain(site, role);
    let store = ParamStore::new(seed);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let lin = linear(fan_in, fan_out, true, gain, vb.pp("proj"))?;
    let w: Vec<f64> = to_vec(lin.weight())?
        .into_iter()
        .map(|v| v as f64)
        .collect();
    let n = w.len() as f64;
    let mean = w.iter().sum::<f64>() / n;
    let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    let sigma = gain / (3.0 * fan_in as f64).sqrt();
    // Uniform: kurtosis 9/5, so SE(std) ≈ σ·sqrt((9/5 - 1)/n)/2; SE(mean) = σ/√n.
    let se_std = sigma * (0.8 / n).sqrt() / 2.0;
    assert!(
        (std - sigma).abs() <= 5.0 * se_std,
        "{site:?}/{role:?}: std {std} vs {sigma} (gain {gain})"
    );
    assert!(mean.abs() <= 5.0 * sigma / n.sqrt(), "mean {mean}");
    let bound = gain / (fan_in as f64).sqrt();
    let b = lin
        .bias()
        .ok_or_else(|| Error::invalid("bias", "missing"))?;
    let bmax = to_vec(b)?
        .into_iter()
        .fold(0f64, |m, v| m.max((v as f64).abs()));
    // P(max of 256 uniform draws < 0.9·bound) = 0.9^256 ≈ 2e-12.
    assert!(
        bmax <= bound * (1.0 + 1e-6) && bmax >= 0.9 * bound,
        "bias max {bmax} vs {bound}"
    );
    Ok(())
}

/// The metadata of one golden file.
pub struct GoldenMeta {
    pub name: String,
    pub config_class: String,
    pub config: serde_json::Value,
    pub derived: serde_json::Value,
}

/// The metadata of every golden file, from `testdata/golden_configs.json` (the index of the
/// repository's `testdata/golden`, kept current by `cargo test -p xtask --test testdata`; the
/// package carries the index, not the megabytes of tensors).
pub fn golden_files() -> Result<Vec<GoldenMeta>> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden_configs.json");
    let name = path.display().to_string();
    let bad = |reason: String| Error::File {
        path: name.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    let index: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> =
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (file, m) in index {
        let json = |k: &str| -> Result<serde_json::Value> {
            match m.get(k) {
                Some(s) => serde_json::from_str(s).map_err(|e| bad(format!("{file}: {k}: {e}"))),
                None => Ok(serde_json::Value::Null),
            }
        };
        out.push(GoldenMeta {
            config_class: m.get("config_class").cloned().unwrap_or_default(),
            config: json("config")?,
            derived: json("derived")?,
            name: file.clone(),
        });
    }
    assert!(!out.is_empty(), "no golden files in {name}");
    Ok(out)
}

/// A float field of a JSON object.
pub fn meta_f64(v: &serde_json::Value, key: &str) -> Option<f64> {
    v.get(key).and_then(|x| x.as_f64())
}
