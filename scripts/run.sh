#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the workflow on the embedded default profile.
# Extra arguments go to snakemake (e.g. `bash scripts/run.sh --configfile config/smoke.yaml`, or `-n`).
# A run that was killed resumes: incomplete jobs are rerun, and a stale Snakemake lock left by a killed
# run is cleared (safe: this script holds its own lock while it runs, released by the kernel on kill -9).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
mkdir -p .snakemake
exec 9> .snakemake/run.lock
if ! flock -n 9; then
  echo "another scripts/run.sh is running in $root; wait for it to finish" >&2
  exit 1
fi
if [ -n "$(ls -A .snakemake/locks 2>/dev/null)" ]; then
  echo "[run] clearing the lock of an earlier run that was killed"
  .venv/bin/snakemake --unlock "$@" > /dev/null
fi
start=$(date +%s)
.venv/bin/snakemake --cores all --rerun-incomplete --show-failed-logs "$@"
case " $* " in
  *" -n "*|*" --dry-run "*|*" --dryrun "*|*" --report"*|*" --unlock "*|*" --lint"*) ;;
  *)
    echo "[run] workflow finished in $(( $(date +%s) - start )) s; per-rule time of the jobs run so far:"
    .venv/bin/python -m extract.cli timings || true
    ;;
esac
