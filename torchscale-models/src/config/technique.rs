//! Which residual/normalisation scheme a finalised config selects.

use serde::{Deserialize, Serialize};

/// The stabilisation technique of a stack, read off a finalised config.
///
/// torchscale encodes it in three flags (`deepnorm`, `subln`, `*_normalize_before`); our
/// extension adds `admin`. After [`finalize`](super::EncoderConfig::finalize) at most one of
/// them wins, in this order: `admin`, `deepnorm`, `subln`, then `*_normalize_before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Technique {
    /// `x ← LN(x + f(x))` (subln, deepnorm, normalize_before all false).
    PostLn,
    /// `x ← x + f(LN(x))` (normalize_before true, subln and deepnorm false).
    PreLn,
    /// DeepNet: `x ← LN(α·x + f(x))` with β-scaled init (`deepnorm`).
    DeepNorm,
    /// Magneto Sub-LN: Pre-LN plus inner LayerNorms and γ-scaled init (`subln`, the default).
    SubLn,
    /// admin-torch: `x ← LN(ω·x + f(x))` (our `admin` extension; Post-LN wiring).
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
