#!/usr/bin/env bash
# Set-up (if needed), lint, the docs site build and the fast test suite on 2 worker processes (pytest-xdist); pass extra
# pytest arguments, e.g. -m slow, or -n 0 to run in this process (for pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check -q .   # lint (pyproject.toml): style holds without anyone watching
# The docs site: a dead link, a missing anchor or a page left out of the nav fails here. No -q: it
# would hide the warnings that --strict turns into a failure. Output only when it fails.
site_tmp=$(mktemp -d)
docs=$(NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict -d "$site_tmp" 2>&1) || { echo "$docs"; rm -rf "$site_tmp"; exit 1; }
rm -rf "$site_tmp"
exec .venv/bin/python -m pytest -q -n 2 "$@"
