"""strategy.shard on JAX: the optimizers' state, the gradients and the parameters split over
the data-parallel devices train to one device's weights, hold less per device, and leave
checkpoints that resume unsharded or on another number of devices."""

import json
import shutil

import pytest

from helpers import assert_same_weights, base_config, run_cli, write_config

pytest.importorskip("jax", reason="JAX is not installed: bash scripts/setup.sh")

ADAM = {"optimizer": {"name": "adam", "learning_rate": 0.01}, "shuffle": True}
"""Adam holds two values per parameter: the state sharding splits."""


def sharded_run(tmp_path, folder: str, *overrides: str, **strategy) -> dict:
    """The digits MLP (every kernel large enough to split) on JAX with Adam, under
    ``strategy`` (mirrored on one device, unless it names another); its summary."""
    out = tmp_path / folder
    config = base_config(out, backend="jax", train=ADAM,
                         model={"fn": base_config(out)["model"]["fn"], "kwargs": {"hidden": 128}})
    config["strategy"] = {"name": "mirrored", **({} if "name" in strategy else {"devices": 1}),
                          **strategy}
    result = run_cli("run", write_config(tmp_path / f"{folder}.yaml", config), "-q", *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unsharded")
    return folder / "one", sharded_run(folder, "one")["bytes_per_device"]


@pytest.mark.parametrize("mode, strategy, split", [
    ("optimizer", {"devices": 2}, ["optimizer_state"]),
    ("gradients", {"devices": 4}, ["optimizer_state", "gradients"]),
    ("parameters", {"devices": 4}, ["optimizer_state", "gradients", "parameters"]),
    ("parameters", {"name": "multiworker", "workers": 2},
     ["optimizer_state", "gradients", "parameters"]),
], ids=["optimizer-2", "gradients-4", "parameters-4", "parameters-2-processes"])
def test_a_sharded_run_ends_with_one_devices_weights_and_holds_less(tmp_path, one_device, mode,
                                                                   strategy, split):
    reference, whole = one_device
    summary = sharded_run(tmp_path, "out", shard=mode, **strategy)
    devices = strategy.get("devices") or strategy["workers"]
    assert summary["num_replicas"] == devices
    held = summary["bytes_per_device"]
    for kind in ("parameters", "optimizer_state", "gradients"):
        if kind in split:  # the kernels split, the biases stay whole
            assert held[kind] < whole[kind] / devices * 1.2, (kind, held, whole)
        else:
            assert held[kind] == whole[kind], (kind, held, whole)
    assert_same_weights(reference, tmp_path / "out")


def test_a_sharded_checkpoint_resumes_unsharded_on_one_device_and_on_four(tmp_path, one_device):
    reference, _ = one_device
    sharded_run(tmp_path, "two", "train.epochs=2", shard="parameters", devices=2)
    shutil.copytree(tmp_path / "two", tmp_path / "four")
    sharded_run(tmp_path, "two")  # the config's 3 epochs: resumed unsharded on one device
    assert_same_weights(reference, tmp_path / "two")
    sharded_run(tmp_path, "four", shard="parameters", devices=4)
    assert_same_weights(reference, tmp_path / "four")


def test_a_model_parallel_transformer_block_ends_with_one_devices_weights(tmp_path):
    """Its kernels cut over the model axis of a 2 x 2 mesh by the min_size rule; each half of
    the global batch goes to one data group."""
    fixtures = base_config(tmp_path)["model"]["fn"].rsplit(":", 1)[0]
    summaries = {}
    for name, strategy in (("one", {"name": "mirrored", "devices": 1}),
                           ("mesh", {"name": "mirrored", "devices": 4, "model_parallel": {
                               "mesh": {"data": 2, "model": 2}, "min_size": 256}})):
        config = base_config(tmp_path / name, backend="jax", strategy=strategy,
                             model={"fn": f"{fixtures}:transformer_block", "kwargs": {}},
                             data={"fn": f"{fixtures}:digit_rows"},
                             train={"optimizer": {"name": "sgd", "learning_rate": 0.05},
                                    "shuffle": True})
        config["strategy"] = strategy
        result = run_cli("run", write_config(tmp_path / f"{name}.yaml", config), "-q")
        assert result.returncode == 0, result.stdout + result.stderr
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert summaries["mesh"]["num_replicas"] == 2  # data groups
    held, whole = (summaries[n]["bytes_per_device"]["parameters"] for n in ("mesh", "one"))
    assert held < 0.6 * whole, (held, whole)
    assert_same_weights(tmp_path / "one", tmp_path / "mesh")


@pytest.mark.fast
def test_sharding_where_it_cannot_be_done_says_what_to_do(tmp_path):
    tensorflow = base_config(tmp_path / "tf", strategy={"name": "mirrored", "shard": "optimizer"})
    result = run_cli("run", write_config(tmp_path / "tf.yaml", tensorflow))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "strategy.shard: shard: optimizer splits the training state" in result.stderr
    assert "HINT: set backend: jax" in result.stderr and "Traceback" not in result.stderr
    elastic = {**base_config(tmp_path / "el", backend="jax"), "strategy": {
        "name": "multiworker", "workers": {"min": 1, "max": 2}, "shard": "parameters"}}
    result = run_cli("run", write_config(tmp_path / "el.yaml", elastic))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "an elastic group" in result.stderr and "Traceback" not in result.stderr
    timed = {**elastic, "strategy": {"name": "multiworker", "shard": "optimizer"},
             "checkpoint": {"every_minutes": 5}}
    result = run_cli("run", write_config(tmp_path / "timed.yaml", timed))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "checkpoint.every_minutes: shard: optimizer across processes" in result.stderr
    mesh = {**elastic, "strategy": {"name": "mirrored", "devices": 2, "model_parallel": {
        "mesh": {"data": 2, "model": 2}}}}
    result = run_cli("run", write_config(tmp_path / "mesh.yaml", mesh))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model_parallel.mesh is 2 x 2 = 4 devices, and the run has 2" in result.stderr
    assert "HINT: set strategy.devices: 4" in result.stderr
    assert not (tmp_path / "tf").exists() and not (tmp_path / "el").exists()
