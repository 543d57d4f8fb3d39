//! Expert parallelism on a real `Collective` (torchscale-core's `LocalGroup`: ranks as threads,
//! tensors copied between them, so autograd crosses ranks only through the differentiable
//! all-to-all). W ranks, each with E / W experts, give the single-process layer's outputs,
//! balance losses and gradients: the gate's summed over ranks (the trainer's all-reduce), each
//! expert's on its owning rank, the inputs' on their rank.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use torchscale_core::init::ParamStore;
use torchscale_core::{Collective, LocalGroup, RouteOptions, RoutingStats};
use torchscale_moe::all_to_all::all_to_all_rows;
use torchscale_moe::{MoeConfig, MoeLayer};

/// Seeded N(0, 1) draws (candle's own `randn` is unseeded).
fn randn(seed: u64, shape: (usize, usize)) -> Tensor {
    use rand::SeedableRng;
    let mut g = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| torchscale_core::init::std_normal(&mut g) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn cfg(top1: bool, use_xmoe: bool) -> MoeConfig {
    MoeConfig {
        embed_dim: 8,
        ffn_dim: 12,
        num_experts: 4,
        top1,
        use_xmoe,
        inner_norm: true,
        ..Default::default()
    }
    .validated()
    .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs `f` on `world` threads, each with its own rank's handle of one `LocalGroup` (moved into
/// the `Arc` the layer keeps; dropping it tells the others that the rank has left).
fn on_ranks<T: Send>(
    world: usize,
    f: impl Fn(Arc<dyn Collective>) -> torchscale_core::Result<T> + Sync,
) -> Vec<torchscale_core::Result<T>> {
    let f = &f;
    std::thread::scope(|sc| {
        let hs: Vec<_> = LocalGroup::new(world)
            .into_iter()
            .map(|g| sc.spawn(move || f(Arc::new(g))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// What one rank (or the single process on that rank's tokens) computed.
struct RankRun {
    output: Tensor,
    balance_loss: f32,
    stats: RoutingStats,
    experts: Vec<u32>,
    /// Gradients of the parameters present in this rank's backward, by name.
    grads: HashMap<String, Tensor>,
    /// Gradient of the rank's input.
    x_grad: Tensor,
}

/// The loss of rank `r`: a fixed projection of the output plus the balance loss.
fn loss(out: &Tensor, balance_loss: &Tensor, r: usize) -> Tensor {
    let w = randn(1000 + r as u64, out.dims2().unwrap());
    ((out * w).unwrap().sum_all().unwrap() + (balance_loss * 0.37).unwrap()).unwrap()
}

fn opts(r: usize, train: bool) -> RouteOptions<'static> {
    RouteOptions {
        train,
        seed: Some(100 + r as u64),
        ..Default::default()
    }
}

/// Every rank runs the expert-parallel layer on `xs[rank]` and its own backward.
fn run_parallel(
    store: &ParamStore,
    cfg: &MoeConfig,
    xs: &[Tensor],
    train: bool,
) -> Vec<torchscale_core::Result<RankRun>> {
    let world = xs.len();
    let names = store.named_vars();
    on_ranks(world, |comm| {
        let r = comm.rank();
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let layer = MoeLayer::new_expert_parallel(cfg.clone(), 1.0, vb, comm)?;
        let x = Var::from_tensor(&xs[r])?;
        let out = layer.forward(x.as_tensor(), &opts(r, train))?;
        let grads = loss(&out.output, &out.balance_loss, r).backward()?;
        Ok(RankRun {
            balance_loss: out.balance_loss.to_scalar::<f32>()?,
            stats: out.stats,
            experts: out.routing.expert.clone(),
            grads: names
                .iter()
                .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
                .collect(),
            x_grad: grads.get(x.as_tensor()).expect("x has a gradient").clone(),
            output: out.output,
        })
    })
}

/// The single-process layer with every expert, on each rank's tokens in turn; one backward of
/// the sum of the ranks' losses. Gradients go in `runs[0].grads` (they are global).
fn run_single(store: &ParamStore, cfg: &MoeConfig, xs: &[Tensor], train: bool) -> Vec<RankRun> {
    let layer = MoeLayer::new(
        cfg.clone(),
        1.0,
        store.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let vars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let outs: Vec<_> = vars
        .iter()
        .enumerate()
        .map(|(r, x)| layer.forward(x.as_tensor(), &opts(r, train)).unwrap())
        .collect();
    let total = outs
        .iter()
        .enumerate()
        .map(|(r, o)| loss(&o.output, &o.balance_loss, r))
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let grads = total.backward().unwrap();
    let named: HashMap<String, Tensor> = store
        .named_vars()
        .iter()
        .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
        .collect();
    outs.into_iter()
        .zip(&vars)
        .map(|(o, x)| RankRun {
            balance_loss: o.balance_loss.to_scalar::<f32>().unwrap(),
            stats: o.stats,
            experts: o.routing.expert.clone(),
            grads: named.clone(),
            x_grad: grads.get(x.as_tensor()).unwrap().clone(),
            output: o.output,
        })
        .collect()
}

/// The largest differences seen, for the report.
#[derive(Default, Debug)]
struct Worst {
    output: f32,
    balance_loss: f32,
    grad: f32,
}

/// Checks every rank against the single process and returns the largest differences.
fn compare(store: &ParamStore, cfg: &MoeConfig, xs: &[Tensor], train: bool) -> Worst {
    // The single process first: it creates every expert in the store.
    let single = run_single(store, cfg, xs, train);
    let par: Vec<RankRun> = run_parallel(store, cfg, xs, train)
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let world = xs.len();
    let per = cfg.num_experts / world;
    let mut worst = Worst::default();
    for (r, (p, s)) in par.iter().zip(&single).enumerate() {
        assert_eq!(p.experts, s.experts, "rank {r}: routing");
        assert_eq!(
            p.stats, s.stats,
            "rank {r}: routing statistics and capacity"
        );
        let d = max_diff(&p.output, &s.output);
        assert!(d <= 1e-6, "rank {r}: output differs by {d}");
        worst.output = worst.output.max(d);
        let d = (p.balance_loss - s.balance_loss).abs();
        assert!(d <= 1e-6, "rank {r}: balance loss differs by {d}");
        worst.balance_loss = worst.balance_loss.max(d);
        let d = max_diff(&p.x_grad, &s.x_grad);
        assert!(d <= 1e-5, "rank {r}: input gradient differs by {d}");
        worst.grad = worst.grad.max(d);
    }
    let global = &single[0].grads;
    for (name, _) in store.named_vars() {
        let want = global.get(&name);
        if let Some(j) = name
            .strip_prefix("experts.")
            .and_then(|s| s.split('.').next())
        {
            // An expert's gradient lives on its owner only and already holds every rank's tokens.
            let owner = j.parse::<usize>().unwrap() / per;
            for (r, p) in par.iter().enumerate() {
                let got = p.grads.get(&name);
                if r != owner {
                    assert!(got.is_none(), "{name}: gradient on rank {r}, not its owner");
                    continue;
                }
                match (got, want) {
                    (Some(a), Some(b)) => {
                        let d = max_diff(a, b);
                        assert!(d <= 1e-5, "{name} on rank {r}: differs by {d}");
                        worst.grad = worst.grad.max(d);
                    }
                    // An expert that no rank used: the padded buffer still runs through it.
                    (Some(a), None) => assert_eq!(max_diff(a, &a.zeros_like().unwrap()), 0.0),
                    (None, _) => panic!("{name}: no gradient on its owner rank {r}"),
                }
            }
        } else {
            // Replicated (the gate): the sum over ranks, what the trainer's all-reduce gives.
            let got = par
                .iter()
                .map(|p| {
                    p.grads
                        .get(&name)
                        .unwrap_or_else(|| panic!("{name}"))
                        .clone()
                })
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            let d = max_diff(&got, want.unwrap_or_else(|| panic!("{name}: no gradient")));
            assert!(d <= 1e-5, "{name}: summed over ranks differs by {d}");
            worst.grad = worst.grad.max(d);
        }
    }
    worst
}

#[test]
fn expert_parallel_layer_equals_the_single_process() {
    for (world, top1, xmoe, train) in [
        (2, false, true, true),
        (2, true, true, true),
        (2, false, false, true),
        (2, false, true, false),
        (4, false, true, true),
    ] {
        let store = ParamStore::new(13);
        let xs: Vec<Tensor> = (0..world).map(|r| randn(r as u64, (20, 8))).collect();
        let w = compare(&store, &cfg(top1, xmoe), &xs, train);
        eprintln!("world {world} top1 {top1} xmoe {xmoe} train {train}: {w:?}");
    }
}

/// The linear gate steered so that rank 0's tokens all go to rank 0's experts and rank 1's to
/// rank 1's: every exchange carries zero real tokens one way, and experts get none from a rank.
#[test]
fn uneven_routing_with_empty_exchanges() {
    let cfg = cfg(false, false);
    let store = ParamStore::new(5);
    // Creates the gate and every expert.
    MoeLayer::new(
        cfg.clone(),
        1.0,
        store.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    // Logits: experts 0, 1 along +e0, experts 2, 3 along -e0 (and apart on e1).
    let mut wg = vec![0f32; 4 * 8];
    for (e, (s0, s1)) in [(4.0, 1.0), (4.0, -1.0), (-4.0, 1.0), (-4.0, -1.0)]
        .iter()
        .enumerate()
    {
        wg[e * 8] = *s0;
        wg[e * 8 + 1] = *s1;
    }
    store
        .get("gate.wg.weight")
        .unwrap()
        .set(&Tensor::from_vec(wg, (4, 8), &Device::Cpu).unwrap())
        .unwrap();
    let shift = |sign: f32| {
        let mut v = vec![0f32; 8];
        v[0] = 5.0 * sign;
        Tensor::new(v.as_slice(), &Device::Cpu).unwrap()
    };
    let xs = vec![
        randn(1, (12, 8)).broadcast_add(&shift(1.0)).unwrap(),
        randn(2, (12, 8)).broadcast_add(&shift(-1.0)).unwrap(),
    ];
    let single = run_single(&store, &cfg, &xs, true);
    for (r, s) in single.iter().enumerate() {
        // Rank r's tokens choose only rank r's experts (2r, 2r + 1), and some are dropped.
        assert!(s.experts.iter().all(|&e| e as usize / 2 == r), "rank {r}");
        assert!(s.stats.dropped > 0, "rank {r}: {:?}", s.stats);
    }
    let w = compare(&store, &cfg, &xs, true);
    eprintln!("uneven: {w:?}");
}

/// Ranks with different numbers of tokens have different capacities: every rank gets an error
/// naming the exchanged shape, and nobody waits.
#[test]
fn unequal_token_counts_fail_on_every_rank() {
    let store = ParamStore::new(2);
    let cfg = cfg(false, true);
    MoeLayer::new(
        cfg.clone(),
        1.0,
        store.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let xs = vec![randn(0, (20, 8)), randn(1, (28, 8))];
    for (r, res) in run_parallel(&store, &cfg, &xs, true)
        .into_iter()
        .enumerate()
    {
        let e = res.err().unwrap_or_else(|| panic!("rank {r} succeeded"));
        assert!(e.to_string().contains("all_to_all chunk"), "rank {r}: {e}");
    }
}

/// The op alone, uneven and zero row counts: forward moves rows, backward moves gradients back.
#[test]
fn all_to_all_rows_forward_and_backward() {
    // Rank r sends `counts[r][d]` rows to rank d; row values say (from, to, index).
    let counts = [[2usize, 0, 1], [0, 0, 3], [1, 2, 0]];
    let res = on_ranks(3, |comm| {
        let r = comm.rank();
        let mut rows = Vec::new();
        for (d, &n) in counts[r].iter().enumerate() {
            for i in 0..n {
                rows.extend([r as f32, d as f32, i as f32]);
            }
        }
        let n: usize = counts[r].iter().sum();
        let x = Var::from_tensor(&Tensor::from_vec(rows, (n, 3), &Device::Cpu)?)?;
        let (y, recv_rows) = all_to_all_rows(&comm, x.as_tensor(), &counts[r])?;
        // Weight each received row by 1 + its position: the gradient tells where it went.
        let m = y.dim(0)?;
        let pos = Tensor::arange(1f32, (m + 1) as f32, &Device::Cpu)?.reshape((m, 1))?;
        let grads = y.broadcast_mul(&pos)?.sum_all()?.backward()?;
        let gx = grads
            .get(x.as_tensor())
            .expect("gradient")
            .to_vec2::<f32>()?;
        Ok((y.to_vec2::<f32>()?, recv_rows, gx))
    });
    for (r, res) in res.into_iter().enumerate() {
        let (y, recv_rows, gx) = res.unwrap();
        let want_rows: Vec<usize> = (0..3).map(|s| counts[s][r]).collect();
        assert_eq!(recv_rows, want_rows, "rank {r}");
        let mut want = Vec::new();
        for (s, row) in counts.iter().enumerate() {
            for i in 0..row[r] {
                want.push(vec![s as f32, r as f32, i as f32]);
            }
        }
        assert_eq!(y, want, "rank {r}");
        // Row i of the chunk for rank d sits at position (rows from ranks < r to d) + i there.
        for (k, row) in gx.iter().enumerate() {
            let (d, i) = (0..3)
                .flat_map(|d| (0..counts[r][d]).map(move |i| (d, i)))
                .nth(k)
                .unwrap();
            let before: usize = (0..r).map(|s| counts[s][d]).sum();
            let p = (before + i + 1) as f32;
            assert_eq!(row, &vec![p; 3], "rank {r} row {k}");
        }
    }
}

/// One rank (torchscale-core's `SingleProcess`): the exchange is the identity, forward and
/// backward, also for a buffer that is a view into a larger tensor (its storage does not start
/// at the buffer's first row).
#[test]
fn one_rank_all_to_all_is_the_identity() {
    let comm: Arc<dyn Collective> = Arc::new(torchscale_core::collective::SingleProcess);
    let base = Var::from_tensor(&randn(3, (7, 4))).unwrap();
    let x = base.as_tensor().narrow(0, 2, 5).unwrap();
    let (y, rows) = all_to_all_rows(&comm, &x, &[5]).unwrap();
    assert_eq!(rows, vec![5]);
    assert_eq!(max_diff(&y, &x), 0.0);
    let w = randn(4, (5, 4));
    let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = g.get(base.as_tensor()).unwrap();
    assert_eq!(max_diff(&gb.narrow(0, 2, 5).unwrap(), &w), 0.0);
    assert_eq!(max_abs_rows(gb, 0, 2), 0.0);
    // Row counts must match the ranks and the rows.
    assert!(all_to_all_rows(&comm, &x, &[4]).is_err());
    assert!(all_to_all_rows(&comm, &x, &[2, 3]).is_err());
}

fn max_abs_rows(t: &Tensor, start: usize, n: usize) -> f32 {
    t.narrow(0, start, n)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
