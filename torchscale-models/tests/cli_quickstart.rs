//! quickstart's command line: --help and --version exit 0, usage errors exit 2 naming the flag,
//! (the run itself builds torchscale-sized models: too slow for a debug test).

mod cli_support;

use cli_support::run;

#[test]
fn help_version_and_usage_errors() {
    let r = run("quickstart", &["--help"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("--dtype") && r.stdout.contains("--device"),
        "{}",
        r.stdout
    );
    let r = run("quickstart", &["--version"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with("quickstart "), "{}", r.stdout);
    let r = run("quickstart", &["--vocab-size=lots"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--vocab-size"), "{}", r.stderr);
}
