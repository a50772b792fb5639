#!/usr/bin/env bash
# Creates .venv and installs requirements.txt; does nothing when they are already installed.
# On a machine without an NVIDIA GPU it installs torch 2.13.0 first, a CPU build (a plain
# `pip install torch` may pull a multi-GB CUDA build that a CPU cannot use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -r requirements.txt
echo "$want" > "$stamp"
