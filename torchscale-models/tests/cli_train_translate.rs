//! train_translate's command line and output: clap parsing (in process, on the example itself),
//! the seeded task on ChaCha8's documented stream, and the built binary run with stdout piped.

mod cli_support;
#[allow(dead_code)]
#[path = "../examples/train_translate.rs"]
mod train_translate;

use clap::error::ErrorKind;
use clap::Parser;
use cli_support::{fields, run};
use torchscale_models::Technique;
use train_translate::{Args, Split, Task};

fn parse(a: &[&str]) -> Result<Args, clap::Error> {
    Args::try_parse_from(std::iter::once("train_translate").chain(a.iter().copied()))
}

#[test]
fn defaults_and_equals_form() {
    let d = parse(&[]).unwrap();
    let want = Args::default();
    assert_eq!(
        (
            d.stabilizer,
            d.layers,
            d.dim,
            d.steps,
            d.batch,
            d.words,
            d.log_every
        ),
        (
            want.stabilizer,
            want.layers,
            want.dim,
            want.steps,
            want.batch,
            want.words,
            25
        )
    );
    assert_eq!((d.lr, d.label_smoothing, d.clip_norm), (2e-3, 0.1, 1.0));
    let a = parse(&["--steps=7", "--stabilizer=deepnorm", "--dtype=f16"]).unwrap();
    assert_eq!(a.steps, 7);
    assert_eq!(a.stabilizer, Technique::DeepNorm);
    assert_eq!(a.dtype.to_string(), "f16");
}

#[test]
fn usage_errors_exit_2_and_name_the_flag() {
    let e = parse(&["--bogus"]).unwrap_err();
    assert_eq!((e.kind(), e.exit_code()), (ErrorKind::UnknownArgument, 2));
    assert!(e.to_string().contains("--bogus"));
    let e = parse(&["--stabilizer", "nope"]).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("--stabilizer"), "{e}");
    let e = parse(&["--help"]).unwrap_err();
    assert_eq!(e.exit_code(), 0);
}

/// The dictionary and the sentences of a seed are pinned: `ChaCha8Rng`'s stream is documented
/// as stable, so a rand upgrade cannot silently change the task of a seed.
#[test]
fn the_task_of_a_seed_is_pinned() {
    let task = Task::new(1, 8, 3, 5);
    assert_eq!(task.dict, [4, 8, 7, 6, 5, 10, 11, 9]);
    let pairs = task.pairs(2, 2, Split::Train);
    assert_eq!(pairs[0], (vec![11, 8, 8], vec![5, 5, 9]));
    assert_eq!(pairs[1], (vec![10, 5, 10], vec![11, 8, 11]));
}

#[test]
fn binary_usage_errors_exit_2() {
    let r = run("train_translate", &["--words", "30"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--words"), "{}", r.stderr);
    let r = run("train_translate", &["--steps"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--steps"), "{}", r.stderr);
    let r = run("train_translate", &["--version"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with("train_translate "), "{}", r.stdout);
}

#[test]
fn off_a_terminal_a_short_run_logs_periodically_and_sums_up() {
    let r = run(
        "train_translate",
        &[
            "--steps=4",
            "--log-every=2",
            "--eval-every=2",
            "--dim=16",
            "--layers=1",
            "--batch=8",
            "--valid=16",
        ],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let periodic: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("step ") && l.contains(" | loss "))
        .collect();
    assert_eq!(periodic.len(), 2, "{}", r.stdout);
    assert_eq!(fields(periodic[1])[0], ("step".into(), "4/4".into()));
    assert!(
        r.stdout.contains("step 2 train nll ") && r.stdout.contains("(mean of 2 steps)"),
        "{}",
        r.stdout
    );
    let summary = r
        .stdout
        .lines()
        .find(|l| l.starts_with("summary: 4 steps (0 skipped), "))
        .unwrap_or_else(|| panic!("no summary in\n{}", r.stdout));
    assert!(summary.ends_with("tokens/s"), "{summary}");
    assert!(r.stdout.contains("  final valid loss "), "{}", r.stdout);
}
