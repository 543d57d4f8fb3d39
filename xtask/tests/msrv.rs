//! The MSRV the crates declare (`rust-version` in the workspace) is one the lock file honours:
//! every locked package, with every feature on (cuda included), declares a `rust_version` no
//! newer than ours. Only one toolchain is installed here, so this reads the metadata instead of
//! building with the old compiler. A bump that breaks it is undone with
//! `cargo update -p <crate> --precise <older version>` (resolver 3 prefers fitting versions).

use std::process::Command;

/// `"1.89"` / `"1.89.0"` as a comparable triple.
fn version(v: &str) -> (u64, u64, u64) {
    let mut it = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

#[test]
fn locked_dependencies_fit_the_declared_msrv() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(cargo)
        .current_dir(&root)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--all-features",
            "--locked",
        ])
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = env!("CARGO_PKG_RUST_VERSION");
    assert!(
        !ours.is_empty(),
        "xtask inherits the workspace rust-version"
    );
    let packages = meta["packages"].as_array().unwrap();
    // The resolve holds candle, gemm, cudarc (cuda) and the rest: not a vacuous check.
    assert!(packages.len() > 100, "{} packages", packages.len());
    let too_new: Vec<String> = packages
        .iter()
        .filter_map(|p| {
            let rv = p["rust_version"].as_str()?;
            (version(rv) > version(ours))
                .then(|| format!("{} {} needs {rv}", p["name"], p["version"]))
        })
        .collect();
    assert!(
        too_new.is_empty(),
        "rust-version {ours} is contradicted by Cargo.lock: {too_new:?}"
    );
}
