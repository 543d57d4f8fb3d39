//! The Admin block of this crate against the same block computed by hand with candle ops, and
//! its gradients.

use admin_plugin::Block;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::{Module, VarBuilder, VarMap};

const DIM: usize = 8;
const EPS: f64 = 1e-5;

/// `torch.nn.LayerNorm` over the last dimension, composed by hand: biased variance, affine.
fn normalise(r: &Tensor) -> Result<Tensor> {
    let c = r.broadcast_sub(&r.mean_keepdim(D::Minus1)?)?;
    let var = c.sqr()?.mean_keepdim(D::Minus1)?;
    c.broadcast_div(&(var + EPS)?.sqrt()?)
}

fn var(map: &VarMap, name: &str) -> Result<Var> {
    let data = map.data().lock().map_err(candle_core::Error::msg)?;
    data.get(name)
        .cloned()
        .ok_or_else(|| candle_core::Error::msg(format!("no variable `{name}`")))
}

fn get(map: &VarMap, name: &str) -> Result<Tensor> {
    Ok(var(map, name)?.as_tensor().clone())
}

fn set(map: &VarMap, name: &str, values: &[f32]) -> Result<()> {
    var(map, name)?.set(&Tensor::new(values, &Device::Cpu)?)
}

/// `LN(x·ω + f(x))` with the block's own tensors, from candle ops alone.
fn admin_by_hand(map: &VarMap, prefix: &str, x: &Tensor, fx: &Tensor) -> Result<Tensor> {
    let omega = get(map, &format!("{prefix}_res.omega"))?;
    let w = get(map, &format!("{prefix}_ln.weight"))?;
    let b = get(map, &format!("{prefix}_ln.bias"))?;
    let r = (x.broadcast_mul(&omega)? + fx)?;
    normalise(&r)?.broadcast_mul(&w)?.broadcast_add(&b)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.max_all()?.to_scalar()
}

/// A block of a 3-layer stack whose ω and LayerNorm parameters are set to distinct per-channel
/// values, so that a channel mix-up or a skipped affine shows.
fn block() -> Result<(VarMap, Block)> {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let block = Block::new(DIM, 16, 3, vb)?;
    let ramp = |a: f32, step: f32| (0..DIM).map(|i| a + step * i as f32).collect::<Vec<_>>();
    set(&map, "attn_res.omega", &ramp(1.2, 0.1))?;
    set(&map, "mlp_res.omega", &ramp(2.0, -0.15))?;
    set(&map, "attn_ln.weight", &ramp(0.5, 0.2))?;
    set(&map, "attn_ln.bias", &ramp(-0.3, 0.05))?;
    set(&map, "mlp_ln.weight", &ramp(1.5, -0.1))?;
    set(&map, "mlp_ln.bias", &ramp(0.2, -0.04))?;
    Ok((map, block))
}

#[test]
fn omega_starts_at_admin_closed_form() -> Result<()> {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let _block = Block::new(DIM, 16, 3, vb)?;
    // 3 layers × 2 sublayers: n = 6, ω = sqrt((n + 1) / ln(n + 1) − 1).
    let want = (7.0f64 / 7.0f64.ln() - 1.0).sqrt() as f32;
    assert!((want - 1.611_610_5).abs() < 1e-6);
    for prefix in ["attn_res", "mlp_res"] {
        let omega = get(&map, &format!("{prefix}.omega"))?.to_vec1::<f32>()?;
        assert_eq!(omega, vec![want; DIM], "{prefix}");
    }
    Ok(())
}

#[test]
fn output_is_admin_post_ln_computed_by_hand() -> Result<()> {
    let (map, block) = block()?;
    let x = Tensor::randn(0f32, 1.0, (2, 5, DIM), &Device::Cpu)?;
    let y = block.forward(&x)?;

    let h = admin_by_hand(&map, "attn", &x, &block.attn.forward(&x)?)?;
    let want = admin_by_hand(&map, "mlp", &h, &block.mlp.forward(&h)?)?;
    assert_eq!(y.dims(), &[2, 5, DIM]);
    let diff = max_abs_diff(&y, &want)?;
    assert!(diff < 2e-5, "max |block - by hand| = {diff}");
    Ok(())
}

#[test]
fn gradients_reach_the_block_the_norms_and_omega() -> Result<()> {
    let (map, block) = block()?;
    let x = Tensor::randn(0f32, 1.0, (2, 5, DIM), &Device::Cpu)?;
    let upstream = Tensor::randn(0f32, 1.0, (2, 5, DIM), &Device::Cpu)?;
    let y = block.forward(&x)?;
    let grads = (&y * &upstream)?.sum_all()?.backward()?;

    let names = [
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.out.weight",
        "attn.out.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "attn_ln.weight",
        "attn_ln.bias",
        "mlp_ln.weight",
        "mlp_ln.bias",
        "attn_res.omega",
        "mlp_res.omega",
    ];
    assert_eq!(
        map.all_vars().len(),
        names.len(),
        "every variable is checked"
    );
    for name in names {
        let g = grads
            .get(&get(&map, name)?)
            .ok_or_else(|| candle_core::Error::msg(format!("no gradient for `{name}`")))?;
        let size = g.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(size > 1e-4, "`{name}`: |gradient| = {size}");
    }

    // The last LayerNorm's affine, exactly: d/db = Σ_rows upstream, d/dw = Σ_rows upstream · n,
    // where n is the normalised sum before the affine.
    let h = admin_by_hand(&map, "attn", &x, &block.attn.forward(&x)?)?;
    let omega = get(&map, "mlp_res.omega")?;
    let n = normalise(&(h.broadcast_mul(&omega)? + block.mlp.forward(&h)?)?)?;
    let rows = |t: &Tensor| t.reshape(((), DIM))?.sum(0);
    let gb = grads.get(&get(&map, "mlp_ln.bias")?).cloned();
    let gw = grads.get(&get(&map, "mlp_ln.weight")?).cloned();
    let (gb, gw) = (gb.expect("checked above"), gw.expect("checked above"));
    assert!(max_abs_diff(&gb, &rows(&upstream)?)? < 1e-5);
    assert!(max_abs_diff(&gw, &rows(&(&upstream * &n)?)?)? < 1e-4);
    Ok(())
}

#[test]
fn torchscale_errors_come_through_candle_question_marks() {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    // A stack of zero layers has no ω (it divides by ln(n + 1) = 0): the field is named.
    let err = match Block::new(DIM, 16, 0, vb) {
        Ok(_) => panic!("a zero-layer stack must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.starts_with("invalid config field `num_res_layers`"),
        "{err}"
    );
}
