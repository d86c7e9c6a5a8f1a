"""The shared checkpoint store: atomic commits, retention, damaged files skipped, any fsspec URL."""

import uuid

import fsspec
import numpy as np
import pytest

from ktrain.checkpoint import CheckpointStore, TrainingState, keep_latest, load_checkpoint_url
from ktrain.errors import UserError


def state(epoch: int) -> TrainingState:
    rng = np.random.default_rng(epoch)
    return TrainingState(epoch, [rng.normal(size=(3, 2)).astype("float32"), np.arange(2)],
                         [np.array(epoch * 10)], [{"epoch": epoch, "loss": 1.0 / epoch}],
                         ["dense/kernel", "seed"])


@pytest.fixture
def store():
    return CheckpointStore(f"memory://{uuid.uuid4().hex}/checkpoints", keep=2)


def test_round_trip_keeps_every_array_and_the_history(store):
    store.save(state(1))
    loaded = store.load_latest()
    original = state(1)
    assert loaded.epoch == 1 and loaded.history == original.history
    for a, b in zip(loaded.model_variables + loaded.optimizer_variables,
                    original.model_variables + original.optimizer_variables):
        np.testing.assert_array_equal(a, b)


def test_retention_keeps_the_newest(store):
    for epoch in range(1, 5):
        store.save(state(epoch))
    assert store.positions() == [(3, 0), (4, 0)]
    assert keep_latest([5, 1, 3], 2) == [1]


def test_damaged_newest_checkpoint_falls_back_to_the_previous(store):
    store.save(state(1))
    store.save(state(2))
    with store.fs.open(store.file_for(2), "wb") as f:
        f.write(b"truncated")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        assert store.load_latest().epoch == 1


def test_leftover_temporary_file_is_ignored_and_cleaned(store):
    store.save(state(1))
    leftover = f"{store.path}/.tmp-crashed.npz"
    store.fs.pipe(leftover, b"partial write")
    assert store.load_latest().epoch == 1
    store.save(state(2))
    assert not store.fs.exists(leftover)


def test_only_the_chief_writes():
    url = f"memory://{uuid.uuid4().hex}/checkpoints"
    CheckpointStore(url, is_chief=False).save(state(1))
    assert CheckpointStore(url).positions() == []


def test_local_paths_and_explicit_resume(tmp_path):
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    store.save(state(2))
    assert load_checkpoint_url(str(tmp_path / "checkpoints")).epoch == 2
    assert load_checkpoint_url(store.file_for(2)).epoch == 2
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint_url(str(tmp_path / "elsewhere"))
    fsspec.filesystem("file").pipe(str(tmp_path / "junk.npz"), b"junk")
    with pytest.raises(UserError, match="not a readable ktrain checkpoint"):
        load_checkpoint_url(str(tmp_path / "junk.npz"))
