#!/usr/bin/env bash
# Create .venv at the repository root if missing and install the project into it (idempotent).
# torch is installed first (pinned CPU build on machines that carry it; set DORMANT_TORCH to change the
# requirement, e.g. DORMANT_TORCH="torch>=2.6" to keep an existing CUDA build).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$py" -m venv .venv
fi
stamp=.venv/.dormant-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import extract" 2>/dev/null; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${DORMANT_TORCH:-torch==2.13.0}"
  .venv/bin/python -m pip install -q "${DORMANT_TORCH:-torch==2.13.0}"
fi
echo "[setup] installing the project (constraints.txt pins the versions)"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
