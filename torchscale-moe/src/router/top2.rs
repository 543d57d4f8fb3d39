//! Top-2 gating: a second expert per token, placed after every first choice of that expert.

use torchscale_core::router::ChoiceStatus;

use super::{argmax, Assignment};
use crate::config::SecondExpertPolicy;

/// Inputs of [`assign`] besides the probabilities.
pub(crate) struct Top2Inputs<'a> {
    /// `[S, E]` logits (the second choice is an argmax of these, plus noise).
    pub logits: &'a [f64],
    /// `[S, E]` Gumbel noise for the `sampling` policy, `[S]` uniforms for `random`, empty for
    /// `all`.
    pub draws: &'a [f64],
    /// The second-expert policy.
    pub policy: SecondExpertPolicy,
    /// Whether the random policy compares the renormalised `g2 / (g1 + g2)` (true) or the raw
    /// probability (false), as torchscale's order of operations implies.
    pub normalize_before: bool,
    /// Round intermediate gate arithmetic to f32, as torchscale's f32 gating does.
    pub f32_math: bool,
    /// `torch.finfo(dtype).eps` of the gating dtype.
    pub eps: f64,
}

/// Top-2 assignment. First choices take slots in token order; the second choices of expert `e`
/// start at the number of tokens whose first choice is `e` (counted before dropping, padding
/// excluded) and continue in token order. Slots `>= capacity` are dropped.
pub(crate) fn assign(
    probs: &[f64],
    num_experts: usize,
    capacity: usize,
    padding: &[bool],
    inp: &Top2Inputs,
) -> Assignment {
    let e = num_experts;
    let s = probs.len() / e;
    let round = |v: f64| if inp.f32_math { v as f32 as f64 } else { v };
    let mut out = Assignment::new(s, e, 2);
    let mut sampled = vec![true; s];
    let mut second = vec![0usize; s];
    let mut noisy = vec![0f64; e];
    for t in 0..s {
        let p = &probs[t * e..(t + 1) * e];
        let lg = &inp.logits[t * e..(t + 1) * e];
        let e1 = argmax(p, None);
        let e2 = if inp.policy == SecondExpertPolicy::Sampling {
            for (j, n) in noisy.iter_mut().enumerate() {
                *n = round(lg[j] + inp.draws[t * e + j]);
            }
            argmax(&noisy, Some(e1))
        } else {
            argmax(lg, Some(e1))
        };
        out.expert[2 * t] = e1 as u32;
        out.expert[2 * t + 1] = e2 as u32;
        out.runner_up[t] = argmax(lg, Some(e1)) as u32;
        second[t] = e2;
        if inp.policy == SecondExpertPolicy::Random {
            let (g1, g2) = (p[e1], p[e2]);
            let g2 = if inp.normalize_before {
                round(g2 / round(g1 + g2).max(inp.eps))
            } else {
                g2
            };
            sampled[t] = 2.0 * g2 > inp.draws[t];
        }
    }
    // First choices.
    let mut taken = vec![0usize; e];
    for (t, &pad) in padding.iter().enumerate().take(s) {
        let e1 = out.expert[2 * t] as usize;
        if pad {
            out.status[2 * t] = ChoiceStatus::Padding;
            continue;
        }
        out.first_counts[e1] += 1;
        let loc = taken[e1];
        taken[e1] += 1;
        out.slot[2 * t] = loc as u32;
        out.status[2 * t] = status(loc, capacity);
    }
    // Second choices, after all first choices of their expert.
    let mut taken2 = vec![0usize; e];
    for t in 0..s {
        let i = 2 * t + 1;
        if padding[t] {
            out.status[i] = ChoiceStatus::Padding;
            continue;
        }
        if !sampled[t] {
            out.status[i] = ChoiceStatus::NotSampled;
            continue;
        }
        let e2 = second[t];
        let loc = out.first_counts[e2] + taken2[e2];
        taken2[e2] += 1;
        out.slot[i] = loc as u32;
        out.status[i] = status(loc, capacity);
    }
    if inp.policy == SecondExpertPolicy::Random {
        out.sampled = Some(sampled);
    }
    out
}

fn status(loc: usize, capacity: usize) -> ChoiceStatus {
    if loc < capacity {
        ChoiceStatus::Kept
    } else {
        ChoiceStatus::DroppedByCapacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChoiceStatus::*;

    fn inputs<'a>(
        logits: &'a [f64],
        draws: &'a [f64],
        policy: SecondExpertPolicy,
    ) -> Top2Inputs<'a> {
        Top2Inputs {
            logits,
            draws,
            policy,
            normalize_before: true,
            f32_math: false,
            eps: f64::EPSILON,
        }
    }

    #[test]
    fn second_choices_start_after_all_first_choices() {
        // 3 experts, 3 tokens, all prefer expert 0 then expert 1; capacity 4.
        let p = [0.6, 0.3, 0.1, 0.5, 0.4, 0.1, 0.7, 0.2, 0.1];
        let a = assign(
            &p,
            3,
            4,
            &[false; 3],
            &inputs(&p, &[], SecondExpertPolicy::All),
        );
        assert_eq!(a.expert, vec![0, 1, 0, 1, 0, 1]);
        // Expert 1 has no first choice, so its second choices start at slot 0.
        assert_eq!(a.slot, vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(a.first_counts, vec![3, 0, 0]);
        assert!(a.status.iter().all(|s| *s == Kept));
    }

    #[test]
    fn second_slots_count_dropped_first_choices() {
        // Tokens 0 and 1 choose expert 0 then 1; token 2 chooses 1 then 0. Expert 0's second
        // choices start at slot 2 (its two first choices), also when capacity 1 drops one.
        let p = [0.6, 0.4, 0.7, 0.3, 0.2, 0.8];
        let a = assign(
            &p,
            2,
            3,
            &[false; 3],
            &inputs(&p, &[], SecondExpertPolicy::All),
        );
        assert_eq!(a.expert, vec![0, 1, 0, 1, 1, 0]);
        assert_eq!(a.slot, vec![0, 1, 1, 2, 0, 2]);
        let a = assign(
            &p,
            2,
            1,
            &[false; 3],
            &inputs(&p, &[], SecondExpertPolicy::All),
        );
        assert_eq!(
            a.status,
            vec![
                Kept,
                DroppedByCapacity,
                DroppedByCapacity,
                DroppedByCapacity,
                Kept,
                DroppedByCapacity
            ]
        );
    }

    #[test]
    fn random_policy_keeps_second_iff_twice_normalised_g2_exceeds_u() {
        // g1n = 0.6 / 0.9, g2n = 0.3 / 0.9 = 1/3: kept iff u < 2/3.
        let p = [0.6, 0.3, 0.1, 0.6, 0.3, 0.1];
        let u = [0.66, 0.67];
        let a = assign(
            &p,
            3,
            8,
            &[false; 2],
            &inputs(&p, &u, SecondExpertPolicy::Random),
        );
        assert_eq!(a.sampled, Some(vec![true, false]));
        assert_eq!(a.status[1], Kept);
        assert_eq!(a.status[3], NotSampled);
        // Unnormalised: 2 * 0.3 = 0.6 < 0.66, so neither is kept.
        let mut inp = inputs(&p, &u, SecondExpertPolicy::Random);
        inp.normalize_before = false;
        let a = assign(&p, 3, 8, &[false; 2], &inp);
        assert_eq!(a.sampled, Some(vec![false, false]));
    }

    #[test]
    fn sampling_policy_uses_the_noisy_logits() {
        let p = [0.5, 0.3, 0.2];
        let lg = [0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln()];
        // Noise that lifts expert 2 above expert 1, and a huge one on expert 0 (excluded).
        let noise = [10.0, 0.0, 1.0];
        let a = assign(
            &p,
            3,
            4,
            &[false],
            &inputs(&lg, &noise, SecondExpertPolicy::Sampling),
        );
        assert_eq!(a.expert, vec![0, 2]);
        assert_eq!(a.runner_up, vec![1]);
        assert_eq!(a.sampled, None);
    }

    #[test]
    fn padding_is_never_routed() {
        let p = [0.6, 0.4, 0.7, 0.3];
        let a = assign(
            &p,
            2,
            4,
            &[true, false],
            &inputs(&p, &[], SecondExpertPolicy::All),
        );
        assert_eq!(a.status, vec![Padding, Padding, Kept, Kept]);
        assert_eq!(a.slot, vec![0, 0, 0, 0]);
        assert_eq!(a.first_counts, vec![1, 0]);
    }
}
