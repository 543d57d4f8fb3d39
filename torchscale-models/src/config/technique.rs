//! Which residual/normalisation scheme a finalised config selects.

use serde::{Deserialize, Serialize};

/// The stabilisation technique of a stack, read off a finalised config.
///
/// torchscale encodes it in three flags (`deepnorm`, `subln`, `*_normalize_before`); our
/// extension adds `admin`. After [`finalize`](super::EncoderConfig::finalize) at most one of
/// them wins, in this order: `admin`, `deepnorm`, `subln`, then `*_normalize_before`.
///
/// In JSON (`layer_techniques`) a technique is `"post_ln"`, `"pre_ln"`, `"deepnorm"`, `"subln"`
/// or `"admin"`; the variant names (`"PostLn"`, ...) are read too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Technique {
    /// `x ← LN(x + f(x))` (subln, deepnorm, normalize_before all false).
    #[serde(rename = "post_ln", alias = "PostLn")]
    PostLn,
    /// `x ← x + f(LN(x))` (normalize_before true, subln and deepnorm false).
    #[serde(rename = "pre_ln", alias = "PreLn")]
    PreLn,
    /// DeepNet: `x ← LN(α·x + f(x))` with β-scaled init (`deepnorm`).
    #[serde(rename = "deepnorm", alias = "DeepNorm")]
    DeepNorm,
    /// Magneto Sub-LN: Pre-LN plus inner LayerNorms and γ-scaled init (`subln`, the default).
    #[serde(rename = "subln", alias = "SubLn")]
    SubLn,
    /// admin-torch: `x ← LN(ω·x + f(x))` (our `admin` extension; Post-LN wiring).
    #[serde(rename = "admin", alias = "Admin")]
    Admin,
}

impl Technique {
    /// Resolves the flags the way the models read them (`admin` first, then `deepnorm`, `subln`,
    /// `normalize_before`).
    pub fn from_flags(admin: bool, deepnorm: bool, subln: bool, normalize_before: bool) -> Self {
        if admin {
            Technique::Admin
        } else if deepnorm {
            Technique::DeepNorm
        } else if subln {
            Technique::SubLn
        } else if normalize_before {
            Technique::PreLn
        } else {
            Technique::PostLn
        }
    }

    /// The flags `(admin, deepnorm, subln, normalize_before)` that select this technique and
    /// survive finalisation unchanged.
    pub fn flags(&self) -> (bool, bool, bool, bool) {
        match self {
            Technique::PostLn => (false, false, false, false),
            Technique::PreLn => (false, false, false, true),
            Technique::DeepNorm => (false, true, false, false),
            Technique::SubLn => (false, false, true, true),
            Technique::Admin => (true, false, false, false),
        }
    }

    /// Whether the sublayer input is normalised (Pre-LN wiring) rather than the residual sum.
    pub fn normalize_before(&self) -> bool {
        matches!(self, Technique::PreLn | Technique::SubLn)
    }
}

impl Technique {
    /// Every technique, in the order of the DeepNet comparison.
    pub const ALL: [Technique; 5] = [
        Technique::PostLn,
        Technique::PreLn,
        Technique::DeepNorm,
        Technique::SubLn,
        Technique::Admin,
    ];

    /// The command-line name: `post-ln`, `pre-ln`, `deepnorm`, `subln`, `admin`.
    pub fn name(&self) -> &'static str {
        match self {
            Technique::PostLn => "post-ln",
            Technique::PreLn => "pre-ln",
            Technique::DeepNorm => "deepnorm",
            Technique::SubLn => "subln",
            Technique::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Technique {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Technique {
    type Err = torchscale_core::Error;

    /// Parses [`Technique::name`]; `magneto` is accepted for `subln`, `deepnet` for `deepnorm`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "post-ln" | "postln" => Technique::PostLn,
            "pre-ln" | "preln" => Technique::PreLn,
            "deepnorm" | "deepnet" => Technique::DeepNorm,
            "subln" | "sub-ln" | "magneto" => Technique::SubLn,
            "admin" => Technique::Admin,
            other => {
                return Err(torchscale_core::Error::config(
                    "stabilizer",
                    format!(
                        "unknown technique `{other}` (post-ln, pre-ln, deepnorm, subln, admin)"
                    ),
                ))
            }
        };
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Technique; 5] = [
        Technique::PostLn,
        Technique::PreLn,
        Technique::DeepNorm,
        Technique::SubLn,
        Technique::Admin,
    ];

    #[test]
    fn names_parse_back() {
        for t in Technique::ALL {
            assert_eq!(t.name().parse::<Technique>().unwrap(), t);
        }
        assert_eq!("magneto".parse::<Technique>().unwrap(), Technique::SubLn);
        assert!("layernorm".parse::<Technique>().is_err());
    }

    #[test]
    fn json_names() {
        for (t, name) in [
            (Technique::PostLn, "post_ln"),
            (Technique::PreLn, "pre_ln"),
            (Technique::DeepNorm, "deepnorm"),
            (Technique::SubLn, "subln"),
            (Technique::Admin, "admin"),
        ] {
            let json = format!("\"{name}\"");
            assert_eq!(serde_json::to_string(&t).unwrap(), json);
            assert_eq!(serde_json::from_str::<Technique>(&json).unwrap(), t);
            // The variant names, serde's former form, still read.
            let old = format!("\"{t:?}\"");
            assert_eq!(serde_json::from_str::<Technique>(&old).unwrap(), t);
        }
    }

    #[test]
    fn flags_round_trip() {
        for t in ALL {
            let (a, d, s, nb) = t.flags();
            assert_eq!(Technique::from_flags(a, d, s, nb), t);
            assert_eq!(t.normalize_before(), nb);
        }
    }

    #[test]
    fn precedence() {
        // Admin wins over everything, DeepNorm over Sub-LN (SPEC 1.2 step 1 runs first).
        assert_eq!(
            Technique::from_flags(true, true, true, true),
            Technique::Admin
        );
        assert_eq!(
            Technique::from_flags(false, true, true, true),
            Technique::DeepNorm
        );
        assert_eq!(
            Technique::from_flags(false, false, true, false),
            Technique::SubLn
        );
    }
}
