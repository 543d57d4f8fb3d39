#!/usr/bin/env bash
# Packages every publishable crate and runs `cargo test` inside each unpacked package, as a user
# of the published crate would: only the files `cargo package` ships are there (no ../testdata,
# no ../data), and the other torchscale crates come from their packages too (patched in for the
# crates.io versions that do not exist yet).
#
# Usage: xtask/scripts/package-check.sh [crate...]   (default: all eight; extra args to cargo test
# after `--`). Builds share the workspace's target folder (or $CARGO_TARGET_DIR).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

crates=(torchscale-kernels torchscale-core torchscale-norm torchscale-admin torchscale-moe
    torchscale-clip torchscale-dist torchscale-models)
only=()
test_args=()
while (($#)); do
    if [[ $1 == -- ]]; then
        shift
        test_args=("$@")
        break
    fi
    only+=("$1")
    shift
done
((${#only[@]})) || only=("${crates[@]}")

# A clean checkout packages as is; a working tree with edits needs --allow-dirty.
dirty=()
[[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] || dirty=(--allow-dirty)
echo "== cargo package --workspace --exclude xtask"
cargo package --workspace --exclude xtask --no-verify "${dirty[@]}" --quiet

# Outside the repository, so cargo does not take the packages for workspace members.
work="$(mktemp -d "${TMPDIR:-/tmp}/torchscale-package-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
version="$(sed -n 's/^version = "\(.*\)"/\1/p' torchscale-core/Cargo.toml | head -n1)"
# The patches and the workspace's test profile (dependencies optimised), in a config file above
# the packages, so cargo runs that the tests start themselves (building an example) see them too.
mkdir -p "$work/.cargo"
{
    echo "[patch.crates-io]"
    for c in "${crates[@]}"; do
        tar -xzf "target/package/$c-$version.crate" -C "$work"
        echo "$c = { path = \"$work/$c-$version\" }"
    done
    printf '[profile.dev]\ndebug = 1\n[profile.dev.package."*"]\nopt-level = 3\n'
    printf '[profile.dev.package.torchscale-kernels]\nopt-level = 3\n'
} >"$work/.cargo/config.toml"
# `cargo package` stamps every file with one fixed old date, and the unpacked crates' build
# hashes do not depend on their temporary folder: in a target folder that has built an older
# package, cargo would take the new sources for unchanged and reuse the old build. Fresh dates
# make it rebuild them.
find "$work" -type f -exec touch {} +

# The workspace's target folder: candle and the other registry crates, built with the same
# profile and features, are reused rather than built again.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
for c in "${only[@]}"; do
    echo "== cargo test in the unpacked $c-$version"
    start=$SECONDS
    # (cargo warns about the patches a crate's graph does not use: harmless.)
    (cd "$work/$c-$version" && cargo test --quiet -- "${test_args[@]}")
    echo "   $c: $((SECONDS - start)) s"
done
