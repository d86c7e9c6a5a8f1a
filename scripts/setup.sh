#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with ktrain, TensorFlow (CPU build), MPI,
# Spark, Ray, JAX and PyTorch (for backend: jax, torch), ONNX export, MLflow and the test tools. Safe to re-run.
# `bash scripts/setup.sh gpu` installs TensorFlow's CUDA build instead.
# (Horovod: scripts/install_horovod.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu},mpi,spark,ray,jax,export,mlflow,test"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip uv
# uv installs and byte-compiles the ~200 packages in under half of pip's time (1:12 vs 2:42 on
# a 2-core machine, from its cache); pip stays in .venv for scripts/install_horovod.sh.
.venv/bin/uv pip install --quiet --python .venv/bin/python --compile-bytecode -e ".[${extras}]"
# backend: torch. pip, not uv: pip takes the CPU build that lies on these machines' disk
# (uv, or another version, downloads a CUDA build of several GB).
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# An editable install is not byte-compiled: every worker process would compile ktrain again.
.venv/bin/python -m compileall -q launcher strategies tests/fixtures
echo "ktrain is set up in .venv: run .venv/bin/ktrain --help"
