//! Parity with admin-torch 0.1.0 on `testdata/golden/admin_residual.safetensors` (FORMAT.md 4.1):
//! a Post-LN stack of torchscale attention / feed-forward sublayers joined by `OmegaResidual`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use torchscale_admin::{as_residual, omega, OutputChangeScale};
use torchscale_core::attention::{AttentionConfig, AttentionGains, MultiheadAttention};
use torchscale_core::ffn::{FeedForward, FfnConfig};
use torchscale_core::init::ParamStore;
use torchscale_core::{Activation, Branch, Ctx, Error, NormSpec, Residual, Result, Sublayer};

struct Golden {
    tensors: HashMap<String, Tensor>,
    config: serde_json::Value,
    derived: serde_json::Value,
}

fn path() -> PathBuf {
    // A link to the repository's testdata/golden; `cargo package` stores the file itself.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/admin_residual.safetensors")
}

fn load() -> Result<Golden> {
    let p = path();
    let bad = |reason: String| Error::File {
        path: p.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(&p).map_err(|e| bad(e.to_string()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let m = meta.metadata().clone().unwrap_or_default();
    let json = |k: &str| -> Result<serde_json::Value> {
        let s = m
            .get(k)
            .ok_or_else(|| bad(format!("metadata `{k}` missing")))?;
        serde_json::from_str(s).map_err(|e| bad(format!("{k}: {e}")))
    };
    Ok(Golden {
        tensors,
        config: json("config")?,
        derived: json("derived")?,
    })
}

impl Golden {
    fn get(&self, key: &str) -> Result<&Tensor> {
        self.tensors
            .get(key)
            .ok_or_else(|| Error::MissingTensor { key: key.into() })
    }
    fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }
}

/// FORMAT.md section 6, strict forward tolerance: |got - want| <= 5e-6 + 1e-5·|want|.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f32> = got.flatten_all()?.to_vec1()?;
    let w: Vec<f32> = want.flatten_all()?.to_vec1()?;
    for (a, b) in g.iter().zip(&w) {
        let (a, b) = (*a as f64, *b as f64);
        let excess = (a - b).abs() - (5e-6 + 1e-5 * b.abs());
        assert!(excess <= 0.0, "{what}: got {a}, want {b}");
    }
    Ok(())
}

enum Sub {
    Attn(MultiheadAttention),
    Ffn(FeedForward),
}

#[test]
fn omega_stack_matches_admin_torch() -> Result<()> {
    let g = load()?;
    let dev = Device::Cpu;
    let vb = VarBuilder::from_tensors(g.tensors.clone(), DType::F32, &dev);
    let x0 = g.get("input.x")?;
    let mask = g.get("input.key_padding_mask")?;
    let c = x0.dim(2)?;
    let heads = g.config["encoder_attention_heads"]
        .as_u64()
        .ok_or_else(|| Error::config("encoder_attention_heads", "missing"))?
        as usize;
    let eps = g.config["layernorm_eps"].as_f64().unwrap_or(1e-5);
    let activation: Activation = g.config["activation_fn"]
        .as_str()
        .unwrap_or("gelu")
        .parse()?;
    let n = (0..)
        .take_while(|i| g.has(&format!("residuals.{i}.omega")))
        .count();
    assert!(n > 0, "no residuals in the file");
    assert_eq!(g.derived["num_res_layers"].as_u64(), Some(n as u64));
    let scale: OutputChangeScale = g.derived["output_change_scale"]
        .as_str()
        .unwrap_or("default")
        .parse()?;
    let spec = NormSpec {
        dim: c,
        eps,
        multiway: false,
    };

    let mut x = x0.clone();
    for i in 0..n {
        let sub_vb = vb.pp("sublayers").pp(i);
        let sub = if g.has(&format!("sublayers.{i}.q_proj.weight")) {
            let cfg = AttentionConfig {
                embed_dim: c,
                num_heads: heads,
                self_attention: true,
                inner_norm: false,
                xpos_scale_base: None,
                multiway: false,
                attention_dropout: 0.0,
                layernorm_eps: eps,
            };
            Sub::Attn(MultiheadAttention::new(
                cfg,
                AttentionGains::default(),
                sub_vb,
            )?)
        } else {
            let ffn_dim = g.get(&format!("sublayers.{i}.fc1.weight"))?.dim(0)?;
            let cfg = FfnConfig {
                embed_dim: c,
                ffn_dim,
                activation,
                activation_dropout: 0.0,
                dropout: 0.0,
                inner_norm: false,
                layernorm_eps: eps,
            };
            Sub::Ffn(FeedForward::new(cfg, 1.0, sub_vb)?)
        };
        let res = as_residual(n).output_change_scale(scale).build(
            spec,
            vb.pp("layer_norms").pp(i),
            vb.pp("residuals").pp(i),
        )?;
        // The stored buffer is admin-torch's f64 omega rounded to f32.
        let stored: Vec<f32> = res.omega().tensor().to_vec1()?;
        let want_omega = g.derived["omega"][i].as_f64().unwrap_or(f64::NAN);
        approx::assert_relative_eq!(stored[0] as f64, want_omega, max_relative = 1e-7);
        approx::assert_relative_eq!(res.omega().init_value(), want_omega, max_relative = 1e-6);

        assert_close(&format!("x.{i}"), &x, g.get(&format!("expect.x.{i}"))?)?;
        let mut ctx = Ctx {
            key_padding_mask: Some(mask),
            ..Default::default()
        };
        let f = match &sub {
            Sub::Attn(m) => Sublayer::forward(m, &x, &mut ctx)?,
            Sub::Ffn(m) => Sublayer::forward(m, &x, &mut ctx)?,
        };
        assert_close(&format!("f_x.{i}"), &f, g.get(&format!("expect.f_x.{i}"))?)?;
        let r = res.combine(&x, &f)?;
        assert_close(
            &format!("residual_out.{i}"),
            &r,
            g.get(&format!("expect.residual_out.{i}"))?,
        )?;
        let out = res.post(&x, &f, Branch::A)?;
        assert_close(
            &format!("out.{i}"),
            &out,
            g.get(&format!("expect.out.{i}"))?,
        )?;
        // The closure form gives the same block output.
        let via_forward = res.forward(&x, &mut |h| {
            let mut ctx = Ctx {
                key_padding_mask: Some(mask),
                ..Default::default()
            };
            match &sub {
                Sub::Attn(m) => Sublayer::forward(m, h, &mut ctx),
                Sub::Ffn(m) => Sublayer::forward(m, h, &mut ctx),
            }
        })?;
        assert_close(
            &format!("forward.{i}"),
            &via_forward,
            g.get(&format!("expect.out.{i}"))?,
        )?;
        x = out;
    }
    assert_close("output", &x, g.get("expect.output")?)
}

#[test]
fn omega_matches_golden_table() -> Result<()> {
    let g = load()?;
    let table = g.derived["omega_table"]
        .as_object()
        .ok_or_else(|| Error::invalid("omega_table", "missing"))?;
    let mut checked = 0;
    for (mode, values) in table {
        let scale: OutputChangeScale = mode.parse()?;
        let values = values
            .as_object()
            .ok_or_else(|| Error::invalid("omega_table", "not an object"))?;
        for (n, want) in values {
            let n: usize = n
                .parse()
                .map_err(|_| Error::invalid("omega_table", format!("bad N `{n}`")))?;
            let want = want.as_f64().unwrap_or(f64::NAN);
            approx::assert_relative_eq!(omega(n, scale)?, want, max_relative = 1e-12);
            if scale == OutputChangeScale::Default {
                // `O(logn)` is the same formula under its other name.
                assert_eq!(omega(n, OutputChangeScale::OLogN)?, omega(n, scale)?);
            }
            checked += 1;
        }
    }
    assert!(
        table.len() == 3 && checked >= 3 * 10,
        "{checked} omega values checked"
    );
    Ok(())
}

/// A learnable omega, built over the golden input, receives a gradient, as do the LayerNorm's
/// parameters.
#[test]
fn learnable_omega_gets_gradient() -> Result<()> {
    let g = load()?;
    let x = g.get("input.x")?;
    let f = g.get("expect.f_x.0")?;
    let c = x.dim(2)?;
    let store = ParamStore::new(0);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let spec = NormSpec {
        dim: c,
        eps: 1e-5,
        multiway: false,
    };
    let res = as_residual(6)
        .as_parameter(c)
        .build(spec, vb.pp("ln"), vb.pp("res"))?;
    let omega_var = store
        .get("res.omega")
        .ok_or_else(|| Error::invalid("res.omega", "not a parameter"))?;
    assert_eq!(omega_var.dims(), &[c]);
    let xv = Var::from_tensor(x)?;
    let y = res.post(xv.as_tensor(), f, Branch::A)?;
    // LN output sums to ~0 per row, so weight it to get a nonzero loss gradient.
    let w = Tensor::arange(0f32, (y.elem_count()) as f32, &Device::Cpu)?
        .reshape(y.shape())?
        .sin()?;
    let grads = (y * w)?.sum_all()?.backward()?;
    for (name, v) in store.named_vars() {
        let gr = grads
            .get(v.as_tensor())
            .ok_or_else(|| Error::invalid(&name, "no gradient"))?;
        let m = gr.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(m > 1e-4, "{name}: gradient {m}");
    }
    assert_eq!(store.named_vars().len(), 3);
    Ok(())
}
