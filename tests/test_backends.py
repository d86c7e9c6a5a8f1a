"""The same configs on Keras' JAX backend: equal weights on 1 and N replicas under every
strategy that runs on JAX, the same accuracy as on TensorFlow, and checkpoints and saved
models that move between the backends."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import (KTRAIN, REPO, assert_quiet_console, assert_same_weights, base_config,
                     run_cli, write_config)

pytest.importorskip("jax", reason="JAX is not installed: bash scripts/setup.sh")

JAX = {"backend": "jax"}


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
def one_jax_device(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jax-reference")
    summary = train(folder, "out", **JAX)
    assert (summary["backend"], summary["num_replicas"]) == ("jax", 1)
    return folder / "out"


@pytest.mark.parametrize("strategy", [
    {"name": "mirrored", "devices": 2},
    {"name": "multiworker", "workers": 2},
    pytest.param({"name": "spark", "workers": 2, "master": "local[2]"}, id="spark"),
    pytest.param({"name": "ray", "workers": 2}, id="ray"),
], ids=lambda s: s["name"])
def test_two_jax_replicas_match_one_jax_device(tmp_path, one_jax_device, strategy):
    if strategy["name"] in ("spark", "ray"):
        pytest.importorskip("pyspark" if strategy["name"] == "spark" else "ray",
                            reason=f"{strategy['name']} is not installed: bash scripts/setup.sh")
    result = run_cli("run", config_file(tmp_path, "out", strategy=strategy, **JAX))
    assert_quiet_console(result, tmp_path / "out", 1 if strategy["name"] == "mirrored" else 2)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["backend"], summary["num_replicas"]) == ("jax", 2)
    assert_same_weights(one_jax_device, tmp_path / "out")


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


def test_tensorflow_and_jax_reach_the_same_accuracy_on_the_quickstart(tmp_path):
    on_tf = quickstart(tmp_path, "output_dir=tf")
    on_jax = quickstart(tmp_path, "output_dir=jax", "backend=jax")
    assert (on_tf["backend"], on_jax["backend"]) == ("tensorflow", "jax")
    assert on_tf["final_metrics"]["val_accuracy"] > 0.9
    assert abs(on_tf["final_metrics"]["val_accuracy"]
               - on_jax["final_metrics"]["val_accuracy"]) <= 0.02


@pytest.mark.parametrize("first, then", [("tensorflow", "jax"), ("jax", "tensorflow")])
def test_a_checkpoint_resumes_on_the_other_backend(tmp_path, single_process_run, one_jax_device,
                                                   first, then):
    """Epochs 1-2 on one backend, epoch 3 on the other: the same weights as 3 epochs on the
    first (whose seed drew the initial weights; the backends round slightly differently)."""
    config = base_config(tmp_path / "moved", backend=first, train={"epochs": 2})
    path = write_config(tmp_path / "moved.yaml", config)
    assert run_cli("run", path, "-q").returncode == 0
    resumed = run_cli("run", path, f"backend={then}", "train.epochs=3")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from the checkpoint after epoch 2" in resumed.stdout
    summary = json.loads((tmp_path / "moved" / "summary.json").read_text())
    assert (summary["backend"], summary["epochs_completed"]) == (then, 3)
    unbroken = single_process_run("mlp") if first == "tensorflow" else one_jax_device
    assert_same_weights(unbroken, tmp_path / "moved", atol=1e-4)


def test_a_model_saved_on_jax_predicts_the_same_under_tensorflow(tmp_path, one_jax_device):
    model = one_jax_device / "model.keras"
    inputs = np.random.default_rng(0).random((16, 64), dtype=np.float32)
    np.save(tmp_path / "inputs.npy", inputs)
    predict = ("import sys, numpy as np, keras; "
               "m = keras.saving.load_model(sys.argv[1]); "
               "np.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0))")
    for backend in ("jax", "tensorflow"):
        done = subprocess.run([sys.executable, "-c", predict, model, tmp_path / "inputs.npy",
                               tmp_path / f"{backend}.npy"], cwd=REPO, capture_output=True,
                              text=True, env=dict(os.environ, KERAS_BACKEND=backend))
        assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "tensorflow.npy"),
                               np.load(tmp_path / "jax.npy"), atol=1e-6)


@pytest.mark.parametrize("config, env, expected", [
    ({"strategy": {"name": "horovod", "workers": 2}, **JAX}, {},
     ["strategy.name: the horovod strategy runs on the TensorFlow backend only",
      "HINT: use strategy.name: multiworker"]),
    ({"strategy": {"name": "multiworker", "communicator": "mpi"}, **JAX}, {},
     ["strategy.communicator: communicator: mpi runs on the TensorFlow backend only"]),
    ({"strategy": {"name": "multiworker", "compression": "fp16"}, **JAX}, {},
     ["strategy.compression: compression: fp16 runs on the TensorFlow backend only"]),
    ({"backend": "tensorflow"}, {"KERAS_BACKEND": "jax"},
     ["backend: the config says backend: tensorflow, but KERAS_BACKEND is 'jax'",
      "HINT: remove one of them"]),
    ({}, {"KERAS_BACKEND": "torch"},
     ["KERAS_BACKEND: KERAS_BACKEND is 'torch'; ktrain trains on tensorflow or jax"]),
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


def test_sigterm_stops_jax_workers_at_one_step_and_the_rerun_resumes(tmp_path, background):
    """The stop flags travel between JAX processes too: every rank stops after the same step,
    with a checkpoint there, and the re-run ends the next epoch with the unbroken run's
    weights."""
    from test_preemption import long_run, stop_with_sigterm

    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", {**long_run(out, "tf-collectives", epochs=20),
                                                **JAX})
    newest = stop_with_sigterm(background("run", config), out)
    epochs = newest.epoch + 1
    result = run_cli("run", config, f"train.epochs={epochs}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from the checkpoint {newest}" in result.stdout
    unbroken = long_run(tmp_path / "unbroken", "mirrored", epochs=epochs)
    result = run_cli("run", write_config(tmp_path / "u.yaml", {**unbroken, **JAX}), "-q")
    assert result.returncode == 0, result.stderr
    assert_same_weights(tmp_path / "unbroken", out, atol=1e-6)


WITHOUT_TENSORFLOW = {"PYTHONPATH": str(REPO / "tests" / "fixtures" / "without_tensorflow")}
"""As on a machine with JAX only (the GPU machine): ``import tensorflow`` fails."""


@pytest.fixture(scope="module")
def one_device_without_tensorflow(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jax-without-tf")
    config = config_file(folder, "out", train={"shuffle": True}, **JAX)
    result = run_cli("run", config, "-q", env=WITHOUT_TENSORFLOW)
    assert result.returncode == 0, result.stderr
    return folder / "out"


@pytest.mark.parametrize("strategy", [{"name": "mirrored", "devices": 2},
                                      {"name": "multiworker", "workers": 2}],
                         ids=lambda s: s["name"])
def test_without_tensorflow_numpy_feeds_jax_the_same_global_batches(
        tmp_path, one_device_without_tensorflow, strategy):
    """Arrays in memory need no tf.data: shuffled by NumPy, 2 replicas still see 1 device's
    global batches."""
    config = config_file(tmp_path, "out", train={"shuffle": True}, strategy=strategy, **JAX)
    result = run_cli("run", config, "-q", env=WITHOUT_TENSORFLOW)
    assert result.returncode == 0, result.stderr
    assert_same_weights(one_device_without_tensorflow, tmp_path / "out")


def test_without_tensorflow_files_say_what_to_install(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"")
    config = config_file(tmp_path, "out", data={"files": str(tmp_path / "train.parquet"),
                                                "features": ["x"], "label": "y"}, **JAX)
    result = run_cli("run", config, env=WITHOUT_TENSORFLOW)
    assert result.returncode == 2, result.stdout + result.stderr
    assert ("data: a dataset in files is read through TensorFlow's tf.data, and TensorFlow is "
            "not installed") in result.stderr
    assert "HINT: pip install tensorflow-cpu" in result.stderr and "Traceback" not in result.stderr


def test_the_gpu_check_runs_where_only_jax_is_installed(tmp_path):
    """scripts/gpu_check.sh --smoke: the GPU check's steps, tiny, on the CPU, without
    TensorFlow; it writes ktrain env and both runs' images/s, ratio and first-step times."""
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
                                   **WITHOUT_TENSORFLOW))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert any(line.startswith("backend         jax") for line in report["ktrain_env"])
    [row] = report["throughput"]
    assert row["plain_samples_per_second"] > 0 and row["ktrain_samples_per_second"] > 0
    assert row["ratio"] == pytest.approx(row["ktrain_samples_per_second"]
                                         / row["plain_samples_per_second"], rel=0.01)
    assert row["plain_first_step_s"] > 0 and row["ktrain_first_step_s"] > 0


def test_a_stalled_jax_rank_is_named_with_its_stack(tmp_path, background):
    """The stall watchdog counts the steps whose stop flags a JAX rank offered."""
    from test_preemption import assert_stall_reported, hanging_rank_one

    config, marker = hanging_rank_one(tmp_path, {"name": "multiworker", "workers": 2})
    assert_stall_reported(background("run", config, "backend=jax"), marker)
