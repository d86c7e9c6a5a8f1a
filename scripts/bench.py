#!/usr/bin/env python
"""ktrain's benchmarks; every figure is a ratio against a baseline measured in the same run.

Throughput (default): for each config, the same model fn, data fn, optimizer and global batch
size are trained by (a) plain `model.fit` on the arrays and (b) `ktrain run`, each in a fresh
process, alternating for --repeats rounds. Prints samples/s of both, the ratio (ktrain / plain;
best of the rounds each), and time-to-first-step counted from each process' start.

    python scripts/bench.py configs/quickstart.yaml configs/synthetic.yaml --repeats 2
    python scripts/bench.py configs/synthetic.yaml --set data.kwargs.samples=512

--allreduce: bus bandwidth of each communicator (2 workers on this machine) for 1, 4 and 64 MB
tensors, as a ratio to a raw mpi4py Allreduce of NumPy arrays on the same machine (best of
--repeats rounds); the raw in-place form (MPI.IN_PLACE) is shown beside it.
--scaling N: weak scaling, 1 process vs N workers of every transport, one thread per process,
each worker with the config's batch and steps; then ms per step of a 2-worker step's input,
compute and gradient exchange, per communicator.
--workers: samples/s and time-to-first-step (from launch) of a config with 1 process (mirrored)
and with 2 workers under multiworker, spark and ray.

--ray-train: ktrain's ray strategy (1 worker) next to Ray Train's own TensorflowTrainer.
--preemption N: 2 workers with checkpoints every N steps, the stop-flag agreement and the stall
watchdog, then with the divergence audit every N steps too, next to 2 workers with epoch
checkpoints only and all of those off.

    python scripts/bench.py --allreduce --repeats 3
    python scripts/bench.py --scaling 2 configs/synthetic.yaml --set data.kwargs.samples=512 \
        --set train.epochs=3
    python scripts/bench.py --workers configs/synthetic.yaml
    python scripts/bench.py --ray-train configs/quickstart.yaml
    python scripts/bench.py --preemption 50 configs/synthetic.yaml --set data.kwargs.samples=3200 \
        --set train.epochs=1

--elastic: 3 workers, one SIGKILLed mid-epoch: seconds from the loss to the first step of the
group that replaces it and steps lost, for an elastic group ({min: 2, max: 3}) and for a
restart at the same size over TF collectives and over MPI, then elastic Ray actors and Spark
tasks; each elastic group then grows back.

    python scripts/bench.py --elastic configs/synthetic.yaml --set train.global_batch_size=48 \
        --set data.kwargs.samples=480 --set train.epochs=5

--sharding N: each strategy.shard mode (none, optimizer, gradients, parameters) on N JAX
devices: bytes per device of parameters, optimizer state and gradients, peak resident memory
and samples/s, as ratios to the unsharded run.

    python scripts/bench.py --sharding 4 configs/quickstart.yaml --set model.kwargs.hidden=2048

--streaming: on synthetic Parquet and TFRecord files (written once, to a temporary folder),
ktrain's streaming input (data.files) next to a hand-written tf.data pipeline over the same
files with model.fit, both in one process; and ktrain on 2 workers. samples/s and peak
resident memory per process.

    python scripts/bench.py --streaming --rows 200000 --width 256 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def plain_keras(config_path: str, overrides: list[str]) -> dict:
    """Baseline: what a user would write by hand with model.fit on one process."""
    from ktrain import console
    from ktrain.config import load_config

    run = load_config(config_path, overrides)
    console.import_keras(run.backend)  # the config's backend, as ktrain's run has
    import keras

    from ktrain.userfn import load_function
    from ktrain.assembly import compile_from_config

    keras.utils.set_random_seed(run.train.seed)
    data = load_function(run.data.fn, "data.fn", run.base_dir)(**run.data.kwargs)
    (x, y), validation = (data["train"], data.get("validation")) if isinstance(data, dict) else (data, None)
    if run.train.precision != "float32":
        keras.mixed_precision.set_global_policy(run.train.precision)
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


def _ktrain(config: str, overrides: list[str], output_dir: str,
            extra_env: dict | None = None) -> dict:
    subprocess.run([sys.executable, "-m", "ktrain", "run", config, *overrides,
                    f"output_dir={output_dir}", "checkpoint.resume=never", "-q"],
                   check=True, cwd=REPO, env={**_env(), **(extra_env or {})})
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


SIZES_MB = (1, 4, 64)
ALLREDUCE_ROUNDS, ALLREDUCE_TRIALS = 10, 5
"""Each size: the fastest of TRIALS runs of ROUNDS allreduces (the 2 cores are shared)."""


def allreduce_worker(kind: str) -> None:
    """In one of 2 processes: time allreduces of a float32 tensor, ROUNDS of them in one call
    (a train step's function call is paid once per step, not per allreduce); rank 0 prints
    JSON."""
    import numpy as np

    if kind.startswith("raw-mpi4py"):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()

        def reduce_fn(size):
            out = np.zeros(size, np.float32)  # zeros: summed in place, it stays finite
            data = MPI.IN_PLACE if kind.endswith("in-place") else np.ones(size, np.float32)

            def rounds():
                for _ in range(ALLREDUCE_ROUNDS):
                    comm.Allreduce(data, out, op=MPI.SUM)
            return rounds
    else:
        import tensorflow as tf

        communicator = _communicator(kind)
        rank, world = communicator.rank, communicator.world_size

        def reduce_fn(size):
            tensor = tf.ones([size], tf.float32)

            @tf.function
            def rounds():
                reduced = tensor
                for _ in range(ALLREDUCE_ROUNDS):
                    reduced = communicator.allreduce_sum([reduced])[0]
                return reduced[0]
            return rounds

    results = {}
    for megabytes in SIZES_MB:
        size = megabytes * 2**20 // 4
        rounds = reduce_fn(size)
        rounds()
        seconds = min(_timed(rounds) for _ in range(ALLREDUCE_TRIALS)) / ALLREDUCE_ROUNDS
        results[megabytes] = 2 * (world - 1) / world * megabytes * 2**20 / seconds / 1e9
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _two_ranks(kind: str, worker_args: list[str], extra_env: dict | None = None) -> dict | None:
    """Run this script with ``worker_args`` as 2 ranks joined by transport ``kind`` (raw-mpi4py,
    mpi, collective, horovod-gloo, horovod-mpi); the JSON rank 0 printed, or None."""
    from ktrain.environment import rank_environment
    from ktrain.rendezvous import free_ports

    bin_dir = os.path.dirname(sys.executable)
    worker = [sys.executable, __file__, *worker_args]
    mpirun = [os.path.join(bin_dir, "mpirun"), "-np", "2", "--oversubscribe",
              "--allow-run-as-root", "--mca", "btl", "self,vader"]
    horovodrun = [os.path.join(bin_dir, "horovodrun"), "-np", "2", "-H", "localhost:2"]
    if kind.startswith("horovod") and not os.path.exists(horovodrun[0]):
        return None
    peers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    commands = {
        "collective": [(worker, rank_environment(r, 2, r, peers)) for r in range(2)],
        "horovod-gloo": [(horovodrun + ["--gloo", "--network-interface", "lo"] + worker, {})],
    }.get(kind, [(mpirun + worker, {})])
    processes = [subprocess.Popen(command, env={**_env(), **(extra_env or {}), **extra},
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
                 for command, extra in commands]
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    found = [line for out in outputs for line in out.splitlines() if "RESULT " in line]
    if not found:
        print(f"{kind}: failed\n" + "\n".join(outputs)[-2000:], file=sys.stderr)
        return None
    return json.loads(found[0].split("RESULT ", 1)[1])


def bench_allreduce(repeats: int) -> None:
    """Every transport in turn, ``repeats`` rounds (the best of each): shared-memory speed on
    2 shared cores comes and goes, and each round meets the same conditions in every row."""
    measured: dict[str, dict[int, float]] = {}
    for _ in range(repeats):
        for kind in ("raw-mpi4py", "raw-mpi4py-in-place", "mpi", "collective", "horovod-gloo",
                     "horovod-mpi"):
            worker_kind = "horovod" if kind.startswith("horovod") else kind
            result = _two_ranks(kind, ["--allreduce-worker", worker_kind]) or {}
            best = measured.setdefault(kind, {})
            for size, speed in result.items():
                best[int(size)] = max(best.get(int(size), 0.0), speed)
    raw = measured.get("raw-mpi4py", {})
    print("| communicator | " + " | ".join(f"{mb} MB GB/s (ratio to raw mpi4py)" for mb in SIZES_MB) + " |")
    print("|---|" + "---|" * len(SIZES_MB))
    for kind, values in measured.items():
        cells = [f"{values[mb]:.2f} ({values[mb] / raw[mb]:.2f})" if raw else f"{values[mb]:.2f}"
                 for mb in SIZES_MB]
        print(f"| {kind} | " + " | ".join(cells) + " |")


ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
              "OMP_NUM_THREADS": "1"}
"""Each worker process computes on one core (TensorFlow's and OpenMP's pools)."""

SCALING_RUNS = (
    ("multiworker, default transport", "{name: multiworker}"),
    ("multiworker, TF collectives", "{name: multiworker, communicator: collective}"),
    ("multiworker, mpi", "{name: multiworker, communicator: mpi}"),
    ("horovod, gloo", "{name: horovod, controller: gloo}"),
    ("horovod, mpi", "{name: horovod, controller: mpi}"),
)


def bench_scaling(config: str, overrides: list[str], workers: int, repeats: int) -> None:
    """Weak scaling: each worker keeps the config's batch and number of steps (the global batch
    and data.kwargs.samples grow with the workers), one thread per process; efficiency is
    samples/s over ``workers`` times the 1-process samples/s, each the median of the epochs
    after the first, the best of ``repeats`` rounds. Then where a step's time goes."""
    from ktrain.config import load_config

    run = load_config(config, overrides)
    batch, samples = run.train.global_batch_size, run.data.kwargs.get("samples")

    def grown(n: int, strategy: str) -> list[str]:
        """The overrides of a run on ``n`` workers (strategy.* ones only for several)."""
        return [f"strategy={strategy}",
                *(o for o in overrides if n > 1 or not o.startswith("strategy.")),
                f"train.global_batch_size={batch * n}",
                *([f"data.kwargs.samples={samples * n}"] if samples else [])]

    transports = SCALING_RUNS if run.backend == "tensorflow" else SCALING_RUNS[:1]  # the rest
    runs = [("1 process (mirrored, 1 device)", "{name: mirrored, devices: 1}", 1),  # are TF's
            *((f"{workers} workers, {label}", strategy, workers)
              for label, strategy in transports)]
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(repeats):
            for index, (label, strategy, n) in enumerate(runs):
                out = os.path.join(tmp, f"{round_}-{index}")
                try:
                    summary = _ktrain(config, grown(n, strategy), out, ONE_THREAD)
                except subprocess.CalledProcessError:
                    print(f"{label}: failed", file=sys.stderr)
                    continue
                best[label] = max(best.get(label, 0.0), _steady_speed(out))
                if index == 1 and round_ == 0:
                    print(f"(default transport: {summary['transport']})", flush=True)
    single = best.get(runs[0][0])
    print("| run | samples/s | speed-up | weak-scaling efficiency |")
    print("|---|---|---|---|")
    for label, speed in best.items():
        ratio = speed / single if single else float("nan")
        efficiency = "-" if label == runs[0][0] else f"{ratio / workers:.0%}"
        print(f"| {label} | {speed:.1f} | {ratio:.2f} | {efficiency} |")
    if run.backend == "tensorflow":  # the breakdown times TensorFlow's communicators
        bench_step_breakdown(config, grown(2, "{name: multiworker}"))


def _steady_speed(output_dir: str) -> float:
    """samples/s of a run's epochs after the first (the median; the first one warms up)."""
    import csv
    import statistics

    with open(os.path.join(output_dir, "metrics.csv")) as f:
        speeds = [float(row["samples_per_second"]) for row in csv.DictReader(f)]
    return statistics.median(speeds[1:] or speeds)


BREAKDOWN_STEPS = 8


def step_breakdown_worker(kind: str, config: str, overrides: list[str]) -> None:
    """In one of 2 processes: the config's model and this worker's batches, as ktrain makes
    them; milliseconds per step of reading a batch, a step without exchange, the exchange of
    the step's gradients alone, and a whole distributed step. Rank 0 prints JSON."""
    from ktrain import console
    from ktrain.config import load_config

    run = load_config(config, overrides)
    console.import_keras("tensorflow")
    import tensorflow as tf

    from ktrain import collectives
    from ktrain.data import training_batches
    from ktrain.session import Session
    from ktrain.assembly import model_and_data

    communicator = _communicator(kind)
    session = Session(rank=communicator.rank, world_size=communicator.world_size,
                      num_replicas=communicator.world_size, communicator=communicator)
    model, splits = model_and_data(run, session)
    batches, _ = training_batches(
        splits.train, global_batch_size=run.train.global_batch_size, rank=session.rank,
        world_size=session.world_size, shuffle=False, shuffle_buffer=1, seed=0,
        first_epoch=0, epochs=4)
    batches = iter(batches)
    collected = [next(batches) for _ in range(BREAKDOWN_STEPS + 2)]

    def per_step(step) -> float:
        for x, y in collected[:2]:
            step(x, y)
        communicator.barrier()
        started = time.perf_counter()
        for x, y in collected[2:]:
            step(x, y)
        return (time.perf_counter() - started) / BREAKDOWN_STEPS * 1e3

    options = {"compression": run.strategy.compression,  # a multiworker config: see its caller
               "bucket_bytes": run.strategy.bucket_bytes}
    gradients = [tf.zeros_like(v) for v in model.trainable_variables]
    exchange = tf.function(lambda: communicator.allreduce_mean(gradients, **options))
    result = {
        "input": per_step(lambda x, y: next(batches)),
        "compute": per_step(lambda x, y: model.train_on_batch(x, y)),
        "exchange": per_step(lambda x, y: exchange()),
    }
    collectives.distribute_optimizer(model.optimizer, communicator, **options)
    model.make_train_function(force=True)
    result["whole step"] = per_step(lambda x, y: model.train_on_batch(x, y))
    if session.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def _communicator(kind: str):
    from ktrain import collectives
    from ktrain.environment import PEERS_ENV, detect

    if kind == "collective":
        return collectives.TensorFlowCollectives(detect().rank,
                                                 os.environ[PEERS_ENV].split(","))
    if kind == "mpi":
        return collectives.MpiCommunicator()
    return collectives.HorovodCommunicator()


def bench_step_breakdown(config: str, overrides: list[str]) -> None:
    """Where a 2-worker step's time goes, for each communicator."""
    rows = {kind: _two_ranks(kind, ["--step-breakdown-worker", kind, config, *overrides],
                             ONE_THREAD)
            for kind in ("collective", "mpi", "horovod-gloo", "horovod-mpi")}
    rows = {kind: row for kind, row in rows.items() if row}
    if not rows:
        return
    columns = list(next(iter(rows.values())))
    print("\n| 2 workers, ms per step | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for kind, row in rows.items():
        print(f"| {kind} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")


WORKER_RUNS = (
    ("1 process (mirrored)", "{name: mirrored, devices: 1}"),
    ("2 workers (multiworker, TF collectives)", "{name: multiworker, workers: 2}"),
    ("2 workers (spark, local[2])", "{name: spark, workers: 2}"),
    ("2 workers (ray, local)", "{name: ray, workers: 2}"),
)


def bench_workers(config: str, overrides: list[str], spark_masters: list[str]) -> None:
    """samples/s and time from `ktrain run` to the first training step, per strategy; each of
    ``spark_masters`` (spark://..., sc://...) adds a spark row on that cluster."""
    runs = [*WORKER_RUNS, *((f"2 workers (spark, {master})",
                             f"{{name: spark, workers: 2, master: '{master}'}}")
                            for master in spark_masters)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, strategy in runs:
            launched = time.time()
            summary = _ktrain(config, [*overrides, f"strategy={strategy}"],
                              os.path.join(tmp, str(len(rows))))
            rows.append((label, summary["samples_per_second"],
                         summary["first_step_unix_time"] - launched))
    print("| run | samples/s | ratio to 1 process | first step after launch (s) |")
    print("|---|---|---|---|")
    for label, speed, first in rows:
        print(f"| {label} | {speed:.1f} | {speed / rows[0][1]:.2f} | {first:.1f} |")


SHARD_MODES = ("none", "optimizer", "gradients", "parameters")


def bench_sharding(config: str, overrides: list[str], devices: int, repeats: int) -> None:
    """Each ``strategy.shard`` mode on ``devices`` JAX devices (mirrored): bytes per device of
    parameters, optimizer state and gradients, peak resident memory and samples/s, each as a
    ratio to the unsharded run (best of ``repeats`` rounds, modes alternating)."""
    runs: dict[str, list[dict]] = {mode: [] for mode in SHARD_MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(repeats):
            for mode in SHARD_MODES:
                runs[mode].append(_ktrain(config, [
                    *overrides, "backend=jax",
                    f"strategy={{name: mirrored, devices: {devices}, shard: {mode}}}"],
                    os.path.join(tmp, f"{mode}-{round_}")))
    base = runs["none"][0]["bytes_per_device"]
    speed = {mode: max(r["samples_per_second"] for r in rows) for mode, rows in runs.items()}
    memory = {mode: min(max(r["peak_memory_mib"]) for r in rows) for mode, rows in runs.items()}
    print(f"| shard ({devices} devices) | parameters / device | optimizer state / device | "
          f"gradients / device | peak RSS (MiB) | samples/s |")
    print("|---|---|---|---|---|---|")
    for mode in SHARD_MODES:
        held = runs[mode][0]["bytes_per_device"]
        cells = [f"{held[k] / 2**20:.2f} MiB ({held[k] / base[k]:.2f})"
                 for k in ("parameters", "optimizer_state", "gradients")]
        print(f"| {mode} | {' | '.join(cells)} | {memory[mode]:.0f} "
              f"({memory[mode] / memory['none']:.2f}) | {speed[mode]:.0f} "
              f"({speed[mode] / speed['none']:.2f}) |")


def ray_train_tensorflow(config_path: str, overrides: list[str]) -> dict:
    """Ray Train's own TensorflowTrainer with one worker on the config's model and data
    (its multi-worker path fails on Keras 3, ray-project/ray#47464)."""
    import ray
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from ktrain.config import load_config

    run = load_config(config_path, overrides)
    launched = time.time()

    def loop(_):
        import keras

        from ktrain.userfn import load_function
        from ktrain.assembly import compile_from_config

        keras.utils.set_random_seed(run.train.seed)
        data = load_function(run.data.fn, "data.fn", run.base_dir)(**run.data.kwargs)
        x, y = data["train"] if isinstance(data, dict) else data
        model = load_function(run.model.fn, "model.fn", run.base_dir)(**run.model.kwargs)
        if not model.compiled:
            compile_from_config(model, run.train)
        first = {}

        class FirstStep(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                first.setdefault("perf", time.perf_counter())
                first.setdefault("unix", time.time())

        model.fit(x, y, batch_size=run.train.global_batch_size, epochs=run.train.epochs,
                  shuffle=run.train.shuffle, verbose=0, callbacks=[FirstStep()])
        seconds = time.perf_counter() - first["perf"]
        samples = len(y) * run.train.epochs - run.train.global_batch_size
        with open(measured_file, "w") as f:  # Ray Train V2 keeps metrics only with checkpoints
            json.dump({"samples_per_second": samples / seconds,
                       "first_step": first["unix"] - launched}, f)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR")
    with tempfile.TemporaryDirectory() as storage:
        measured_file = os.path.join(storage, "measured.json")
        try:
            result = TensorflowTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                                       run_config=RayRunConfig(storage_path=storage)).fit()
        finally:
            ray.shutdown()
        if result.error or not os.path.exists(measured_file):
            raise RuntimeError(f"Ray Train failed: {result.error}")
        with open(measured_file) as f:
            return json.load(f)


def bench_preemption(config: str, overrides: list[str], every_steps: int, repeats: int) -> None:
    """The cost of long-job safety on 2 workers: mid-epoch checkpoints every ``every_steps``
    global batches, the stop-flag agreement and the stall watchdog, then the divergence audit
    every ``every_steps`` too, against epoch checkpoints only with all of it off, alternating
    for ``repeats`` rounds (best of each)."""
    two = "strategy={name: multiworker, workers: 2}"
    runs = {"epoch checkpoints only; no stop flags, watchdog or audit":
            [two, "checkpoint.stop_signals=[]", "strategy.stall_timeout=null",
             "strategy.audit_steps=null"],
            f"+ checkpoints every {every_steps} steps, stop flags, watchdog":
            [two, f"checkpoint.every_steps={every_steps}", "strategy.audit_steps=null"],
            f"+ divergence audit every {every_steps} steps":
            [two, f"checkpoint.every_steps={every_steps}",
             f"strategy.audit_steps={every_steps}"]}
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(repeats):
            for index, (label, extra) in enumerate(runs.items()):
                out = os.path.join(tmp, f"{round_}-{index}")
                speed = _ktrain(config, [*overrides, *extra], out)["samples_per_second"]
                best[label] = max(best.get(label, 0.0), speed)
    baseline = next(iter(best.values()))
    print("| run (2 workers) | samples/s | ratio |")
    print("|---|---|---|")
    for label, speed in best.items():
        print(f"| {label} | {speed:.1f} | {speed / baseline:.3f} |")


ELASTIC_RUNS = {
    "elastic {min: 2, max: 3}: goes on with 2": "{name: multiworker, workers: {min: 2, max: 3}}",
    "3 workers, max_restarts 1 (TF collectives)":
        "{name: multiworker, workers: 3, max_restarts: 1, communicator: collective}",
    "3 workers, max_restarts 1 (MPI: mpirun ends every rank)":
        "{name: multiworker, workers: 3, max_restarts: 1, communicator: mpi}",
    "ray {min: 2, max: 3} (a local Ray; an actor's process killed)":
        "{name: ray, workers: {min: 2, max: 3}}",
    "spark {min: 2, max: 3} (local[3]; Spark ends the stage: from the checkpoint)":
        "{name: spark, workers: {min: 2, max: 3}}"}


def bench_elastic(config: str, overrides: list[str]) -> None:
    """What a lost worker costs: 3 workers, rank 2 SIGKILLed half an epoch after the second
    epoch's checkpoint; seconds from the launcher seeing the loss to the first step of
    the group that replaces it, and steps lost, as each run's world_size_history records them;
    then the elastic group's growth back to 3."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, strategy in ELASTIC_RUNS.items():
            out = Path(tmp, str(len(rows)))
            run = subprocess.Popen([sys.executable, "-m", "ktrain", "run", config, *overrides,
                                    f"strategy={strategy}", f"output_dir={out}",
                                    "checkpoint.resume=never", "-q"], cwd=REPO, env=_env())
            while not (out / "checkpoints" / "ckpt-000002.npz").exists():
                time.sleep(0.05)
            time.sleep(_epoch_seconds(out, 2) / 2)  # half an epoch since the checkpoint
            os.kill(_pid_of_rank(out, 2), 9)
            if run.wait() != 0:
                raise SystemExit(f"{label}: ktrain exited with {run.returncode}")
            history = json.loads((out / "summary.json").read_text())["world_size_history"]
            rows += [(label if i == 1 else "", h) for i, h in enumerate(history) if i]
    print("| run | re-formed | size | seconds to its first step | steps lost |")
    print("|---|---|---|---|---|")
    for label, h in rows:
        print(f"| {label} | {h['kind']} | {h['size']} | {h['seconds']:.1f} | "
              f"{h.get('steps_lost', '-')} |")


def _epoch_seconds(out: Path, epoch: int) -> float:
    """How long epoch ``epoch`` took, from metrics.csv."""
    import csv

    while True:
        with open(out / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        if len(rows) >= epoch:
            return float(rows[epoch - 1]["epoch_seconds"])
        time.sleep(0.05)


def _pid_of_rank(out: Path, rank: int) -> int:
    """The pid a rank's log says it runs as ("rank r of n joined (..., pid N, ...)")."""
    import re

    log = out / "logs" / f"rank-{rank}.log"
    while not (log.exists() and re.search(r"pid (\d+)", log.read_text())):
        time.sleep(0.05)
    return int(re.search(r"pid (\d+)", log.read_text()).group(1))


STREAMING_TRAIN = {"epochs": 2, "global_batch_size": 256, "shuffle": True, "seed": 0,
                   "shuffle_buffer": 10000, "optimizer": {"name": "adam", "learning_rate": 0.001},
                   "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}


def hand_written_streaming(config_path: str) -> dict:
    """Baseline: the tf.data pipeline a user would write over the files, and model.fit."""
    import glob
    import resource

    import keras
    import pyarrow.parquet as pq
    import tensorflow as tf

    from ktrain.config import load_config
    from ktrain.userfn import load_function
    from ktrain.assembly import compile_from_config

    run = load_config(config_path)
    train, width = run.train, run.model.kwargs["width"]
    files = sorted(glob.glob(run.data.files))
    keras.utils.set_random_seed(train.seed)
    if files[0].endswith(".parquet"):
        def batches():
            for path in files:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                    x = batch.column("pixels").flatten().to_numpy().reshape(len(batch), width)
                    yield x, batch.column("label").to_numpy()

        spec = (tf.TensorSpec((None, width), tf.float32), tf.TensorSpec((None,), tf.int64))
        data = tf.data.Dataset.from_generator(batches, output_signature=spec).unbatch()
        data = data.shuffle(train.shuffle_buffer, seed=train.seed).batch(
            train.global_batch_size, drop_remainder=True)
    else:
        features = {"pixels": tf.io.FixedLenFeature([width], tf.float32),
                    "label": tf.io.FixedLenFeature([], tf.int64)}

        def parse(records):
            parsed = tf.io.parse_example(records, features)
            return parsed["pixels"], parsed["label"]

        data = tf.data.TFRecordDataset(files).shuffle(train.shuffle_buffer, seed=train.seed) \
            .batch(train.global_batch_size, drop_remainder=True).map(parse, tf.data.AUTOTUNE)
    data = data.prefetch(tf.data.AUTOTUNE)
    model = load_function(run.model.fn, "model.fn", run.base_dir)(**run.model.kwargs)
    compile_from_config(model, train)
    first = []
    step = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: first or first.append(time.perf_counter()))
    model.fit(data, epochs=train.epochs, verbose=0, callbacks=[step])
    ended = time.perf_counter()
    steps = sum(1 for _ in data) * train.epochs
    return {"samples_per_second": (steps - 1) * train.global_batch_size / (ended - first[0]),
            "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_streaming(rows: int, width: int, repeats: int) -> None:
    import yaml

    sys.path.insert(0, os.path.join(REPO, "configs"))
    from streaming import write_synthetic

    print("| format | run | samples/s | ratio to hand-written | peak memory per process (MiB) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("parquet", "tfrecord"):
            files = write_synthetic(Path(tmp) / fmt, fmt, rows=rows, width=width)
            config = os.path.join(tmp, f"{fmt}.yaml")
            with open(config, "w") as f:
                yaml.safe_dump({
                    "model": {"fn": f"{REPO}/configs/streaming.py:build_model",
                              "kwargs": {"width": width}},
                    "data": {"files": files, "features": ["pixels"], "label": "label"},
                    "train": STREAMING_TRAIN,
                    "strategy": {"name": "mirrored", "devices": 1}}, f)
            runs = {"hand-written tf.data + model.fit, 1 process": None,
                    "ktrain data.files, 1 process": [],
                    "ktrain data.files, 2 workers (multiworker)":
                        ["strategy={name: multiworker, workers: 2}"]}
            best: dict[str, tuple[float, float]] = {}
            for round_ in range(repeats):
                for index, (label, extra) in enumerate(runs.items()):
                    if extra is None:
                        result = subprocess.run(
                            [sys.executable, __file__, "--hand-written-streaming", config],
                            check=True, cwd=REPO, env=_env(), capture_output=True, text=True)
                        measured = json.loads(result.stdout.strip().splitlines()[-1])
                        speed, memory = measured["samples_per_second"], measured["peak_memory_mib"]
                    else:
                        summary = _ktrain(config, extra, os.path.join(tmp, f"{fmt}-{round_}-{index}"))
                        speed, memory = summary["samples_per_second"], max(summary["peak_memory_mib"])
                    if speed > best.get(label, (0.0, 0.0))[0]:
                        best[label] = (speed, memory)
            baseline = next(iter(best.values()))[0]
            for label, (speed, memory) in best.items():
                print(f"| {fmt} | {label} | {speed:.0f} | {speed / baseline:.3f} | {memory:.0f} |",
                      flush=True)


def bench_ray_train(config: str, overrides: list[str]) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, strategy in (("ktrain ray, 1 worker", "{name: ray, workers: 1}"),
                                ("ktrain multiworker, 1 worker", "{name: multiworker, workers: 1}")):
            launched = time.time()
            summary = _ktrain(config, [*overrides, f"strategy={strategy}"],
                              os.path.join(tmp, str(len(rows))))
            rows.append((label, summary["samples_per_second"],
                         summary["first_step_unix_time"] - launched))
    result = subprocess.run([sys.executable, __file__, "--ray-train-worker", config, *overrides],
                            check=True, cwd=REPO, env=_env(), capture_output=True, text=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    rows.append(("Ray Train TensorflowTrainer, 1 worker", measured["samples_per_second"],
                 measured["first_step"]))
    print("| run | samples/s | ratio to Ray Train | first step after launch (s) |")
    print("|---|---|---|---|")
    for label, speed, first in rows:
        print(f"| {label} | {speed:.1f} | {speed / rows[-1][1]:.2f} | {first:.1f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--plain":
        print(json.dumps(plain_keras(sys.argv[2], sys.argv[3:])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--allreduce-worker":
        allreduce_worker(sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--step-breakdown-worker":
        step_breakdown_worker(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--hand-written-streaming":
        print(json.dumps(hand_written_streaming(sys.argv[2])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--ray-train-worker":
        print(json.dumps(ray_train_tensorflow(sys.argv[2], sys.argv[3:])))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*")
    parser.add_argument("--allreduce", action="store_true", help="communicator bandwidth")
    parser.add_argument("--workers", action="store_true", help="1 vs 2 worker processes")
    parser.add_argument("--scaling", type=int, metavar="N",
                        help="weak scaling: 1 process vs N workers, one thread each")
    parser.add_argument("--spark-master", action="append", default=[], metavar="URL",
                        help="with --workers: also 2 spark workers on this cluster")
    parser.add_argument("--ray-train", action="store_true",
                        help="ktrain's ray strategy next to Ray Train's TensorflowTrainer")
    parser.add_argument("--preemption", type=int, metavar="STEPS",
                        help="cost of checkpoints every STEPS steps, stop flags and watchdog")
    parser.add_argument("--elastic", action="store_true",
                        help="a worker of 3 lost: elastic, restarted, restarted under MPI")
    parser.add_argument("--sharding", type=int, metavar="DEVICES",
                        help="each strategy.shard mode on DEVICES JAX devices")
    parser.add_argument("--streaming", action="store_true",
                        help="data.files next to a hand-written tf.data pipeline")
    parser.add_argument("--rows", type=int, default=200_000, help="with --streaming")
    parser.add_argument("--width", type=int, default=256, help="with --streaming")
    parser.add_argument("--set", action="append", default=[], metavar="key.path=value",
                        help="override applied to both runs of every config")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", help="also write the throughput rows here")
    args = parser.parse_args()
    if args.allreduce:
        bench_allreduce(args.repeats)
    if args.workers:
        for config in args.configs:
            bench_workers(os.path.abspath(config), args.set, args.spark_master)
    if args.scaling:
        for config in args.configs:
            bench_scaling(os.path.abspath(config), args.set, args.scaling, args.repeats)
    if args.ray_train:
        for config in args.configs:
            bench_ray_train(os.path.abspath(config), args.set)
    if args.preemption:
        for config in args.configs:
            bench_preemption(os.path.abspath(config), args.set, args.preemption, args.repeats)
    if args.sharding:
        for config in args.configs:
            bench_sharding(os.path.abspath(config), args.set, args.sharding, args.repeats)
    if args.streaming:
        bench_streaming(args.rows, args.width, args.repeats)
    if args.elastic:
        for config in args.configs:
            bench_elastic(os.path.abspath(config), args.set)
    if (args.allreduce or args.workers or args.scaling or args.ray_train or args.preemption
            or args.streaming or args.elastic or args.sharding or not args.configs):
        return
    rows = [compare(os.path.abspath(c), args.set, args.repeats) for c in args.configs]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
