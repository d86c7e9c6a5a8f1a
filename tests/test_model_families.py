"""Keras model families across worker processes: where N workers cannot train as 1 process,
ktrain refuses before training, naming the layer and what to do. (Families that train exactly,
an Embedding's sparse gradients among them, are compared with 1 process in test_multiworker.)"""

from types import SimpleNamespace

import pytest

from helpers import FIXTURES, base_config, write_config
from ktrain.assembly import model_and_data
from ktrain.config import load_config
from ktrain.errors import UserError
from ktrain.session import Session


def session(world_size: int) -> Session:
    """A rank of ``world_size`` worker processes whose gradients ktrain averages (TensorFlow):
    only what the check reads of its communicator."""
    return Session(rank=0, world_size=world_size, num_replicas=world_size,
                   communicator=SimpleNamespace(reduces_gradients=True) if world_size > 1
                   else None)


def test_synchronized_batch_norm_is_refused_across_processes_and_kept_in_one(tmp_path):
    run = load_config(write_config(tmp_path / "config.yaml", base_config(
        tmp_path / "out", model={"fn": f"{FIXTURES}:mlp_synchronized_batch_norm",
                                 "kwargs": {}})))
    with pytest.raises(UserError) as caught:
        model_and_data(run, session(2))
    message = caught.value.render()
    assert message.startswith("model.fn: BatchNormalization layer(s) ['norm'] ask for "
                              "statistics synchronized")
    assert "synchronized=False" in message and "strategy.name: mirrored" in message
    model, _ = model_and_data(run, session(1))  # one process: Keras synchronizes its replicas
    assert model.get_layer("norm").synchronized


def test_a_gan_with_optimizers_of_its_own_is_refused_across_processes(tmp_path):
    run = load_config(write_config(tmp_path / "config.yaml", base_config(
        tmp_path / "out", model={"fn": f"{FIXTURES}:gan", "kwargs": {}})))
    with pytest.raises(UserError) as caught:
        model_and_data(run, session(2))
    message = caught.value.render()
    assert message.startswith("model.fn: the model holds optimizer(s) of its own (d_optimizer, "
                              "g_optimizer)")
    # In one process nothing is refused; its call() takes latent vectors, not the data's
    # images, so the variables cannot be made by calling it: said as the user's problem.
    with pytest.raises(UserError) as caught:
        model_and_data(run, session(1))
    message = caught.value.render()
    assert message.startswith("model.fn: the model cannot be called on the training features")
    assert "ValueError" in message and "model.build(shape)" in message
