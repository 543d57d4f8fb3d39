//! AdamW with the moments in tensors ([`adamw_update_tensors`]) against the host-slice update
//! ([`adamw_update`]) on the CPU: the same kernel reached through nested in-place ops, so the
//! parameter and both moments must agree bit for bit; and the checks that keep the nested locks
//! from meeting one storage twice. (tests/cuda_fused.rs holds the CUDA version to this too.)

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::randn;
use torchscale_kernels::adamw::{adamw_update, adamw_update_tensors, AdamWStep};

fn hp(weight_decay: f64, step: u64) -> AdamWStep {
    AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay,
        step,
    }
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn same_bits_as_host_moments() {
    for (pdtype, gdtype) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F32),
    ] {
        for wd in [0.0, 0.1] {
            let dims = [13, 301];
            let n = 13 * 301;
            let p0 = randn(1, &dims, 1.0, pdtype);
            let host = Var::from_tensor(&p0).unwrap();
            let tens = Var::from_tensor(&p0).unwrap();
            let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
            let mt = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
            let vt = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
            for step in 1..=3 {
                let g = randn(10 + step, &dims, 0.5, gdtype);
                adamw_update(host.as_tensor(), &g, &mut m, &mut v, &hp(wd, step)).unwrap();
                adamw_update_tensors(tens.as_tensor(), &g, &mt, &vt, &hp(wd, step)).unwrap();
            }
            let what = format!("{pdtype:?} grad {gdtype:?} wd {wd}");
            assert_eq!(
                to_vec(tens.as_tensor()),
                to_vec(host.as_tensor()),
                "{what} param"
            );
            assert_eq!(to_vec(&mt), m, "{what} m");
            assert_eq!(to_vec(&vt), v, "{what} v");
        }
    }
}

#[test]
fn strided_gradient_and_shaped_moments() {
    let p = Var::from_tensor(&randn(2, &[7, 5], 1.0, DType::F32)).unwrap();
    let host = Var::from_tensor(p.as_tensor()).unwrap();
    let g = randn(3, &[5, 7], 1.0, DType::F32).t().unwrap();
    let (mut m, mut v) = (vec![0f32; 35], vec![0f32; 35]);
    let mt = Tensor::zeros((7, 5), DType::F32, &Device::Cpu).unwrap();
    let vt = Tensor::zeros((5, 7), DType::F32, &Device::Cpu).unwrap();
    adamw_update(host.as_tensor(), &g, &mut m, &mut v, &hp(0.01, 1)).unwrap();
    adamw_update_tensors(p.as_tensor(), &g, &mt, &vt, &hp(0.01, 1)).unwrap();
    assert_eq!(to_vec(p.as_tensor()), to_vec(host.as_tensor()));
    assert_eq!(to_vec(&mt), m);
    assert_eq!(to_vec(&vt), v);
}

#[test]
fn bad_inputs_are_errors() {
    let p = Var::zeros(10, DType::F32, &Device::Cpu).unwrap();
    let g = Tensor::ones(10, DType::F32, &Device::Cpu).unwrap();
    let m = Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap();
    let v = Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap();
    let s = hp(0.0, 1);
    let err = |r: candle_core::Result<()>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains("adamw"), "{what}: {e}");
    };
    err(
        adamw_update_tensors(p.as_tensor(), &g, &m, &m, &s),
        "m and v one tensor",
    );
    err(
        adamw_update_tensors(p.as_tensor(), &g, &m, &m.reshape((2, 5)).unwrap(), &s),
        "m and v one storage",
    );
    err(
        adamw_update_tensors(p.as_tensor(), &g, p.as_tensor(), &v, &s),
        "m is the parameter",
    );
    err(
        adamw_update_tensors(p.as_tensor(), &m, &m, &v, &s),
        "m is the gradient",
    );
    let half = Tensor::zeros(10, DType::F16, &Device::Cpu).unwrap();
    err(
        adamw_update_tensors(p.as_tensor(), &g, &half, &v, &s),
        "f16 moment",
    );
    let short = Tensor::zeros(9, DType::F32, &Device::Cpu).unwrap();
    err(
        adamw_update_tensors(p.as_tensor(), &g, &short, &v, &s),
        "short moment",
    );
    let strided = Tensor::zeros((5, 2), DType::F32, &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    err(
        adamw_update_tensors(p.as_tensor(), &g, &strided, &v, &s),
        "strided moment",
    );
    err(
        adamw_update_tensors(p.as_tensor(), &g.reshape((2, 5)).unwrap(), &m, &v, &s),
        "gradient shape",
    );
    err(
        adamw_update_tensors(p.as_tensor(), &g, &m, &v, &hp(0.0, 0)),
        "step 0",
    );
    // Nothing moved.
    assert_eq!(to_vec(p.as_tensor()), vec![0.0; 10]);
    assert_eq!(to_vec(&m), vec![0.0; 10]);
}
