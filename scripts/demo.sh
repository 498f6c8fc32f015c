#!/usr/bin/env bash
# Install (if needed) and run the main job on the bundled demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/fbmem demo "$@"
