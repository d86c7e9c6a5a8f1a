"""The spark strategy on a real local Spark (local[2], loopback only)."""

import json
import os
import re
import signal
import time

import keras
import numpy as np
import pytest

from helpers import FIXTURES, base_config, run_cli, write_config

pytest.importorskip("pyspark", reason="pyspark is not installed: bash scripts/setup.sh installs it")


def spark(out, strategy=None, **sections):
    config = base_config(out, **sections)
    config["strategy"] = {"name": "spark", "workers": 2, **(strategy or {})}
    return config


def test_two_barrier_tasks_match_one_process(tmp_path, single_process_run):
    out = tmp_path / "out"
    result = run_cli("run", write_config(tmp_path / "c.yaml", spark(out)), "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["strategy"], summary["world_size"], summary["epochs_completed"]) == ("spark", 2, 3)
    reference = keras.saving.load_model(single_process_run("mlp") / "model.keras").get_weights()
    for a, b in zip(reference, keras.saving.load_model(out / "model.keras").get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert "epoch 3/3" in (out / "logs" / "rank-1.log").read_text()


def test_too_few_slots_for_the_barrier_stage(tmp_path):
    config = spark(tmp_path / "out", {"workers": 4, "master": "local[2]"},
                   train={"global_batch_size": 64})
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    assert result.returncode == 2
    assert "a barrier stage of 4 tasks needs 4 task slots; local[2] has 2" in result.stderr


def worker_pid(out, rank):
    log = out / "logs" / f"rank-{rank}.log"
    found = re.findall(r"rank \d of \d joined .*pid (\d+)", log.read_text()) if log.exists() else []
    return int(found[-1]) if found else None


@pytest.mark.parametrize("restarts", [0, 1])
def test_killed_task_fails_clearly_or_restarts(tmp_path, background, restarts):
    out = tmp_path / "out"
    epochs = 400 if restarts == 0 else 40
    config = write_config(tmp_path / "c.yaml", spark(out, {"max_restarts": restarts},
                                                      train={"epochs": epochs}))
    run = background("run", config)
    run.wait_for(lambda: (out / "checkpoints" / "ckpt-000002.npz").exists() and worker_pid(out, 1),
                 timeout=180)
    os.kill(worker_pid(out, 1), signal.SIGKILL)
    killed = time.monotonic()
    run.process.wait(timeout=300)
    output = run.process.stdout.read()
    if restarts == 0:
        assert time.monotonic() - killed < 60
        assert run.process.returncode == 1, output
        assert "rank 1 was killed by SIGKILL" in output and "rank-1.log" in output
    else:
        assert run.process.returncode == 0, output
        assert "restarting all workers from the newest checkpoint" in output
        assert json.loads((out / "summary.json").read_text())["epochs_completed"] == epochs
