//! Routing decisions on the GPU (`kernels/moe_route.cu`): top-1/top-2 choices and capacity
//! slots from f32 probabilities and logits, with the host router's tie-breaking and slot order
//! (torchscale's cumsum over tokens, all first choices of an expert before its second ones).

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use torchscale_core::router::ChoiceStatus;
use torchscale_core::{Error, Result};

use super::launch::grid;
use crate::config::SecondExpertPolicy;

/// The PTX of `kernels/moe_route.cu`.
pub const ROUTE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_route.ptx"));
const MODULE: &str = "torchscale_moe_route";

/// The gating rules the kernel applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteParams {
    /// 1 (top-1) or 2 (top-2).
    pub k: usize,
    /// Slots per expert.
    pub capacity: usize,
    /// The second-expert policy (top-2 only).
    pub policy: SecondExpertPolicy,
    /// Whether the random policy compares the renormalised second gate.
    pub normalize_before: bool,
    /// The denominator clamp (`torch.finfo(f32).eps` for f32 gating).
    pub eps: f32,
}

/// The decisions, on the device: `expert`, `slot`, `status` (codes of [`status_of`]) `[S, k]`,
/// `rows` `[S * k]` (`e * capacity + slot` when kept, else [`super::index::NONE`]: the
/// capacity layout of a [`super::DispatchIndex`]) and `first_counts` `[E]`, all `u32`.
#[derive(Debug, Clone)]
pub struct GpuRoute {
    /// Expert of each choice.
    pub expert: Tensor,
    /// Slot of each choice (0 for padding and unsampled choices, as the host router).
    pub slot: Tensor,
    /// Status code of each choice.
    pub status: Tensor,
    /// Buffer row of each choice.
    pub rows: Tensor,
    /// First choices per expert before dropping, padding excluded.
    pub first_counts: Tensor,
}

/// The [`ChoiceStatus`] of a kernel status code.
pub fn status_of(code: u32) -> Result<ChoiceStatus> {
    Ok(match code {
        0 => ChoiceStatus::Kept,
        1 => ChoiceStatus::DroppedByCapacity,
        2 => ChoiceStatus::NotSampled,
        3 => ChoiceStatus::Padding,
        c => return Err(Error::invalid("status", format!("unknown code {c}"))),
    })
}

/// The draws tensor the kernel wants from the router's uniforms: none for `all`, the `[S]`
/// uniforms for `random`, Gumbel noise `-ln(-ln u)` `[S, E]` for `sampling` (u clamped inside
/// (0, 1) as the host router does). f64, on `u`'s device.
pub fn draws_from_uniform(
    u: &[f64],
    policy: SecondExpertPolicy,
    dev: &candle_core::Device,
) -> Result<Option<Tensor>> {
    let v: Vec<f64> = match policy {
        SecondExpertPolicy::All => return Ok(None),
        SecondExpertPolicy::Random => u.to_vec(),
        SecondExpertPolicy::Sampling => u
            .iter()
            .map(|&u| -(-(u.clamp(f64::MIN_POSITIVE, 1.0 - f64::EPSILON)).ln()).ln())
            .collect(),
    };
    Ok(Some(Tensor::from_vec(v.clone(), v.len(), dev)?))
}

/// Routes on the GPU. `probs`, `logits`: `[S, E]` f32 on a CUDA device; `draws` as made by
/// [`draws_from_uniform`]; `padding`: `[S]` u8 (non-zero = padding).
pub fn route_decisions(
    probs: &Tensor,
    logits: &Tensor,
    draws: Option<&Tensor>,
    padding: Option<&Tensor>,
    p: &RouteParams,
) -> Result<GpuRoute> {
    let (s, e) = probs.dims2()?;
    if logits.dims() != [s, e] {
        return Err(Error::shape("logits", format!("[{s}, {e}]"), logits.dims()));
    }
    if probs.dtype() != DType::F32 || logits.dtype() != DType::F32 {
        return Err(Error::invalid("probs", "GPU routing needs f32 gating"));
    }
    if !(p.k == 1 || p.k == 2) || s == 0 || e == 0 {
        return Err(Error::invalid(
            "route",
            format!("k {} with S {s}, E {e}", p.k),
        ));
    }
    let want_draws = match (p.k, p.policy) {
        (1, _) | (_, SecondExpertPolicy::All) => 0,
        (_, SecondExpertPolicy::Random) => s,
        (_, SecondExpertPolicy::Sampling) => s * e,
    };
    let n_draws = draws.map_or(0, |d| d.elem_count());
    if n_draws != want_draws || draws.is_some_and(|d| d.dtype() != DType::F64) {
        return Err(Error::shape(
            "draws",
            format!("[{want_draws}] f64"),
            &[n_draws],
        ));
    }
    if let Some(pad) = padding {
        if pad.dims() != [s] || pad.dtype() != DType::U8 {
            return Err(Error::shape("padding", format!("[{s}] u8"), pad.dims()));
        }
    }
    let op = RouteOp {
        p: *p,
        draws: draws.map(|d| d.contiguous()).transpose()?,
        padding: padding.map(|d| d.contiguous()).transpose()?,
    };
    let packed = probs
        .contiguous()?
        .apply_op2_no_bwd(&logits.contiguous()?, &op)?;
    let n = s * p.k;
    let part = |i: usize| -> Result<Tensor> { Ok(packed.narrow(0, i * n, n)?) };
    Ok(GpuRoute {
        expert: part(0)?.reshape((s, p.k))?,
        slot: part(1)?.reshape((s, p.k))?,
        status: part(2)?.reshape((s, p.k))?,
        rows: part(3)?,
        first_counts: packed.narrow(0, 4 * n, e)?,
    })
}

/// The route kernels as a custom op: `(probs, logits) -> [4 S k + E]` u32 packed as
/// expert | slot | status | rows | first_counts.
struct RouteOp {
    p: RouteParams,
    draws: Option<Tensor>,
    padding: Option<Tensor>,
}

type CResult<T> = candle_core::Result<T>;

fn msg(s: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(s.into())
}

impl CustomOp2 for RouteOp {
    fn name(&self) -> &'static str {
        "moe-route"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        // The host router (crate::router) is the CPU path.
        Err(msg("moe-route runs on CUDA only; use MoeRouter on the CPU"))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        let dev = &s1.device;
        let (s, e) = l1.shape().dims2()?;
        let (CudaStorageSlice::F32(probs), CudaStorageSlice::F32(logits)) = (&s1.slice, &s2.slice)
        else {
            return Err(msg("moe-route needs f32 probs and logits"));
        };
        let probs = probs.slice(l1.start_offset()..);
        let logits = logits.slice(l2.start_offset()..);
        let k = self.p.k;
        let n = s * k;
        let out: CudaSlice<u32> = output_u32(dev, 4 * n + e)?;
        // SAFETY: fully written by moe_topk before it is read.
        let mut flags = unsafe { dev.alloc::<u8>(s)? };
        let null: u64 = 0;
        let (su, eu, ku) = (s as u32, e as u32, k as u32);
        let policy: u32 = match self.p.policy {
            SecondExpertPolicy::All => 0,
            SecondExpertPolicy::Random => 1,
            SecondExpertPolicy::Sampling => 2,
        };
        let norm = self.p.normalize_before as u32;
        let cap = self.p.capacity as u32;
        let dguard = self.draws.as_ref().map(|t| t.storage_and_layout());
        let pguard = self.padding.as_ref().map(|t| t.storage_and_layout());
        let draws = match &dguard {
            Some((g, l)) => match &**g {
                Storage::Cuda(st) => Some(st.as_cuda_slice::<f64>()?.slice(l.start_offset()..)),
                _ => return Err(msg("draws must be on the CUDA device")),
            },
            None => None,
        };
        let padding = match &pguard {
            Some((g, l)) => match &**g {
                Storage::Cuda(st) => Some(st.as_cuda_slice::<u8>()?.slice(l.start_offset()..)),
                _ => return Err(msg("padding must be on the CUDA device")),
            },
            None => None,
        };
        let expert = out.slice(0..n);
        let topk = dev.get_or_load_custom_func("moe_topk", MODULE, ROUTE_PTX)?;
        let mut b = topk.builder();
        b.arg(&probs).arg(&logits);
        match &draws {
            Some(d) => b.arg(d),
            None => b.arg(&null),
        };
        match &padding {
            Some(d) => b.arg(d),
            None => b.arg(&null),
        };
        b.arg(&su)
            .arg(&eu)
            .arg(&ku)
            .arg(&policy)
            .arg(&norm)
            .arg(&self.p.eps);
        b.arg(&expert).arg(&mut flags);
        // SAFETY: arguments match moe_topk.
        unsafe { b.launch(grid((su.div_ceil(256), 1), 256)) }.w()?;
        drop(b);
        let slot = out.slice(n..2 * n);
        let status = out.slice(2 * n..3 * n);
        let rows = out.slice(3 * n..4 * n);
        let counts = out.slice(4 * n..4 * n + e);
        let capk = dev.get_or_load_custom_func("moe_capacity", MODULE, ROUTE_PTX)?;
        let mut b = capk.builder();
        b.arg(&expert).arg(&flags).arg(&su).arg(&ku).arg(&cap);
        b.arg(&slot).arg(&status).arg(&rows).arg(&counts);
        // SAFETY: arguments match moe_capacity; one block of 256 threads (SCAN_THREADS) per expert.
        unsafe { b.launch(grid((eu, 1), 256)) }.w()?;
        drop(b);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            (4 * n + e).into(),
        ))
    }
}

fn output_u32(dev: &candle_core::CudaDevice, n: usize) -> CResult<CudaSlice<u32>> {
    // Poisoning (when on) fills u32 outputs with u32::MAX - 1, a value no field can hold.
    if super::launch::poisoning() {
        dev.clone_htod(&vec![u32::MAX - 1; n])
    } else {
        // SAFETY: every element is written by moe_topk / moe_capacity.
        unsafe { dev.alloc::<u32>(n) }
    }
}
