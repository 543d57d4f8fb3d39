//! Validation rules shared by the three config structs. Each failure is an
//! [`Error::Config`] naming the torchscale field at fault.

use torchscale_core::{Error, Result};

/// Accepted `moe_second_expert_policy` values. torchscale treats any other string as "all"; we
/// reject it so a typo is not silently turned into a different routing rule.
pub const SECOND_EXPERT_POLICIES: [&str; 3] = ["sampling", "random", "all"];

/// Accepted `admin_output_change_scale` values (admin-torch's `output_change_scale`).
pub const ADMIN_OUTPUT_CHANGE_SCALES: [&str; 4] = ["default", "O(logn)", "O(n)", "O(1)"];

/// The fields every config has, copied out so one function checks them for all three structs.
#[derive(Debug, Clone)]
pub(crate) struct Shared<'a> {
    pub dropout: f64,
    pub attention_dropout: f64,
    pub activation_dropout: f64,
    pub drop_path_rate: f64,
    pub layernorm_eps: f64,
    pub vocab_size: i64,
    pub xpos_scale_base: usize,
    pub moe_freq: usize,
    /// Some layer is an MoE layer (by `moe_freq` or an explicit list).
    pub has_moe_layers: bool,
    pub moe_expert_count: usize,
    pub moe_top1_expert: bool,
    /// `moe_router` is torchscale's capacity routing (top-1 / top-2).
    pub moe_capacity_routing: bool,
    pub moe_eval_capacity_token_fraction: f64,
    pub moe_second_expert_policy: &'a str,
    pub use_xmoe: bool,
    pub xmoe_paper_routing: bool,
    pub rel_pos_buckets: usize,
    pub max_rel_pos: usize,
    pub deepnorm: bool,
    pub subln: bool,
    pub admin: bool,
    pub admin_output_change_scale: &'a str,
}

/// Builds a [`Shared`] view of any of the three config structs (they share these field names);
/// `$has_moe` says whether the config has MoE layers.
macro_rules! shared_view {
    ($c:expr, $has_moe:expr) => {
        $crate::config::validate::Shared {
            dropout: $c.dropout,
            attention_dropout: $c.attention_dropout,
            activation_dropout: $c.activation_dropout,
            drop_path_rate: $c.drop_path_rate,
            layernorm_eps: $c.layernorm_eps,
            vocab_size: $c.vocab_size,
            xpos_scale_base: $c.xpos_scale_base,
            moe_freq: $c.moe_freq,
            has_moe_layers: $has_moe,
            moe_expert_count: $c.moe_expert_count,
            moe_top1_expert: $c.moe_top1_expert,
            moe_capacity_routing: $c.moe_router.is_capacity(),
            moe_eval_capacity_token_fraction: $c.moe_eval_capacity_token_fraction,
            moe_second_expert_policy: &$c.moe_second_expert_policy,
            use_xmoe: $c.use_xmoe,
            xmoe_paper_routing: $c.xmoe_paper_routing,
            rel_pos_buckets: $c.rel_pos_buckets,
            max_rel_pos: $c.max_rel_pos,
            deepnorm: $c.deepnorm,
            subln: $c.subln,
            admin: $c.admin,
            admin_output_change_scale: &$c.admin_output_change_scale,
        }
    };
}
pub(crate) use shared_view;

/// A dropout-like probability: finite and in `[0, 1)` (1 would divide by zero when rescaling).
pub(crate) fn probability(field: &str, p: f64) -> Result<()> {
    if !p.is_finite() || !(0.0..1.0).contains(&p) {
        return Err(Error::config(field, format!("must be in [0, 1), got {p}")));
    }
    Ok(())
}

/// The shape fields of one stack; `prefix` is `encoder` or `decoder`.
pub(crate) fn stack(
    prefix: &str,
    embed_dim: usize,
    heads: usize,
    ffn_dim: usize,
    layers: usize,
    xpos_rel_pos: bool,
) -> Result<()> {
    if embed_dim == 0 {
        return Err(Error::config(format!("{prefix}_embed_dim"), "must be > 0"));
    }
    if heads == 0 {
        return Err(Error::config(
            format!("{prefix}_attention_heads"),
            "must be > 0",
        ));
    }
    // torchscale floors d / H silently and then fails in a reshape; say why up front.
    if !embed_dim.is_multiple_of(heads) {
        return Err(Error::config(
            format!("{prefix}_attention_heads"),
            format!("{prefix}_embed_dim {embed_dim} is not divisible by {heads} heads"),
        ));
    }
    if ffn_dim == 0 {
        return Err(Error::config(
            format!("{prefix}_ffn_embed_dim"),
            "must be > 0",
        ));
    }
    if layers == 0 {
        return Err(Error::config(format!("{prefix}_layers"), "must be > 0"));
    }
    let head_dim = embed_dim / heads;
    // xPos rotates interleaved pairs of the head dimension.
    if xpos_rel_pos && !head_dim.is_multiple_of(2) {
        return Err(Error::config(
            "xpos_rel_pos",
            format!("needs an even head dimension, {prefix}_embed_dim / heads = {head_dim}"),
        ));
    }
    Ok(())
}

/// A learned-positions table size.
pub(crate) fn positions(field: &str, n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::config(field, "must be > 0"));
    }
    Ok(())
}

/// The most elements one tensor may have: 2^60, so that its bytes in any dtype (at most 8 bytes
/// an element) fit in an `isize`, the most Rust allocates, and no shape arithmetic overflows.
pub const MAX_TENSOR_ELEMENTS: u128 = 1 << 60;

/// The sizes of one stack's tensors, for [`sizes`]; `prefix` is `encoder` or `decoder`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StackSizes<'a> {
    pub prefix: &'a str,
    pub positions_field: &'a str,
    pub embed_dim: usize,
    pub heads: usize,
    pub ffn_dim: usize,
    pub positions: usize,
    pub vocab_size: i64,
    /// Experts of the MoE layers (0: dense).
    pub experts: usize,
    pub rel_pos_buckets: usize,
}

/// Every tensor a stack of these sizes builds must count at most [`MAX_TENSOR_ELEMENTS`]
/// elements, so that sizes far beyond any machine (`max_target_positions` near 2^60,
/// `vocab_size` 2^63 - 1, `embed_dim × ffn_dim` past 2^64) are refused here, naming the field,
/// instead of overflowing in shape arithmetic. Totals (layers, experts) are the memory budget's.
pub(crate) fn sizes(s: &StackSizes<'_>) -> Result<()> {
    let p = s.prefix;
    let c = s.embed_dim as u128;
    let check = |field: String, rows: u128, what: &str| -> Result<()> {
        let n = rows.saturating_mul(c);
        if n > MAX_TENSOR_ELEMENTS {
            return Err(Error::config(
                field,
                format!(
                    "{what} would hold {rows} × {c} = {n} elements, more than the 2^60 one \
                     tensor may hold (its bytes would not fit in memory's address range)"
                ),
            ));
        }
        Ok(())
    };
    check(format!("{p}_embed_dim"), c, "each attention projection")?;
    check(format!("{p}_ffn_embed_dim"), s.ffn_dim as u128, "fc1")?;
    if s.vocab_size > 0 {
        check("vocab_size".into(), s.vocab_size as u128, "the token table")?;
    }
    // torchscale's position table has 2 rows more than positions.
    let rows = (s.positions as u128).saturating_add(2);
    check(s.positions_field.into(), rows, "the position table")?;
    check("moe_expert_count".into(), s.experts as u128, "the gate")?;
    let rel = (s.rel_pos_buckets as u128).saturating_mul(s.heads as u128);
    if rel > MAX_TENSOR_ELEMENTS {
        return Err(Error::config(
            "rel_pos_buckets",
            format!("the relative-position table would hold {rel} elements, more than 2^60"),
        ));
    }
    Ok(())
}

/// With xPos on, its scales must stay finite in f32 over the stack's `positions` (see
/// [`Xpos::check_positions`](torchscale_core::attention::xpos::Xpos::check_positions)); an
/// error names `xpos_scale_base`. Call after [`stack`] (a non-zero head count).
pub(crate) fn xpos(
    on: bool,
    embed_dim: usize,
    heads: usize,
    scale_base: usize,
    positions_field: &str,
    positions: usize,
) -> Result<()> {
    if !on {
        return Ok(());
    }
    let head_dim = embed_dim / heads.max(1);
    torchscale_core::attention::xpos::Xpos::check_positions(head_dim, scale_base as f64, positions)
        .map_err(|e| match e {
            Error::Config { field, reason } => Error::config(
                field,
                format!("{reason} ({positions_field} = {positions}, head width {head_dim})"),
            ),
            other => other,
        })
}

/// `admin` excludes the other schemes; `normalize_before` lists the stacks' flags after
/// finalisation (with the default `subln = true` the user must switch Sub-LN off).
pub(crate) fn admin(s: &Shared<'_>, normalize_before: &[(&str, bool)]) -> Result<()> {
    if !s.admin {
        return Ok(());
    }
    if s.deepnorm {
        return Err(Error::config("admin", "cannot be combined with deepnorm"));
    }
    if s.subln {
        return Err(Error::config(
            "admin",
            "cannot be combined with subln (the torchscale default; set subln = false)",
        ));
    }
    for (name, on) in normalize_before {
        if *on {
            return Err(Error::config(
                "admin",
                format!("is a Post-LN scheme: set {name} = false"),
            ));
        }
    }
    Ok(())
}

/// Every rule on the shared fields.
pub(crate) fn shared(s: &Shared<'_>) -> Result<()> {
    probability("dropout", s.dropout)?;
    probability("attention_dropout", s.attention_dropout)?;
    probability("activation_dropout", s.activation_dropout)?;
    probability("drop_path_rate", s.drop_path_rate)?;
    if !s.layernorm_eps.is_finite() || s.layernorm_eps <= 0.0 {
        return Err(Error::config(
            "layernorm_eps",
            format!("must be finite and > 0, got {}", s.layernorm_eps),
        ));
    }
    // -1 (torchscale's default) and any value <= 0 mean "no output projection" there; we accept
    // only -1 so that 0 (a likely mistake) is caught.
    if s.vocab_size == 0 || s.vocab_size < -1 {
        return Err(Error::config(
            "vocab_size",
            format!(
                "must be > 0, or -1 for no output projection; got {}",
                s.vocab_size
            ),
        ));
    }
    if s.xpos_scale_base == 0 {
        return Err(Error::config("xpos_scale_base", "must be > 0"));
    }
    moe(s)?;
    rel_pos(s.rel_pos_buckets, s.max_rel_pos)?;
    if !ADMIN_OUTPUT_CHANGE_SCALES.contains(&s.admin_output_change_scale) {
        return Err(Error::config(
            "admin_output_change_scale",
            format!(
                "unknown value `{}` (expected one of {ADMIN_OUTPUT_CHANGE_SCALES:?})",
                s.admin_output_change_scale
            ),
        ));
    }
    Ok(())
}

fn moe(s: &Shared<'_>) -> Result<()> {
    // torchscale asserts this in post-processing.
    if s.use_xmoe && (!s.has_moe_layers || s.moe_expert_count == 0) {
        return Err(Error::config(
            "use_xmoe",
            format!(
                "needs MoE layers: moe_freq = {} (or a non-empty moe_layers) and \
                 moe_expert_count = {} must both be > 0",
                s.moe_freq, s.moe_expert_count
            ),
        ));
    }
    if s.has_moe_layers && s.moe_expert_count == 0 {
        return Err(Error::config(
            "moe_expert_count",
            "must be > 0 when there are MoE layers (moe_freq > 0 or moe_layers)",
        ));
    }
    // Top-2 picks the second expert among the others; with one expert there is none.
    if s.has_moe_layers && s.moe_capacity_routing && !s.moe_top1_expert && s.moe_expert_count < 2 {
        return Err(Error::config(
            "moe_expert_count",
            "top-2 gating (moe_top1_expert = false) needs at least 2 experts",
        ));
    }
    if !s.moe_eval_capacity_token_fraction.is_finite() {
        return Err(Error::config(
            "moe_eval_capacity_token_fraction",
            "must be finite",
        ));
    }
    if !SECOND_EXPERT_POLICIES.contains(&s.moe_second_expert_policy) {
        return Err(Error::config(
            "moe_second_expert_policy",
            format!(
                "unknown policy `{}` (expected one of {SECOND_EXPERT_POLICIES:?})",
                s.moe_second_expert_policy
            ),
        ));
    }
    if s.xmoe_paper_routing && !s.use_xmoe {
        return Err(Error::config(
            "xmoe_paper_routing",
            "requires use_xmoe = true",
        ));
    }
    Ok(())
}

/// T5 buckets (bidirectional everywhere in torchscale): half the buckets per direction, half of
/// those exact, so the log branch divides by ln(max_rel_pos / (buckets / 4)).
fn rel_pos(buckets: usize, max_rel_pos: usize) -> Result<()> {
    match (buckets > 0, max_rel_pos > 0) {
        (false, false) => Ok(()),
        // torchscale silently builds no bias when only one is set; we report the missing one.
        (true, false) => Err(Error::config(
            "max_rel_pos",
            format!(
                "must be > 0 when rel_pos_buckets = {buckets} (else no relative bias is built)"
            ),
        )),
        (false, true) => Err(Error::config(
            "rel_pos_buckets",
            format!(
                "must be > 0 when max_rel_pos = {max_rel_pos} (else no relative bias is built)"
            ),
        )),
        (true, true) => {
            let max_exact = buckets / 4;
            if max_exact == 0 {
                return Err(Error::config(
                    "rel_pos_buckets",
                    format!(
                        "must be >= 4 (got {buckets}): the bucket formula divides by buckets / 4"
                    ),
                ));
            }
            if max_rel_pos <= max_exact {
                return Err(Error::config(
                    "max_rel_pos",
                    format!(
                        "must exceed rel_pos_buckets / 4 = {max_exact} (got {max_rel_pos}), else the log buckets are undefined"
                    ),
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<()>) -> String {
        match r {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    #[test]
    fn probabilities() {
        assert!(probability("dropout", 0.0).is_ok());
        assert!(probability("dropout", 0.999).is_ok());
        for bad in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
            assert_eq!(field(probability("dropout", bad)), "dropout");
        }
    }

    #[test]
    fn stack_rules() {
        assert!(stack("encoder", 32, 4, 64, 2, true).is_ok());
        assert_eq!(
            field(stack("encoder", 0, 4, 64, 2, false)),
            "encoder_embed_dim"
        );
        assert_eq!(
            field(stack("decoder", 32, 0, 64, 2, false)),
            "decoder_attention_heads"
        );
        assert_eq!(
            field(stack("decoder", 30, 4, 64, 2, false)),
            "decoder_attention_heads"
        );
        assert_eq!(
            field(stack("encoder", 32, 4, 0, 2, false)),
            "encoder_ffn_embed_dim"
        );
        assert_eq!(
            field(stack("encoder", 32, 4, 64, 0, false)),
            "encoder_layers"
        );
        // head dim 32 / 32 = 1 is odd.
        assert_eq!(field(stack("encoder", 32, 32, 64, 2, true)), "xpos_rel_pos");
        assert!(stack("encoder", 32, 32, 64, 2, false).is_ok());
    }

    #[test]
    fn size_rules() {
        let ok = StackSizes {
            prefix: "decoder",
            positions_field: "max_target_positions",
            embed_dim: 64,
            heads: 4,
            ffn_dim: 256,
            positions: 1024,
            vocab_size: 50_000,
            experts: 0,
            rel_pos_buckets: 0,
        };
        assert!(sizes(&ok).is_ok());
        let cases: [(StackSizes, &str); 6] = [
            (
                StackSizes {
                    positions: 1 << 60,
                    ..ok
                },
                "max_target_positions",
            ),
            (
                StackSizes {
                    positions: usize::MAX,
                    ..ok
                },
                "max_target_positions",
            ),
            (
                StackSizes {
                    vocab_size: i64::MAX,
                    ..ok
                },
                "vocab_size",
            ),
            (
                StackSizes {
                    embed_dim: 1 << 32,
                    heads: 1,
                    ..ok
                },
                "decoder_embed_dim",
            ),
            (
                StackSizes {
                    embed_dim: 1 << 20,
                    ffn_dim: usize::MAX,
                    ..ok
                },
                "decoder_ffn_embed_dim",
            ),
            (
                StackSizes {
                    experts: usize::MAX,
                    ..ok
                },
                "moe_expert_count",
            ),
        ];
        for (s, want) in cases {
            assert_eq!(field(sizes(&s)), want);
        }
    }

    #[test]
    fn xpos_rules() {
        assert!(xpos(false, 64, 4, 1, "max_target_positions", 1 << 20).is_ok());
        assert!(xpos(true, 64, 4, 512, "max_target_positions", 1024).is_ok());
        assert_eq!(
            field(xpos(true, 64, 4, 1, "max_target_positions", 1024)),
            "xpos_scale_base"
        );
        assert_eq!(
            field(xpos(true, 64, 4, 0, "max_target_positions", 1024)),
            "xpos_scale_base"
        );
    }

    #[test]
    fn rel_pos_rules() {
        assert!(rel_pos(0, 0).is_ok());
        assert!(rel_pos(16, 8).is_ok());
        assert!(rel_pos(32, 128).is_ok());
        assert_eq!(field(rel_pos(16, 0)), "max_rel_pos");
        assert_eq!(field(rel_pos(0, 8)), "rel_pos_buckets");
        assert_eq!(field(rel_pos(3, 8)), "rel_pos_buckets");
        // 16 buckets: 4 exact per direction, so max_rel_pos must be > 4.
        assert_eq!(field(rel_pos(16, 4)), "max_rel_pos");
        assert!(rel_pos(16, 5).is_ok());
    }
}
