#!/usr/bin/env bash
# Set-up (if needed) and the fast test suite; pass extra pytest arguments, e.g. -m slow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
