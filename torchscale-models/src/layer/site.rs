//! One residual site of a layer: a [`Residual`] around a [`Sublayer`], with the dropout and
//! stochastic depth applied to the sublayer's output.

use candle_core::Tensor;
use torchscale_core::dropout::{drop_path, dropout};
use torchscale_core::{Ctx, Residual, Result, Sublayer};

/// `x ← residual(x, drop_path(dropout(sublayer(·))))`: one site of a [`Layer`](super::Layer).
///
/// The name is the key prefix of the sublayer's parameters relative to the layer (`self_attn`,
/// `encoder_attn`, `ffn`, `moe_layer`, or a user's); the sublayer's
/// [`buffers`](Sublayer::buffers) are keyed under it and [`Layer::site`](super::Layer::site)
/// finds the site by it.
#[derive(Debug)]
pub struct SiteBlock {
    name: String,
    residual: Box<dyn Residual>,
    sublayer: Box<dyn Sublayer>,
    dropout: f64,
    drop_path: f64,
}

impl SiteBlock {
    /// A site without dropout or stochastic depth on the sublayer output.
    pub fn new(
        name: impl Into<String>,
        residual: Box<dyn Residual>,
        sublayer: Box<dyn Sublayer>,
    ) -> Self {
        Self {
            name: name.into(),
            residual,
            sublayer,
            dropout: 0.0,
            drop_path: 0.0,
        }
    }

    /// Dropout with probability `p` on the sublayer output in training (torchscale applies the
    /// stack's `dropout` after attention; its feed-forward applies its own, so 0 there).
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }

    /// Stochastic depth with probability `p` on the sublayer output in training.
    pub fn with_drop_path(mut self, p: f64) -> Self {
        self.drop_path = p;
        self
    }

    /// The site's name (its parameters' key prefix in the layer).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the sublayer joins the stream.
    pub fn residual(&self) -> &dyn Residual {
        self.residual.as_ref()
    }

    /// The sublayer.
    pub fn sublayer(&self) -> &dyn Sublayer {
        self.sublayer.as_ref()
    }

    /// The concrete sublayer, if it is a `T`.
    pub fn sublayer_as<T: 'static>(&self) -> Option<&T> {
        self.sublayer.as_any().downcast_ref::<T>()
    }

    /// Dropout probability on the sublayer output.
    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// Stochastic depth probability on the sublayer output.
    pub fn drop_path(&self) -> f64 {
        self.drop_path
    }

    /// Runs the site; `x` passes through untouched when the sublayer is not
    /// [`active`](Sublayer::active) for this call.
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        if !self.sublayer.active(ctx) {
            return Ok(x.clone());
        }
        let (train, branch) = (ctx.train, ctx.branch);
        self.residual.forward_branch(x, branch, &mut |h| {
            let y = self.sublayer.forward(h, ctx)?;
            // Dropout draws its mask before drop-path, as torchscale's layers do.
            drop_path(&dropout(&y, self.dropout, train)?, self.drop_path, train)
        })
    }
}
