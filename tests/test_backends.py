"""The same configs on Keras' JAX and torch backends: equal weights on 1 and N replicas under
every strategy that runs there, the same accuracy as on TensorFlow, and checkpoints and saved
models that move between the backends."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import (KTRAIN, REPO, assert_quiet_console, assert_same_weights, base_config,
                     run_cli, run_command, write_config)

pytest.importorskip("jax", reason="JAX is not installed: bash scripts/setup.sh")

JAX = {"backend": "jax"}
NEEDS_TORCH = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch is not installed: bash scripts/setup.sh")


def on(backend: str, *values):
    """Parameters of a test on ``backend`` (skipped where it is not installed)."""
    return pytest.param(backend, *values, marks=[NEEDS_TORCH] if backend == "torch" else [],
                        id="-".join([backend, *(v["name"] if isinstance(v, dict) else str(v)
                                                for v in values)]))


def config_file(tmp_path, name: str, **sections):
    """``base_config`` (output in tmp_path/name) as tmp_path/name.yaml; a strategy or data
    section replaces the default one whole."""
    config = base_config(tmp_path / name, **sections)
    config.update({key: sections[key] for key in ("strategy", "data") if key in sections})
    return write_config(tmp_path / f"{name}.yaml", config)


def train(tmp_path, name: str, *overrides: str, **sections) -> dict:
    """A finished run of ``config_file`` in tmp_path/name; its summary."""
    out = tmp_path / name
    config = config_file(tmp_path, name, **sections)
    result = run_cli("run", config, "-q", *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The reference of a backend: one process on one device (run once per module)."""
    done = {}

    def get(backend: str):
        if backend not in done:
            folder = tmp_path_factory.mktemp(f"{backend}-reference")
            summary = train(folder, "out", backend=backend)
            assert (summary["backend"], summary["num_replicas"]) == (backend, 1)
            done[backend] = folder / "out"
        return done[backend]

    return get


@pytest.fixture(scope="module")
def one_jax_device(one_device):
    return one_device("jax")


@pytest.mark.parametrize("backend, strategy", [
    on(backend, strategy) for backend in ("jax", "torch") for strategy in (
        {"name": "mirrored", "devices": 2}, {"name": "multiworker", "workers": 2},
        {"name": "spark", "workers": 2, "master": "local[2]"}, {"name": "ray", "workers": 2})])
def test_two_replicas_match_one_device_on_jax_and_torch(tmp_path, one_device, backend,
                                                        strategy):
    if strategy["name"] in ("spark", "ray"):
        pytest.importorskip("pyspark" if strategy["name"] == "spark" else "ray",
                            reason=f"{strategy['name']} is not installed: bash scripts/setup.sh")
    result = run_cli("run", config_file(tmp_path, "out", strategy=strategy, backend=backend))
    one_process = strategy["name"] == "mirrored" and backend == "jax"  # torch: one per device
    assert_quiet_console(result, tmp_path / "out", 1 if one_process else 2)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["backend"], summary["num_replicas"]) == (backend, 2)
    assert_same_weights(one_device(backend), tmp_path / "out")


@NEEDS_TORCH
def test_two_torchrun_ranks_match_one_device(tmp_path, one_device):
    """Under torchrun ktrain reads its variables (RANK, WORLD_SIZE, MASTER_ADDR) as any
    scheduler's: its process group is its own, beside torchrun's store."""
    out = tmp_path / "out"
    config = config_file(tmp_path, "out", strategy={"name": "multiworker"}, backend="torch")
    torchrun = Path(sys.executable).parent / "torchrun"
    result = run_command([torchrun, "--standalone", "--nproc-per-node", "2", "--no-python",
                          KTRAIN, "run", config, "-q"])
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["transport"]) == (2, "torch.distributed")
    assert_same_weights(one_device("torch"), out)


def quickstart(tmp_path, *overrides: str) -> dict:
    """The README's quickstart (as `ktrain init` writes it), a few epochs."""
    project = tmp_path / "project"
    if not project.exists():
        assert run_cli("init", project).returncode == 0
    out = tmp_path / overrides[0].partition("=")[2]
    result = run_cli("run", project / "config.yaml", f"output_dir={out}", "train.epochs=5", "-q",
                     *overrides[1:])
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def tensorflow_quickstart(tmp_path_factory) -> dict:
    return quickstart(tmp_path_factory.mktemp("quickstart"), "output_dir=tf")


@pytest.mark.parametrize("backend", [on("jax"), on("torch")])
def test_jax_and_torch_reach_tensorflows_accuracy_on_the_quickstart(tmp_path, backend,
                                                                    tensorflow_quickstart):
    on_tf, other = tensorflow_quickstart, quickstart(tmp_path, f"output_dir={backend}",
                                                     f"backend={backend}")
    assert (on_tf["backend"], other["backend"]) == ("tensorflow", backend)
    assert on_tf["final_metrics"]["val_accuracy"] > 0.9
    assert abs(on_tf["final_metrics"]["val_accuracy"]
               - other["final_metrics"]["val_accuracy"]) <= 0.02


@pytest.mark.parametrize("chain", [
    ("tensorflow", "jax"), ("jax", "tensorflow"),
    pytest.param(("tensorflow", "torch", "jax"), marks=NEEDS_TORCH)], ids="-".join)
def test_a_checkpoint_resumes_on_another_backend(tmp_path, single_process_run, one_jax_device,
                                                 chain):
    """The run's last epoch on the chain's last backend, each before it on the one before:
    the same weights as the 3 epochs on the first (whose seed drew the initial weights; the
    backends round slightly differently)."""
    config = base_config(tmp_path / "moved", backend=chain[0])
    path = write_config(tmp_path / "moved.yaml", config)
    for epochs, backend in enumerate(chain, start=4 - len(chain)):
        done = run_cli("run", path, f"backend={backend}", f"train.epochs={epochs}")
        assert done.returncode == 0, done.stdout + done.stderr
        if backend != chain[0]:
            assert f"resuming from the checkpoint after epoch {epochs - 1}" in done.stdout
    summary = json.loads((tmp_path / "moved" / "summary.json").read_text())
    assert (summary["backend"], summary["epochs_completed"]) == (chain[-1], 3)
    unbroken = single_process_run("mlp") if chain[0] == "tensorflow" else one_jax_device
    assert_same_weights(unbroken, tmp_path / "moved", atol=1e-4)


@pytest.mark.parametrize("backend", [on("jax"), on("torch")])
def test_a_model_saved_on_jax_or_torch_predicts_the_same_under_every_backend(tmp_path,
                                                                             one_device, backend):
    model = one_device(backend) / "model.keras"
    inputs = np.random.default_rng(0).random((16, 64), dtype=np.float32)
    np.save(tmp_path / "inputs.npy", inputs)
    predict = ("import sys, numpy as np, keras; "
               "m = keras.saving.load_model(sys.argv[1]); "
               "np.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0))")
    loaded_on = ["tensorflow", "jax"] + (["torch"] if backend == "torch" else [])
    for loader in loaded_on:
        done = subprocess.run([sys.executable, "-c", predict, model, tmp_path / "inputs.npy",
                               tmp_path / f"{loader}.npy"], cwd=REPO, capture_output=True,
                              text=True, env=dict(os.environ, KERAS_BACKEND=loader))
        assert done.returncode == 0, done.stderr
    for loader in loaded_on[1:]:
        np.testing.assert_allclose(np.load(tmp_path / "tensorflow.npy"),
                                   np.load(tmp_path / f"{loader}.npy"), atol=1e-6)


@pytest.mark.parametrize("config, env, expected", [
    ({"strategy": {"name": "horovod", "workers": 2}, **JAX}, {},
     ["strategy.name: the horovod strategy runs on the TensorFlow backend only",
      "HINT: use strategy.name: multiworker"]),
    ({"strategy": {"name": "multiworker", "communicator": "mpi"}, **JAX}, {},
     ["strategy.communicator: communicator: mpi runs on the TensorFlow backend only"]),
    ({"strategy": {"name": "multiworker", "compression": "fp16"}, **JAX}, {},
     ["strategy.compression: compression: fp16 runs on the TensorFlow backend only"]),
    pytest.param({"strategy": {"name": "horovod", "workers": 2}, "backend": "torch"}, {},
                 ["strategy.name: the horovod strategy runs on the TensorFlow backend only",
                  "which on torch joins the workers with torch.distributed"],
                 marks=NEEDS_TORCH, id="torch-horovod"),
    ({"backend": "tensorflow"}, {"KERAS_BACKEND": "jax"},
     ["backend: the config says backend: tensorflow, but KERAS_BACKEND is 'jax'",
      "HINT: remove one of them"]),
    ({}, {"KERAS_BACKEND": "mxnet"},
     ["KERAS_BACKEND: KERAS_BACKEND is 'mxnet'; ktrain trains on tensorflow, jax, torch"]),
])
def test_what_a_backend_cannot_do_is_a_user_error(tmp_path, config, env, expected):
    result = run_cli("run", config_file(tmp_path, "out", **config), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    for text in expected:
        assert text in result.stderr, result.stderr


def test_ktrain_env_reports_the_backend():
    shown = subprocess.run([KTRAIN, "env"], capture_output=True, text=True,
                           env=dict(os.environ, KERAS_BACKEND="jax"))
    assert shown.returncode == 0, shown.stderr
    assert "backend         jax (from KERAS_BACKEND" in shown.stdout


@pytest.mark.parametrize("backend", [on("jax"), on("torch")])
def test_sigterm_stops_jax_or_torch_workers_at_one_step_and_the_rerun_resumes(
        tmp_path, background, backend):
    """The stop flags travel between JAX and torch processes too: every rank stops after the
    same step, with a checkpoint there, and the re-run ends the next epoch with the unbroken
    run's weights."""
    from test_preemption import long_run, stop_with_sigterm

    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", {**long_run(out, "tf-collectives", epochs=20),
                                                "backend": backend})
    newest = stop_with_sigterm(background("run", config), out)
    epochs = newest.epoch + 1
    result = run_cli("run", config, f"train.epochs={epochs}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from the checkpoint {newest}" in result.stdout
    unbroken = long_run(tmp_path / "unbroken", "mirrored", epochs=epochs)
    result = run_cli("run", write_config(tmp_path / "u.yaml", {**unbroken, "backend": backend}),
                     "-q")
    assert result.returncode == 0, result.stderr
    assert_same_weights(tmp_path / "unbroken", out, atol=1e-6)


WITHOUT_TENSORFLOW = {"PYTHONPATH": str(REPO / "tests" / "fixtures" / "without_tensorflow")}
"""As on a machine with JAX only (the GPU machine): ``import tensorflow`` fails."""


@pytest.fixture(scope="module")
def one_device_without_tensorflow(tmp_path_factory):
    done = {}

    def get(backend: str):
        if backend not in done:
            folder = tmp_path_factory.mktemp(f"{backend}-without-tf")
            config = config_file(folder, "out", train={"shuffle": True}, backend=backend)
            result = run_cli("run", config, "-q", env=WITHOUT_TENSORFLOW)
            assert result.returncode == 0, result.stderr
            done[backend] = folder / "out"
        return done[backend]

    return get


@pytest.mark.parametrize("backend, strategy", [
    on("jax", {"name": "mirrored", "devices": 2}), on("jax", {"name": "multiworker", "workers": 2}),
    on("torch", {"name": "multiworker", "workers": 2})])
def test_without_tensorflow_numpy_feeds_jax_and_torch_the_same_global_batches(
        tmp_path, one_device_without_tensorflow, backend, strategy):
    """Arrays in memory need no tf.data: shuffled by NumPy, 2 replicas still see 1 device's
    global batches."""
    config = config_file(tmp_path, "out", train={"shuffle": True}, strategy=strategy,
                         backend=backend)
    result = run_cli("run", config, "-q", env=WITHOUT_TENSORFLOW)
    assert result.returncode == 0, result.stderr
    assert_same_weights(one_device_without_tensorflow(backend), tmp_path / "out")


@NEEDS_TORCH
def test_without_tensorflow_parquet_streams_to_two_torch_workers_as_to_one(tmp_path):
    """pyarrow reads Parquet where TensorFlow is not installed: shuffled, 2 workers train on
    1 process' global batches, and the audit finds each epoch's examples read once; TFRecord
    (which needs TensorFlow to parse) says what to install."""
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    from file_datasets import PIXELS, write_digits

    train_files, validation_files = write_digits(tmp_path / "files", "parquet", files=4)
    data = {"files": train_files, "validation_files": validation_files, "features": PIXELS,
            "label": "label", "audit": True}
    for name, strategy in (("one", {"name": "mirrored", "devices": 1}),
                           ("two", {"name": "multiworker", "workers": 2})):
        config = config_file(tmp_path, name, data=data, train={"shuffle": True},
                             strategy=strategy, backend="torch")
        result = run_cli("run", config, "-q", env=WITHOUT_TENSORFLOW)
        assert result.returncode == 0, result.stdout + result.stderr
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["data_audit"] == {"epochs_checked": 3} and two["world_size"] == 2
    assert two["final_metrics"]["val_accuracy"] > 0.5
    assert_same_weights(tmp_path / "one", tmp_path / "two")

    (tmp_path / "train.tfrecord").write_bytes(b"")
    config = config_file(tmp_path, "out", data={**data, "files": str(tmp_path / "train.tfrecord")},
                         backend="torch")
    result = run_cli("run", config, env=WITHOUT_TENSORFLOW)
    assert result.returncode == 2, result.stdout + result.stderr
    assert ("data: a dataset in tfrecord files is read through TensorFlow's tf.data, and "
            "TensorFlow is not installed") in result.stderr
    assert "HINT: pip install tensorflow-cpu" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("backend", [on("jax"), on("torch")])
def test_the_gpu_check_runs_where_tensorflow_is_not_installed(tmp_path, backend):
    """scripts/gpu_check.sh --smoke: the GPU check's steps, tiny, on the CPU, without
    TensorFlow; it writes ktrain env and both runs' images/s, ratio and first-step times."""
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", "--backend", backend],
                          cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
                                   **WITHOUT_TENSORFLOW))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert any(line.startswith(f"backend         {backend}") for line in report["ktrain_env"])
    assert report["backend"] == backend
    [row] = report["throughput"]
    assert row["plain_samples_per_second"] > 0 and row["ktrain_samples_per_second"] > 0
    assert row["ratio"] == pytest.approx(row["ktrain_samples_per_second"]
                                         / row["plain_samples_per_second"], rel=0.01)
    assert row["plain_first_step_s"] > 0 and row["ktrain_first_step_s"] > 0


@pytest.mark.parametrize("backend", [on("jax"), on("torch")])
def test_a_stalled_jax_or_torch_rank_is_named_with_its_stack(tmp_path, background, backend):
    """The stall watchdog counts the steps whose stop flags a JAX or torch rank offered."""
    from test_preemption import assert_stall_reported, hanging_rank_one

    config, marker = hanging_rank_one(tmp_path, {"name": "multiworker", "workers": 2})
    assert_stall_reported(background("run", config, f"backend={backend}"), marker)
