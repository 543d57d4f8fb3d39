//! The mix_and_match example in its quick mode: every experiment trains through the stock
//! `Trainer` with the stabilisers and routers it defines itself, and reports a finite
//! validation loss; the summary JSON names the per-layer stabilisers and per-layer routers.

mod cli_support;

use cli_support::run;

#[test]
fn quick_run_trains_every_experiment_with_its_own_pieces() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    // The crate's own copy of the corpus, so the test also runs inside the packaged crate.
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/data/kjv.txt");
    let r = run(
        "mix_and_match",
        &["--quick", "--corpus", corpus, "--out", dir],
    );
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    let json = std::fs::read_to_string(out.path().join("summary.json")).unwrap();
    let runs: serde_json::Value = serde_json::from_str(&json).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 4, "{json}");
    let by = |name: &str| {
        runs.iter()
            .find(|r| r["experiment"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {json}"))
    };
    let names = |v: &serde_json::Value, key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    for r in runs {
        let v = r["valid_loss"].as_f64().unwrap();
        // Below ln(260): the models learned something in three steps, and nothing is NaN.
        assert!(v.is_finite() && v < 260f64.ln(), "{r}");
    }
    assert!(names(by("deepnorm-admin"), "stabilizers")
        .iter()
        .all(|s| s == "deepnorm-attn+admin-ffn"));
    assert_eq!(
        names(by("routers"), "routers"),
        ["1: xmoe-top2", "3: z-loss top-1 (example)"]
    );
    assert!(names(by("peri-ln"), "stabilizers")
        .iter()
        .all(|s| s == "peri-ln"));
    assert_eq!(
        names(by("mix-ln"), "stabilizers"),
        ["post-ln", "post-ln", "pre-ln", "pre-ln"]
    );
    assert_eq!(names(by("mix-ln"), "routers"), ["3: dropless-top2"]);
}

#[test]
fn usage_errors_name_the_flag() {
    let r = run("mix_and_match", &["--only", "nope"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--only"), "{}", r.stderr);
    let r = run("mix_and_match", &["--layers", "1", "--quick"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--layers"), "{}", r.stderr);
}
