#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the workflow on the embedded default profile.
# Extra arguments go to snakemake (e.g. `bash scripts/run.sh --config profile=smoke`, or `-n`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/snakemake --cores all --rerun-incomplete --show-failed-logs "$@"
