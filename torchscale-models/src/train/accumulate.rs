//! Gradient accumulation over micro-batches.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use torchscale_core::{Error, Result};

/// Sums the gradients of a fixed parameter list over micro-batches, then scales the sum.
///
/// Only the listed parameters are kept (a `backward()` store also holds every intermediate
/// tensor's gradient, which would waste memory across micro-batches). A parameter that has no
/// gradient in some micro-batch counts as zero there, as PyTorch's `.grad` accumulation does.
#[derive(Debug)]
pub struct GradAccumulator {
    params: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    count: usize,
}

impl GradAccumulator {
    /// An empty accumulator for `params`.
    pub fn new(params: Vec<Var>) -> Self {
        let sums = vec![None; params.len()];
        Self {
            params,
            sums,
            count: 0,
        }
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (p, sum) in self.params.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(p) {
                let g = g.detach();
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
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
            if let Some(s) = sum.take() {
                let s = if scale == 1.0 {
                    s
                } else {
                    s.affine(scale, 0.0)?
                };
                out.insert(p, s);
            }
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
}
