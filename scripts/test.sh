#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow tests included.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
# What the service tests run against: a PostgreSQL server they start themselves, headless Chromium.
debian_packages postgresql chromium chromium-driver
ruff check src tests benchmarks scripts
python -m pytest -q "$@"
