#!/usr/bin/env bash
# Build Horovod 0.28.1 (the last release) against the TensorFlow in .venv, with Gloo and MPI.
# Its sdist does not build against TF >= 2.21 as published: the optional XLA ops include
# headers that moved, so they are left out (ktrain never runs Horovod ops under XLA anyway).
# Needs a C++ compiler and CMake < 4 (/usr/bin/cmake on Debian 12); takes ~2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
if $python -c "import horovod.tensorflow" 2>/dev/null; then
    echo "horovod is already installed"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$python -m pip download --quiet --no-deps --no-binary :all: horovod==0.28.1 -d "$work"
tar -xzf "$work"/horovod-0.28.1.tar.gz -C "$work"
sed -i '/xla_mpi_ops.cc/d' "$work"/horovod-0.28.1/horovod/tensorflow/CMakeLists.txt
cmake_bin=$(command -v cmake)
case "$($cmake_bin --version | head -1)" in
    *" 4."*) export CMAKE_POLICY_VERSION_MINIMUM=3.5 ;;
esac
PATH="$PWD/.venv/bin:$PATH" \
HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 MAKEFLAGS="-j$(nproc)" \
    $python -m pip install --quiet --no-build-isolation "$work"/horovod-0.28.1
$python -c "import horovod, horovod.tensorflow; print('horovod', horovod.__version__, 'built')"
