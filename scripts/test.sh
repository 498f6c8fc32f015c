#!/usr/bin/env bash
# Install (if needed), lint and run the whole test suite, slow tests included; the browser test
# needs chromium, which scripts/browser.sh installs when it can (else it says the test is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/browser.sh
echo "set-up done in ${SECONDS} s (the README's time estimates come from such runs)"
.venv/bin/ruff check scanner actors jobs benchmarks tests
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
