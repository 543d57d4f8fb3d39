#!/usr/bin/env bash
# Runs the packed CUDA tests and benchmarks on the GPU machine (no Rust needed), from the
# folder `cargo xtask cuda build` wrote: unxz, point LD_LIBRARY_PATH at the pip CUDA 13
# libraries, run every test binary, then every bench binary, each from its crate's folder
# (MANIFEST: `kind name crate` per line). Usage: run.sh [tests|bench|all] (default all).
# Exit status: 2 at once when no NVIDIA GPU is visible, else non-zero when any binary fails.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WHAT=${1:-all}
if ! nvidia-smi -L >/dev/null 2>&1 && ! ls /dev/nvidia0 >/dev/null 2>&1; then
  echo "run.sh: no NVIDIA GPU here (nvidia-smi -L failed, no /dev/nvidia0); the packed CUDA" \
    "tests and benchmarks must run on the GPU machine" >&2
  exit 2
fi
PY=${PYTHON:-python3}
NV=$($PY -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
if [ -n "$NV" ] && [ -d "$NV" ]; then
  export LD_LIBRARY_PATH=$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
else
  echo "warning: no pip nvidia/cu13/lib found; relying on the system's CUDA 13 libraries" >&2
fi
# The tests read testdata/ relative to the crate, as cargo runs them.
ROOT=${TORCHSCALE_ROOT:-$(cd "$HERE/../.." && pwd)}
fail=0
while read -r kind name crate; do
  crate=${crate:-torchscale-moe}
  [ -f "$HERE/$name" ] || { unxz -k -f "$HERE/$name.xz" && chmod +x "$HERE/$name"; }
  if [ "$WHAT" != all ] && [ "$WHAT" != "$kind" ]; then continue; fi
  echo "== $kind $name"
  ldd "$HERE/$name" | grep 'not found' && fail=1
  if [ "$kind" = tests ]; then
    (cd "$ROOT/$crate" && "$HERE/$name" --include-ignored --test-threads=1) || fail=1
  else
    (cd "$ROOT/$crate" && "$HERE/$name") || fail=1
  fi
done < "$HERE/MANIFEST"
exit $fail
