#!/usr/bin/env bash
# The GPU check: ktrain on Keras' JAX (or torch) backend on one GPU, on a machine with JAX and
# PyTorch (CUDA) and no TensorFlow, next to plain Keras model.fit on the same backend and data
# in the same invocation.
#
#   bash scripts/gpu_check.sh --wheels   # here, once: what the GPU machine lacks, as wheels
#                                        # in .whl/ (keras, pydantic, ktrain itself; ~10 MiB)
#   bash scripts/gpu_check.sh            # there: installs .whl/ (if present) into a folder of
#                                        # its own, then runs the check (about 5 minutes)
#   bash scripts/gpu_check.sh --smoke    # the same steps on the quickstart's MLP, on any CPU,
#                                        # with the Python as it is (the tests run it)
#   ... --backend torch                  # with any of the above: Keras' torch backend
#
# Prints, and writes to $OUT/gpu_check.json (or runs/gpu_check/): `ktrain env`, the GPU's name,
# and for the synthetic ResNet50 (224x224, mixed_bfloat16, 320 steps of 128 images) through
# `ktrain run` (mirrored, 1 GPU) and through plain model.fit: images/s, their ratio and the
# seconds from process start to the first step (scripts/bench.py's comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
mode="" backend=jax
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels|--smoke) mode="$1" ;;
        --backend) backend="$2"; shift ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [[ "$mode" == "--wheels" ]]; then
    rm -rf .whl && mkdir .whl
    # The GPU machine's Python is 3.12; these are the packages its image does not have.
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        "keras==$("$python" -c 'import keras; print(keras.__version__)')" namex optree \
        "pydantic==$("$python" -c 'import pydantic; print(pydantic.VERSION)')" \
        "pydantic-core==$("$python" -c 'import pydantic_core; print(pydantic_core.__version__)')" \
        annotated-types typing-inspection typing-extensions
    "$python" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl .
    du -sh .whl
    exit 0
fi

if [[ "$mode" != "--smoke" ]] && compgen -G ".whl/*.whl" > /dev/null; then
    site="$(mktemp -d)"
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
if [[ "$mode" == "--smoke" ]]; then  # the quickstart's MLP: the steps, not the model
    config=configs/quickstart.yaml size=0 samples=1437 batch=64 epochs=2
    model=()
else
    config=configs/synthetic.yaml size=224 samples=4096 batch=128 epochs=10
    model=(--set "model.kwargs.image_size=$size" --set "data.kwargs.image_size=$size"
           --set "data.kwargs.samples=$samples")
fi
export KERAS_BACKEND="$backend"
"$python" -m ktrain env | tee "$out/env.txt"
gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
echo "GPU: $gpu"
"$python" scripts/bench.py "$config" --json "$out/throughput.json" "${model[@]}" \
    --set "backend=$backend" --set train.precision=mixed_bfloat16 --set report=false \
    --set "train.global_batch_size=$batch" --set "train.epochs=$epochs" \
    --set "checkpoint.every_epochs=$epochs" --set strategy.devices=1
GPU="$gpu" OUT_DIR="$out" STEPS=$((samples / batch * epochs)) SIZE="$size" "$python" - <<'EOF'
import json, os
out = os.environ["OUT_DIR"]
report = {"gpu": os.environ["GPU"], "backend": os.environ["KERAS_BACKEND"], "steps": int(os.environ["STEPS"]),
          "image_size": int(os.environ["SIZE"]), "precision": "mixed_bfloat16",
          "ktrain_env": open(f"{out}/env.txt").read().splitlines(),
          "throughput": json.load(open(f"{out}/throughput.json"))}
with open(f"{out}/gpu_check.json", "w") as f:
    json.dump(report, f, indent=2)
print(json.dumps(report["throughput"], indent=2))
EOF
