//! GPU benchmark (feature `cuda`): the dispatch/combine kernels against torchscale's one-hot
//! einsum dispatch (`maskᵀ · x`, `combine · y` as matmuls) on the same GPU, and against the
//! memory-bandwidth floor (bytes the kernel must move / a measured device-to-device copy rate).
//! Run by `run.sh bench` (from `cargo xtask cuda build`); prints one line per case.
//!
//! Sizes: `TS_BENCH_TOKENS` (default 8192), `TS_BENCH_WIDTH` (1024), `TS_BENCH_EXPERTS`
//! (comma list, default 8,64), `TS_BENCH_REPEATS` (20).

#[cfg(feature = "cuda")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::run()
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("cuda_bench needs --features cuda");
}

#[cfg(feature = "cuda")]
mod bench {
    use std::sync::Arc;
    use std::time::Instant;

    use candle_core::{DType, Device, Tensor};
    use torchscale_core::init::ParamStore;
    use torchscale_core::{RouteOptions, Router};
    use torchscale_moe::cuda::{combine, dispatch, DispatchIndex, Layout};
    use torchscale_moe::dispatch::{dense_combine, dense_dispatch_mask};
    use torchscale_moe::{MoeConfig, MoeRouter, SecondExpertPolicy};

    type R<T> = Result<T, Box<dyn std::error::Error>>;

    fn env(name: &str, default: usize) -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Median seconds of `f` over `n` timed runs after two warm-ups, synchronising the GPU.
    fn time(dev: &Device, n: usize, mut f: impl FnMut() -> R<Tensor>) -> R<f64> {
        for _ in 0..2 {
            f()?;
        }
        dev.synchronize()?;
        let mut t = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            f()?;
            dev.synchronize()?;
            t.push(start.elapsed().as_secs_f64());
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    }

    pub fn run() -> R<()> {
        let dev = Device::new_cuda(0)?;
        let s = env("TS_BENCH_TOKENS", 8192);
        let c = env("TS_BENCH_WIDTH", 1024);
        let reps = env("TS_BENCH_REPEATS", 20);
        let experts: Vec<usize> = std::env::var("TS_BENCH_EXPERTS")
            .unwrap_or_else(|_| "8,64".into())
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect();
        // Copy rate: read + write of a 256 MiB f32 buffer.
        let big = Tensor::zeros(64 << 20, DType::F32, &dev)?;
        let copy_s = time(&dev, reps, || Ok(big.copy()?))?;
        let bw = 2.0 * (256u64 << 20) as f64 / copy_s;
        println!("device-to-device copy: {:.0} GB/s (read + write)", bw / 1e9);
        println!(
            "dtype experts tokens width | op        kernel_us  einsum_us  floor_us  kernel/floor"
        );
        for &e in &experts {
            let cfg = MoeConfig {
                embed_dim: c,
                ffn_dim: c,
                num_experts: e,
                second_expert_policy: SecondExpertPolicy::All,
                ..Default::default()
            }
            .validated()?;
            let router = MoeRouter::new(
                &cfg,
                ParamStore::new(1).var_builder(DType::F32, &dev).pp("gate"),
            )?;
            let x32 = Tensor::randn(0f32, 1.0, (s, c), &dev)?;
            let r = router.route(
                &x32,
                &RouteOptions {
                    train: true,
                    seed: Some(1),
                    ..Default::default()
                },
            )?;
            let ix = Arc::new(DispatchIndex::from_routing(&r, Layout::Capacity, &dev)?);
            for dt in [DType::F32, DType::BF16] {
                let x = x32.to_dtype(dt)?;
                let mask_t = dense_dispatch_mask(&r, dt)?.t()?.contiguous()?;
                let comb = dense_combine(&r)?.to_dtype(dt)?;
                let gate = r.gate.to_dtype(dt)?;
                let buf = dispatch(&x, &ix)?;
                let el = dt.size_in_bytes() as f64;
                let kept = r.stats.tokens_per_expert.iter().sum::<usize>() as f64;
                // Dispatch must write the whole [E cap, C] buffer and read each kept row once.
                let d_floor = (ix.num_rows as f64 + kept) * c as f64 * el / bw;
                // Combine reads each kept row once and writes [S, C].
                let c_floor = (kept + s as f64) * c as f64 * el / bw;
                let dk = time(&dev, reps, || Ok(dispatch(&x, &ix)?))?;
                let de = time(&dev, reps, || Ok(mask_t.matmul(&x)?))?;
                let ck = time(&dev, reps, || Ok(combine(&buf, &gate, &ix)?))?;
                let ce = time(&dev, reps, || Ok(comb.matmul(&buf)?))?;
                for (op, k, ein, fl) in
                    [("dispatch", dk, de, d_floor), ("combine", ck, ce, c_floor)]
                {
                    println!(
                        "{dt:?} {e} {s} {c} | {op:9} {:9.1} {:10.1} {:9.1} {:8.2}",
                        k * 1e6,
                        ein * 1e6,
                        fl * 1e6,
                        k / fl
                    );
                }
            }
        }
        Ok(())
    }
}
