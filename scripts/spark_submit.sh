#!/usr/bin/env bash
# Train with ktrain on a Spark cluster: the driver runs `ktrain run`, the workers are one
# barrier stage on the executors (as many as the config's strategy.workers).
#   bash scripts/spark_submit.sh spark://head:7077 config.yaml models.py [key=value ...]
# Executors need ktrain and TensorFlow installed (pip install "ktrain-launcher[cpu,spark]"), and
# output_dir in the config must be a path or URL every executor can write.
set -euo pipefail
usage="usage: spark_submit.sh MASTER CONFIG MODEL_FILE [key=value ...]"
master=${1:?$usage}
config=${2:?$usage}
model_file=${3:?$usage}
shift 3
# spark-submit runs a Python app only from a file ending in .py: ktrain's entry file.
spark-submit --master "${master}" \
    --conf spark.task.maxFailures=1 \
    --py-files "${model_file}" \
    "$(ktrain spark-entry)" run "${config}" strategy.name=spark "$@"
