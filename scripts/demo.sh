#!/usr/bin/env bash
# Install (if needed) and run the main job (jobs/full_scan.py) on the bundled demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python jobs/full_scan.py "$@"
