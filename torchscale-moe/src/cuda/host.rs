//! Host versions of the dispatch kernels: the ops' `cpu_fwd`, and the reference the GPU
//! results are tested against. Same arithmetic as the kernels (f32 accumulation, choices in
//! order), so f32 results agree up to FMA contraction.

use candle_core::WithDType;

use super::index::NONE;

fn f<T: WithDType>(x: T) -> f32 {
    x.to_f64() as f32
}

/// `out[r] = w[inv[r]] * x[inv[r] / k]` (`w` absent: a copy), zero rows where `inv[r]` is
/// [`NONE`]. `x: [S, c]`, `out: [inv.len(), c]`.
pub fn scatter<T: WithDType>(x: &[T], inv: &[u32], w: Option<&[T]>, k: usize, c: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); inv.len() * c];
    for (r, &i) in inv.iter().enumerate() {
        if i == NONE {
            continue;
        }
        let i = i as usize;
        let src = &x[(i / k) * c..(i / k + 1) * c];
        let dst = &mut out[r * c..(r + 1) * c];
        match w {
            None => dst.copy_from_slice(src),
            Some(w) => {
                let g = f(w[i]);
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = T::from_f64((g * f(v)) as f64);
                }
            }
        }
    }
    out
}

/// `out[s] = Σ_j w[s k + j] * buf[rows[s k + j]]` over kept choices (`w` absent: weight 1).
/// `buf: [R, c]`, `rows: [S * k]`, `out: [S, c]`.
pub fn gather<T: WithDType>(
    buf: &[T],
    rows: &[u32],
    w: Option<&[T]>,
    k: usize,
    c: usize,
) -> Vec<T> {
    let s = rows.len() / k;
    let mut out = vec![T::from_f64(0.0); s * c];
    let mut acc = vec![0f32; c];
    for t in 0..s {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for i in t * k..(t + 1) * k {
            let r = rows[i];
            if r == NONE {
                continue;
            }
            let g = w.map_or(1.0, |w| f(w[i]));
            let src = &buf[r as usize * c..(r as usize + 1) * c];
            for (a, &v) in acc.iter_mut().zip(src) {
                *a += g * f(v);
            }
        }
        for (o, &a) in out[t * c..(t + 1) * c].iter_mut().zip(&acc) {
            *o = T::from_f64(a as f64);
        }
    }
    out
}

/// `out[i] = <gout[i / k], buf[rows[i]]>` for kept choices, 0 otherwise (`[S * k]`).
pub fn gate_grad<T: WithDType>(gout: &[T], buf: &[T], rows: &[u32], k: usize, c: usize) -> Vec<T> {
    rows.iter()
        .enumerate()
        .map(|(i, &r)| {
            if r == NONE {
                return T::from_f64(0.0);
            }
            let g = &gout[(i / k) * c..(i / k + 1) * c];
            let b = &buf[r as usize * c..(r as usize + 1) * c];
            let dot: f32 = g.iter().zip(b).map(|(&x, &y)| f(x) * f(y)).sum();
            T::from_f64(dot as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two tokens, k = 2, three buffer rows: token 0 -> rows 2 (w .25) and 0 (w .75); token 1
    // keeps only its first choice, row 1 (w 1).
    const ROWS: [u32; 4] = [2, 0, 1, NONE];
    const INV: [u32; 3] = [1, 2, 0];
    const X: [f32; 4] = [1.0, 2.0, 3.0, 4.0];
    const W: [f32; 4] = [0.25, 0.75, 1.0, 0.5];

    #[test]
    fn scatter_then_gather_weights_each_row_once() {
        let buf = scatter(&X, &INV, None, 2, 2);
        assert_eq!(buf, vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0]);
        // Token 0: .25 x0 + .75 x0 = x0; token 1: 1 * x1.
        assert_eq!(gather(&buf, &ROWS, Some(&W), 2, 2), X.to_vec());
        let weighted = scatter(&X, &INV, Some(&W), 2, 2);
        assert_eq!(weighted, vec![0.75, 1.5, 3.0, 4.0, 0.25, 0.5]);
    }

    #[test]
    fn gate_grad_is_the_row_dot_product() {
        let buf = [1.0f32, 0.0, 0.0, 1.0, 2.0, 2.0];
        let g = gate_grad(&X, &buf, &ROWS, 2, 2);
        // Choice 0: <[1, 2], [2, 2]> = 6; choice 1: <[1, 2], [1, 0]> = 1; choice 2:
        // <[3, 4], [0, 1]> = 4; choice 3 dropped.
        assert_eq!(g, vec![6.0, 1.0, 4.0, 0.0]);
    }
}
