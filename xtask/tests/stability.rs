//! `cargo xtask stability`: the verdict rules on synthetic curves, the JSON record, and a
//! smoke run that writes the figure and the record.

use xtask::stability::{
    classify, parse_technique, run, unigram_entropy, window, Experiment, StabilityOpts, Thresholds,
    Verdict,
};

/// H1 = 3.0 nats: stall margin 0.1, relapse 0.5 (the experiment's thresholds).
fn th() -> Thresholds {
    Thresholds::new(3.0)
}

/// A curve from `start` decaying exponentially towards `end` over `n` steps.
fn decay(start: f64, end: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| end + (start - end) * (-(i as f64) / 10.0).exp())
        .collect()
}

#[test]
fn verdict_trained() {
    let l = decay(5.6, 2.0, 100);
    let s = classify(&l, &[1.0; 100], 0, 100, &th());
    assert_eq!(s.verdict, Verdict::Trained);
    // window(100) = 5: the final loss is the mean of the last 5 steps, all ≈ 2.0.
    assert_eq!(window(100), 5);
    assert!((s.final_loss - 2.0).abs() < 1e-3, "{}", s.final_loss);
    assert_eq!(s.initial_loss, 5.6);
    assert_eq!(s.max_grad_norm, 1.0);
}

#[test]
fn verdict_stalled_at_the_unigram_level() {
    // Ends at 2.95, above H1 − 0.1 = 2.9: no better than byte frequencies.
    let l = decay(5.6, 2.95, 100);
    assert_eq!(
        classify(&l, &[1.0; 100], 0, 100, &th()).verdict,
        Verdict::Stalled
    );
    // Ends at 2.85, just under the threshold: trained.
    let l = decay(5.6, 2.85, 100);
    assert_eq!(
        classify(&l, &[1.0; 100], 0, 100, &th()).verdict,
        Verdict::Trained
    );
}

#[test]
fn verdict_diverged() {
    let norms = [1.0; 100];
    // A skipped (non-finite) step.
    let l = decay(5.6, 2.0, 100);
    assert_eq!(
        classify(&l, &norms, 1, 100, &th()).verdict,
        Verdict::Diverged
    );
    // Stopped early: 60 of 100 steps ran.
    assert_eq!(
        classify(&l[..60], &norms[..60], 0, 100, &th()).verdict,
        Verdict::Diverged
    );
    // A NaN loss among the last steps.
    let mut nan = l.clone();
    nan[98] = f64::NAN;
    let s = classify(&nan, &norms, 0, 100, &th());
    assert!(s.final_loss.is_nan());
    assert_eq!(s.verdict, Verdict::Diverged);
    // Learned down to 2.0, then blew up to 2.6 (> best + 0.5) and stayed there.
    let mut relapse = decay(5.6, 2.0, 100);
    for x in relapse.iter_mut().skip(80) {
        *x = 2.6;
    }
    let s = classify(&relapse, &norms, 0, 100, &th());
    assert!((s.best_loss - 2.0).abs() < 0.01, "{}", s.best_loss);
    assert_eq!(s.verdict, Verdict::Diverged);
    // Ends above where it started.
    let up: Vec<f64> = (0..100).map(|i| 5.6 + i as f64 * 0.01).collect();
    assert_eq!(
        classify(&up, &norms, 0, 100, &th()).verdict,
        Verdict::Diverged
    );
}

#[test]
fn unigram_entropy_of_known_distributions() {
    // Two equally frequent bytes: ln 2. One byte: 0.
    assert!((unigram_entropy(b"abababab") - 2f64.ln()).abs() < 1e-12);
    assert_eq!(unigram_entropy(b"aaaa"), 0.0);
    // 256 distinct bytes once each: ln 256.
    let all: Vec<u8> = (0..=255).collect();
    assert!((unigram_entropy(&all) - 256f64.ln()).abs() < 1e-12);
}

#[test]
fn technique_names_parse() {
    use torchscale_models::config::Technique;
    assert_eq!(parse_technique("post-ln").unwrap(), Technique::PostLn);
    assert_eq!(parse_technique("Pre_LN").unwrap(), Technique::PreLn);
    assert_eq!(parse_technique("deepnorm").unwrap(), Technique::DeepNorm);
    assert_eq!(parse_technique("sub-ln").unwrap(), Technique::SubLn);
    assert_eq!(parse_technique("admin").unwrap(), Technique::Admin);
    assert!(parse_technique("batchnorm").is_err());
}

#[test]
fn flags_select_the_techniques() {
    use torchscale_models::config::Technique;
    let args: Vec<String> = "--quick --steps 4 --techniques post-ln,admin --lr 0.01"
        .split(' ')
        .map(String::from)
        .collect();
    let o = StabilityOpts::parse(&args).unwrap();
    assert_eq!(o.steps, 4);
    assert_eq!(o.layers, 2);
    assert_eq!(o.lr, 0.01);
    assert_eq!(o.techniques, vec![Technique::PostLn, Technique::Admin]);
    // Every technique's config finalises to that technique.
    for t in xtask::stability::ALL_TECHNIQUES {
        let c = o.decoder_config(t).finalize().unwrap();
        assert_eq!(c.technique(), t);
        // Post-LN wiring (no final LayerNorm) for Post-LN, DeepNorm and Admin.
        assert_eq!(
            c.decoder_normalize_before,
            matches!(t, Technique::PreLn | Technique::SubLn)
        );
    }
    let bad: Vec<String> = vec!["--dim".into(), "30".into(), "--heads".into(), "4".into()];
    assert!(StabilityOpts::parse(&bad).is_err());
}

/// Two techniques, 3 steps of a 2-layer model: the PNG and the JSON are written, the JSON has
/// every step and reads back equal.
#[test]
fn quick_run_writes_png_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("stability");
    let mut opts = StabilityOpts::parse(&[
        "--quick".into(),
        "--techniques".into(),
        "post-ln,deepnorm".into(),
    ])
    .unwrap();
    opts.out = out.clone();
    opts.progress = false;
    let exp = run(&opts).unwrap();

    let png = std::fs::read(out.join("stability.png")).unwrap();
    assert!(png.len() > 1000);
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let back = Experiment::read(&out.join("stability.json")).unwrap();
    assert_eq!(back.runs.len(), 2);
    assert_eq!(back.runs[0].technique, "Post-LN");
    assert_eq!(back.runs[1].technique, "DeepNorm");
    for r in &back.runs {
        assert_eq!(r.steps.len(), opts.steps);
        let idx: Vec<u64> = r.steps.iter().map(|s| s.step).collect();
        assert_eq!(idx, (0..opts.steps as u64).collect::<Vec<_>>());
        // fairseq inverse_sqrt, warmup 1, rate set from the updates done: update 0 warms up
        // from 0, update u >= 1 uses lr·sqrt(1/u).
        for (u, s) in r.steps.iter().enumerate() {
            let want = if u == 0 {
                0.0
            } else {
                opts.lr / (u as f64).sqrt()
            };
            assert!((s.lr - want).abs() < 1e-15, "step {u}: {} vs {want}", s.lr);
        }
        // Valid after step 2 and at the end.
        assert_eq!(r.valid.len(), 2);
        // A fresh byte model starts near the uniform loss ln 260 = 5.56.
        assert!(
            (r.steps[0].loss - 260f64.ln()).abs() < 1.5,
            "{}",
            r.steps[0].loss
        );
    }
    assert_eq!(back.config.techniques, vec!["Post-LN", "DeepNorm"]);
    assert_eq!(back.config.steps, exp.config.steps);
    for (a, b) in exp.runs.iter().zip(&back.runs) {
        for (x, y) in a.steps.iter().zip(&b.steps) {
            assert!((x.loss - y.loss).abs() <= 1e-12 * x.loss.abs());
            assert!((x.grad_norm - y.grad_norm).abs() <= 1e-12 * x.grad_norm.abs());
        }
        assert_eq!(a.summary.verdict, b.summary.verdict);
    }
}

/// NaN survives the JSON round trip as null -> NaN.
#[test]
fn json_round_trip_keeps_non_finite_values() {
    use xtask::stability::{ExperimentConfig, RunRecord, StepRecord, ValidRecord};
    let steps = vec![
        StepRecord {
            step: 0,
            loss: 5.5,
            lr: 0.0,
            grad_norm: 1.5,
            clip_coef: 1.0,
            skipped: false,
            seconds: 0.25,
        },
        StepRecord {
            step: 1,
            loss: f64::NAN,
            lr: 1e-3,
            grad_norm: f64::NAN,
            clip_coef: f64::NAN,
            skipped: true,
            seconds: 0.0,
        },
    ];
    let losses: Vec<f64> = steps.iter().map(|s| s.loss).collect();
    let norms: Vec<f64> = steps.iter().map(|s| s.grad_norm).collect();
    let summary = classify(&losses, &norms, 1, 2, &th());
    assert_eq!(summary.verdict, Verdict::Diverged);
    let exp = Experiment {
        config: ExperimentConfig {
            experiment: "stability".into(),
            layers: 1,
            dim: 8,
            heads: 1,
            ffn_dim: 16,
            steps: 2,
            lr: 1e-3,
            warmup: 1,
            batch: 1,
            seq_len: 4,
            seed: 0,
            clip: 0.0,
            betas: (0.9, 0.98),
            scale_embedding: true,
            valid_every: 1,
            corpus: "x".into(),
            thresholds: th(),
            techniques: vec!["Post-LN".into()],
            checkpoint_activations: None,
            threads: 2,
        },
        runs: vec![RunRecord {
            technique: "Post-LN".into(),
            parameters: 10,
            steps,
            valid: vec![ValidRecord {
                step: 1,
                loss: f64::NAN,
            }],
            stopped: None,
            summary,
            seconds: 0.5,
            peak_rss_bytes: 1 << 20,
            timing: None,
        }],
    };
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("experiment.json");
    exp.write(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("null"));
    let back = Experiment::read(&path).unwrap();
    let (a, b) = (&exp.runs[0], &back.runs[0]);
    assert_eq!(a.steps[0], b.steps[0]);
    assert!(b.steps[1].loss.is_nan() && b.steps[1].grad_norm.is_nan() && b.steps[1].skipped);
    assert!(b.steps[1].clip_coef.is_nan());
    assert_eq!(b.peak_rss_bytes, 1 << 20);
    assert!(b.valid[0].loss.is_nan());
    assert_eq!(b.summary.verdict, Verdict::Diverged);
    assert_eq!(b.summary.initial_loss, 5.5);
    assert!(b.summary.final_loss.is_nan());
    assert_eq!(b.summary.max_grad_norm, 1.5);
    assert_eq!(back.config, exp.config);
}

/// A record written before the per-step clipping coefficient and time, the experiment name, the
/// peak memory and the phase times existed still reads, with their defaults.
#[test]
fn older_records_read_with_defaults() {
    use xtask::stability::StepRecord;
    let step: StepRecord = serde_json::from_str(
        r#"{"step": 3, "loss": 2.5, "lr": 0.001, "grad_norm": 1.25, "skipped": false}"#,
    )
    .unwrap();
    assert_eq!(step.clip_coef, 1.0);
    assert_eq!(step.seconds, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = StabilityOpts::parse(&[
        "--quick".into(),
        "--steps".into(),
        "1".into(),
        "--techniques".into(),
        "pre-ln".into(),
    ])
    .unwrap();
    opts.out = tmp.path().to_path_buf();
    opts.progress = false;
    run(&opts).unwrap();
    // Strip the new fields from the file and read it back.
    let path = tmp.path().join("stability.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for k in ["experiment", "checkpoint_activations", "threads"] {
        v["config"].as_object_mut().unwrap().remove(k).unwrap();
    }
    for r in v["runs"].as_array_mut().unwrap() {
        let r = r.as_object_mut().unwrap();
        r.remove("peak_rss_bytes").unwrap();
        r.remove("timing").unwrap();
        for s in r.get_mut("steps").unwrap().as_array_mut().unwrap() {
            s.as_object_mut().unwrap().remove("clip_coef").unwrap();
            s.as_object_mut().unwrap().remove("seconds").unwrap();
        }
    }
    std::fs::write(&path, v.to_string()).unwrap();
    let back = Experiment::read(&path).unwrap();
    assert_eq!(back.config.experiment, "stability");
    assert_eq!(back.runs[0].peak_rss_bytes, 0);
    assert!(back.runs[0].timing.is_none());
    assert_eq!(back.runs[0].steps[0].clip_coef, 1.0);
}
