//! The experiments' phase timing (`xtask::experiment::timing`) on a quick `deepnet` run. In its
//! own test binary: tracing caches whether a span is enabled per call site, process-wide, and
//! runs in parallel threads without the layer would race with this one's.

use xtask::deepnet;
use xtask::stability::run;

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

/// With the timing layer installed (as `cargo xtask` installs it), the trainer's spans give the
/// backward pass, clipping and the optimizer; the phases add up to the step.
#[test]
fn the_timing_layer_splits_the_step() {
    use tracing_subscriber::layer::SubscriberExt;
    let subscriber = tracing_subscriber::registry().with(xtask::experiment::timing::layer());
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = deepnet::parse(&args("--quick --techniques admin --steps 6")).unwrap();
    opts.out = tmp.path().to_path_buf();
    opts.progress = false;
    let exp = tracing::subscriber::with_default(subscriber, || run(&opts)).unwrap();
    let t = exp.runs[0].timing.unwrap();
    assert_eq!(t.steps, 5);
    for (what, v) in [
        ("backward", t.backward),
        ("clip", t.clip),
        ("optimizer", t.optimizer),
    ] {
        assert!(v > 0.0 && v < t.step, "{what}: {t:?}");
    }
    let sum = t.forward + t.backward + t.clip + t.optimizer + t.other;
    assert!((sum - t.step).abs() < 1e-9, "{t:?}");
    assert!(t.other > -1e-3, "{t:?}");
    let table = xtask::stability::phase_table(&exp);
    assert!(
        table.contains("backward") && table.contains("Admin"),
        "{table}"
    );
}
