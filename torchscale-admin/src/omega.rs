//! admin-torch's closed-form ω (`calculate_init`), the skip scale of `LN(ω·x + f(x))`.
//!
//! With `n` residual sublayers in the stack (2 per encoder layer, 3 per decoder layer of an
//! encoder-decoder), ω is chosen so that the expected output change at init grows as:
//!
//! | `output_change_scale` | ω |
//! |---|---|
//! | `default` / `O(logn)` | sqrt((n+1)/ln(n+1) − 1) |
//! | `O(n)` | 1 (plain Post-LN) |
//! | `O(1)` | sqrt(n) |

use std::fmt;
use std::str::FromStr;

use torchscale_core::{Error, Result};

/// How the output change at init scales with depth; picks ω.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OutputChangeScale {
    /// admin-torch's `'default'`, the same as [`OutputChangeScale::OLogN`].
    #[default]
    Default,
    /// `'O(logn)'`: ω = sqrt((n+1)/ln(n+1) − 1).
    OLogN,
    /// `'O(n)'`: ω = 1, plain Post-LN.
    ON,
    /// `'O(1)'`: ω = sqrt(n).
    O1,
}

impl FromStr for OutputChangeScale {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "default" => Ok(Self::Default),
            "O(logn)" => Ok(Self::OLogN),
            "O(n)" => Ok(Self::ON),
            "O(1)" => Ok(Self::O1),
            other => Err(Error::config(
                "output_change_scale",
                format!("unknown value `{other}` (default, O(logn), O(n), O(1))"),
            )),
        }
    }
}

impl fmt::Display for OutputChangeScale {
    /// admin-torch's spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Default => "default",
            Self::OLogN => "O(logn)",
            Self::ON => "O(n)",
            Self::O1 => "O(1)",
        })
    }
}

/// ω for a stack of `num_res_layers` residual sublayers, in f64.
///
/// `num_res_layers = 0` is a config error (admin-torch divides by ln(1) = 0 there).
pub fn omega(num_res_layers: usize, scale: OutputChangeScale) -> Result<f64> {
    if num_res_layers == 0 {
        return Err(Error::config(
            "num_res_layers",
            "must be at least 1 (ω divides by ln(n + 1))",
        ));
    }
    let n = num_res_layers as f64;
    Ok(match scale {
        OutputChangeScale::Default | OutputChangeScale::OLogN => {
            ((n + 1.0) / (n + 1.0).ln() - 1.0).sqrt()
        }
        OutputChangeScale::ON => 1.0,
        OutputChangeScale::O1 => n.sqrt(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn omega_matches_spec_values() -> Result<()> {
        // SPEC.md section 6.2.
        let d = OutputChangeScale::Default;
        for (n, want) in [
            (12, 2.0170),
            (18, 2.3351),
            (36, 3.0408),
            (200, 6.0746),
            (300, 7.1931),
        ] {
            approx::assert_abs_diff_eq!(omega(n, d)?, want, epsilon = 5.1e-5);
            assert_eq!(omega(n, OutputChangeScale::OLogN)?, omega(n, d)?);
            assert_eq!(omega(n, OutputChangeScale::ON)?, 1.0);
        }
        approx::assert_abs_diff_eq!(omega(12, OutputChangeScale::O1)?, 3.4641, epsilon = 5e-5);
        approx::assert_abs_diff_eq!(omega(36, OutputChangeScale::O1)?, 6.0, epsilon = 1e-12);
        approx::assert_abs_diff_eq!(omega(200, OutputChangeScale::O1)?, 14.142, epsilon = 5e-4);
        // FORMAT.md 4.1: 1.6116105 for N = 6.
        approx::assert_abs_diff_eq!(omega(6, d)?, 1.6116105, epsilon = 1e-7);
        Ok(())
    }

    #[test]
    fn zero_layers_is_a_config_error() {
        let err = omega(0, OutputChangeScale::O1).unwrap_err();
        assert!(matches!(err, Error::Config { ref field, .. } if field == "num_res_layers"));
    }

    #[test]
    fn parses_admin_torch_spellings() -> Result<()> {
        for s in ["default", "O(logn)", "O(n)", "O(1)"] {
            let parsed: OutputChangeScale = s.parse()?;
            assert_eq!(parsed.to_string(), s);
        }
        let err = "O(n^2)".parse::<OutputChangeScale>().unwrap_err();
        assert!(matches!(err, Error::Config { ref field, .. } if field == "output_change_scale"));
        assert!(err.to_string().contains("O(n^2)"));
        Ok(())
    }
}
