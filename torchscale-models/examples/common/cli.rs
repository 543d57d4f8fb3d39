//! Command-line pieces shared by the examples: the `--device` and `--dtype` flags and the tracing
//! subscriber. Each example uses a part of it.
#![allow(dead_code)]

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// Where the model lives: `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    /// The host.
    #[default]
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

/// Why a `--device` value was refused; clap prints it after the flag's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceArgError {
    /// Neither `cpu` nor `cuda[:N]`.
    #[error("`{0}` is not a device; expected cpu, cuda or cuda:N")]
    Unknown(String),
    /// `cuda:` followed by something other than a whole number.
    #[error("`{0}`: the CUDA device ordinal must be a whole number, as in cuda:0")]
    BadOrdinal(String),
    /// A CUDA device asked of a build without the `cuda` feature.
    #[error(
        "`{0}` needs CUDA support, which this build lacks: rebuild with \
         `--features cuda` (needs the CUDA toolkit's nvcc)"
    )]
    NoCuda(String),
}

impl FromStr for DeviceArg {
    type Err = DeviceArgError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ordinal = match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => return Ok(Self::Cpu),
            "cuda" => 0,
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| DeviceArgError::BadOrdinal(s.to_string()))?,
                None => return Err(DeviceArgError::Unknown(s.to_string())),
            },
        };
        // Refused here rather than at start-up so that it is a usage error naming the flag.
        if !cfg!(feature = "cuda") {
            return Err(DeviceArgError::NoCuda(s.to_string()));
        }
        Ok(Self::Cuda(ordinal))
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// Opens the device.
    pub fn open(self) -> candle_core::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(n),
        }
    }
}

/// The parameters' and activations' floating-point type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16: f32's range with 8 bits of mantissa.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl DTypeArg {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

impl fmt::Display for DTypeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

/// Installs the tracing subscriber: `RUST_LOG` filters (default `info`), events go to stderr,
/// and each enabled span reports its duration when it closes (`RUST_LOG=torchscale_models=debug`
/// times every step, backward and optimiser update).
pub fn init_tracing() {
    use tracing_subscriber::fmt::format::FmtSpan;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second call (tests run several mains in one process) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_span_events(FmtSpan::CLOSE)
        .try_init();
}

/// Whether progress is drawn as a bar (stderr is a terminal) and whether periodic log lines are
/// printed (stdout is a file, a pipe or a CI log, or no bar is drawn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    /// indicatif's bar on stderr.
    pub bar: bool,
    /// A log line every `--log-every` steps on stdout.
    pub lines: bool,
}

impl Output {
    /// Decided from the process's streams.
    pub fn detect() -> Self {
        let bar = std::io::stderr().is_terminal();
        Self {
            bar,
            lines: !bar || !std::io::stdout().is_terminal(),
        }
    }
}
