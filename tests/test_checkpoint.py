"""The shared checkpoint store: atomic commits, retention, damaged files skipped, any fsspec URL."""

import io
import uuid

import fsspec
import numpy as np
import pytest

from ktrain import cli
from ktrain.checkpoint import CheckpointStore, TrainingState, keep_latest, load_checkpoint_url
from ktrain.errors import UserError

pytestmark = pytest.mark.fast  # the fast tier: README, Development


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


def _truncated(data: bytes) -> bytes:  # a failed copy, a full disk on another host
    return data[:len(data) // 2]


def _bit_flipped(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    return bytes(flipped)


def _rewritten(data: bytes) -> bytes:
    """A well-formed .npz whose values changed after the digest was taken (no zip CRC can
    tell)."""
    with np.load(io.BytesIO(data)) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["model_00000"] = arrays["model_00000"] + 1
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


DAMAGES = {"truncated": _truncated, "bit-flipped": _bit_flipped, "empty": lambda data: b"",
           "rewritten": _rewritten}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_resumes(store, damage, capsys):
    store.save(state(1))
    store.save(state(2))
    newest = store.file_for(2)
    store.fs.pipe(newest, DAMAGES[damage](store.fs.cat(newest)))
    assert store.load_latest().epoch == 1
    warning = capsys.readouterr().err
    assert f"skipping the damaged checkpoint {newest}" in warning
    assert "resuming from ckpt-000001.npz" in warning


def test_when_every_checkpoint_is_damaged_each_is_listed(store):
    store.save(state(1))
    store.save(state(2))
    store.fs.pipe(store.file_for(1), b"")
    store.fs.pipe(store.file_for(2), _truncated(store.fs.cat(store.file_for(2))))
    with pytest.raises(UserError) as caught:
        store.load_latest()
    message = caught.value.render()
    assert "every checkpoint" in message and "is damaged" in message
    assert f"{store.file_for(1)}: the file is empty" in message
    assert f"{store.file_for(2)}: not a readable .npz" in message


def test_ktrain_checkpoints_lists_each_with_whether_it_is_intact(tmp_path, capsys):
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"), keep=3)
    for epoch in (1, 2):
        store.save(TrainingState(**{**vars(state(epoch)), "written_by": {
            "strategy": "multiworker", "backend": "tensorflow", "world_size": 2,
            "replicas": 2}}))
    store.fs.pipe(store.file_for(2), _bit_flipped(store.fs.cat(store.file_for(2))))
    assert cli.main(["checkpoints", str(tmp_path / "run")]) == 1  # one is damaged
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("ckpt-000001.npz") and "after epoch 1" in first
    assert "multiworker, tensorflow, 2 worker(s)" in first and first.endswith("intact")
    assert second.startswith("ckpt-000002.npz") and "DAMAGED: " in second
    assert cli.main(["checkpoints", str(tmp_path / "elsewhere")]) == 2


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
    with pytest.raises(UserError, match="not an intact ktrain checkpoint"):
        load_checkpoint_url(str(tmp_path / "junk.npz"))
