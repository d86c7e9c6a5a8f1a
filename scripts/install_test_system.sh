#!/usr/bin/env bash
# System packages the integration tests need, installed only where missing (Debian 12, root):
# SLURM 22.05 + MUNGE + PMIx (`srun --mpi=pmix`), iproute2 and util-linux (network namespaces,
# nsenter), Java 17 (Spark), and the compiler and CMake < 4 that scripts/install_horovod.sh uses.
# Safe to re-run. Without root or apt-get it changes nothing and says which tests cannot run.
set -euo pipefail
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "not root or no apt-get: SLURM and network-namespace tests will be skipped"; exit 0
fi
missing=()
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
ldconfig -p | grep -q "libpmix\.so " || missing+=(libpmix-dev)
command -v ip >/dev/null || missing+=(iproute2)
command -v nsenter >/dev/null || missing+=(util-linux)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v cmake >/dev/null || missing+=(cmake)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
fi
echo "system packages for the tests are installed"
