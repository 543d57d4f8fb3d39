//! Multiway (BEiT-3) wrapping: two copies `A` and `B` of a module, split along time.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// Which copy of a multiway module a sequence goes through.
///
/// torchscale's `multiway_split_position`: `-1` is all `A`, `0` is all `B`, `k > 0` sends
/// positions `[0, k)` through `A` and `[k, T)` through `B`. Modules that are not multiway ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Branch {
    /// Every position through `A` (torchscale's `-1`, the default).
    #[default]
    A,
    /// Every position through `B` (torchscale's `0`).
    B,
    /// Positions before the index through `A`, the rest through `B`.
    SplitAt(usize),
}

impl Branch {
    /// From torchscale's integer convention.
    pub fn from_split_position(p: i64) -> Result<Self> {
        match p {
            -1 => Ok(Branch::A),
            0 => Ok(Branch::B),
            k if k > 0 => Ok(Branch::SplitAt(k as usize)),
            k => Err(Error::invalid(
                "multiway_split_position",
                format!("{k} is below -1"),
            )),
        }
    }
}

/// A module, or its two multiway copies stored under `<name>.A.*` and `<name>.B.*`.
#[derive(Debug, Clone)]
pub enum Multiway<M> {
    /// Plain module (`multiway = false`).
    Single(M),
    /// Two copies.
    Pair {
        /// Used for the first part of the sequence.
        a: M,
        /// Used for the rest.
        b: M,
    },
}

impl<M> Multiway<M> {
    /// Builds one module under `vb`, or two under `vb.pp("A")` and `vb.pp("B")`.
    pub fn new(
        multiway: bool,
        vb: VarBuilder,
        build: impl Fn(VarBuilder) -> Result<M>,
    ) -> Result<Self> {
        if multiway {
            Ok(Multiway::Pair {
                a: build(vb.pp("A"))?,
                b: build(vb.pp("B"))?,
            })
        } else {
            Ok(Multiway::Single(build(vb)?))
        }
    }

    /// The `A` copy (the only one when not multiway).
    pub fn a(&self) -> &M {
        match self {
            Multiway::Single(m) => m,
            Multiway::Pair { a, .. } => a,
        }
    }

    /// Applies `f` to `x` (time on dimension 1), splitting between the copies per `branch`.
    pub fn apply(
        &self,
        x: &Tensor,
        branch: Branch,
        f: impl Fn(&M, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self {
            Multiway::Single(m) => f(m, x),
            Multiway::Pair { a, b } => match branch {
                Branch::A => f(a, x),
                Branch::B => f(b, x),
                Branch::SplitAt(k) => {
                    let t = x.dim(1)?;
                    if k >= t {
                        if k == t {
                            return f(a, x);
                        }
                        return Err(Error::invalid(
                            "multiway_split_position",
                            format!("{k} is beyond the sequence length {t}"),
                        ));
                    }
                    let xa = f(a, &x.narrow(1, 0, k)?)?;
                    let xb = f(b, &x.narrow(1, k, t - k)?)?;
                    Ok(Tensor::cat(&[&xa, &xb], 1)?)
                }
            },
        }
    }
}
