#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with ktrain, TensorFlow (CPU build), MPI,
# Spark, Ray, JAX (for backend: jax), ONNX export, MLflow and the test tools. Safe to re-run.
# `bash scripts/setup.sh gpu` installs TensorFlow's CUDA build instead.
# (Horovod: scripts/install_horovod.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu},mpi,spark,ray,jax,export,mlflow,test"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
echo "ktrain is set up in .venv: run .venv/bin/ktrain --help"
