#!/usr/bin/env bash
# Creates the PyTorch reference environment that `cargo xtask export-check` (and
# `cargo xtask bench train --torch PYTHON`) run against: a Python virtual environment holding the
# CPU build of torch, torchscale 0.3.0 and safetensors. A GPU is not needed; the CPU wheel index
# keeps the download to a few hundred MB instead of several GB of unused CUDA libraries.
#
# Usage: bash xtask/scripts/setup_ref.sh [--venv DIR] [--python PY] [--dry-run] [--help]
#   --venv DIR    where to create it (default: ~/.cache/torchscale-ref-venv, where export-check
#                 looks when --python is not given)
#   --python PY   the Python that creates it (default: python3; 3.9 or newer)
#   --dry-run     print the commands without running them
# Environment: TORCH_INDEX_URL overrides the wheel index of torch and torchvision (empty: pip's
# default index, which is also tried when the CPU index cannot be reached).
# An environment that already imports torch, torchscale and safetensors is left as it is.
set -euo pipefail

DEFAULT_VENV=$HOME/.cache/torchscale-ref-venv
VENV=$DEFAULT_VENV
PY=python3
DRY=0
INDEX=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}

usage() {
  # The header comment above is the help text.
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
  echo "setup_ref.sh: $1" >&2
  exit "${2:-1}"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --venv) [ $# -ge 2 ] || die "--venv needs a folder" 2; VENV=$2; shift 2 ;;
    --venv=*) VENV=${1#*=}; shift ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter" 2; PY=$2; shift 2 ;;
    --python=*) PY=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument \`$1\` (see --help)" 2 ;;
  esac
done
[ -n "$VENV" ] || die "--venv is empty" 2

# Paths under $HOME are shown as ~/... so that logs name no machine-specific prefix.
shown() { local s="$*"; [ -n "${HOME:-}" ] && s=${s//"$HOME"/\~}; printf '%s\n' "$s"; }
step() {
  shown "+ $*"
  [ "$DRY" = 1 ] || "$@"
}

IMPORTS='import torch, torchscale, safetensors'
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$IMPORTS" 2>/dev/null; then
  shown "already set up: $VENV (torch, torchscale, safetensors import)"
  exit 0
fi

# A dry run only warns, so that it can show the commands on a machine without Python.
need() { if [ "$DRY" = 1 ]; then echo "setup_ref.sh: warning: $1" >&2; else die "$1"; fi; }
if ! command -v "$PY" >/dev/null; then
  need "no \`$PY\` on PATH; pass --python PY"
elif ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
  need "$PY is older than Python 3.9, which torch needs; pass --python PY"
fi

step "$PY" -m venv "$VENV"
step "$VENV/bin/python" -m pip install --upgrade pip
# torchvision comes with torch from the same index: torchscale needs timm, which needs torchvision,
# and torchvision from PyPI would pull the CUDA build of torch back in.
PIP=("$VENV/bin/python" -m pip install)
if [ -z "$INDEX" ]; then
  step "${PIP[@]}" torch torchvision
elif ! step "${PIP[@]}" --retries 1 --timeout 30 --index-url "$INDEX" torch torchvision; then
  echo "setup_ref.sh: the torch CPU index failed; trying the default index instead (its torch" \
    "wheel pulls CUDA libraries, a few GB)" >&2
  step "${PIP[@]}" torch torchvision
fi
step "$VENV/bin/python" -m pip install torchscale==0.3.0 safetensors numpy
step "$VENV/bin/python" -c "$IMPORTS; print('torch', torch.__version__, '/ torchscale OK')"

if [ "$DRY" = 1 ]; then
  echo "(dry run: nothing was installed)"
elif [ "$VENV" = "$DEFAULT_VENV" ]; then
  echo "done: cargo xtask export-check finds this environment by itself"
else
  shown "done: run cargo xtask export-check --python $VENV/bin/python"
fi
