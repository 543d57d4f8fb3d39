//! train_lm's command line and output: clap parsing (in process, on the example's own module) and
//! the built binary run with stdout piped: usage errors exit 2 naming the flag, a short run prints
//! periodic log lines, the summary and a printable sample, and a bf16 run trains.

#[path = "../examples/train_lm/args.rs"]
#[allow(dead_code)]
mod args;
#[path = "../examples/common/cli.rs"]
mod cli;
mod cli_support;

use std::path::Path;

use args::{parse_from, RunArgs};
use clap::error::ErrorKind;
use cli::{DTypeArg, DeviceArg};
use cli_support::{fields, run};

fn parse(a: &[&str]) -> Result<args::Parsed, clap::Error> {
    parse_from(std::iter::once("train_lm").chain(a.iter().copied()))
}

#[test]
fn defaults_are_the_documented_run() {
    let p = parse(&[]).unwrap();
    assert_eq!(p.run, RunArgs::default());
    assert_eq!(p.session.out, Path::new("runs/train_lm"));
    assert_eq!(p.session.device, DeviceArg::Cpu);
    assert_eq!(p.session.log_every, 25);
    assert_eq!((p.session.eval_every, p.session.save_every), (100, 100));
    assert!(p.run_flags_given.is_empty());
}

#[test]
fn equals_form_and_every_kind_of_flag_parse() {
    let p = parse(&[
        "--steps=5",
        "--lr",
        "1e-3",
        "--no-scale-embedding",
        "--dtype=bf16",
        "--stabilizer=deepnorm",
        "--log-every=0",
    ])
    .unwrap();
    assert_eq!(p.run.steps, 5);
    assert_eq!(p.run.lr, 1e-3);
    assert!(!p.run.scale_embedding);
    assert_eq!(p.run.dtype, DTypeArg::Bf16);
    assert_eq!(p.run.stabilizer, "deepnorm");
    assert_eq!(p.session.log_every, 1, "0 is read as every step");
    // --steps may change on resume; the others come from the checkpoint.
    assert_eq!(
        p.run_flags_given,
        ["--stabilizer", "--lr", "--no-scale-embedding", "--dtype"]
    );
}

#[test]
fn usage_errors_exit_2_and_name_the_flag() {
    let e = parse(&["--bogus"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnknownArgument);
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("--bogus"), "{e}");

    let e = parse(&["--steps", "many"]).unwrap_err();
    assert_eq!((e.kind(), e.exit_code()), (ErrorKind::ValueValidation, 2));
    assert!(e.to_string().contains("--steps"), "{e}");

    let e = parse(&["--stabilizer", "rmsnorm"]).unwrap_err();
    assert!(e.to_string().contains("--stabilizer"), "{e}");
    assert!(e.to_string().contains("rmsnorm"), "{e}");

    let e = parse(&["--dtype", "f64"]).unwrap_err();
    assert!(e.to_string().contains("--dtype"), "{e}");
    assert!(e.to_string().contains("bf16"), "lists the choices: {e}");

    let e = parse(&["--device", "tpu"]).unwrap_err();
    assert!(e.to_string().contains("--device"), "{e}");
    assert!(e.to_string().contains("cuda:N"), "{e}");

    let e = parse(&["--device", "cuda:x"]).unwrap_err();
    assert!(e.to_string().contains("ordinal"), "{e}");
}

#[test]
fn help_and_version_exit_0() {
    let e = parse(&["--help"]).unwrap_err();
    assert_eq!((e.kind(), e.exit_code()), (ErrorKind::DisplayHelp, 0));
    let e = parse(&["--version"]).unwrap_err();
    assert_eq!((e.kind(), e.exit_code()), (ErrorKind::DisplayVersion, 0));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_a_usage_error() {
    for dev in ["cuda", "cuda:1"] {
        let e = parse(&["--device", dev]).unwrap_err();
        assert_eq!((e.kind(), e.exit_code()), (ErrorKind::ValueValidation, 2));
        let msg = e.to_string();
        assert!(
            msg.contains("--device") && msg.contains("--features cuda"),
            "{msg}"
        );
    }
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_parses_with_the_feature() {
    assert_eq!(
        parse(&["--device", "cuda:1"]).unwrap().session.device,
        DeviceArg::Cuda(1)
    );
}

/// A checkpoint written before `dtype` existed still resumes (as f32); the field round-trips.
#[test]
fn run_args_stay_backward_compatible() {
    let mut json = serde_json::to_value(RunArgs::default()).unwrap();
    assert_eq!(json["dtype"], "f32");
    json.as_object_mut().unwrap().remove("dtype");
    let old: RunArgs = serde_json::from_value(json).unwrap();
    assert_eq!(old, RunArgs::default());
    let bf16 = RunArgs {
        dtype: DTypeArg::Bf16,
        ..RunArgs::default()
    };
    let back: RunArgs = serde_json::from_str(&serde_json::to_string(&bf16).unwrap()).unwrap();
    assert_eq!(back.dtype, DTypeArg::Bf16);
}

#[test]
fn binary_help_version_and_usage_errors() {
    let r = run("train_lm", &["--help"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for flag in [
        "--steps",
        "--dtype",
        "--device",
        "--log-every",
        "runs/train_lm",
    ] {
        assert!(
            r.stdout.contains(flag),
            "--help lacks {flag}:\n{}",
            r.stdout
        );
    }
    let r = run("train_lm", &["--version"]);
    assert_eq!(
        (r.code, r.stdout.trim()),
        (0, concat!("train_lm ", env!("CARGO_PKG_VERSION")))
    );
    let r = run("train_lm", &["--bogus"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("'--bogus'"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("Options:"),
        "no full usage dump: {}",
        r.stderr
    );
    if !cfg!(feature = "cuda") {
        let r = run("train_lm", &["--device", "cuda"]);
        assert_eq!(r.code, 2);
        assert!(r.stderr.contains("--device"), "{}", r.stderr);
        assert!(r.stderr.contains("--features cuda"), "{}", r.stderr);
    }
}

/// A small corpus, so the tests need neither `data/` nor a long read.
fn corpus(dir: &Path) -> String {
    let verse = "In the beginning God created the heaven and the earth. And the earth was \
                 without form, and void; and darkness was upon the face of the deep.\n";
    let path = dir.join("corpus.txt");
    std::fs::write(&path, verse.repeat(120)).unwrap();
    path.display().to_string()
}

/// Flags of a tiny model that trains in well under a second.
const TINY: &[&str] = &[
    "--layers", "1", "--dim", "32", "--heads", "2", "--ffn", "64", "--batch", "8", "--seq", "32",
    "--lr", "5e-3", "--warmup", "5",
];

fn train(dir: &Path, extra: &[&str]) -> cli_support::Run {
    let data = corpus(dir);
    let out = dir.join("run").display().to_string();
    let mut a: Vec<&str> = vec!["--data", &data, "--out", &out];
    a.extend_from_slice(TINY);
    a.extend_from_slice(extra);
    let r = run("train_lm", &a);
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    r
}

/// Losses of `log.jsonl`, checking each line's fields.
fn logged_losses(dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("run/log.jsonl")).unwrap();
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["step"], i as u64 + 1);
            assert_eq!(v["skipped"], false);
            assert!(v["lr"].as_f64().unwrap() >= 0.0);
            assert!(v["grad_norm"].as_f64().unwrap() > 0.0);
            v["loss"].as_f64().unwrap()
        })
        .collect()
}

#[test]
fn off_a_terminal_a_short_run_logs_periodically_and_sums_up() {
    let tmp = tempfile::tempdir().unwrap();
    let r = train(
        tmp.path(),
        &[
            "--steps=4",
            "--log-every=2",
            "--eval-every=4",
            "--sample-len=60",
        ],
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    let periodic: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("step ") && l.contains(" | loss "))
        .collect();
    assert_eq!(periodic.len(), 2, "{}", r.stdout);
    for (line, step) in periodic.iter().zip(["2/4", "4/4"]) {
        let f = fields(line);
        let keys: Vec<&str> = f.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["step", "loss", "ppl", "lr", "tok/s", "gnorm", "clip", "skipped", "wall"],
            "{line}"
        );
        assert_eq!(f[0].1, step);
        let loss: f64 = f[1].1.parse().unwrap();
        // Bytes start near uniform over 260 ids: ln 260 = 5.56.
        assert!((4.0..6.5).contains(&loss), "{line}");
        assert_eq!(f[7].1, "0");
    }
    // The interval's mean, not the last step's loss.
    let losses = logged_losses(tmp.path());
    assert_eq!(losses.len(), 4);
    let first: f64 = fields(periodic[0])[1].1.parse().unwrap();
    assert!(
        (first - (losses[0] + losses[1]) / 2.0).abs() < 1e-3,
        "{first} {losses:?}"
    );

    let eval = lines
        .iter()
        .find(|l| l.starts_with("step 4: train loss"))
        .expect("an evaluation line");
    assert!(eval.contains("(mean of 4 steps)"), "{eval}");
    let summary = lines
        .iter()
        .position(|l| l.starts_with("summary: 4 steps (0 skipped), 1024 tokens in "))
        .unwrap_or_else(|| panic!("no summary in\n{}", r.stdout));
    assert!(
        lines[summary + 1].starts_with("  final train loss"),
        "{}",
        r.stdout
    );
    assert!(
        lines[summary + 2].starts_with("  final valid loss"),
        "{}",
        r.stdout
    );
    assert!(
        lines[summary + 3].ends_with("run/checkpoint"),
        "{}",
        r.stdout
    );
    assert!(tmp
        .path()
        .join("run/checkpoint/model.safetensors")
        .is_file());

    let sample = lines
        .iter()
        .position(|l| {
            l.starts_with(
                "sample of 60 bytes at temperature 0.8 after the prompt \"And God said\":",
            )
        })
        .unwrap_or_else(|| panic!("no sample header in\n{}", r.stdout));
    assert!(lines.len() > sample + 1);
    assert!(
        lines[sample + 1..].iter().all(|l| l.starts_with("  | ")),
        "{}",
        r.stdout
    );
    assert!(
        !r.stdout.contains(['\x1b', '\x7f']),
        "control bytes reached stdout"
    );
}

#[test]
fn a_bf16_run_trains_and_keeps_bf16_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let r = train(
        tmp.path(),
        &[
            "--dtype",
            "bf16",
            "--steps",
            "30",
            "--eval-every",
            "30",
            "--sample-len",
            "0",
        ],
    );
    assert!(r.stdout.contains("bf16 on cpu"), "{}", r.stdout);
    let losses = logged_losses(tmp.path());
    assert_eq!(losses.len(), 30);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (head, tail) = (mean(&losses[..5]), mean(&losses[25..]));
    assert!(head > 5.0, "starts near ln 260: {losses:?}");
    assert!(tail < head - 1.5, "bf16 loss falls: {head:.3} -> {tail:.3}");
    let st = candle_core::safetensors::load(
        tmp.path().join("run/checkpoint/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        st["embed_tokens.weight"].dtype(),
        candle_core::DType::BF16,
        "weights are stored as they were trained"
    );
}

/// bf16 resumes exactly: 3 + 3 steps log the losses of 6 uninterrupted steps.
#[test]
fn a_bf16_run_resumes_exactly() {
    let whole = tempfile::tempdir().unwrap();
    train(
        whole.path(),
        &["--dtype=bf16", "--steps=6", "--sample-len=0"],
    );
    let parts = tempfile::tempdir().unwrap();
    train(
        parts.path(),
        &["--dtype=bf16", "--steps=3", "--sample-len=0"],
    );
    let r = train(parts.path(), &["--steps=6", "--resume", "--sample-len=0"]);
    assert!(r.stdout.contains("resuming at step 3"), "{}", r.stdout);
    assert!(
        r.stdout.contains("bf16 on cpu"),
        "the saved dtype wins: {}",
        r.stdout
    );
    assert_eq!(logged_losses(parts.path()), logged_losses(whole.path()));
}

#[test]
fn checkpoint_activations_parses_as_a_session_flag() {
    assert_eq!(parse(&[]).unwrap().session.checkpoint_activations, None);
    let p = parse(&["--checkpoint-activations", "--steps=3"]).unwrap();
    assert_eq!(p.session.checkpoint_activations, Some(1), "K defaults to 1");
    assert!(p.run_flags_given.is_empty(), "{:?}", p.run_flags_given);
    let p = parse(&["--checkpoint-activations", "3"]).unwrap();
    assert_eq!(p.session.checkpoint_activations, Some(3));
    let e = parse(&["--checkpoint-activations=0"]).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("--checkpoint-activations"), "{e}");
}

/// With activation checkpointing the run logs the plain run's losses (3 layers in segments of
/// 2, dropout on).
#[test]
fn a_checkpointed_run_logs_the_plain_losses() {
    let flags = |extra: &'static [&'static str]| {
        let mut f = vec![
            "--layers",
            "3",
            "--dim",
            "32",
            "--heads",
            "2",
            "--ffn",
            "64",
            "--batch",
            "4",
            "--seq",
            "32",
            "--steps",
            "3",
            "--attention-dropout",
            "0.1",
            "--sample-len",
            "0",
        ];
        f.extend_from_slice(extra);
        f
    };
    let run_with = |extra: &'static [&'static str]| {
        let tmp = tempfile::tempdir().unwrap();
        let data = corpus(tmp.path());
        let out = tmp.path().join("run").display().to_string();
        let mut a: Vec<&str> = vec!["--data", &data, "--out", &out];
        a.extend(flags(extra));
        let r = run("train_lm", &a);
        assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
        (r.stdout, logged_losses(tmp.path()))
    };
    let (_, plain) = run_with(&[]);
    let (stdout, ck) = run_with(&["--checkpoint-activations", "2"]);
    assert!(
        stdout.contains("activation checkpointing: segments of 2 layer(s)"),
        "{stdout}"
    );
    assert_eq!(plain.len(), 3);
    for (a, b) in plain.iter().zip(&ck) {
        assert!((a - b).abs() <= 1e-5 * a, "{plain:?} vs {ck:?}");
    }
}
