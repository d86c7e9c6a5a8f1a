#!/usr/bin/env bash
# Install what a single-node SLURM needs (Debian 12: SLURM 22.05, MUNGE, PMIx for
# `srun --mpi=pmix`) and make sure MUNGE has a key. Needs root; safe to re-run.
# The daemons themselves are started and stopped by whoever uses them (tests/clusters.py).
set -euo pipefail
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null \
        || ! ldconfig -p | grep -q "libpmix\.so "; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurm-wlm munge libpmix-dev
fi
if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
fi
echo "SLURM $(slurmctld -V | cut -d' ' -f2) and MUNGE are installed"
