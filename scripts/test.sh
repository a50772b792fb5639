#!/usr/bin/env bash
# Set-up (if needed) and the fast test suite on 2 worker processes (pytest-xdist); pass extra
# pytest arguments, e.g. -m slow, or -n 0 to run in this process (for pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 "$@"
