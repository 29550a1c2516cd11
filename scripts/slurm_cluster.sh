#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, with accounting, for the cluster test (tests/test_slurm.py)
# and for trying config/slurm before a site's cluster:
#   bash scripts/slurm_cluster.sh start    # munged, MariaDB, slurmdbd, slurmctld, slurmd; partition "local"
#   bash scripts/slurm_cluster.sh env      # prints `export SLURM_CONF=...` (eval it before sbatch/sacct)
#   bash scripts/slurm_cluster.sh stop
# Needs root and Debian's slurmctld slurmd slurm-client slurmdbd munge mariadb-server (scripts/setup.sh
# --tests installs them as root). Everything lives in $DORMANT_SLURM_DIR (default /tmp/dormant-slurm-$UID):
# configs, munge key, MariaDB data, spool, logs. Outside it: /etc/slurm/slurm.conf, a link to its slurm.conf
# (a job's srun reads the default path; refused where a SLURM configuration of the machine's own is there), and
# munged's default socket (/run/munge/munge.socket.2); the other daemons listen on 127.0.0.1 only, on ports
# of their own ($DORMANT_SLURM_PORT..+3, default 16817..16820).
# Bare-node settings: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroups needed);
# MinJobAge=600 keeps finished jobs visible to squeue as well.
set -euo pipefail
D=${DORMANT_SLURM_DIR:-/tmp/dormant-slurm-$(id -u)}
PORT=${DORMANT_SLURM_PORT:-16817}
HOST=$(hostname -s)
MARK="# written by dormant-heads scripts/slurm_cluster.sh"
ETC_CONF=/etc/slurm/slurm.conf  # where SLURM's commands look without SLURM_CONF
MUNGE_SOCKET=/run/munge/munge.socket.2  # munge's default, the only one SLURM 22.05's clients use
NEED=(munge unmunge munged mungekey mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sbatch sacct sacctmgr sinfo)

die() { echo "[slurm] $*" >&2; exit 1; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds (each try at most 5 s)
  local n=$1 what=$2 end=$((SECONDS + $1)); shift 2
  while [ $SECONDS -lt $end ]; do timeout 5 "$@" > /dev/null 2>&1 && return 0; sleep 0.25; done
  die "$what did not come up in $n s; logs: $D/log"
}

write_configs() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MiB, 1 GiB left to the system
  mkdir -p "$D"/{log,ctld,spool,munge,mysql}
  chmod 700 "$D/munge"
  cat > "$D/slurm.conf" <<EOF
$MARK
ClusterName=dormant
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$D/ctld
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
JobAcctGatherType=jobacct_gather/linux
AccountingStoreFlags=job_comment
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$D/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=dormant
StorageLoc=slurm_acct_db
PidFile=$D/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
EOF
  chmod 600 "$D/slurmdbd.conf"
}

start() {
  [ "$(id -u)" = 0 ] || die "needs root (the daemons run as root here)"
  local missing=()
  for c in "${NEED[@]}"; do command -v "$c" > /dev/null || missing+=("$c"); done
  [ ${#missing[@]} = 0 ] || die "missing ${missing[*]}: as root on Debian, apt-get install --no-install-recommends slurmctld slurmd slurm-client slurmdbd munge mariadb-server (or bash scripts/setup.sh --tests)"
  if [ -e "$ETC_CONF" ] && ! grep -q "^$MARK" "$ETC_CONF"; then
    die "$ETC_CONF exists and is not this script's: this machine has a SLURM configuration of its own; use its cluster"
  fi
  stop > /dev/null 2>&1 || true
  write_configs
  export SLURM_CONF=$D/slurm.conf
  # the jobs' own srun calls (snakemake-executor-plugin-slurm-jobstep) drop SLURM_CONF from their environment
  # and read the default path: a link to ours there
  mkdir -p "$(dirname "$ETC_CONF")"
  ln -sfn "$D/slurm.conf" "$ETC_CONF"
  # munge: SLURM's clients reach munged at its default socket only, so a munged of ours serves it there
  # (with a key of ours); one that already answers there (a machine with munge running) is used as it is
  if munge -n < /dev/null 2> /dev/null | unmunge > /dev/null 2>&1; then
    echo "[slurm] using the munged already running at $MUNGE_SOCKET"
  else
    [ -f "$D/munge/munge.key" ] || mungekey --create --keyfile="$D/munge/munge.key" > /dev/null
    mkdir -p "$(dirname "$MUNGE_SOCKET")"
    munged --force --key-file="$D/munge/munge.key" --socket="$MUNGE_SOCKET" \
      --pid-file="$D/munge/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
    wait_for 20 munged bash -c "munge -n < /dev/null | unmunge"
  fi
  if [ ! -d "$D/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$D/mysql" --auth-root-authentication-method=socket \
      > "$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; log: $D/log/mariadb-install.log"
  fi
  mariadbd --user=root --datadir="$D/mysql" --socket="$D/mysql.sock" --bind-address=127.0.0.1 \
    --port=$((PORT + 3)) --pid-file="$D/mysql.pid" --log-error="$D/log/mariadb.log" \
    --innodb-buffer-pool-size=64M > /dev/null 2>&1 &
  wait_for 60 MariaDB mariadb --socket="$D/mysql.sock" -u root -e "SELECT 1"
  mariadb --socket="$D/mysql.sock" -u root <<'EOF'
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'dormant';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'dormant';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
  slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster dormant > /dev/null 2>&1 || true
  sacctmgr -i add account dormant Description=local Organization=local > /dev/null 2>&1 || true
  sacctmgr -i add user "$(id -un)" Account=dormant > /dev/null 2>&1 || true
  slurmctld
  wait_for 60 slurmctld scontrol ping
  slurmd
  wait_for 60 "node $HOST" bash -c "sinfo -h -N -o %T | grep -Eq '^(idle|mixed|allocated)'"
  echo "[slurm] up: one node $HOST, partition local; export SLURM_CONF=$D/slurm.conf"
}

stop() {
  export SLURM_CONF=$D/slurm.conf
  local f
  for f in slurmd slurmctld slurmdbd; do
    [ -f "$D/$f.pid" ] && kill "$(cat "$D/$f.pid")" 2> /dev/null || true
  done
  sleep 1
  if [ -S "$D/mysql.sock" ]; then
    mariadb-admin --socket="$D/mysql.sock" -u root shutdown 2> /dev/null || true
  fi
  [ -f "$D/munge/munged.pid" ] && kill "$(cat "$D/munge/munged.pid")" 2> /dev/null || true
  rm -f "$D"/slurm*.pid
  if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$D/slurm.conf" ]; then rm -f "$ETC_CONF"; fi
  echo "[slurm] stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$D/slurm.conf" ;;
  *) echo "usage: scripts/slurm_cluster.sh start|stop|env" >&2; exit 2 ;;
esac
