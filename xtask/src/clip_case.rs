//! The `sparse_clip` golden case (FORMAT.md section 4.2): global-norm clipping and SparseClip,
//! both the intended behaviour and torchscale's published one, on stored gradients.

use std::collections::HashMap;

use anyhow::{anyhow, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use torchscale_clip::{GlobalNorm, SparseClip};
use torchscale_core::GradClipper;

use crate::golden::GoldenFile;

/// Runs the three clippers on `input.grad.*` and returns every `expect.*` tensor.
pub fn run(f: &GoldenFile) -> Result<HashMap<String, Tensor>> {
    let derived = f.json("derived")?;
    let num = |k: &str| {
        derived
            .get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| anyhow!("derived has no number `{k}`"))
    };
    let max_norm = num("max_norm")?;
    let experts = num("moe_expert_count")? as usize;
    let world = num("world_size")? as usize;
    let names = |group: &str| -> Vec<String> {
        f.keys_with(&format!("input.grad.{group}."))
            .into_iter()
            .map(|k| k["input.grad.".len()..].to_string())
            .collect()
    };
    let (dense, expert) = (names("dense"), names("expert"));
    if dense.is_empty() && expert.is_empty() {
        return Err(anyhow!("no input.grad.* tensors"));
    }
    let mut out = HashMap::new();
    let scalar = |v: f64| Tensor::new(&[v as f32], &Device::Cpu);

    let clippers: [(&str, &str, Box<dyn GradClipper>); 3] = [
        (
            "vanilla",
            "clipped_vanilla",
            Box::new(GlobalNorm::new(max_norm)),
        ),
        (
            "sparse",
            "clipped_sparse_intended",
            Box::new(SparseClip::new(max_norm, experts, world)),
        ),
        (
            "sparse",
            "clipped_sparse_torchscale",
            Box::new(SparseClip::torchscale_compat(max_norm, experts, world)),
        ),
    ];
    for (norm_name, clipped_name, clipper) in clippers {
        let (d, e, mut grads) = grad_store(f, &dense, &expert)?;
        let r = clipper.clip(&mut grads, &d, &e)?;
        out.insert(
            format!("expect.total_norm_{norm_name}"),
            scalar(r.total_norm)?,
        );
        out.insert(format!("expect.clip_coef_{norm_name}"), scalar(r.coef)?);
        for (n, v) in dense.iter().zip(&d).chain(expert.iter().zip(&e)) {
            let g = grads
                .get(v)
                .ok_or_else(|| anyhow!("clipper dropped the gradient of {n}"))?;
            out.insert(format!("expect.{clipped_name}.{n}"), g.clone());
        }
        if clipped_name == "clipped_sparse_torchscale" {
            // torchscale's function clips a scaled copy of each expert gradient and drops it; the
            // file stores that copy: g / sqrt(max(world, E)) times the coefficient.
            let den = SparseClip::new(max_norm, experts, world).expert_denominator()?;
            for n in &expert {
                let g = f.get(&format!("input.grad.{n}"))?;
                let copy = ((g / den)? * r.coef)?;
                out.insert(format!("expect.sparse_internal_expert_copy.{n}"), copy);
            }
        }
    }
    Ok(out)
}

/// Fresh variables whose gradients, in the returned store, are the stored input gradients.
fn grad_store(
    f: &GoldenFile,
    dense: &[String],
    expert: &[String],
) -> Result<(Vec<Var>, Vec<Var>, GradStore)> {
    let mut loss = Tensor::new(0f32, &Device::Cpu)?;
    let mut make = |names: &[String]| -> Result<Vec<Var>> {
        names
            .iter()
            .map(|n| {
                let g = f.get(&format!("input.grad.{n}"))?;
                let v = Var::from_tensor(&g.ones_like()?)?;
                loss = (&loss + (v.as_tensor() * g)?.sum_all()?)?;
                Ok(v)
            })
            .collect()
    };
    let d = make(dense)?;
    let e = make(expert)?;
    let grads = loss.backward()?;
    Ok((d, e, grads))
}
