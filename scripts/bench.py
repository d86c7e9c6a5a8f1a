#!/usr/bin/env python
"""Throughput of `ktrain run` against plain Keras `model.fit`, measured in one invocation.

For each config: the same model fn, data fn, optimizer and global batch size are trained by
(a) plain `model.fit` on the arrays and (b) `ktrain run`, each in a fresh process, alternating
for --repeats rounds. Prints samples/s of both, the ratio (ktrain / plain; best of the
rounds each), and time-to-first-step counted from each process' start.

    python scripts/bench.py configs/quickstart.yaml configs/synthetic.yaml --repeats 2
    python scripts/bench.py configs/synthetic.yaml --set data.kwargs.samples=512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

STARTED = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def plain_keras(config_path: str, overrides: list[str]) -> dict:
    """Baseline: what a user would write by hand with model.fit on one process."""
    import keras

    from launcher.config import load_config
    from launcher.userfn import load_function
    from launcher.worker import compile_from_config

    run = load_config(config_path, overrides)
    keras.utils.set_random_seed(run.train.seed)
    data = load_function(run.data.fn, "data.fn", run.base_dir)(**run.data.kwargs)
    (x, y), validation = (data["train"], data.get("validation")) if isinstance(data, dict) else (data, None)
    model = load_function(run.model.fn, "model.fn", run.base_dir)(**run.model.kwargs)
    if not model.compiled:
        compile_from_config(model, run.train)

    class FirstStep(keras.callbacks.Callback):
        done = None

        def on_train_batch_end(self, batch, logs=None):
            if FirstStep.done is None:
                FirstStep.done = time.perf_counter()

    fit_started = time.perf_counter()
    model.fit(x, y, batch_size=run.train.global_batch_size, epochs=run.train.epochs,
              shuffle=run.train.shuffle, validation_data=validation, verbose=0,
              callbacks=[FirstStep()])
    fit_ended = time.perf_counter()
    samples = len(y) * run.train.epochs - run.train.global_batch_size
    return {"samples_per_second": samples / (fit_ended - FirstStep.done),
            "seconds_to_first_step_since_start": FirstStep.done - STARTED,
            "time_to_first_step_seconds": FirstStep.done - fit_started}


def _ktrain(config: str, overrides: list[str], output_dir: str) -> dict:
    subprocess.run([sys.executable, "-m", "launcher", "run", config, *overrides,
                    f"output_dir={output_dir}", "checkpoint.resume=never", "-q"],
                   check=True, cwd=REPO, env=_env())
    with open(os.path.join(output_dir, "summary.json")) as f:
        return json.load(f)


def _plain(config: str, overrides: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "--plain", config, *overrides],
                            check=True, cwd=REPO, env=_env(), capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _env() -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def compare(config: str, overrides: list[str], repeats: int) -> dict:
    plain, ktrain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(repeats):
            plain.append(_plain(config, overrides))
            ktrain.append(_ktrain(config, overrides, os.path.join(tmp, f"run-{round_}")))
    best_plain = max(r["samples_per_second"] for r in plain)
    best_ktrain = max(r["samples_per_second"] for r in ktrain)
    return {
        "config": os.path.relpath(config, REPO),
        "plain_samples_per_second": round(best_plain, 1),
        "ktrain_samples_per_second": round(best_ktrain, 1),
        "ratio": round(best_ktrain / best_plain, 3),
        "plain_first_step_s": round(min(r["seconds_to_first_step_since_start"] for r in plain), 2),
        "ktrain_first_step_s": round(min(r["seconds_to_first_step_since_start"] for r in ktrain), 2),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--plain":
        print(json.dumps(plain_keras(sys.argv[2], sys.argv[3:])))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--set", action="append", default=[], metavar="key.path=value",
                        help="override applied to both runs of every config")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = [compare(os.path.abspath(c), args.set, args.repeats) for c in args.configs]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
