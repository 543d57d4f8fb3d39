//! How many tokens each expert can take (torchscale's capacity rule).

/// Slots per expert for `num_tokens` tokens and `num_experts` experts.
///
/// * eval with `eval_fraction > 0`: `ceil(eval_fraction * S)` (computed in f64, as Python does);
/// * training top-1: `int(capacity_factor * ceil(S / E))`;
/// * training top-2: `2 * ceil(S / E)`.
pub fn capacity(
    num_tokens: usize,
    num_experts: usize,
    top1: bool,
    train: bool,
    eval_fraction: f64,
    capacity_factor: f64,
) -> usize {
    if !train && eval_fraction > 0.0 {
        return (eval_fraction * num_tokens as f64).ceil() as usize;
    }
    let per_expert = num_tokens.div_ceil(num_experts.max(1));
    if top1 {
        // Python's int() truncates towards zero.
        (capacity_factor * per_expert as f64) as usize
    } else {
        2 * per_expert
    }
}

#[cfg(test)]
mod tests {
    use super::capacity;

    #[test]
    fn eval_uses_the_token_fraction() {
        // FORMAT.md 4: decoder_moe_top1 has fraction 0.2 and 16 tokens -> capacity 4.
        assert_eq!(capacity(16, 4, true, false, 0.2, 1.0), 4);
        assert_eq!(capacity(16, 4, false, false, 0.25, 1.0), 4);
        // Python: math.ceil(0.55 * 100) == 56, because 0.55 * 100 == 55.00000000000001.
        assert_eq!(capacity(100, 4, false, false, 0.55, 1.0), 56);
    }

    #[test]
    fn training_rules() {
        // grad_decoder_moe_top2: S = 16, E = 4, train -> 8.
        assert_eq!(capacity(16, 4, false, true, 0.25, 1.0), 8);
        assert_eq!(capacity(17, 4, false, true, 0.25, 1.0), 10);
        assert_eq!(capacity(17, 4, true, true, 0.25, 1.0), 5);
        assert_eq!(capacity(17, 4, true, true, 0.25, 1.5), 7);
        // A non-positive fraction uses the training rule in eval too.
        assert_eq!(capacity(16, 4, false, false, -1.0, 1.0), 8);
    }
}
