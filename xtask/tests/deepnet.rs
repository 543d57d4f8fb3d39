//! `cargo xtask deepnet`: the defaults, and a smoke run (12 layers, every technique) that writes
//! the record and the figure, with each run's time, peak memory and phase times; two runs from
//! one seed record the same losses.

use torchscale_models::config::Technique;
use xtask::deepnet;
use xtask::stability::{run, Experiment};

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

#[test]
fn defaults_are_the_thousand_layer_run() {
    let o = deepnet::parse(&[]).unwrap();
    assert_eq!(o.experiment, "deepnet");
    assert_eq!(o.layers, 1000);
    assert_eq!(o.techniques, deepnet::TECHNIQUES.to_vec());
    assert_eq!(
        o.techniques,
        vec![
            Technique::DeepNorm,
            Technique::SubLn,
            Technique::Admin,
            Technique::PostLn
        ]
    );
    assert!(o.json_path().ends_with("target/deepnet/deepnet.json"));
    // The help text states the defaults the code uses.
    let help = <deepnet::DeepnetArgs as clap::CommandFactory>::command()
        .render_help()
        .to_string();
    for (what, v) in [
        ("Decoder layers", o.layers.to_string()),
        ("Model width", o.dim.to_string()),
        ("FFN width", o.ffn_dim.to_string()),
        ("Training steps per technique", o.steps.to_string()),
        ("Sequences per step", o.batch.to_string()),
        ("Bytes per sequence", o.seq_len.to_string()),
        ("Peak learning rate", format!("{:e}", o.lr)),
        ("schedule", o.warmup.to_string()),
    ] {
        let line = help
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("{what} missing:\n{help}"));
        let want = format!("[default: {v}]");
        assert!(line.contains(&want), "{line} vs {want}");
    }
    // Flags override, `--quick` too.
    let q = deepnet::parse(&args("--quick --layers 6 --checkpoint-activations 2")).unwrap();
    assert_eq!((q.layers, q.dim, q.steps), (6, 32, 4));
    assert_eq!(q.checkpoint_activations, Some(2));
    assert!(deepnet::parse(&args("--checkpoint-activations 0")).is_err());
}

#[test]
fn quick_run_records_every_technique() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = deepnet::parse(&args("--quick")).unwrap();
    opts.out = tmp.path().to_path_buf();
    opts.progress = false;
    let exp = run(&opts).unwrap();
    let png = std::fs::read(tmp.path().join("deepnet.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let back = Experiment::read(&tmp.path().join("deepnet.json")).unwrap();
    assert_eq!(back.config.experiment, "deepnet");
    assert_eq!(back.config.layers, 12);
    let names: Vec<&str> = back.runs.iter().map(|r| r.technique.as_str()).collect();
    assert_eq!(names, ["DeepNorm", "Sub-LN", "Admin", "Post-LN"]);
    for r in &back.runs {
        assert_eq!(r.steps.len(), opts.steps);
        assert!(r
            .steps
            .iter()
            .all(|s| s.loss.is_finite() && s.seconds > 0.0));
        // No clipping: the coefficient stays 1.
        assert!(r.steps.iter().all(|s| s.clip_coef == 1.0));
        let t = r.timing.expect("phase times");
        // Every step but the first is timed; the forward closure is part of the step.
        assert_eq!(t.steps, opts.steps - 1);
        assert!(
            t.step > 0.0 && t.forward > 0.0 && t.forward < t.step,
            "{t:?}"
        );
        assert!(r.seconds > 0.0);
        if cfg!(target_os = "linux") {
            assert!(r.peak_rss_bytes > 1 << 20, "{}", r.peak_rss_bytes);
        }
        // Valid after step 2 and at the end.
        assert_eq!(r.valid.len(), 2);
    }
    let table = xtask::stability::table(&exp);
    assert!(table.contains("peak MiB"), "{table}");
    assert!(xtask::stability::phase_table(&exp).contains("DeepNorm"));
    // --replot redraws from the record alone.
    let again = tmp.path().join("again");
    opts.replot = Some(tmp.path().join("deepnet.json"));
    opts.out = again.clone();
    let json = |e: &Experiment| serde_json::to_string(e).unwrap();
    assert_eq!(json(&deepnet::main(&opts).unwrap()), json(&back));
    assert!(again.join("deepnet.png").is_file());
}

#[test]
fn the_seed_fixes_the_losses() {
    let once = || {
        let tmp = tempfile::tempdir().unwrap();
        let mut opts = deepnet::parse(&args(
            "--quick --techniques deepnorm --checkpoint-activations 5",
        ))
        .unwrap();
        opts.out = tmp.path().to_path_buf();
        opts.progress = false;
        run(&opts).unwrap()
    };
    let (a, b) = (once(), once());
    let losses = |e: &Experiment| -> Vec<u64> {
        e.runs[0]
            .steps
            .iter()
            .flat_map(|s| [s.loss.to_bits(), s.grad_norm.to_bits()])
            .collect()
    };
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(a.config.checkpoint_activations, Some(5));
}
