//! `cargo xtask scaling`: flags, and a smoke run (depths 1 and 2) that writes the record and the
//! figure and trains every depth on the same batches.

use xtask::scaling::{run, ScalingOpts, ScalingRecord};

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

#[test]
fn flags_override_the_defaults() {
    let o = ScalingOpts::parse(&[]).unwrap();
    assert_eq!(o.depths, vec![6, 12, 24, 48]);
    assert_eq!(
        o.technique,
        torchscale_models::config::Technique::SubLn,
        "Magneto is Sub-LN"
    );
    let q = ScalingOpts::parse(&args("--quick --depths 3,1 --technique deepnorm")).unwrap();
    assert_eq!(q.depths, vec![3, 1]);
    assert_eq!(q.dim, 32);
    assert_eq!(q.technique, torchscale_models::config::Technique::DeepNorm);
    // Every depth finalises to the technique with its own layer count.
    for l in [1, 6, 48] {
        let c = o.decoder_config(l).finalize().unwrap();
        assert_eq!(c.decoder_layers, l);
        assert!(c.subln);
    }
    assert!(ScalingOpts::parse(&args("--depths 0")).is_err());
    assert!(ScalingOpts::parse(&args("--dim 30")).is_err());
}

#[test]
fn quick_run_writes_every_step_and_the_curves() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = ScalingOpts::parse(&args("--quick")).unwrap();
    opts.out = tmp.path().to_path_buf();
    opts.progress = false;
    let rec = run(&opts).unwrap();
    let png = std::fs::read(tmp.path().join("scaling.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let back = ScalingRecord::read(&tmp.path().join("scaling.json")).unwrap();
    assert_eq!(back.runs.len(), 2);
    assert_eq!(back.config.depths, opts.depths);
    assert_eq!(back.tokens_seen, opts.steps * opts.batch * opts.seq_len);
    assert!(back.epochs() > 0.0 && back.epochs() < 1e-3);
    for (r, &l) in back.runs.iter().zip(&opts.depths) {
        assert_eq!(r.layers, l);
        assert_eq!(r.steps.len(), opts.steps);
        // Valid after step 2 and at the end; the best is one of them.
        assert_eq!(r.valid.len(), 2);
        assert!(r.valid.iter().any(|v| v.loss == r.best_valid_loss));
        assert!(r.final_train_loss.is_finite() && r.final_valid_loss.is_finite());
    }
    // The deeper model has more parameters; both start near the uniform loss ln 260.
    assert!(back.runs[1].parameters > back.runs[0].parameters);
    for r in &back.runs {
        assert!((r.steps[0].loss - 260f64.ln()).abs() < 1.5);
    }
    assert_eq!(rec.runs[0].steps[0].loss, back.runs[0].steps[0].loss);
    let t = xtask::scaling::table(&rec);
    assert!(t.contains("epochs"), "{t}");
    // --replot redraws from the record alone.
    let again = tmp.path().join("again");
    opts.replot = Some(tmp.path().join("scaling.json"));
    opts.out = again.clone();
    let json = |r: &ScalingRecord| serde_json::to_string(r).unwrap();
    assert_eq!(json(&xtask::scaling::main(&opts).unwrap()), json(&back));
    assert!(again.join("scaling.png").is_file());
}
