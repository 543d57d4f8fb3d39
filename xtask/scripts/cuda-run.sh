#!/usr/bin/env bash
# Runs the packed CUDA tests and benchmarks on the GPU machine (no Rust needed), from the
# folder `cargo xtask cuda build` wrote: unxz, point LD_LIBRARY_PATH at the pip CUDA 13
# libraries, run every test binary, then every bench binary. Usage: run.sh [tests|bench|all]
# (default all). Exit status: non-zero when any test binary fails.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WHAT=${1:-all}
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
while read -r kind name; do
  [ -f "$HERE/$name" ] || { unxz -k -f "$HERE/$name.xz" && chmod +x "$HERE/$name"; }
  if [ "$WHAT" != all ] && [ "$WHAT" != "$kind" ]; then continue; fi
  echo "== $kind $name"
  ldd "$HERE/$name" | grep 'not found' && fail=1
  if [ "$kind" = tests ]; then
    (cd "$ROOT/torchscale-moe" && "$HERE/$name" --include-ignored --test-threads=1) || fail=1
  else
    (cd "$ROOT/torchscale-moe" && "$HERE/$name") || fail=1
  fi
done < "$HERE/MANIFEST"
exit $fail
