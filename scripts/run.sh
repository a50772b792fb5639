#!/usr/bin/env bash
# Set-up (if needed) and the whole darkroom pipeline: collect, train all variants, evaluate.
# Extra arguments go to scripts/pipeline.py, e.g. --size full, --seeds 0, --variants AD.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/pipeline.py "$@"
