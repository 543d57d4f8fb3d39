//! The `cargo xtask` command line as a user meets it: `--help` on every command, `--version`,
//! usage errors that name the culprit and exit with status 2, `--flag=value`, and the messages
//! of a missing reference environment. Runs the built binary from the repository root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(root())
        // Logs at their default level whatever the caller's environment says.
        .env_remove("RUST_LOG")
        .output()
        .expect("run the xtask binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The exit status, stdout and stderr of `xtask args`.
fn run(args: &[&str]) -> (i32, String, String) {
    let o = xtask(args);
    let code = o.status.code().expect("exited, not killed");
    (code, text(&o.stdout), text(&o.stderr))
}

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cli")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn top_level_help_lists_every_command() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Usage: cargo xtask <COMMAND>"), "{out}");
    for cmd in [
        "parity",
        "export-check",
        "ref-setup",
        "stability",
        "deepnet",
        "scaling",
        "sparseclip",
        "bench",
        "cuda",
        "fuzz",
    ] {
        assert!(
            out.contains(&format!("\n  {cmd} ")),
            "{cmd} missing:\n{out}"
        );
    }
}

#[test]
fn every_subcommand_has_help() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["parity"],
            &["--tolerance", "[PATH]...", "testdata/golden"],
        ),
        (
            &["export-check"],
            &["--python", "--checkpoint", "--out", "--tolerance"],
        ),
        (&["ref-setup"], &["--venv", "--python", "--dry-run"]),
        (&["bench"], &["moe", "train"]),
        (
            &["bench", "moe"],
            &[
                "--quick",
                "--tokens",
                "--width",
                "--ffn",
                "--repeats",
                "--experts",
            ],
        ),
        (
            &["bench", "train"],
            &[
                "--quick",
                "--configs",
                "--rounds",
                "--steps",
                "--warmup",
                "--threads",
                "--torch",
                "--ref",
                "--out",
                "--in-process",
            ],
        ),
        (&["cuda"], &["build", "run"]),
        (&["cuda", "build"], &["--out"]),
        (&["cuda", "run"], &["--dir", "tests", "bench", "all"]),
        (
            &["fuzz"],
            &[
                "--cases",
                "--seconds",
                "--seed",
                "--case",
                "--targets",
                "--memory-limit",
                "--case-timeout",
            ],
        ),
    ];
    for (cmd, words) in cases {
        let args: Vec<&str> = cmd.iter().copied().chain(["--help"]).collect();
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        let usage = format!("Usage: cargo xtask {}", cmd.join(" "));
        assert!(out.contains(&usage), "{args:?}:\n{out}");
        for w in *words {
            assert!(out.contains(w), "{args:?} does not mention {w}:\n{out}");
        }
        // The internal flag of the bench children stays out of sight.
        assert!(!out.contains("--child"), "{args:?}:\n{out}");
    }
}

/// README promises `stability --help` for the experiment's options.
#[test]
fn stability_help_lists_its_flags_and_defaults() {
    let (code, out, _) = run(&["stability", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--quick",
        "--layers <N>",
        "--dim <D>",
        "--heads <H>",
        "--ffn <F>",
        "--steps <S>",
        "--lr <X>",
        "--warmup <W>",
        "--batch <B>",
        "--seq <T>",
        "--clip <C>",
        "--techniques <LIST>",
        "--seed <N>",
        "--valid-every <K>",
        "--corpus <FILE>",
        "--out <DIR>",
        "--threads <N>",
        "--no-progress",
        "--no-scale-embedding",
    ] {
        assert!(out.contains(flag), "{flag} missing:\n{out}");
    }
    assert!(out.contains("Decoder layers [default: 48]"), "{out}");
}

#[test]
fn version_is_the_crate_version() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("cargo xtask {}", env!("CARGO_PKG_VERSION"))
    );
    // Subcommands answer it too.
    assert_eq!(run(&["parity", "--version"]).0, 0);
}

#[test]
fn no_command_is_a_usage_error() {
    let (code, _, err) = run(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("Usage: cargo xtask <COMMAND>"), "{err}");
}

#[test]
fn unknown_commands_and_flags_are_named_with_status_2() {
    let (code, _, err) = run(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("unrecognized subcommand 'frobnicate'"),
        "{err}"
    );

    for args in [
        &["parity", "--bogus"][..],
        &["stability", "--bogus"],
        &["bench", "moe", "--bogus"],
        &["bench", "train", "--bogus"],
        &["export-check", "--bogus"],
        &["cuda", "run", "--bogus"],
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("unexpected argument '--bogus'"),
            "{args:?}: {err}"
        );
    }

    let (code, _, err) = run(&["bench", "frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("'frobnicate'"), "{err}");
}

#[test]
fn bad_values_are_usage_errors_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["stability", "--layers", "0"],
            "'--layers <N>': must be positive",
        ),
        (
            &["stability", "--steps=abc"],
            "'--steps <S>': `abc` is not a count",
        ),
        (
            &["stability", "--lr", "-1"],
            "'--lr <X>': must be a finite number >= 0",
        ),
        (
            &["stability", "--techniques=post-ln,batchnorm"],
            "unknown technique `batchnorm`",
        ),
        (
            &["stability", "--layers"],
            "a value is required for '--layers <N>'",
        ),
        (
            &["parity", "--tolerance=loose"],
            "invalid value 'loose' for '--tolerance",
        ),
        (&["bench", "train", "--configs=a,z"], "unknown config `z`"),
        (
            &["bench", "moe", "--experts", "8,0"],
            "'--experts <E1,E2,..>': must be positive",
        ),
        // Checked after parsing, still a usage error.
        (
            &["stability", "--dim", "30", "--heads=4"],
            "--heads 4 must divide --dim 30",
        ),
    ];
    for (args, want) in cases {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want `{want}` in\n{err}");
    }
}

#[test]
fn parity_takes_flag_equals_value_and_a_file() {
    let (code, out, err) = run(&[
        "parity",
        "--tolerance=strict",
        "testdata/golden/admin_residual.safetensors",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("testdata/golden/admin_residual.safetensors  admin_residual  PASS"),
        "{out}"
    );
    assert!(out.contains("1 passed, 0 failed, 0 skipped"), "{out}");
}

#[test]
fn parity_on_a_missing_path_names_it() {
    let (code, out, err) = run(&["parity", "testdata/golden/no_such_file.safetensors"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("invalid value 'testdata/golden/no_such_file.safetensors'")
            && err.contains("no such file or folder"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");
}

/// `--flag=value` everywhere, and without a terminal the run logs its progress on stderr while
/// the table goes to stdout.
#[test]
fn stability_quick_run_logs_without_a_terminal() {
    let out_dir = tmp("stability");
    let out_flag = format!("--out={}", out_dir.display());
    let (code, out, err) = run(&[
        "stability",
        "--quick",
        "--steps=2",
        "--techniques=pre-ln",
        "--threads=1",
        &out_flag,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out_dir.join("stability.json").is_file());
    assert!(out.contains("Pre-LN "), "{out}");
    assert!(out.contains("2 layers, d=32"), "{out}");
    // Bars are hidden off a terminal: one log line per step here (steps / 10 rounds up to 1).
    assert!(err.contains("INFO Pre-LN step 1/2: loss "), "{err}");
    assert!(err.contains("INFO Pre-LN step 2/2: loss "), "{err}");
    assert!(
        !err.contains('\x1b'),
        "no colour codes off a terminal: {err:?}"
    );
}

/// The hidden interface the bench parent uses for its child processes.
#[test]
fn bench_train_child_prints_one_json_measurement() {
    let (code, out, err) = run(&["bench", "train", "--child", "quick", "1", "0"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON on stdout");
    assert_eq!(v["config"], "quick");
    assert_eq!(v["tokens"], 32);
    assert!(v["loss"].as_f64().unwrap().is_finite());
}

#[test]
fn missing_reference_environment_says_how_to_make_it() {
    let home = tmp("empty-home");
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["export-check"])
        .current_dir(root())
        .env("HOME", &home)
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no Python interpreter at ~/.cache/torchscale-ref-venv/bin/python"),
        "{err}"
    );
    assert!(err.contains("`cargo xtask ref-setup`"), "{err}");
    // No machine-specific prefix: the home folder is shown as `~`.
    assert!(!err.contains(&home.display().to_string()), "{err}");

    let (code, _, err) = run(&["export-check", "--python=/nonexistent/venv/bin/python"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("`cargo xtask ref-setup --venv /nonexistent/venv`"),
        "{err}"
    );
}

/// `ref-setup --dry-run` shows what it would install into the folder given, and creates nothing.
#[test]
fn ref_setup_dry_run_creates_nothing() {
    let venv = tmp("ref-setup").join("venv");
    let venv_flag = format!("--venv={}", venv.display());
    let (code, out, err) = run(&["ref-setup", "--dry-run", &venv_flag]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("-m venv"), "{out}");
    assert!(
        out.contains("pip install --retries 1 --timeout 30 --index-url https://download.pytorch.org/whl/cpu torch torchvision"),
        "{out}"
    );
    assert!(
        out.contains("pip install torchscale==0.3.0 safetensors"),
        "{out}"
    );
    assert!(out.contains("dry run: nothing was installed"), "{out}");
    assert!(!venv.exists());

    let (code, _, err) = run(&["ref-setup", "--venv"]);
    assert_eq!(code, 2);
    assert!(err.contains("'--venv <DIR>'"), "{err}");
}
