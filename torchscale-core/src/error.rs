//! The one error type of torchscale-rs.

use candle_core::DType;

/// Everything that can go wrong in torchscale-rs: each variant names the field, key or shape at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration field holds a value the model cannot be built with.
    #[error("invalid config field `{field}`: {reason}")]
    Config {
        /// The torchscale name of the field.
        field: String,
        /// Why the value is rejected.
        reason: String,
    },
    /// An input tensor has the wrong shape.
    #[error("shape mismatch for `{what}`: expected {expected}, got {got:?}")]
    Shape {
        /// Which input.
        what: String,
        /// What was expected, in words (for example `[B, T]`).
        expected: String,
        /// The shape received.
        got: Vec<usize>,
    },
    /// An input tensor has the wrong dtype.
    #[error("dtype mismatch for `{what}`: expected {expected:?}, got {got:?}")]
    DType {
        /// Which input.
        what: String,
        /// The dtype expected.
        expected: DType,
        /// The dtype received.
        got: DType,
    },
    /// A checkpoint lacks a tensor the model needs.
    #[error("checkpoint is missing tensor `{key}`")]
    MissingTensor {
        /// The state_dict key.
        key: String,
    },
    /// A checkpoint tensor has the wrong shape.
    #[error("checkpoint tensor `{key}` has shape {got:?}, the model expects {expected:?}")]
    TensorShape {
        /// The state_dict key.
        key: String,
        /// The shape the model has.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A checkpoint holds a tensor the model does not have.
    #[error("checkpoint has unexpected tensor `{key}`")]
    UnexpectedTensor {
        /// The state_dict key.
        key: String,
    },
    /// A checkpoint tensor holds values it must not (a NaN or an infinity in an optimizer moment,
    /// a negative second moment or count).
    #[error("checkpoint tensor `{key}` {reason}")]
    TensorValue {
        /// The state_dict key.
        key: String,
        /// What is wrong with its values.
        reason: String,
    },
    /// A file-system operation failed, or was refused to protect what is at the path (a save
    /// onto a regular file, an unexpected entry where a checkpoint keeps its previous folder).
    #[error("cannot {op} `{path}`: {reason}")]
    FileOp {
        /// The operation, in words (`fsync`, `create the folder`, `rename … to`, ...).
        op: String,
        /// The path it was applied to.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A file could not be read or parsed.
    #[error("cannot read `{path}`: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A value that must be finite was NaN or infinite.
    #[error("non-finite value in {what}")]
    NonFinite {
        /// Where it was found.
        what: String,
    },
    /// Building a model or running a batch would take more memory than the budget (by default
    /// the memory available): refused before anything is allocated.
    #[error("{what} needs {needed} bytes ({sized_by}), over the memory budget of {budget} bytes")]
    MemoryBudget {
        /// What was refused (`Decoder parameters`, `micro-batch`, ...).
        what: String,
        /// The fields or arguments that size it, with their values.
        sized_by: String,
        /// Bytes it would take (saturated at `u128::MAX` when even that overflows).
        needed: u128,
        /// Bytes allowed.
        budget: u64,
    },
    /// An argument outside the shapes and dtypes checks (an index out of range, an empty input...).
    #[error("invalid argument `{what}`: {reason}")]
    Invalid {
        /// The argument.
        what: String,
        /// Why.
        reason: String,
    },
    /// A collective operation failed, or another rank of the run did.
    #[error("collective `{op}` failed on rank {rank}: {reason}")]
    Collective {
        /// The operation (`all_reduce_sum`, `all_to_all`, ...).
        op: String,
        /// The rank that reports it.
        rank: usize,
        /// What went wrong (which rank failed, a mismatch, a timeout...).
        reason: String,
    },
    /// An error from candle that came out of a public call, with the call and its main inputs
    /// named (`Decoder::forward(prev_output_tokens [2, 7] u32): shape mismatch in cat ...`).
    #[error("{context}: {source}")]
    Context {
        /// The call and its main arguments' shapes and dtypes.
        context: String,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Lets `?` pass our errors up through candle-style functions (`-> candle_core::Result<T>`).
///
/// A candle error that we carried is handed back as it was (not nested); an I/O error becomes
/// candle's `Io` (its source survives); the others, which have no source, keep their message in
/// candle's `Wrapped`.
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(inner) => inner,
            Error::Io(inner) => candle_core::Error::Io(inner),
            Error::Context { context, source } => source.context(context),
            other => candle_core::Error::wrap(other),
        }
    }
}

impl Error {
    /// A [`Error::Config`] for `field`.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
    /// A [`Error::Shape`] for `what`.
    pub fn shape(what: impl Into<String>, expected: impl Into<String>, got: &[usize]) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.to_vec(),
        }
    }
    /// A [`Error::FileOp`]: `op` on `path` failed for `reason`.
    pub fn file_op(
        op: impl Into<String>,
        path: impl AsRef<std::path::Path>,
        reason: impl ToString,
    ) -> Self {
        Error::FileOp {
            op: op.into(),
            path: path.as_ref().display().to_string(),
            reason: reason.to_string(),
        }
    }
    /// A [`Error::Invalid`] for `what`.
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Names the public call a candle error came out of: [`Error::Candle`] becomes
    /// [`Error::Context`] with `call()` (only evaluated then). Our own errors already name their
    /// input, and an error that has its context keeps the innermost one, so both pass unchanged.
    pub fn in_call(self, call: impl FnOnce() -> String) -> Self {
        match self {
            Error::Candle(source) => Error::Context {
                context: call(),
                source,
            },
            other => other,
        }
    }
}

/// `name [2, 7] u32`: how error messages show an input tensor.
pub fn describe(name: &str, t: &candle_core::Tensor) -> String {
    format!("{name} {:?} {}", t.dims(), t.dtype().as_str())
}

/// Checks that `t` lives on `device` (the model's), naming the input on failure; candle's own
/// error would not say which input.
pub fn expect_device(
    t: &candle_core::Tensor,
    what: &str,
    device: &candle_core::Device,
) -> Result<()> {
    if !t.device().same_device(device) {
        return Err(Error::invalid(
            what,
            format!(
                "is on {:?} but the model is on {:?}",
                t.device().location(),
                device.location()
            ),
        ));
    }
    Ok(())
}

/// Checks that a mask holds integers or booleans (candle's u8), naming the input on failure:
/// nonzero means masked, a notion a float tensor (an additive mask, an embedding) does not carry.
pub fn expect_int_mask(t: &candle_core::Tensor, what: &str) -> Result<()> {
    if !t.dtype().is_int() {
        return Err(Error::invalid(
            what,
            format!(
                "a padding mask holds integers or booleans (nonzero = padded), got {}",
                describe(what, t)
            ),
        ));
    }
    Ok(())
}

/// Checks a tensor's dtype, naming the input on failure.
pub fn expect_dtype(t: &candle_core::Tensor, what: &str, expected: DType) -> Result<()> {
    if t.dtype() != expected {
        return Err(Error::DType {
            what: what.into(),
            expected,
            got: t.dtype(),
        });
    }
    Ok(())
}

/// Checks a tensor's rank, naming the input on failure.
pub fn expect_rank(t: &candle_core::Tensor, what: &str, rank: usize, pattern: &str) -> Result<()> {
    if t.rank() != rank {
        return Err(Error::shape(what, pattern, t.dims()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn fails_in_torchscale() -> Result<()> {
        Err(Error::config("decoder_layers", "must be at least 1"))
    }

    // What a user's candle model looks like: candle's Result, `?` on our calls.
    fn candle_style() -> candle_core::Result<()> {
        fails_in_torchscale()?;
        Ok(())
    }

    #[test]
    fn question_mark_works_in_candle_functions_and_keeps_the_message() {
        let err = candle_style().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("invalid config field `decoder_layers`: must be at least 1"),
            "{msg}"
        );
    }

    #[test]
    fn candle_errors_are_unwrapped_not_nested() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 3), candle_core::DType::F32, &dev)?;
        let b = Tensor::zeros((4, 5), candle_core::DType::F32, &dev)?;
        let ours: Error = a.matmul(&b).unwrap_err().into();
        let original = ours.to_string();
        let back: candle_core::Error = ours.into();
        assert_eq!(back.to_string(), original);
        assert!(
            !matches!(back, candle_core::Error::Wrapped(_)),
            "nested: {back:?}"
        );
        Ok(())
    }

    #[test]
    fn in_call_names_candle_errors_only_and_survives_the_way_back() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 3), candle_core::DType::F32, &dev)?;
        let b = Tensor::zeros((4, 5), candle_core::DType::F32, &dev)?;
        let candle: Error = a.matmul(&b).unwrap_err().into();
        let raw = candle.to_string();
        let named = candle.in_call(|| format!("Model::forward({})", describe("x", &a)));
        assert!(matches!(named, Error::Context { .. }));
        assert_eq!(
            named.to_string(),
            format!("Model::forward(x [2, 3] f32): {raw}")
        );
        // The innermost call keeps its name.
        let outer = named.in_call(|| "Outer::call()".into());
        assert!(outer.to_string().starts_with("Model::forward"), "{outer}");
        let back: candle_core::Error = outer.into();
        assert!(back.to_string().contains("Model::forward(x [2, 3] f32)"));
        // Our own errors already name their input.
        let ours = Error::invalid("x", "bad").in_call(|| unreachable!());
        assert!(matches!(ours, Error::Invalid { .. }));
        Ok(())
    }

    #[test]
    fn io_errors_keep_their_source() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no config.json here");
        let back: candle_core::Error = Error::Io(io).into();
        match back {
            candle_core::Error::Io(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
                assert_eq!(e.to_string(), "no config.json here");
            }
            other => panic!("expected candle's Io, got {other:?}"),
        }
    }
}
