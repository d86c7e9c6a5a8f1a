#!/usr/bin/env bash
# Train with ktrain on a Spark cluster: the driver runs `ktrain run`, the workers are one
# barrier stage on the executors.
#   bash scripts/spark_submit.sh spark://head:7077 config.yaml models.py [key=value ...]
# Executors need ktrain and TensorFlow installed (pip install "ktrain-launcher[cpu,spark]"), and
# output_dir in the config must be a path or URL every executor can write.
set -euo pipefail
master=${1:?usage: spark_submit.sh MASTER CONFIG MODEL_FILE [key=value ...]}
config=${2:?usage: spark_submit.sh MASTER CONFIG MODEL_FILE [key=value ...]}
model_file=${3:?usage: spark_submit.sh MASTER CONFIG MODEL_FILE [key=value ...]}
shift 3
spark-submit --master "${master}" \
    --conf spark.task.maxFailures=1 \
    --py-files "${model_file}" \
    "$(command -v ktrain)" run "${config}" "strategy={name: spark, workers: 4}" "$@"
