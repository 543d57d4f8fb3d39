//! Gradient accumulation over micro-batches, in place on buffers the accumulator owns.

use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, InplaceOp1, InplaceOp2, Layout, Tensor, Var, WithDType};
use torchscale_core::{Error, Result};

/// One parameter's running sum.
#[derive(Debug)]
enum Sum {
    /// The first micro-batch's gradient, still the caller's tensor: never written.
    Shared(Tensor),
    /// A buffer created here (the sum of two micro-batches): added to and scaled in place.
    Owned(Tensor),
}

/// Sums the gradients of a fixed parameter list over micro-batches, then scales the sum.
///
/// Only the listed parameters are kept (a `backward()` store also holds every intermediate
/// tensor's gradient, which would waste memory across micro-batches). A parameter that has no
/// gradient in some micro-batch counts as zero there, as PyTorch's `.grad` accumulation does.
///
/// The first micro-batch's gradients are kept as they are (a single micro-batch costs no copy);
/// the second is added into a fresh buffer, and every later one is added into that buffer in
/// place, as is the final scaling (on the CPU; elsewhere each step allocates, as candle does).
#[derive(Debug)]
pub struct GradAccumulator {
    params: Vec<Var>,
    sums: Vec<Option<Sum>>,
    count: usize,
}

impl GradAccumulator {
    /// An empty accumulator for `params`.
    pub fn new(params: Vec<Var>) -> Self {
        let sums = params.iter().map(|_| None).collect();
        Self {
            params,
            sums,
            count: 0,
        }
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (p, sum) in self.params.iter().zip(self.sums.iter_mut()) {
            let Some(g) = grads.get(p) else { continue };
            let g = g.detach();
            *sum = Some(match sum.take() {
                None => Sum::Shared(g),
                Some(Sum::Shared(s)) => Sum::Owned((s + g)?),
                Some(Sum::Owned(s)) => {
                    if in_place(&s, &g) {
                        s.inplace_op2(&g, &AddAssign)?;
                        Sum::Owned(s)
                    } else {
                        Sum::Owned((s + g)?)
                    }
                }
            });
        }
        self.count += 1;
        Ok(())
    }

    /// Micro-batches added since the last finish.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The summed gradients multiplied by `scale` in a fresh store, and a reset accumulator.
    pub fn finish_scaled(&mut self, scale: f64) -> Result<GradStore> {
        let mut out = GradStore::default();
        for (p, sum) in self.params.iter().zip(self.sums.iter_mut()) {
            let s = match sum.take() {
                None => continue,
                Some(Sum::Shared(s)) if scale != 1.0 => s.affine(scale, 0.0)?,
                Some(Sum::Owned(s)) if scale != 1.0 && writable(&s) => {
                    s.inplace_op1(&Scale(scale))?;
                    s
                }
                Some(Sum::Owned(s)) if scale != 1.0 => s.affine(scale, 0.0)?,
                Some(Sum::Shared(s) | Sum::Owned(s)) => s,
            };
            out.insert(p, s);
        }
        self.count = 0;
        Ok(out)
    }

    /// The mean gradient over the micro-batches (the sum times `1 / count`).
    pub fn finish_mean(&mut self) -> Result<GradStore> {
        if self.count == 0 {
            return Err(Error::invalid(
                "GradAccumulator",
                "no micro-batch was added",
            ));
        }
        self.finish_scaled(1.0 / self.count as f64)
    }
}

/// Whether the owned buffer `s` can be written by the CPU ops below.
fn writable(s: &Tensor) -> bool {
    s.device().is_cpu() && s.is_contiguous()
}

/// Whether `g` can be added into `s` in place; otherwise candle's out-of-place add runs (and
/// reports any shape or dtype mismatch; strided gradients, rare, take that path too).
fn in_place(s: &Tensor, g: &Tensor) -> bool {
    writable(s)
        && g.device().is_cpu()
        && g.is_contiguous()
        && s.dims() == g.dims()
        && s.dtype() == g.dtype()
}

/// `dst += src`, element-wise, with candle's arithmetic in the tensors' dtype.
struct AddAssign;

fn add_into<T: WithDType>(dst: &mut [T], src: &[T]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "grad-accumulate"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((a, b)), Some((c, d))) = (dl.contiguous_offsets(), sl.contiguous_offsets())
        else {
            bail!("grad-accumulate: contiguous tensors only");
        };
        if b - a != d - c {
            bail!("grad-accumulate: {} values added into {}", d - c, b - a);
        }
        match (dst, src) {
            (CpuStorage::F32(x), CpuStorage::F32(y)) => add_into(&mut x[a..b], &y[c..d]),
            (CpuStorage::F64(x), CpuStorage::F64(y)) => add_into(&mut x[a..b], &y[c..d]),
            (CpuStorage::F16(x), CpuStorage::F16(y)) => add_into(&mut x[a..b], &y[c..d]),
            (CpuStorage::BF16(x), CpuStorage::BF16(y)) => add_into(&mut x[a..b], &y[c..d]),
            _ => bail!("grad-accumulate: float gradients of one dtype only"),
        }
        Ok(())
    }
}

/// `dst *= scale`, as candle's `affine(scale, 0)` rounds it.
struct Scale(f64);

fn scale_slice<T: WithDType>(d: &mut [T], scale: f64) {
    let k = T::from_f64(scale);
    for x in d {
        *x *= k;
    }
}

impl InplaceOp1 for Scale {
    fn name(&self) -> &'static str {
        "grad-scale"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            bail!("grad-scale: the running sum must be contiguous");
        };
        match s {
            CpuStorage::F32(d) => scale_slice(&mut d[a..b], self.0),
            CpuStorage::F64(d) => scale_slice(&mut d[a..b], self.0),
            CpuStorage::F16(d) => scale_slice(&mut d[a..b], self.0),
            CpuStorage::BF16(d) => scale_slice(&mut d[a..b], self.0),
            _ => bail!("grad-scale: float gradients only"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn mean_of_micro_batches() {
        let dev = Device::Cpu;
        let a = Var::zeros(2, DType::F32, &dev).unwrap();
        let b = Var::zeros(1, DType::F32, &dev).unwrap();
        let mut acc = GradAccumulator::new(vec![a.clone(), b.clone()]);
        // Batch 1: d/da = [1, 2], d/db = [4]; batch 2: d/da = [3, 6], b unused.
        let l1 = ((a.as_tensor() * Tensor::new(&[1f32, 2.0], &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            + (b.as_tensor() * 4.0).unwrap().sum_all().unwrap())
        .unwrap();
        acc.add(&l1.backward().unwrap()).unwrap();
        let l2 = (a.as_tensor() * Tensor::new(&[3f32, 6.0], &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        acc.add(&l2.backward().unwrap()).unwrap();
        assert_eq!(acc.count(), 2);
        let g = acc.finish_mean().unwrap();
        assert_eq!(g.get(&a).unwrap().to_vec1::<f32>().unwrap(), vec![2.0, 4.0]);
        assert_eq!(g.get(&b).unwrap().to_vec1::<f32>().unwrap(), vec![2.0]);
        assert_eq!(g.get_ids().count(), 2);
        assert_eq!(acc.count(), 0);
        assert!(acc.finish_mean().is_err());
    }

    /// A store holding `g` as the gradient of `v` (built directly, so `g` may be strided).
    fn store(pairs: &[(&Var, Tensor)]) -> GradStore {
        let mut s = GradStore::default();
        for (v, g) in pairs {
            s.insert(v.as_tensor(), g.clone());
        }
        s
    }

    #[test]
    fn three_micro_batches_in_place_match_the_sum() {
        let dev = Device::Cpu;
        let w = Var::zeros((3, 4), DType::F32, &dev).unwrap();
        let h = Var::zeros(5, DType::BF16, &dev).unwrap();
        let gw: Vec<Tensor> = (0..3)
            .map(|i| Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap() * (i + 1) as f64)
            .collect::<candle_core::Result<_>>()
            .unwrap();
        // The last gradient of `w` is a transposed view (added out of place).
        let gw2 = Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap().t().unwrap();
        let gh: Vec<Tensor> = (0..3)
            .map(|i| Tensor::full(0.25f32 * i as f32, 5, &dev)?.to_dtype(DType::BF16))
            .collect::<candle_core::Result<_>>()
            .unwrap();
        let stores = [
            store(&[(&w, gw[0].clone()), (&h, gh[0].clone())]),
            store(&[(&w, gw[1].clone()), (&h, gh[1].clone())]),
            store(&[(&w, gw2.clone()), (&h, gh[2].clone())]),
        ];
        let first = gw[0].to_vec2::<f32>().unwrap();
        let mut acc = GradAccumulator::new(vec![w.clone(), h.clone()]);
        for s in &stores {
            acc.add(s).unwrap();
        }
        let out = acc.finish_scaled(0.5).unwrap();
        let want = ((((&gw[0] + &gw[1]).unwrap() + &gw2).unwrap()) * 0.5).unwrap();
        let got = out.get(&w).unwrap();
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let want = ((((&gh[0] + &gh[1]).unwrap() + &gh[2]).unwrap()) * 0.5).unwrap();
        let got = out.get(&h).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(
            got.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            want.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
        );
        // The caller's gradients were read, never written.
        assert_eq!(gw[0].to_vec2::<f32>().unwrap(), first);
        assert_eq!(stores[0].get(&w).unwrap().to_vec2::<f32>().unwrap(), first);
        // The accumulator starts over after finishing.
        acc.add(&stores[1]).unwrap();
        let out = acc.finish_scaled(1.0).unwrap();
        assert_eq!(
            out.get(&w).unwrap().to_vec2::<f32>().unwrap(),
            gw[1].to_vec2::<f32>().unwrap()
        );
    }
}
