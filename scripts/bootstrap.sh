#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: data packages, a virtual environment, oodscope and its
# offline models. Sourced by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OODSCOPE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

# Debian packages: install those given that are missing (needs root and apt; elsewhere a note, and
# the tests that need them are skipped with a reason).
debian_packages() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[oodscope] installing Debian packages ${missing[*]}" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "[oodscope] note: Debian packages ${missing[*]} are not installed (need root and apt-get)" >&2
  fi
}

# The data the demo and tests read (Fashion-MNIST, WordNet); without them the demo falls back to
# packaged data.
debian_packages dataset-fashion-mnist wordnet-base

if [ ! -x "$VENV/bin/python" ]; then
  echo "[oodscope] creating virtual environment $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.oodscope-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "[oodscope] installing oodscope and its offline models into $VENV" >&2
  python -m pip install -q --upgrade pip >/dev/null
  # The pinned CPU build of torch; GPU users may install a CUDA build of torch instead (see README).
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e "$ROOT[all,test]"
  touch "$stamp"
fi
