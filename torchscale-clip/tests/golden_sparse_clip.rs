//! Parity with testdata/golden/sparse_clip.safetensors (FORMAT.md 4.2).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use torchscale_clip::{GlobalNorm, SparseClip};
use torchscale_core::GradClipper;

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/testdata/sparse_clip.safetensors"
);
const RTOL: f64 = 1e-5;

struct Golden {
    tensors: HashMap<String, Tensor>,
    derived: serde_json::Value,
    /// Parameter names (`dense.i`, `expert.e.j`) in the file's order.
    dense: Vec<String>,
    expert: Vec<String>,
}

fn load() -> Golden {
    let bytes = std::fs::read(PATH).unwrap_or_else(|e| panic!("{PATH}: {e}"));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let meta = meta.metadata().as_ref().expect("metadata");
    let derived: serde_json::Value = serde_json::from_str(&meta["derived"]).expect("derived json");
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("tensors");
    let mut dense = Vec::new();
    let mut expert = Vec::new();
    for k in tensors.keys() {
        if let Some(name) = k.strip_prefix("input.grad.") {
            if name.starts_with("dense.") {
                dense.push(name.to_string());
            } else if name.starts_with("expert.") {
                expert.push(name.to_string());
            }
        }
    }
    dense.sort();
    expert.sort();
    Golden {
        tensors,
        derived,
        dense,
        expert,
    }
}

impl Golden {
    fn num(&self, key: &str) -> f64 {
        self.derived[key]
            .as_f64()
            .unwrap_or_else(|| panic!("derived.{key}"))
    }
    fn scalar(&self, key: &str) -> f64 {
        self.tensors[key]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64
    }
    /// Vars whose gradient under the returned store equals the stored input gradients.
    fn grads(&self) -> (Vec<Var>, Vec<Var>, GradStore) {
        let mk = |names: &[String]| -> Vec<(Var, Tensor)> {
            names
                .iter()
                .map(|n| {
                    let g = self.tensors[&format!("input.grad.{n}")].clone();
                    (Var::from_tensor(&g.ones_like().unwrap()).unwrap(), g)
                })
                .collect()
        };
        let d = mk(&self.dense);
        let e = mk(&self.expert);
        let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (v, g) in d.iter().chain(e.iter()) {
            loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        (
            d.into_iter().map(|p| p.0).collect(),
            e.into_iter().map(|p| p.0).collect(),
            grads,
        )
    }
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= RTOL * want.abs() + 1e-7,
        "{what}: got {got}, want {want}"
    );
}

fn check_grads(g: &Golden, prefix: &str, names: &[String], vars: &[Var], grads: &GradStore) {
    for (n, v) in names.iter().zip(vars) {
        let got = grads
            .get(v)
            .expect("grad")
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = g.tensors[&format!("expect.{prefix}.{n}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got.len(), want.len(), "{prefix}.{n}");
        for (a, b) in got.iter().zip(&want) {
            close(*a as f64, *b as f64, &format!("{prefix}.{n}"));
        }
    }
}

#[test]
fn file_has_inputs() {
    let g = load();
    assert!(!g.dense.is_empty() && !g.expert.is_empty());
}

#[test]
fn global_norm_matches_clip_grad_norm() {
    let g = load();
    let (d, e, mut grads) = g.grads();
    let r = GlobalNorm::new(g.num("max_norm"))
        .clip(&mut grads, &d, &e)
        .unwrap();
    close(
        r.total_norm,
        g.scalar("expect.total_norm_vanilla"),
        "total_norm_vanilla",
    );
    close(
        r.coef,
        g.scalar("expect.clip_coef_vanilla"),
        "clip_coef_vanilla",
    );
    assert_eq!(r.clipped, r.coef < 1.0);
    check_grads(&g, "clipped_vanilla", &g.dense, &d, &grads);
    check_grads(&g, "clipped_vanilla", &g.expert, &e, &grads);
}

fn sparse(g: &Golden, compat: bool) -> (Vec<Var>, Vec<Var>, GradStore) {
    let (d, e, mut grads) = g.grads();
    let (m, ne, w) = (
        g.num("max_norm"),
        g.num("moe_expert_count") as usize,
        g.num("world_size") as usize,
    );
    let clip = if compat {
        SparseClip::torchscale_compat(m, ne, w)
    } else {
        SparseClip::new(m, ne, w)
    };
    close(
        clip.expert_denominator().unwrap(),
        g.num("expert_denominator"),
        "expert_denominator",
    );
    let r = clip.clip(&mut grads, &d, &e).unwrap();
    close(
        r.total_norm,
        g.scalar("expect.total_norm_sparse"),
        "total_norm_sparse",
    );
    close(
        r.coef,
        g.scalar("expect.clip_coef_sparse"),
        "clip_coef_sparse",
    );
    (d, e, grads)
}

#[test]
fn sparse_clip_intended_scales_experts() {
    let g = load();
    let (d, e, grads) = sparse(&g, false);
    check_grads(&g, "clipped_sparse_intended", &g.dense, &d, &grads);
    check_grads(&g, "clipped_sparse_intended", &g.expert, &e, &grads);
}

#[test]
fn sparse_clip_torchscale_compat_leaves_experts() {
    let g = load();
    let (d, e, grads) = sparse(&g, true);
    check_grads(&g, "clipped_sparse_torchscale", &g.dense, &d, &grads);
    check_grads(&g, "clipped_sparse_torchscale", &g.expert, &e, &grads);
}
