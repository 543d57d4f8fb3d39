//! `cargo xtask bench train`: the `--quick` smoke run (no timing assertions), the report, flags.

use xtask::bench::train::{run, TrainBenchOpts};
use xtask::bench::train_configs::{measure, TrainConfig};
use xtask::bench::train_report::render;

#[test]
fn quick_run_measures_every_part_and_renders() {
    let opts = TrainBenchOpts::quick();
    let report = run(&opts, false).unwrap();
    assert_eq!(report.samples.len(), 1);
    let m = &report.samples[0].m;
    assert_eq!(m.config, "quick");
    assert_eq!(m.tokens, 32);
    for (part, s) in [
        ("forward", m.forward.unwrap()),
        ("train forward", m.train_forward),
        ("backward", m.train_backward),
        ("optimizer", m.train_optimizer.unwrap()),
    ] {
        assert!(s > 0.0 && s.is_finite(), "{part}: {s}");
    }
    assert!(m.train_step >= m.train_backward);
    // A byte-level model near its initialisation: the loss is close to ln(260) = 5.56.
    assert!((m.loss - 260f64.ln()).abs() < 1.0, "loss {}", m.loss);
    assert!(m.peak_rss_bytes > 0);
    let table = render(&report);
    assert!(table.contains("quick: decoder 2 x 32"), "{table}");
    assert!(table.contains("no PyTorch side"), "{table}");
    // The JSON a child process prints parses back.
    let json = serde_json::to_string(m).unwrap();
    let back: xtask::bench::train_configs::Measurement = serde_json::from_str(&json).unwrap();
    assert_eq!(back.tokens, m.tokens);
}

#[test]
fn encoder_config_times_forward_and_backward_only() {
    // The encoder's step has no optimizer and no inference forward; one tiny step suffices to
    // check the shape of the measurement (the full config is 12 x 256, run once: ~1 s).
    let m = measure(TrainConfig::DeepnormEncoder, 0, 1).unwrap();
    assert!(m.forward.is_none() && m.train_optimizer.is_none());
    assert_eq!(m.tokens, 16 * 128);
    assert!(m.loss.is_finite());
}

#[test]
fn flags_parse_and_bad_ones_are_refused() {
    let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    let o = TrainBenchOpts::parse(&args("--configs a,d --rounds 2 --steps 3 --warmup 0")).unwrap();
    assert_eq!(
        o.configs,
        vec![TrainConfig::MagnetoLm, TrainConfig::DeepNarrow]
    );
    assert_eq!((o.rounds, o.steps, o.warmup), (2, 3, 0));
    assert!(TrainBenchOpts::parse(&args("--quick")).unwrap().in_process);
    let e = TrainBenchOpts::parse(&args("--configs z")).unwrap_err();
    assert!(e.to_string().contains("unknown config `z`"), "{e}");
    assert!(TrainBenchOpts::parse(&args("--rounds 0")).is_err());
    assert!(TrainBenchOpts::parse(&args("--bogus")).is_err());
    assert!(TrainBenchOpts::parse(&args("--steps")).is_err());
}
