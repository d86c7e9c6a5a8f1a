"""`ktrain run` with the mirrored strategy, end to end in real processes."""

import json

import keras
import numpy as np
import pytest

from helpers import FIXTURES, REPO, base_config, run_cli, write_config


def final_weights(output_dir):
    return keras.saving.load_model(output_dir / "model.keras").get_weights()


@pytest.mark.parametrize("model_fn", ["mlp", "mlp_compiled_momentum"])
def test_two_logical_cpus_match_one_device(tmp_path, model_fn, single_process_run):
    """Same global batches, so 2 replicas must reach the 1-replica weights (uncompiled model
    with the config's SGD, and a model the user compiled with SGD + momentum)."""
    out = tmp_path / "devices-2"
    config = base_config(out, model={"fn": f"{FIXTURES}:{model_fn}"},
                         strategy={"name": "mirrored", "devices": 2})
    result = run_cli("run", write_config(tmp_path / "2.yaml", config), "-q")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num_replicas"], summary["epochs_completed"]) == (2, 3)
    for one, two in zip(final_weights(single_process_run(model_fn)), final_weights(out)):
        np.testing.assert_allclose(one, two, atol=1e-5)


def test_quickstart_learns_and_writes_every_output(tmp_path):
    out = tmp_path / "quickstart"
    result = run_cli("run", REPO / "configs" / "quickstart.yaml", f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    assert "epoch 15/15" in result.stdout and "done: 15 epochs" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_metrics"]["val_accuracy"] >= 0.9
    for key in ("strategy", "world_size", "epochs_completed", "samples_per_second", "wall_seconds"):
        assert key in summary
    assert (out / "metrics.csv").read_text().count("\n") == 16  # header + 15 epochs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "ckpt-000013.npz", "ckpt-000014.npz", "ckpt-000015.npz"]
    assert "train.epochs" not in (out / "config.yaml").read_text()
    assert "epochs: 15" in (out / "config.yaml").read_text()
    assert "epoch 15/15" in (out / "logs" / "rank-0.log").read_text()
    model = keras.saving.load_model(out / "model.keras")
    assert model.output_shape == (None, 10)
