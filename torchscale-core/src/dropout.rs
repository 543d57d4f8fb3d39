//! Dropout that is a no-op outside training, with reproducible masks.
//!
//! candle's CPU device cannot be seeded, so masks are drawn on the host from a per-thread
//! generator. [`seed_dropout`] seeds it; a trainer reseeds it at every step from (run seed, step),
//! which makes a resumed run draw the same masks as the uninterrupted one. Unseeded, the generator
//! starts from the operating system's entropy.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::init::seeded_rng;
use crate::Result;

/// The ChaCha stream of dropout masks, apart from parameter init (stream 0) under the same seed.
const DROPOUT_STREAM: u64 = 1;

thread_local! {
    static MASK_RNG: RefCell<Option<ChaCha8Rng>> = const { RefCell::new(None) };
}

/// Seeds this thread's dropout generator: every later mask is a function of `seed` and the order
/// of the dropout calls.
pub fn seed_dropout(seed: u64) {
    MASK_RNG.with(|r| *r.borrow_mut() = Some(seeded_rng(seed, DROPOUT_STREAM)));
}

/// A copy of this thread's dropout generator at one moment, from [`dropout_state`].
///
/// Activation checkpointing recomputes a stretch of layers in the backward pass; restoring the
/// state taken before their forward makes the recomputation draw the very same masks.
#[derive(Debug, Clone)]
pub struct DropoutState(ChaCha8Rng);

/// The current state of this thread's dropout generator. An unseeded generator is seeded from
/// the operating system's entropy here first, so that the state can be restored exactly.
pub fn dropout_state() -> DropoutState {
    MASK_RNG.with(|r| {
        let mut r = r.borrow_mut();
        DropoutState(
            r.get_or_insert_with(|| seeded_rng(rand::random(), DROPOUT_STREAM))
                .clone(),
        )
    })
}

/// Puts this thread's dropout generator back to `state`: the next masks repeat those drawn after
/// [`dropout_state`] returned it.
pub fn restore_dropout(state: &DropoutState) {
    MASK_RNG.with(|r| *r.borrow_mut() = Some(state.0.clone()));
}

/// `n` uniforms in `[0, 1)` from this thread's generator.
fn uniforms(n: usize) -> Vec<f32> {
    MASK_RNG.with(|r| {
        let mut r = r.borrow_mut();
        let g = r.get_or_insert_with(|| seeded_rng(rand::random(), DROPOUT_STREAM));
        (0..n).map(|_| g.random::<f32>()).collect()
    })
}

/// A keep mask of `shape` (1 with probability `1 - p`, else 0), already scaled by `1 / (1 - p)`.
fn keep_mask(shape: &[usize], p: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    let scale = (1.0 / (1.0 - p)) as f32;
    let p = p as f32;
    let v: Vec<f32> = uniforms(n)
        .into_iter()
        .map(|u| if u >= p { scale } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// Inverted dropout with probability `p` when `train` is true; identity otherwise or when `p == 0`.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return Ok(x.zeros_like()?);
    }
    let mask = keep_mask(x.dims(), p, x.dtype(), x.device())?;
    Ok((x * mask)?)
}

/// Stochastic depth (timm's `DropPath`): each sample of the batch (dimension 0) is dropped with
/// probability `p` and the survivors are scaled by `1/(1-p)`; identity outside training.
pub fn drop_path(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    let mut shape = vec![1usize; x.rank()];
    shape[0] = x.dim(0)?;
    let keep = keep_mask(&shape, p.min(1.0 - 1e-6), x.dtype(), x.device())?;
    Ok(x.broadcast_mul(&keep)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_masks_repeat_and_keep_the_mean() {
        let x = Tensor::ones((64, 64), DType::F32, &Device::Cpu).unwrap();
        seed_dropout(7);
        let a: Vec<f32> = dropout(&x, 0.25, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        seed_dropout(7);
        let b: Vec<f32> = dropout(&x, 0.25, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        let zeros = a.iter().filter(|v| **v == 0.0).count() as f64 / a.len() as f64;
        assert!((zeros - 0.25).abs() < 0.03, "dropped fraction {zeros}");
        // Survivors are scaled so the expectation is unchanged.
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
        seed_dropout(8);
        let c: Vec<f32> = dropout(&x, 0.25, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn restored_state_repeats_the_masks() {
        // Unseeded on a fresh thread: the snapshot must still pin the stream.
        std::thread::spawn(|| {
            let x = Tensor::ones((16, 16), DType::F32, &Device::Cpu).unwrap();
            let draw = || -> Vec<f32> {
                dropout(&x, 0.5, true)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let state = dropout_state();
            let a = draw();
            let b = draw();
            restore_dropout(&state);
            assert_eq!(draw(), a);
            assert_eq!(draw(), b);
            assert_ne!(a, b);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn eval_and_zero_p_are_identity() {
        let x = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        for (p, train) in [(0.5, false), (0.0, true)] {
            let y: Vec<f32> = dropout(&x, p, train).unwrap().to_vec1().unwrap();
            assert_eq!(y, vec![1.0, 2.0, 3.0]);
        }
    }

    #[test]
    fn drop_path_drops_whole_samples() {
        let x = Tensor::ones((200, 3), DType::F32, &Device::Cpu).unwrap();
        seed_dropout(1);
        let y: Vec<Vec<f32>> = drop_path(&x, 0.5, true).unwrap().to_vec2().unwrap();
        assert!(y.iter().all(|r| r.iter().all(|v| *v == r[0])));
        let dropped = y.iter().filter(|r| r[0] == 0.0).count();
        assert!((60..140).contains(&dropped), "{dropped}");
    }
}
