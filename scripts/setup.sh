#!/usr/bin/env bash
# Create .venv at the repository root if missing and install the project into it (idempotent).
# torch is installed first (pinned CPU build on machines that carry it; set DORMANT_TORCH to change the
# requirement, e.g. DORMANT_TORCH="torch>=2.6" to keep an existing CUDA build).
#
# System packages (Debian, as root, with apt-get --no-install-recommends, only those missing):
#   always      TeX for the manuscript (the workflow's `paper` rule): latexmk texlive-latex-base
#               texlive-latex-recommended lmodern
#   --tests     also poppler-utils (the paper test reads the PDF), chromium (the explorer's browser test) and
#               a one-node SLURM cluster's parts (the cluster test, scripts/slurm_cluster.sh): slurmctld slurmd
#               slurm-client slurmdbd munge mariadb-server (their init scripts are not started)
# Not root, no apt-get, or DORMANT_SYSTEM_PACKAGES=0: nothing is installed and a line says so. A failed
# install never stops set-up: the paper rule then writes "skipped" and those tests skip, saying why.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tests=0
for arg in "$@"; do
  case "$arg" in
    --tests) tests=1 ;;
    *) echo "usage: scripts/setup.sh [--tests]" >&2; exit 2 ;;
  esac
done

have_tex() {
  command -v latexmk > /dev/null && command -v pdflatex > /dev/null && command -v kpsewhich > /dev/null \
    && [ "$(kpsewhich booktabs.sty pdflscape.sty lmodern.sty | wc -l)" = 3 ]
}
have_chromium() {
  command -v chromium > /dev/null || command -v chromium-browser > /dev/null || command -v google-chrome > /dev/null
}

have_slurm() {
  local c
  for c in munged mungekey mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct sacctmgr; do
    command -v "$c" > /dev/null || return 1
  done
}

system_packages() {
  local want=() log start
  [ "${DORMANT_SYSTEM_PACKAGES:-1}" = 0 ] && return 0
  have_tex || want+=(latexmk texlive-latex-base texlive-latex-recommended lmodern)
  if [ "$tests" = 1 ]; then
    command -v pdftotext > /dev/null && command -v pdfimages > /dev/null || want+=(poppler-utils)
    have_chromium || want+=(chromium)
    have_slurm || want+=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
  fi
  [ ${#want[@]} = 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "[setup] not root: not installing ${want[*]} (Debian: sudo apt-get install --no-install-recommends" \
         "${want[*]}); without them the paper is skipped and the tests that need them skip"
    return 0
  fi
  if ! command -v apt-get > /dev/null; then
    echo "[setup] no apt-get: not installing ${want[*]}; without them the paper is skipped and the tests that" \
         "need them skip"
    return 0
  fi
  log=$(mktemp "${TMPDIR:-/tmp}/dormant-apt.XXXXXX.log")
  start=$(date +%s)
  echo "[setup] installing ${want[*]} (apt-get, as root; once)"
  export DEBIAN_FRONTEND=noninteractive
  # no package's daemon is started at install (munge, MariaDB, SLURM: the cluster test starts its own)
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && own_policy=1; fi
  local apt=(apt-get -y -q -o DPkg::Lock::Timeout=120)
  if { "${apt[@]}" install --no-install-recommends "${want[@]}" \
       || { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends "${want[@]}"; }; } > "$log" 2>&1; then
    echo "[setup] installed in $(( $(date +%s) - start )) s"
    rm -f "$log"
  else
    echo "[setup] apt-get could not install ${want[*]} (log: $log); continuing without them"
    tail -n 5 "$log" | sed 's/^/[setup]   /'
  fi
  [ "$own_policy" = 0 ] || rm -f "$policy"
}
system_packages || echo "[setup] system packages not installed; continuing"

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
