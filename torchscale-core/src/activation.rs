//! torchscale's activation functions.

use std::str::FromStr;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `activation_fn`: computed in f32, as torchscale does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// max(0, x).
    Relu,
    /// Exact erf GELU (not the tanh approximation).
    #[default]
    Gelu,
    /// SiLU, x·σ(x).
    Swish,
}

impl FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "relu" => Ok(Activation::Relu),
            "gelu" => Ok(Activation::Gelu),
            "swish" => Ok(Activation::Swish),
            other => Err(Error::config(
                "activation_fn",
                format!("unknown activation `{other}` (relu, gelu, swish)"),
            )),
        }
    }
}

impl Activation {
    /// The torchscale spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::Swish => "swish",
        }
    }

    /// Applies the activation in f32 and casts back.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = if dtype == DType::F64 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let y = match self {
            Activation::Relu => xf.relu()?,
            // The fused kernel has a one-pass backward; candle's builds six temporaries.
            Activation::Gelu => return Ok(torchscale_kernels::gelu_erf(x)?),
            Activation::Swish => xf.silu()?,
        };
        Ok(y.to_dtype(dtype)?)
    }
}
