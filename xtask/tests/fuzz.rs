//! `cargo xtask fuzz` in CI: a seeded, bounded run over config JSON, safetensors files and
//! checkpoint folders, its cases in a child process under an address-space limit, must find no
//! case that panics, aborts, hangs or breaks a promise. About 35 s in a debug build on 2 cores;
//! longer runs: `cargo xtask fuzz --seconds 600 --seed N`.

use std::process::{Command, Output};

fn fuzz(args: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("fuzz")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the xtask binary");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// The CI run: seed 0, 12000 cases (4000 per target; about 35 s here), at most 75 s (on a
/// slower machine the time limit ends the run early, which is reported and not a failure).
#[test]
fn a_seeded_run_finds_no_failing_case() {
    let (out, text) = fuzz(&["--seed", "0", "--cases", "12000", "--seconds", "75"]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("fuzz: 0 failures"), "{text}");
    assert!(
        text.contains("address space limited to +4096 MiB"),
        "{text}"
    );
    for target in ["config", "file", "folder"] {
        assert!(
            text.contains(&format!("\n  {target} ")),
            "{target} missing:\n{text}"
        );
    }
}

/// A case that aborts the child (as a failed allocation does) fails the run, naming the case,
/// its input and the command that replays it.
#[test]
fn an_abort_is_reported_with_the_case_and_its_replay() {
    let (out, text) = fuzz(&["--seed", "4", "--cases", "10", "--inject", "abort@7"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAILED case 7 [file]"), "{text}");
    assert!(text.contains("SIGABRT"), "{text}");
    assert!(
        text.contains("input: moe checkpoint") || text.contains("input: dense checkpoint"),
        "{text}"
    );
    assert!(
        text.contains("replay: cargo xtask fuzz --seed 4 --case 7 --targets config,file,folder"),
        "{text}"
    );
}

/// A panicking case is caught: the run goes on and fails at the end, naming the case, its input
/// and the panic.
#[test]
fn a_panic_is_reported_and_the_run_goes_on() {
    let (out, text) = fuzz(&["--seed", "4", "--cases", "9", "--inject", "panic@3"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAILED case 3 [config]: panic: panicked at"),
        "{text}"
    );
    assert!(text.contains("injected panic"), "{text}");
    assert!(text.contains("input: "), "{text}");
    assert!(
        text.contains("9 cases in"),
        "the run stopped at the panic:\n{text}"
    );
    assert!(text.contains("fuzz: 1 failures"), "{text}");
}

/// A case that runs past --case-timeout is stopped and reported.
#[test]
fn a_hang_is_stopped_and_reported() {
    let (out, text) = fuzz(&[
        "--seed",
        "4",
        "--cases",
        "5",
        "--inject",
        "hang@2",
        "--case-timeout",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAILED case 2 [folder]"), "{text}");
    assert!(text.contains("ran past --case-timeout (2 s)"), "{text}");
}

/// `--case I` replays one case alone, the same one a full run draws.
#[test]
fn a_case_replays_alone() {
    let (out, text) = fuzz(&[
        "--seed",
        "4",
        "--case",
        "5",
        "--verbose",
        "--targets",
        "folder",
    ]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 cases in"), "{text}");
    let (_, full) = fuzz(&[
        "--seed",
        "4",
        "--cases",
        "6",
        "--verbose",
        "--targets",
        "folder",
    ]);
    let case5 = |t: &str| {
        t.lines()
            .skip_while(|l| !l.starts_with("case 5 "))
            .take(2)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(!case5(&text).is_empty(), "{text}");
    // The scratch folder differs between runs; the case and its verdict do not.
    let strip = |s: String| {
        s.split('/')
            .filter(|p| !p.starts_with("torchscale-fuzz-"))
            .collect::<Vec<_>>()
            .join("/")
    };
    assert_eq!(strip(case5(&text)), strip(case5(&full)));
}
