#!/usr/bin/env bash
# The test suite: set up .venv if needed (and, as root on Debian, the system packages the tests use: TeX,
# poppler-utils, chromium; scripts/setup.sh), then run pytest. Extra arguments go to pytest. pyproject's
# addopts has -ra: every skipped test's reason is in the summary.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh" --tests
cd "$root"
exec .venv/bin/python -m pytest "$@"
