#!/usr/bin/env bash
# Runs the packed CUDA tests and benchmarks on the GPU machine (no Rust needed), from the
# folder `cargo xtask cuda build` wrote: unxz, point LD_LIBRARY_PATH at the pip CUDA 13 and
# NCCL libraries, run every test binary, the NCCL test, then every bench binary, each from its
# crate's folder (MANIFEST: `kind name crate` per line). Usage: run.sh [tests|bench|all]
# (default all; `tests` includes the NCCL test).
#
# The NCCL backend (torchscale-dist's NcclCollective) is verified only on a machine with 2 or
# more GPUs (NCCL takes one GPU per rank). There, `bash run.sh tests` (or `cargo xtask cuda run
# tests`) runs nccl_collectives, which starts itself under `mpirun -np N` for N = 2..min(GPUs, 4):
# every collective (all-reduce u8/u32/i64/f32/f64/bf16/f16, all-gather, reduce-scatter, uneven
# all-to-all with empty chunks, broadcast from every root, barrier) against a local reference,
# mismatched and invalid calls failing on every rank, then a rank that aborts (the job must end
# with its message). That machine needs `mpirun` and libmpi.so.40 (Debian/Ubuntu: openmpi-bin,
# libopenmpi3) and libnccl.so.2 (pip nvidia-nccl-cu13, 2.30 or newer, or the system's). With one
# GPU the NCCL test is reported as SKIPPED (not verified), never as passed.
#
# Exit status: 2 at once when no NVIDIA GPU is visible, else non-zero when any binary fails.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WHAT=${1:-all}
if ! nvidia-smi -L >/dev/null 2>&1 && ! ls /dev/nvidia0 >/dev/null 2>&1; then
  echo "run.sh: no NVIDIA GPU here (nvidia-smi -L failed, no /dev/nvidia0); the packed CUDA" \
    "tests and benchmarks must run on the GPU machine" >&2
  exit 2
fi
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
if [ "${GPUS:-0}" -eq 0 ]; then
  GPUS=$(ls /dev/nvidia[0-9]* 2>/dev/null | wc -l)
fi
PY=${PYTHON:-python3}
for sub in cu13 nccl; do
  NV=$($PY -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], '$sub', 'lib'))" 2>/dev/null || true)
  if [ -n "$NV" ] && [ -d "$NV" ]; then
    export LD_LIBRARY_PATH=$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  else
    echo "warning: no pip nvidia/$sub/lib found; relying on the system's libraries" >&2
  fi
done
# The tests read testdata/ relative to the crate, as cargo runs them.
ROOT=${TORCHSCALE_ROOT:-$(cd "$HERE/../.." && pwd)}
fail=0
passed=0
failed=0
skipped=0
notes=""
while read -r kind name crate; do
  crate=${crate:-torchscale-moe}
  [ -f "$HERE/$name" ] || { unxz -k -f "$HERE/$name.xz" && chmod +x "$HERE/$name"; }
  want=$kind
  [ "$kind" = nccl ] && want=tests
  if [ "$WHAT" != all ] && [ "$WHAT" != "$want" ]; then continue; fi
  if [ "$kind" = nccl ] && [ "$GPUS" -lt 2 ]; then
    echo "== SKIPPED $kind $name: NCCL needs 2 or more GPUs (one per rank) and this machine" \
      "has $GPUS; the NCCL backend is NOT verified here"
    skipped=$((skipped + 1))
    notes="$notes $name(skipped: $GPUS GPU)"
    continue
  fi
  echo "== $kind $name"
  ok=1
  if ldd "$HERE/$name" | grep 'not found'; then ok=0; fi
  if [ "$kind" = nccl ] && ! command -v mpirun >/dev/null 2>&1; then
    echo "$name: mpirun is missing (install OpenMPI: openmpi-bin); cannot verify NCCL" >&2
    ok=0
  fi
  if [ $ok = 1 ]; then
    case $kind in
      tests) (cd "$ROOT/$crate" && "$HERE/$name" --include-ignored --test-threads=1) || ok=0 ;;
      *) (cd "$ROOT/$crate" && "$HERE/$name") || ok=0 ;;
    esac
  fi
  if [ $ok = 1 ]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    notes="$notes $name(failed)"
    fail=1
  fi
done < "$HERE/MANIFEST"
echo "run.sh: $passed binaries passed, $failed failed, $skipped skipped${notes:+ --$notes}"
exit $fail
