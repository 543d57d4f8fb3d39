//! The test data that travels in the published crates stays in step with the repository's
//! canonical files: each crate's `testdata/` links resolve, and `testdata/golden_configs.json`
//! (the metadata of every golden file, read by `torchscale-norm` and `torchscale-models`, whose
//! packages do not carry the megabytes of tensors) matches `testdata/golden/`.
//!
//! `TORCHSCALE_BLESS=1 cargo test -p xtask --test testdata` rewrites the index after the golden
//! files change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The metadata keys a crate's tests read, as torchscale wrote them (JSON kept as text, so a
/// round trip compares against exactly torchscale's output).
const KEYS: &[&str] = &["kind", "config_class", "config", "derived"];

/// `{file name: {key: text}}` for every golden file.
fn index_of(dir: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for path in xtask::golden::collect_files(&[dir.to_path_buf()]).unwrap() {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap_or_default();
        let entry = KEYS
            .iter()
            .filter_map(|k| meta.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        out.insert(name, entry);
    }
    out
}

#[test]
fn golden_configs_index_is_current() {
    let index = root().join("testdata/golden_configs.json");
    let want = index_of(&root().join("testdata/golden"));
    assert_eq!(want.len(), 21, "golden files");
    if std::env::var_os("TORCHSCALE_BLESS").is_some() {
        let text = serde_json::to_string_pretty(&want).unwrap() + "\n";
        std::fs::write(&index, text).unwrap();
    }
    let text = std::fs::read_to_string(&index)
        .unwrap_or_else(|e| panic!("{}: {e} (TORCHSCALE_BLESS=1 writes it)", index.display()));
    let got: BTreeMap<String, BTreeMap<String, String>> = serde_json::from_str(&text).unwrap();
    assert!(
        got == want,
        "{} is stale: rerun with TORCHSCALE_BLESS=1",
        index.display()
    );
}

/// Each crate's test data is a link to the canonical file (one copy in git; `cargo package`
/// stores the content), and each link resolves to the same bytes.
#[test]
fn crate_testdata_links_resolve() {
    let links = [
        (
            "torchscale-admin/testdata/admin_residual.safetensors",
            "testdata/golden/admin_residual.safetensors",
        ),
        (
            "torchscale-clip/testdata/sparse_clip.safetensors",
            "testdata/golden/sparse_clip.safetensors",
        ),
        (
            "torchscale-moe/testdata/decoder_moe_top1.safetensors",
            "testdata/golden/decoder_moe_top1.safetensors",
        ),
        (
            "torchscale-moe/testdata/decoder_moe_top2.safetensors",
            "testdata/golden/decoder_moe_top2.safetensors",
        ),
        (
            "torchscale-moe/testdata/encoder_moe_top2.safetensors",
            "testdata/golden/encoder_moe_top2.safetensors",
        ),
        (
            "torchscale-norm/testdata/golden_configs.json",
            "testdata/golden_configs.json",
        ),
        (
            "torchscale-models/testdata/golden_configs.json",
            "testdata/golden_configs.json",
        ),
        ("torchscale-models/data/kjv.txt", "data/kjv.txt"),
        ("torchscale-models/data/README.md", "data/README.md"),
    ];
    for (link, target) in links {
        let (link, target) = (root().join(link), root().join(target));
        let a = std::fs::read(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display()));
        let b = std::fs::read(&target).unwrap_or_else(|e| panic!("{}: {e}", target.display()));
        assert!(
            a == b,
            "{} differs from {}",
            link.display(),
            target.display()
        );
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{} should be a link to {} (one copy in git)",
            link.display(),
            target.display()
        );
    }
}
