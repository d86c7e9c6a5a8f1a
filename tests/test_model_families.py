"""Keras model families across worker processes. The model zoo (fixtures/zoo.py, written as
keras-io writes them) trains as 2 workers and as 1 process: each family ends with 1 process'
weights, within a tolerance its test justifies, or differs by design, measured. What cannot
train as the user meant (N workers unlike 1 process, an option that would do nothing), ktrain
refuses before training, naming it and what to do."""

import subprocess
import sys

import numpy as np
import pytest

from helpers import FIXTURES, MPIRUN, REPO, base_config, cli_env, write_config
from ktrain.checkpoint import load_checkpoint_url
from ktrain.assembly import model_and_data
from ktrain.config import load_config
from ktrain.errors import UserError
from ktrain.session import Session


sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from zoo import FAMILIES, JAX_FAMILIES  # noqa: E402

CASES = [("tensorflow", family) for family in FAMILIES] + [("jax", f) for f in JAX_FAMILIES]
EXACT = 1e-6
TOLERANCE = {
    # float16 math on half batches (mirrored with 2 devices differs from 1 device as much)
    ("tensorflow", "mixed_precision"): 1e-3, ("jax", "mixed_precision"): 1e-3,
    # XLA compiles the attention for 2 devices with other roundings throughout, and Adam takes
    # full steps with the noise on small gradients (2.3e-3 measured; with SGD, 6e-8)
    ("jax", "transformer_block"): 5e-3,
}
NOISE_DRIVEN = {
    ("tensorflow", "transformer_block"): ("key/bias",),  # softmax ignores a constant per score
    # the norm removes a bias before it
    ("tensorflow", "synchronized_batch_norm"): ("dense/bias", "moving_mean"),
    ("jax", "batch_norm"): ("dense/bias", "moving_mean"),  # on JAX, statistics are global
}
"""Variables whose gradient is zero in exact arithmetic: Adam divides their rounding noise by
its own size and takes full steps with it (a moving mean follows such a variable). Within
1e-3; every other variable of the family within EXACT."""
BY_DESIGN = {
    # Each worker draws its own masks for its share of the batch, not its slice of the one
    # process' draw: the same training in distribution, other random numbers. (On JAX the
    # step draws for the global batch, as one device does.)
    ("tensorflow", "dropout"): "its own dropout masks",
    # Each worker normalizes by its own share's statistics (synchronized=False, as DDP does;
    # on JAX, XLA takes the statistics of the global batch, synchronized or not).
    ("tensorflow", "batch_norm"): "its own batch statistics",
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Every family trained as 1 process and as 2 workers (TensorFlow, MPI) or 2 devices (JAX),
    each a process for the whole zoo (tests/zoo_ranks.py); all four at once."""
    script = str(REPO / "tests" / "zoo_ranks.py")
    runs = {("tensorflow", 1): [sys.executable, script], ("tensorflow", 2): [
        *MPIRUN, sys.executable, script], ("jax", 1): [sys.executable, script],
        ("jax", 2): [sys.executable, script]}
    folders = {key: tmp_path_factory.mktemp(f"zoo-{key[0]}-{key[1]}") for key in runs}
    processes = [subprocess.Popen(
        [*command, str(folders[backend, n]), *(["2"] if (backend, n) == ("jax", 2) else [])],
        cwd=REPO, env=cli_env({"KERAS_BACKEND": backend}), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for (backend, n), command in runs.items()]
    try:
        outputs = [process.communicate(timeout=900)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.communicate()
    assert [p.returncode for p in processes] == [0] * 4, "\n".join(outputs)[-5000:]
    return folders


def final_weights(out, family) -> dict:
    assert (out / f"{family}.status").read_text() == "0", family
    state = load_checkpoint_url(str(out / family / "checkpoints" / "ckpt-000002.npz"))
    return dict(zip(state.variable_paths, state.model_variables))


@pytest.mark.parametrize("backend, family", CASES, ids=[f"{b}-{f}" for b, f in CASES])
def test_two_workers_train_each_family_as_one_process(zoo, backend, family):
    one, two = (final_weights(zoo[backend, n], family) for n in (1, 2))
    assert one.keys() == two.keys()
    apart = {path: float(np.max(np.abs(one[path] - two[path]), initial=0)) for path in one}
    case = (backend, family)
    if case in BY_DESIGN:  # measured, and said in the README (Porting)
        assert max(apart.values()) > 1e-3, f"{family}: expected to differ ({BY_DESIGN[case]})"
        return
    noisy = {p for p in apart if p.endswith(NOISE_DRIVEN.get(case, ()))}
    assert all(apart[p] <= 1e-3 for p in noisy), apart
    allowed = TOLERANCE.get(case, EXACT)
    assert all(d <= allowed for p, d in apart.items() if p not in noisy), {
        p: d for p, d in apart.items() if d > EXACT}


def assembled(tmp_path, replicas: int = 1, **sections):
    """model_and_data of ``base_config(**sections)`` in this process, on ``replicas`` devices."""
    run = load_config(write_config(tmp_path / "config.yaml",
                                   base_config(tmp_path / "out", **sections)))
    return model_and_data(run, Session(rank=0, world_size=1, num_replicas=replicas))


def refusal(tmp_path, replicas: int = 1, **sections) -> str:
    """The message ``assembled`` refuses with."""
    with pytest.raises(UserError) as caught:
        assembled(tmp_path, replicas, **sections)
    return caught.value.render()


@pytest.mark.fast
def test_a_model_whose_call_does_not_take_the_features_is_named(tmp_path):
    """Keras' own train_step calls the model on the data's features: a model whose call()
    takes something else (a GAN's generator, without the GAN's train_step) is the user's
    mistake, said before training, without ktrain's frames."""
    message = refusal(tmp_path, model={"fn": f"{FIXTURES}:generator_only", "kwargs": {}})
    assert message.startswith("model.fn: the model cannot be called on the training features")
    assert "ValueError" in message and "model.build(shape)" in message


@pytest.mark.fast
def test_an_optimizer_the_model_does_not_hold_is_named(tmp_path):
    """ktrain averages, checkpoints and restores the optimizers a model holds; one its
    train_step finds elsewhere (a module's global) is refused before training, named."""
    message = refusal(tmp_path, model={"fn": f"{FIXTURES}:optimizer_held_elsewhere",
                                       "kwargs": {}})
    assert message.startswith("model.fn: the model's train_step applies optimizer(s) the model "
                              "does not hold ('global_sgd' (SGD))"), message
    assert "self.d_optimizer = ..." in message


@pytest.mark.fast
def test_compile_options_a_compiled_model_does_not_use_are_said(tmp_path, capsys):
    """train.optimizer, loss, metrics and jit_compile act only on a model ktrain compiles; set
    for one the model fn compiled, they would do nothing, so the run says so."""
    assembled(tmp_path, model={"fn": f"{FIXTURES}:mlp_compiled_momentum", "kwargs": {}})
    said = capsys.readouterr().err
    assert ("ktrain: note: the model fn returned a compiled model, so train.optimizer, "
            "train.loss, train.metrics are not used") in said, said


@pytest.mark.fast
def test_each_rank_draws_its_own_dropout_masks():
    """Every rank starts from rank 0's state, seeds included; each then draws its own masks
    (with one seed, the k-th example of every rank's share got the same mask)."""
    import keras

    import zoo
    from ktrain.worker import own_random_draws

    def masks(rank: int | None):
        keras.utils.set_random_seed(3)
        model = zoo.dropout()
        if rank is not None:
            own_random_draws(model, rank)
        dropout = next(layer for layer in model.layers if isinstance(layer, keras.layers.Dropout))
        return keras.ops.convert_to_numpy(dropout(np.ones((8, 32)), training=True)) != 0

    assert (masks(0) == masks(None)).all()  # rank 0 keeps its stream: checkpoints hold it
    assert (masks(1) != masks(0)).any() and (masks(2) != masks(1)).any()


@pytest.mark.fast
def test_string_features_over_several_devices_of_one_process_are_refused(tmp_path):
    """TensorFlow's MirroredStrategy fails on them mid-training (its AddN has no string
    kernel): refused before, with what works instead (one device, or a process per device)."""
    zoo_fns = REPO / "tests" / "fixtures" / "zoo.py"
    text = {"model": {"fn": f"{zoo_fns}:text_classifier", "kwargs": {}},
            "data": {"fn": f"{zoo_fns}:sentences", "kwargs": {}},
            "train": {"loss": None, "metrics": []}}
    message = refusal(tmp_path, replicas=2, **text)
    assert message.startswith("strategy.devices: the data's features include strings")
    assert "devices: 1" in message and "strategy.name: multiworker" in message
    assembled(tmp_path, **text)


@pytest.mark.fast
def test_early_stopping_on_validation_metrics_without_validation_data_is_refused(tmp_path):
    """Watching val_loss with no validation data, Keras' EarlyStopping would warn every epoch
    and never stop: refused before training, with the ways to give it validation data."""
    message = refusal(tmp_path, data={"fn": f"{FIXTURES}:digits", "kwargs": {"n": 256}},
                      train={"early_stopping": {"monitor": "val_loss"}})
    assert message.startswith("train.early_stopping.monitor: train.early_stopping watches "
                              "val_loss, and this run has no validation data"), message
    assert "train.validation_split" in message
