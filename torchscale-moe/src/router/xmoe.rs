//! The X-MoE gate: routing scores in a low-dimensional space against normalised expert
//! embeddings.
//!
//! torchscale: `logits = (x W_red^T) · normalize_rows(wg)^T` in f32 (row norms clamped at 1e-4),
//! no token normalisation, no temperature. Paper routing (`paper_routing`): the projected token
//! is normalised too and the cosine is divided by a learnable temperature `gating_t` (init 0.07,
//! read as `max(gating_t, 1e-4)`), as in the X-MoE research code.
//!
//! torchscale also rescales the rows of `wg` in place to norm 1.5 at every forward. That does not
//! change the logits, only the parameter's scale (and so its gradient scale, `∝ 1/|wg|`), so the
//! forward here leaves `wg` alone; [`XMoeGate::rescale_wg`] performs the same in-place rescale
//! for a trainer that wants torchscale's optimisation dynamics.

use candle_core::{DType, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};
use torchscale_core::{Error, Result};

/// Row-norm clamp of the cosine (torchscale's `eps` of `F.normalize`).
const NORM_EPS: f64 = 1e-4;
/// Lower clamp of the paper temperature.
const TEMPERATURE_EPS: f64 = 1e-4;
/// Initial paper temperature.
pub const TEMPERATURE_INIT: f64 = 0.07;
/// Gain of the orthogonal init of `wg`.
pub const WG_INIT_GAIN: f64 = 0.32;
/// Row norm that torchscale rescales `wg` to at every forward.
pub const WG_NORM: f64 = 1.5;

/// Keys `wg_reduction.weight` `[d, C]`, `wg` `[E, d]` and, with paper routing, `gating_t` `[1]`.
#[derive(Debug, Clone)]
pub struct XMoeGate {
    wg_reduction: Tensor,
    wg: Tensor,
    gating_t: Option<Tensor>,
}

impl XMoeGate {
    /// Builds the gate. A freshly created `wg` (not already in the store) gets an orthogonal
    /// init with gain 0.32 made from the store's own normal draws.
    pub fn new(
        embed_dim: usize,
        num_experts: usize,
        routing_dim: usize,
        paper_routing: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let wg_reduction = torchscale_core::linear::linear(
            embed_dim,
            routing_dim,
            false,
            1.0,
            vb.pp("wg_reduction"),
        )?
        .weight()
        .clone();
        let fresh = !vb.contains_tensor("wg");
        let wg = vb.get_with_hints(
            (num_experts, routing_dim),
            "wg",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        if fresh && wg.is_variable() {
            let rows = wg.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            let q = orthogonal(&rows, WG_INIT_GAIN);
            let q = Tensor::new(q, wg.device())?.to_dtype(wg.dtype())?;
            Var::from_tensor(&wg)?.set(&q)?;
        }
        let gating_t = if paper_routing {
            Some(vb.get_with_hints(1, "gating_t", Init::Const(TEMPERATURE_INIT))?)
        } else {
            None
        };
        Ok(Self {
            wg_reduction,
            wg,
            gating_t,
        })
    }

    /// The projection `[d, C]`.
    pub fn wg_reduction(&self) -> &Tensor {
        &self.wg_reduction
    }

    /// The expert embeddings `[E, d]`.
    pub fn wg(&self) -> &Tensor {
        &self.wg
    }

    /// The learnable temperature (paper routing only).
    pub fn temperature(&self) -> Option<&Tensor> {
        self.gating_t.as_ref()
    }

    /// `[S, C] -> [S, E]` logits in `gating_dtype`.
    pub fn logits(&self, x: &Tensor, gating_dtype: DType) -> Result<Tensor> {
        let r = torchscale_kernels::linear(x, &self.wg_reduction, None)?.to_dtype(gating_dtype)?;
        let w_hat = normalize_rows(&self.wg.to_dtype(gating_dtype)?)?;
        match &self.gating_t {
            None => Ok(r.matmul(&w_hat.t()?)?),
            Some(t) => {
                let r_hat = normalize_rows(&r)?;
                let t = t.to_dtype(gating_dtype)?.maximum(TEMPERATURE_EPS)?;
                Ok(r_hat.matmul(&w_hat.t()?)?.broadcast_div(&t)?)
            }
        }
    }

    /// torchscale's in-place rescale of each row of `wg` to norm 1.5 (outside the graph). Does
    /// nothing and returns false when `wg` is not a trainable variable.
    pub fn rescale_wg(&self) -> Result<bool> {
        if !self.wg.is_variable() {
            return Ok(false);
        }
        let w = self.wg.detach();
        let norms = w.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        let scaled = (w.broadcast_div(&norms)? * WG_NORM)?;
        Var::from_tensor(&self.wg)?.set(&scaled)?;
        Ok(true)
    }
}

/// `x / max(|x_row|, 1e-4)`, written as `sqrt(max(|x|², 1e-8))` so that a zero row has a finite
/// gradient.
pub fn normalize_rows(x: &Tensor) -> Result<Tensor> {
    let sq = x.sqr()?.sum_keepdim(D::Minus1)?;
    let norm = sq.maximum(NORM_EPS * NORM_EPS)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// An orthogonal matrix of the shape of `a` (orthonormal rows when rows <= cols, orthonormal
/// columns otherwise) times `gain`, by modified Gram-Schmidt on the normal draws in `a` (the same
/// distribution as `torch.nn.init.orthogonal_`, which takes the QR of normal draws).
pub fn orthogonal(a: &[Vec<f64>], gain: f64) -> Vec<Vec<f32>> {
    let rows = a.len();
    let cols = a.first().map_or(0, |r| r.len());
    let transpose = rows > cols;
    // Work on the vectors that must be orthonormal.
    let mut v: Vec<Vec<f64>> = if transpose {
        (0..cols)
            .map(|j| a.iter().map(|r| r[j]).collect())
            .collect()
    } else {
        a.to_vec()
    };
    for i in 0..v.len() {
        for j in 0..i {
            let dot: f64 = v[i].iter().zip(&v[j]).map(|(x, y)| x * y).sum();
            let (head, tail) = v.split_at_mut(i);
            for (x, y) in tail[0].iter_mut().zip(&head[j]) {
                *x -= dot * y;
            }
        }
        let n = v[i].iter().map(|x| x * x).sum::<f64>().sqrt();
        if n > 0.0 {
            v[i].iter_mut().for_each(|x| *x /= n);
        }
    }
    let get = |r: usize, c: usize| if transpose { v[c][r] } else { v[r][c] };
    (0..rows)
        .map(|r| (0..cols).map(|c| (gain * get(r, c)) as f32).collect())
        .collect()
}

/// Checks that `x` is `[S, C]`.
pub(crate) fn check_tokens(x: &Tensor, embed_dim: usize) -> Result<usize> {
    match x.dims() {
        [s, c] if *c == embed_dim => Ok(*s),
        d => Err(Error::shape("x", format!("[S, {embed_dim}]"), d)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use torchscale_core::init::ParamStore;

    fn gram(m: &[Vec<f32>], rows_dot: bool) -> Vec<Vec<f64>> {
        let (r, c) = (m.len(), m[0].len());
        let n = if rows_dot { r } else { c };
        let el = |i: usize, k: usize| if rows_dot { m[i][k] } else { m[k][i] } as f64;
        let len = if rows_dot { c } else { r };
        (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| (0..len).map(|k| el(i, k) * el(j, k)).sum())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn orthogonal_init_has_orthogonal_rows_of_norm_gain() {
        let store = ParamStore::new(3);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let g = XMoeGate::new(8, 4, 16, false, vb).unwrap();
        let w = g.wg().to_vec2::<f32>().unwrap();
        let gm = gram(&w, true);
        for (i, row) in gm.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let want = if i == j {
                    WG_INIT_GAIN * WG_INIT_GAIN
                } else {
                    0.0
                };
                assert!((v - want).abs() < 1e-6, "gram[{i}][{j}] = {v}");
            }
        }
        // More experts than routing dims: the columns are orthogonal instead.
        let tall = orthogonal(&[vec![1.0, 2.0], vec![0.5, -1.0], vec![3.0, 0.1]], 2.0);
        let gm = gram(&tall, false);
        assert!((gm[0][0] - 4.0).abs() < 1e-5 && (gm[1][1] - 4.0).abs() < 1e-5);
        assert!(gm[0][1].abs() < 1e-5);
    }

    #[test]
    fn logits_are_projection_times_unit_expert_embeddings() {
        let dev = Device::Cpu;
        let mut map = std::collections::HashMap::new();
        // wg_reduction = identity on 2 dims, wg rows (3, 4) and (0, 2): unit rows (0.6, 0.8), (0, 1).
        map.insert(
            "wg_reduction.weight".to_string(),
            Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap(),
        );
        map.insert(
            "wg".to_string(),
            Tensor::new(&[[3f32, 4.0], [0.0, 2.0]], &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(map.clone(), DType::F32, &dev);
        let g = XMoeGate::new(2, 2, 2, false, vb).unwrap();
        let x = Tensor::new(&[[2f32, 1.0]], &dev).unwrap();
        let l = g.logits(&x, DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert!((l[0][0] - 2.0).abs() < 1e-6 && (l[0][1] - 1.0).abs() < 1e-6);
        // The stored wg is used as is.
        assert_eq!(g.wg().to_vec2::<f32>().unwrap()[0], vec![3.0, 4.0]);
        assert!(!g.rescale_wg().unwrap());
        // Paper routing: cosine / 0.07; x = (2, 1) has norm sqrt(5).
        map.insert(
            "gating_t".to_string(),
            Tensor::new(&[0.07f32], &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let g = XMoeGate::new(2, 2, 2, true, vb).unwrap();
        let l = g.logits(&x, DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let s5 = 5f32.sqrt();
        assert!((l[0][0] - 2.0 / s5 / 0.07).abs() < 1e-4);
        assert!((l[0][1] - 1.0 / s5 / 0.07).abs() < 1e-4);
    }

    #[test]
    fn rescale_sets_row_norms_to_one_and_a_half() {
        let store = ParamStore::new(1);
        let g = XMoeGate::new(8, 3, 4, false, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
        assert!(g.rescale_wg().unwrap());
        for row in store
            .get("wg")
            .unwrap()
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap()
        {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((n - 1.5).abs() < 1e-5);
        }
    }
}
