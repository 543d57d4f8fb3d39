//! Top-1 gating: each token goes to its most probable expert, first come first served.

use torchscale_core::router::ChoiceStatus;

use super::{argmax, Assignment};

/// Assigns each token to `argmax probs[s]`, in token order, slots `0, 1, ...` per expert;
/// slots `>= capacity` are dropped, padding tokens never take a slot.
///
/// `probs` and `logits` are `[S, E]` row-major; `logits` only feeds the runner-up diagnostics.
pub(crate) fn assign(
    probs: &[f64],
    logits: &[f64],
    num_experts: usize,
    capacity: usize,
    padding: &[bool],
) -> Assignment {
    let e = num_experts;
    let s = probs.len() / e;
    let mut out = Assignment::new(s, e, 1);
    let mut taken = vec![0usize; e];
    for t in 0..s {
        let row = &probs[t * e..(t + 1) * e];
        let e1 = argmax(row, None);
        out.expert[t] = e1 as u32;
        out.runner_up[t] = argmax(&logits[t * e..(t + 1) * e], Some(e1)) as u32;
        if padding[t] {
            out.status[t] = ChoiceStatus::Padding;
            continue;
        }
        out.first_counts[e1] += 1;
        let loc = taken[e1];
        taken[e1] += 1;
        out.slot[t] = loc as u32;
        out.status[t] = if loc < capacity {
            ChoiceStatus::Kept
        } else {
            ChoiceStatus::DroppedByCapacity
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_come_first_served_with_capacity() {
        // 4 tokens, 2 experts, capacity 1: tokens 0, 1 prefer expert 1, tokens 2, 3 expert 0.
        let probs = [0.2, 0.8, 0.3, 0.7, 0.9, 0.1, 0.6, 0.4];
        let a = assign(&probs, &probs, 2, 1, &[false; 4]);
        assert_eq!(a.expert, vec![1, 1, 0, 0]);
        assert_eq!(a.slot, vec![0, 1, 0, 1]);
        use ChoiceStatus::*;
        assert_eq!(
            a.status,
            vec![Kept, DroppedByCapacity, Kept, DroppedByCapacity]
        );
        assert_eq!(a.first_counts, vec![2, 2]);
        assert_eq!(a.runner_up, vec![0, 0, 1, 1]);
    }

    #[test]
    fn padding_takes_no_slot() {
        let probs = [0.2, 0.8, 0.3, 0.7];
        let a = assign(&probs, &probs, 2, 1, &[true, false]);
        assert_eq!(a.status, vec![ChoiceStatus::Padding, ChoiceStatus::Kept]);
        assert_eq!(a.slot[1], 0);
        assert_eq!(a.first_counts, vec![0, 1]);
    }
}
