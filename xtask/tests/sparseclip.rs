//! `cargo xtask sparseclip`: flags, and a smoke run (dense and 4 experts, both clipping methods)
//! that records the clipping and the routing entropy of every step.

use torchscale_models::train::ClipMode;
use xtask::sparseclip::{run, SparseclipOpts, SparseclipRecord};

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

#[test]
fn runs_pair_every_model_with_both_methods() {
    let o = SparseclipOpts::parse(&[]).unwrap();
    assert_eq!(o.experts, vec![8, 32, 64]);
    let runs = o.runs();
    assert_eq!(runs.len(), 8);
    assert_eq!(runs[0], (0, ClipMode::GlobalNorm(o.clip)));
    assert_eq!(
        runs[7],
        (
            64,
            ClipMode::SparseClip {
                max_norm: o.clip,
                num_experts: 64
            }
        )
    );
    // The MoE configs are X-MoE with the expert count asked for; the dense one has none.
    let c = o.decoder_config(32).finalize().unwrap();
    assert!(c.use_xmoe && c.moe_expert_count == 32 && c.moe_freq == 2);
    assert!(!o.decoder_config(0).finalize().unwrap().has_moe_layers());
    assert!(SparseclipOpts::parse(&args("--clip 0")).is_err());
    assert!(SparseclipOpts::parse(&args("--layers 2 --moe-freq 3")).is_err());
    let q = SparseclipOpts::parse(&args("--quick --experts 2,3")).unwrap();
    assert_eq!((q.experts.clone(), q.layers), (vec![2, 3], 2));
}

#[test]
fn quick_run_records_clipping_and_routing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = SparseclipOpts::parse(&args("--quick")).unwrap();
    opts.out = tmp.path().to_path_buf();
    opts.progress = false;
    run(&opts).unwrap();
    let png = std::fs::read(tmp.path().join("sparseclip.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let rec = SparseclipRecord::read(&tmp.path().join("sparseclip.json")).unwrap();
    let labels: Vec<String> = rec.runs.iter().map(|r| r.label()).collect();
    assert_eq!(
        labels,
        [
            "dense, vanilla",
            "dense, sparseclip",
            "4 experts, vanilla",
            "4 experts, sparseclip"
        ]
    );
    for r in &rec.runs {
        assert_eq!(r.steps.len(), opts.steps);
        let clipped = r.steps.iter().filter(|s| s.clip_coef < 1.0).count();
        assert_eq!(r.clipped_steps, clipped);
        for s in &r.steps {
            // coef = min(1, max / (norm + 1e-6)).
            let want = (opts.clip / (s.grad_norm + 1e-6)).min(1.0);
            assert!(
                (s.clip_coef - want).abs() < 1e-6,
                "{} vs {want}",
                s.clip_coef
            );
        }
        if r.experts == 0 {
            assert!(r.routing.is_empty() && r.expert_parameters == 0);
        } else {
            assert_eq!(r.routing.len(), opts.steps);
            let ln_e = (r.experts as f64).ln();
            for g in &r.routing {
                assert!(g.entropy > 0.0 && g.entropy <= ln_e + 1e-9, "{}", g.entropy);
                assert!((0.0..=1.0).contains(&g.dropped));
            }
            assert!(r.expert_parameters > 0);
        }
    }
    // Without experts SparseClip is global-norm clipping: the dense runs agree bit for bit.
    let (a, b) = (&rec.runs[0], &rec.runs[1]);
    for (x, y) in a.steps.iter().zip(&b.steps) {
        assert_eq!(x.loss.to_bits(), y.loss.to_bits());
        assert_eq!(x.grad_norm.to_bits(), y.grad_norm.to_bits());
    }
    // With experts, SparseClip's norm weighs the expert gradients down: it is the smaller one
    // at step 0 (same weights, same batch).
    let (v, s) = (&rec.runs[2], &rec.runs[3]);
    assert_eq!(v.steps[0].loss, s.steps[0].loss);
    assert!(s.steps[0].grad_norm < v.steps[0].grad_norm);
    assert!(xtask::sparseclip::table(&rec).contains("4 experts, sparseclip"));
    // --replot redraws from the record alone.
    let again = tmp.path().join("again");
    opts.replot = Some(tmp.path().join("sparseclip.json"));
    opts.out = again.clone();
    let json = |r: &SparseclipRecord| serde_json::to_string(r).unwrap();
    assert_eq!(json(&xtask::sparseclip::main(&opts).unwrap()), json(&rec));
    assert!(again.join("sparseclip.png").is_file());
}
