"""Crashes and interruptions: a re-run of the same command resumes and finishes, and no
checkpoint left behind is unreadable."""

import csv
import json
import os
import signal

import keras
import numpy as np

from helpers import FIXTURES, base_config, run_cli, write_config
from ktrain.checkpoint import CheckpointStore


def checkpoints(out):
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def epochs_in_metrics(out):
    with open(out / "metrics.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_sigkill_mid_training_then_rerun_matches_an_uninterrupted_run(tmp_path, background):
    """With shuffling and dropout on, so data order and RNG state must both be restored. The
    killed run's newest checkpoint is then cut short (a failed copy): the re-run takes over the
    dead run's lease, skips that checkpoint with a warning and resumes from the one before."""
    sections = dict(model={"fn": f"{FIXTURES}:mlp", "kwargs": {"hidden": 32, "dropout": 0.2}},
                    train={"epochs": 30, "shuffle": True})
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    config = write_config(tmp_path / "killed.yaml", base_config(killed, **sections))
    run = background("run", config, "-q")
    run.wait_for(lambda: "ckpt-000004.npz" in checkpoints(killed))
    run.signal(signal.SIGKILL)
    store = CheckpointStore(str(killed / "checkpoints"))
    *_, before_newest, newest = store.positions()
    damaged = store.file_for(newest)
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    resumed_from = before_newest.epoch
    assert newest.epoch < 30

    result = run_cli("run", config)
    assert result.returncode == 0, result.stderr
    assert f"skipping the damaged checkpoint {damaged}" in result.stderr
    assert f"taking over output_dir '{killed}' from run" in result.stderr
    assert "on this host has ended" in result.stderr
    assert f"resuming from the checkpoint after epoch {resumed_from}" in result.stdout
    summary = json.loads((killed / "summary.json").read_text())
    assert (summary["epochs_completed"], summary["resumed_from_epoch"]) == (30, resumed_from)
    assert epochs_in_metrics(killed) == list(range(1, 31))

    result = run_cli("run", write_config(tmp_path / "straight.yaml",
                                         base_config(straight, **sections)), "-q")
    assert result.returncode == 0, result.stderr
    for a, b in zip(keras.saving.load_model(straight / "model.keras").get_weights(),
                    keras.saving.load_model(killed / "model.keras").get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_sigkill_during_a_checkpoint_write(tmp_path, background):
    out = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", base_config(
        out, model={"fn": f"{FIXTURES}:wide", "kwargs": {"width": 3000}},
        train={"epochs": 4, "optimizer": {"name": "adam", "learning_rate": 0.001}}))
    run = background("run", config, "-q")
    run.wait_for(lambda: any(name.startswith(".tmp-") for name in checkpoints(out)),
                 interval=0.002)
    run.signal(signal.SIGKILL)
    store = CheckpointStore(str(out / "checkpoints"))
    for position in store.positions():  # whatever was committed is complete
        assert store.load(store.file_for(position)).position == position

    result = run_cli("run", config, "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 4
    assert not [name for name in checkpoints(out) if name.startswith(".tmp-")]


def test_ctrl_c_stops_cleanly_and_the_run_resumes(tmp_path, background):
    out = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", base_config(out, train={"epochs": 40}))
    run = background("run", config)
    run.wait_for(lambda: "ckpt-000002.npz" in checkpoints(out))
    output = run.signal(signal.SIGINT)
    assert run.process.returncode == 130
    assert "stopped by SIGINT" in output and "run the same command again to resume" in output
    assert "Traceback" not in output
    result = run_cli("run", config, "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 40
