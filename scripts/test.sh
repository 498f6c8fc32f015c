#!/usr/bin/env bash
# Install (if needed), lint and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check scanner actors jobs benchmarks tests
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
