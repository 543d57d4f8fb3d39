//! admin-torch's `OmegaResidual` (`x·ω + f(x)`) and the Post-LN block around it,
//! `LN(x·ω + f(x))`.

use candle_core::{DType, Tensor, D};
use candle_nn::{Init, VarBuilder};
use torchscale_core::layer_norm::LayerNorm;
use torchscale_core::{Branch, Error, Multiway, Residual, Result};

/// The skip scale ω: a fixed buffer of shape `[1]` or a learnable per-channel vector of shape
/// `[embed_dim]`, both stored under the key `omega`.
#[derive(Debug, Clone)]
pub struct Omega {
    init: f64,
    tensor: Tensor,
    learnable: bool,
}

impl Omega {
    /// A fixed ω. When `vb` holds `omega` (a checkpoint), that `[1]` tensor is used; otherwise a
    /// constant filled with `init` is made, deliberately outside the `VarBuilder`'s variables: a
    /// PyTorch buffer gets no gradient and no optimiser step.
    pub fn buffer(init: f64, vb: VarBuilder) -> Result<Self> {
        let tensor = if vb.contains_tensor("omega") {
            vb.get(1, "omega")?.to_dtype(DType::F32)?
        } else {
            Tensor::from_vec(vec![init as f32], 1, vb.device())?
        };
        Ok(Self {
            init,
            tensor,
            learnable: false,
        })
    }

    /// A learnable ω: the parameter `omega` of shape `[embed_dim]`, filled with `init`.
    pub fn parameter(init: f64, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        if embed_dim == 0 {
            return Err(Error::config("embed_dim", "must be at least 1"));
        }
        let tensor = vb.get_with_hints(embed_dim, "omega", Init::Const(init))?;
        Ok(Self {
            init,
            tensor,
            learnable: true,
        })
    }

    /// The value ω was initialised with (from the formula, not a loaded checkpoint).
    pub fn init_value(&self) -> f64 {
        self.init
    }

    /// The stored ω: `[1]` for a buffer, `[embed_dim]` for a parameter.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// Whether ω is a trainable parameter.
    pub fn is_parameter(&self) -> bool {
        self.learnable
    }

    /// `x·ω + fx`. A buffer initialised to exactly 1 gives `x + fx` without the multiply, as
    /// admin-torch does (its check is on the init value).
    pub fn combine(&self, x: &Tensor, fx: &Tensor) -> Result<Tensor> {
        if !self.learnable && self.init == 1.0 {
            return Ok((x + fx)?);
        }
        if self.learnable {
            let c = self.tensor.dim(0)?;
            if x.dim(D::Minus1)? != c {
                return Err(Error::shape("x", format!("[.., {c}]"), x.dims()));
            }
        }
        let w = self.tensor.to_dtype(x.dtype())?;
        Ok((x.broadcast_mul(&w)? + fx)?)
    }
}

/// Admin's Post-LN block: `LN(x·ω + f(x))`. The sublayer sees the raw stream.
#[derive(Debug, Clone)]
pub struct OmegaResidual {
    omega: Omega,
    norm: Multiway<LayerNorm>,
}

impl OmegaResidual {
    /// From a built ω and LayerNorm.
    pub fn new(omega: Omega, norm: Multiway<LayerNorm>) -> Self {
        Self { omega, norm }
    }

    /// `x·ω + fx`, without the LayerNorm (admin-torch's `OmegaResidual.forward`).
    pub fn combine(&self, x: &Tensor, fx: &Tensor) -> Result<Tensor> {
        self.omega.combine(x, fx)
    }

    /// The skip scale.
    pub fn omega(&self) -> &Omega {
        &self.omega
    }

    /// The LayerNorm after the sum (or its multiway pair).
    pub fn norm(&self) -> &Multiway<LayerNorm> {
        &self.norm
    }

    // The four methods below repeat the `Residual` ones so that they need no trait import (rustc
    // would otherwise suggest candle's `Module`, which has a `forward` too).

    /// `LN(x·ω + f(x))` ([`Residual::forward`]); `f` returns our `Result`.
    pub fn forward(
        &self,
        x: &Tensor,
        f: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        Residual::forward(self, x, f)
    }

    /// [`OmegaResidual::forward`] with a multiway branch ([`Residual::forward_branch`]).
    pub fn forward_branch(
        &self,
        x: &Tensor,
        branch: Branch,
        f: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        Residual::forward_branch(self, x, branch, f)
    }

    /// `LN(x·ω + f(x))` for an `f` returning candle's `Result` (or any error convertible into
    /// [`Error`]): `res.forward_with(&x, |h| attn.forward(h))?` ([`Residual::forward_with`]).
    pub fn forward_with<F, E>(&self, x: &Tensor, f: F) -> Result<Tensor>
    where
        F: FnMut(&Tensor) -> std::result::Result<Tensor, E>,
        E: Into<Error>,
    {
        Residual::forward_with(self, x, f)
    }

    /// [`OmegaResidual::forward_with`] with a multiway branch.
    pub fn forward_branch_with<F, E>(&self, x: &Tensor, branch: Branch, f: F) -> Result<Tensor>
    where
        F: FnMut(&Tensor) -> std::result::Result<Tensor, E>,
        E: Into<Error>,
    {
        Residual::forward_branch_with(self, x, branch, f)
    }
}

impl Residual for OmegaResidual {
    fn pre(&self, x: &Tensor, _branch: Branch) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn post(&self, x: &Tensor, fx: &Tensor, branch: Branch) -> Result<Tensor> {
        let r = self.combine(x, fx)?;
        self.norm.apply(&r, branch, |ln, h| ln.forward(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use std::collections::HashMap;
    use torchscale_core::init::ParamStore;

    fn vals(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_vec1()?)
    }

    fn ln(dim: usize, vb: VarBuilder) -> Result<Multiway<LayerNorm>> {
        Multiway::new(false, vb, |vb| LayerNorm::new(dim, 1e-5, vb))
    }

    #[test]
    fn buffer_combine_scales_the_skip_only() -> Result<()> {
        let store = ParamStore::new(0);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let om = Omega::buffer(1.5, vb.pp("res"))?;
        assert!(
            store.named_vars().is_empty(),
            "a buffer is not a trainable variable"
        );
        let x = Tensor::new(&[[1.0f32, -2.0], [0.5, 4.0]], &Device::Cpu)?;
        let f = Tensor::new(&[[0.25f32, 1.0], [-1.0, 0.0]], &Device::Cpu)?;
        assert_eq!(vals(&om.combine(&x, &f)?)?, [1.75, -2.0, -0.25, 6.0]);
        assert_eq!(om.tensor().dims(), &[1]);
        Ok(())
    }

    #[test]
    fn buffer_is_read_from_a_checkpoint() -> Result<()> {
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        map.insert("r.omega".to_string(), Tensor::new(&[2.0f32], &dev)?);
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let om = Omega::buffer(1.25, vb.pp("r"))?;
        let x = Tensor::new(&[3.0f32], &dev)?;
        assert_eq!(vals(&om.combine(&x, &x.zeros_like()?)?)?, [6.0]);
        assert_eq!(om.init_value(), 1.25);
        // A checkpoint omega of the wrong shape is rejected.
        let mut bad = HashMap::new();
        bad.insert("omega".to_string(), Tensor::new(&[1.0f32, 2.0], &dev)?);
        assert!(Omega::buffer(1.0, VarBuilder::from_tensors(bad, DType::F32, &dev)).is_err());
        Ok(())
    }

    #[test]
    fn unit_buffer_is_plain_sum() -> Result<()> {
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        // Even with a different stored value, an init of exactly 1 means `x + f` (admin-torch).
        map.insert("omega".to_string(), Tensor::new(&[3.0f32], &dev)?);
        let om = Omega::buffer(1.0, VarBuilder::from_tensors(map, DType::F32, &dev))?;
        let x = Tensor::new(&[1.0f32, 2.0], &dev)?;
        let f = Tensor::new(&[0.5f32, 0.5], &dev)?;
        assert_eq!(vals(&om.combine(&x, &f)?)?, [1.5, 2.5]);
        Ok(())
    }

    #[test]
    fn parameter_is_per_channel_and_gets_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let store = ParamStore::new(1);
        let vb = store.var_builder(DType::F32, &dev);
        let om = Omega::parameter(1.6, 3, vb.pp("res"))?;
        let norm = ln(3, vb.pp("ln"))?;
        let res = OmegaResidual::new(om, norm);
        let var = store
            .get("res.omega")
            .ok_or_else(|| Error::invalid("res.omega", "not created"))?;
        assert_eq!(vals(var.as_tensor())?, [1.6f32; 3]);
        // A distinct per-channel value is applied per channel.
        var.set(&Tensor::new(&[1.0f32, 2.0, 3.0], &dev)?)?;
        let x = Tensor::new(&[[1.0f32, 1.0, 1.0], [2.0, -1.0, 0.5]], &dev)?;
        let f = Tensor::new(&[[0.5f32, 0.0, -0.5], [0.0, 1.0, 0.0]], &dev)?;
        assert_eq!(
            vals(&res.combine(&x, &f)?)?,
            [1.5, 2.0, 2.5, 2.0, -1.0, 1.5]
        );
        let xv = Var::from_tensor(&x)?;
        let y = res.forward(xv.as_tensor(), &mut |h| Ok((h.sqr()? * 0.3)?))?;
        let w = Tensor::new(&[[0.3f32, -1.0, 2.0], [1.0, 0.7, -0.2]], &dev)?;
        let grads = (y * w)?.sum_all()?.backward()?;
        for (name, v) in store.named_vars() {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| Error::invalid(&name, "no gradient"))?;
            let m = g.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(m > 1e-4, "{name}: gradient {m}");
        }
        assert_eq!(store.named_vars().len(), 3);
        let bad = Tensor::ones((2, 4), DType::F32, &dev)?;
        assert!(matches!(res.combine(&bad, &bad), Err(Error::Shape { .. })));
        Ok(())
    }

    #[test]
    fn candle_closures_and_branches_give_the_same_block() -> Result<()> {
        let dev = Device::Cpu;
        let store = ParamStore::new(4);
        let vb = store.var_builder(DType::F32, &dev);
        let norm = Multiway::new(true, vb.pp("ln"), |vb| LayerNorm::new(4, 1e-5, vb))?;
        let res = OmegaResidual::new(Omega::buffer(2.0, vb.pp("r"))?, norm);
        // Make the B norm differ from A, so that the branch is seen in the output.
        store
            .get("ln.B.bias")
            .ok_or_else(|| Error::invalid("ln.B.bias", "not created"))?
            .set(&Tensor::new(&[1.0f32, 1.0, 1.0, 1.0], &dev)?)?;
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0, 4.0]], &dev)?;
        let f = Tensor::new(&[[1.0f32, -1.0, 0.0, 2.0]], &dev)?;
        let candle_f = |_: &Tensor| -> candle_core::Result<Tensor> { Ok(f.clone()) };
        let a = vals(&res.forward_with(&x, candle_f)?)?;
        assert_eq!(a, vals(&res.forward(&x, &mut |_| Ok(f.clone()))?)?);
        // r = 2x + f = [3, 3, 6, 10]: mean 5.5, biased variance 33/4.
        let s = (33.0f64 / 4.0 + 1e-5).sqrt();
        for (g, v) in a.iter().zip([3.0f64, 3.0, 6.0, 10.0]) {
            approx::assert_abs_diff_eq!(*g as f64, (v - 5.5) / s, epsilon = 1e-6);
        }
        let b = vals(&res.forward_branch_with(&x, Branch::B, candle_f)?)?;
        assert_eq!(
            b,
            vals(&res.forward_branch(&x, Branch::B, &mut |_| Ok(f.clone()))?)?
        );
        for (gb, ga) in b.iter().zip(&a) {
            approx::assert_abs_diff_eq!(*gb, ga + 1.0, epsilon = 1e-6);
        }
        Ok(())
    }

    #[test]
    fn residual_is_post_ln_of_the_combination() -> Result<()> {
        let dev = Device::Cpu;
        let store = ParamStore::new(2);
        let vb = store.var_builder(DType::F32, &dev);
        let res = OmegaResidual::new(Omega::buffer(2.0, vb.pp("r"))?, ln(4, vb.pp("ln"))?);
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0, 4.0]], &dev)?;
        let f = Tensor::new(&[[1.0f32, -1.0, 0.0, 2.0]], &dev)?;
        assert_eq!(vals(&res.pre(&x, Branch::A)?)?, [1.0, 2.0, 3.0, 4.0]);
        let got = vals(&res.post(&x, &f, Branch::A)?)?;
        // r = 2x + f = [3, 3, 6, 10]: mean 5.5, biased variance 33/4.
        let r = [3.0f64, 3.0, 6.0, 10.0];
        for (g, v) in got.iter().zip(r) {
            let want = (v - 5.5) / (33.0f64 / 4.0 + 1e-5).sqrt();
            approx::assert_abs_diff_eq!(*g as f64, want, epsilon = 1e-6);
        }
        Ok(())
    }
}
