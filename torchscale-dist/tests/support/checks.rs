//! Values and checks both collective test programs use: what each rank sends, the reference a
//! rank computes for the others, and comparisons that return errors instead of panicking.
// Each test program uses part of it.
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use torchscale_core::{Error, Result};

/// What rank `rank` holds for `seed`: exact multiples of 1/4.
pub fn data(rank: usize, seed: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((rank * 7 + seed * 13 + i * 3) % 17) as f32 * 0.25 - 2.0)
        .collect()
}

/// What an all-reduce of [`data`] over `world` ranks gives.
pub fn sum_ref(world: usize, seed: usize, n: usize) -> Vec<f32> {
    (0..world).fold(vec![0.0; n], |acc, r| {
        acc.iter()
            .zip(data(r, seed, n))
            .map(|(a, b)| a + b)
            .collect()
    })
}

/// `t`'s elements as f32, in order.
pub fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// An error naming `what` unless `got == want`.
pub fn expect<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<()> {
    if got != want {
        return Err(Error::invalid(what, format!("got {got:?}, want {want:?}")));
    }
    Ok(())
}

/// Rows `from` sends to `to`: uneven, and zero for some pairs at every world size used.
pub fn rows_between(from: usize, to: usize) -> usize {
    (from * 2 + to * 3) % 4
}

/// The reason of an `Error::Collective`, or an error if `r` is anything else.
pub fn reason<T: std::fmt::Debug>(r: Result<T>) -> Result<String> {
    match r {
        Err(Error::Collective { reason, .. }) => Ok(reason),
        other => Err(Error::invalid(
            "result",
            format!("expected Error::Collective, got {other:?}"),
        )),
    }
}
