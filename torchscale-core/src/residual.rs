//! How a sublayer joins the residual stream, and how a technique says so.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::multiway::Branch;
use crate::{Error, Result};

/// How one sublayer `f` joins the residual stream: where its norms sit and how the skip is scaled.
///
/// Like a tower `Layer` wrapping any `Service`, a `Residual` wraps any function:
/// `res.forward(&x, &mut |h| my_attention(h))`. The lower-level [`Residual::pre`] and
/// [`Residual::post`] serve code that has already computed `f`'s input or output.
///
/// From candle code, [`Residual::forward_with`] takes a closure that returns candle's `Result`
/// (or any error convertible into [`Error`]), and `?` turns our [`Error`] back into
/// `candle_core::Error`:
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use torchscale_core::{init::ParamStore, layer_norm::LayerNorm, Branch, Residual};
///
/// /// `LN(x + f(x))`, the smallest Post-LN residual.
/// #[derive(Debug)]
/// struct PostLn(LayerNorm);
///
/// impl Residual for PostLn {
///     fn pre(&self, x: &Tensor, _: Branch) -> torchscale_core::Result<Tensor> {
///         Ok(x.clone())
///     }
///     fn post(&self, x: &Tensor, fx: &Tensor, _: Branch) -> torchscale_core::Result<Tensor> {
///         self.0.forward(&(x + fx)?)
///     }
/// }
///
/// fn block(res: &PostLn, mlp: &candle_nn::Linear, x: &Tensor) -> candle_core::Result<Tensor> {
///     Ok(res.forward_with(x, |h| mlp.forward(h))?)
/// }
///
/// # fn main() -> candle_core::Result<()> {
/// let store = ParamStore::new(0);
/// let vb = store.var_builder(DType::F32, &Device::Cpu);
/// let res = PostLn(LayerNorm::new(4, 1e-5, vb.pp("ln"))?);
/// let mlp = candle_nn::linear(4, 4, vb.pp("mlp"))?;
/// let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu)?;
/// assert_eq!(block(&res, &mlp, &x)?.dims(), &[2, 4]);
/// # Ok(()) }
/// ```
pub trait Residual: Send + Sync + std::fmt::Debug {
    /// What the sublayer sees: `LN(x)` for Pre-LN styles, `x` otherwise.
    fn pre(&self, x: &Tensor, branch: Branch) -> Result<Tensor>;

    /// Joins the sublayer output `fx` to the skip `x`: `x + fx`, `LN(α·x + fx)`, `LN(ω·x + fx)`, ...
    fn post(&self, x: &Tensor, fx: &Tensor, branch: Branch) -> Result<Tensor>;

    /// `post(x, f(pre(x)))`.
    fn forward(&self, x: &Tensor, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        self.forward_branch(x, Branch::A, f)
    }

    /// [`Residual::forward`] with a multiway branch.
    fn forward_branch(
        &self,
        x: &Tensor,
        branch: Branch,
        f: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let h = self.pre(x, branch)?;
        let fx = f(&h)?;
        self.post(x, &fx, branch)
    }

    /// [`Residual::forward`] for a closure returning any error convertible into [`Error`],
    /// candle's included: `res.forward_with(&x, |h| attn.forward(h))`.
    fn forward_with<F, E>(&self, x: &Tensor, f: F) -> Result<Tensor>
    where
        Self: Sized,
        F: FnMut(&Tensor) -> std::result::Result<Tensor, E>,
        E: Into<Error>,
    {
        self.forward_branch_with(x, Branch::A, f)
    }

    /// [`Residual::forward_branch`] for a closure returning any error convertible into [`Error`].
    fn forward_branch_with<F, E>(&self, x: &Tensor, branch: Branch, mut f: F) -> Result<Tensor>
    where
        Self: Sized,
        F: FnMut(&Tensor) -> std::result::Result<Tensor, E>,
        E: Into<Error>,
    {
        // Through `forward_branch`, so that an implementation overriding it is honoured.
        self.forward_branch(x, branch, &mut |h| f(h).map_err(Into::into))
    }
}

// A boxed or borrowed residual is one too. Besides composing, this is what makes the generic
// `forward_with` (which needs `Self: Sized`) callable on `Box<dyn Residual>` and
// `&dyn Residual`, as `Stabilizer::residual` hands them out. Every method delegates, so an
// overridden `forward_branch` is kept.
macro_rules! delegate_residual {
    ($($ty:ty),*) => {$(
        impl<R: Residual + ?Sized> Residual for $ty {
            fn pre(&self, x: &Tensor, branch: Branch) -> Result<Tensor> {
                (**self).pre(x, branch)
            }
            fn post(&self, x: &Tensor, fx: &Tensor, branch: Branch) -> Result<Tensor> {
                (**self).post(x, fx, branch)
            }
            fn forward(
                &self,
                x: &Tensor,
                f: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
            ) -> Result<Tensor> {
                (**self).forward(x, f)
            }
            fn forward_branch(
                &self,
                x: &Tensor,
                branch: Branch,
                f: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
            ) -> Result<Tensor> {
                (**self).forward_branch(x, branch, f)
            }
        }
    )*};
}

delegate_residual!(Box<R>, &R);

/// Where a residual block sits in a layer; also names its LayerNorm as torchscale does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// Self-attention (`self_attn_layer_norm`).
    SelfAttention,
    /// Encoder-decoder attention (`encoder_attn_layer_norm`).
    CrossAttention,
    /// Feed-forward or MoE (`final_layer_norm`).
    FeedForward,
    /// A site of a sublayer kind defined outside torchscale (a retention block, say); its
    /// LayerNorm is keyed by the given name. Techniques treat it as they treat a feed-forward
    /// site for wiring and give it no inner norm and no init gain unless they know it.
    Custom(&'static str),
}

impl Site {
    /// The torchscale key of this site's LayerNorm.
    pub fn norm_name(&self) -> &'static str {
        match self {
            Site::SelfAttention => "self_attn_layer_norm",
            Site::CrossAttention => "encoder_attn_layer_norm",
            Site::FeedForward => "final_layer_norm",
            Site::Custom(name) => name,
        }
    }
}

/// The weights whose init a technique may scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamRole {
    /// `q_proj`.
    Query,
    /// `k_proj`.
    Key,
    /// `v_proj`.
    Value,
    /// `out_proj`.
    Out,
    /// `fc1` (dense FFN and experts).
    Fc1,
    /// `fc2` (dense FFN and experts).
    Fc2,
}

/// The shape of the stack a technique is applied to; its constants depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackKind {
    /// An encoder alone, N layers.
    Encoder {
        /// N.
        layers: usize,
    },
    /// A decoder alone, M layers.
    Decoder {
        /// M.
        layers: usize,
    },
    /// The encoder of an encoder-decoder.
    EncoderOfEncDec {
        /// N.
        encoder_layers: usize,
        /// M.
        decoder_layers: usize,
    },
    /// The decoder of an encoder-decoder.
    DecoderOfEncDec {
        /// N.
        encoder_layers: usize,
        /// M.
        decoder_layers: usize,
    },
}

impl StackKind {
    /// Number of layers of this stack.
    pub fn layers(&self) -> usize {
        match *self {
            StackKind::Encoder { layers } | StackKind::Decoder { layers } => layers,
            StackKind::EncoderOfEncDec { encoder_layers, .. } => encoder_layers,
            StackKind::DecoderOfEncDec { decoder_layers, .. } => decoder_layers,
        }
    }

    /// Number of residual sublayers in the stack (2 per encoder layer, 3 per decoder layer of an
    /// encoder-decoder, 2 per decoder-only layer).
    pub fn residual_sublayers(&self) -> usize {
        match *self {
            StackKind::Encoder { layers } | StackKind::Decoder { layers } => 2 * layers,
            StackKind::EncoderOfEncDec { encoder_layers, .. } => 2 * encoder_layers,
            StackKind::DecoderOfEncDec { decoder_layers, .. } => 3 * decoder_layers,
        }
    }
}

/// What a residual block needs to build its norms.
#[derive(Debug, Clone, Copy)]
pub struct NormSpec {
    /// Width of the stream.
    pub dim: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// Multiway A/B copies of the norms.
    pub multiway: bool,
}

impl NormSpec {
    /// Parameters of the LayerNorm this spec describes: weight and bias of `dim`, twice when
    /// multiway (saturating: a count that large is refused by any memory budget anyway).
    pub fn norm_param_count(&self) -> usize {
        let copies = if self.multiway { 2 } else { 1 };
        self.dim.saturating_mul(2).saturating_mul(copies)
    }
}

/// A technique: answers the three questions that tell stabilisers apart, for one stack.
///
/// 1. the residual wiring of each site ([`Stabilizer::residual`]);
/// 2. whether a sublayer gets an inner norm ([`Stabilizer::inner_norm`], Sub-LN);
/// 3. the init gain of chosen weights ([`Stabilizer::init_gain`], DeepNorm β, Sub-LN γ);
///
/// plus whether the stack ends with a LayerNorm.
pub trait Stabilizer: Send + Sync + std::fmt::Debug {
    /// A short name (`post-ln`, `pre-ln`, `deepnorm`, `subln`, `admin`).
    fn name(&self) -> &'static str;

    /// Builds the residual block of `site`; its norm lives under `vb.pp(site.norm_name())`.
    fn residual(&self, site: Site, spec: NormSpec, vb: VarBuilder) -> Result<Box<dyn Residual>>;

    /// The init gain of the weights and biases of `role` at `site` (1 unless the technique scales it).
    fn init_gain(&self, _site: Site, _role: ParamRole) -> f64 {
        1.0
    }

    /// Whether the sublayer at `site` carries an inner LayerNorm (Sub-LN).
    fn inner_norm(&self, _site: Site) -> bool {
        false
    }

    /// Whether the stack ends with a LayerNorm.
    fn final_norm(&self) -> bool {
        false
    }

    /// The factor on the skip branch, for reporting (DeepNorm α, Admin ω; 1 otherwise).
    fn residual_scale(&self) -> f64 {
        1.0
    }

    /// How many trainable scalars [`Stabilizer::residual`] creates for `site`, so a model's
    /// size is known before anything is allocated. The default is one LayerNorm
    /// ([`NormSpec::norm_param_count`]), what every built-in residual has; a technique whose
    /// residual holds more (Admin's learnable ω) or fewer parameters overrides it.
    fn residual_param_count(&self, _site: Site, spec: NormSpec) -> usize {
        spec.norm_param_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// `2x + f(x)`: small enough to compute by hand.
    #[derive(Debug)]
    struct Doubling;

    impl Residual for Doubling {
        fn pre(&self, x: &Tensor, _: Branch) -> Result<Tensor> {
            Ok((x + 1.0)?)
        }
        fn post(&self, x: &Tensor, fx: &Tensor, _: Branch) -> Result<Tensor> {
            Ok(((x * 2.0)? + fx)?)
        }
    }

    /// Overrides `forward_branch`, which the generic methods must go through.
    #[derive(Debug)]
    struct Overriding;

    impl Residual for Overriding {
        fn pre(&self, x: &Tensor, _: Branch) -> Result<Tensor> {
            Ok(x.clone())
        }
        fn post(&self, x: &Tensor, _: &Tensor, _: Branch) -> Result<Tensor> {
            Ok(x.clone())
        }
        fn forward_branch(
            &self,
            x: &Tensor,
            _: Branch,
            f: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
        ) -> Result<Tensor> {
            Ok((f(x)? * 10.0)?)
        }
    }

    fn candle_sqr(h: &Tensor) -> candle_core::Result<Tensor> {
        h.sqr()
    }

    #[test]
    fn forward_with_takes_candle_closures_on_types_and_trait_objects() -> Result<()> {
        let x = Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu)?;
        // 2x + (x + 1)^2
        let want = [6.0f32, -3.0, 22.0];
        let ours = Doubling.forward(&x, &mut |h| Ok(h.sqr()?))?;
        assert_eq!(ours.to_vec1::<f32>()?, want);
        let concrete = Doubling.forward_with(&x, candle_sqr)?;
        assert_eq!(concrete.to_vec1::<f32>()?, want);
        let boxed: Box<dyn Residual> = Box::new(Doubling);
        let dynamic = boxed.forward_branch_with(&x, Branch::B, |h| h.sqr())?;
        assert_eq!(dynamic.to_vec1::<f32>()?, want);
        // A stateful closure (FnMut) is fine too.
        let mut calls = 0;
        boxed.forward_with(&x, |h| {
            calls += 1;
            h.sqr()
        })?;
        assert_eq!(calls, 1);
        Ok(())
    }

    #[test]
    fn forward_with_honours_an_overridden_forward_branch() -> Result<()> {
        let x = Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?;
        let got = Overriding.forward_with(&x, |h| h + 1.0)?;
        assert_eq!(got.to_vec1::<f32>()?, [20.0, 30.0]);
        let boxed: Box<dyn Residual> = Box::new(Overriding);
        assert_eq!(
            boxed.forward_with(&x, |h| h + 1.0)?.to_vec1::<f32>()?,
            [20.0, 30.0]
        );
        Ok(())
    }

    #[test]
    fn closure_errors_keep_their_message() -> Result<()> {
        let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?;
        let w = Tensor::ones((4, 5), DType::F32, &Device::Cpu)?;
        let err = Doubling.forward_with(&x, |h| h.matmul(&w)).unwrap_err();
        assert!(matches!(err, Error::Candle(_)));
        // The first line: with RUST_BACKTRACE set, candle appends a backtrace.
        assert_eq!(
            err.to_string().lines().next(),
            Some("shape mismatch in matmul, lhs: [2, 3], rhs: [4, 5]")
        );
        let err = Doubling
            .forward_with(&x, |_| Err(Error::invalid("attention", "no mask")))
            .unwrap_err();
        assert_eq!(err.to_string(), "invalid argument `attention`: no mask");
        Ok(())
    }
}
