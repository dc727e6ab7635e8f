#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow tests included.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
# What the service tests run against: a PostgreSQL server they start themselves, headless Chromium.
debian_packages postgresql chromium chromium-driver openclipart-png  # + the openclipart zero-shot set
# pytorch-ood for tests/test_pytorch_ood_rank.py: without its dependencies (torchvision would replace the
# pinned torch; the test stands in for torchvision at import, none of the detector code calls it).
python -c "import pytorch_ood" 2>/dev/null || python -m pip install -q --no-deps "pytorch-ood==0.4.0"
ruff check src tests benchmarks scripts
python -m pytest -q "$@"
