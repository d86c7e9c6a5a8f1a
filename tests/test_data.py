"""Data contract: accepted shapes of the data fn's result, and batches that are the same global
batches whatever the number of workers or wherever a run resumes."""

import numpy as np
import pytest
import tensorflow as tf

from ktrain.data import to_splits, training_batches
from ktrain.errors import UserError

pytestmark = pytest.mark.fast  # the fast tier: README, Development

X = np.arange(40, dtype="float32").reshape(20, 2)
Y = np.arange(20)


def labels(dataset) -> list[list[int]]:
    return [batch[1].numpy().tolist() for batch in dataset]


def batches(split, *, rank=0, world_size=1, shuffle=False, first_epoch=0, epochs=2):
    return training_batches(split, global_batch_size=8, rank=rank, world_size=world_size,
                            shuffle=shuffle, shuffle_buffer=100, seed=3,
                            first_epoch=first_epoch, epochs=epochs)


@pytest.mark.parametrize("shuffle", [False, True])
def test_interleaved_shards_rebuild_the_global_batches(shuffle):
    split = to_splits((X, Y), 0.0).train
    single, steps = batches(split, shuffle=shuffle)
    assert steps == 2  # 20 examples, batches of 8: the partial batch is dropped
    workers = [labels(batches(split, rank=r, world_size=2, shuffle=shuffle)[0]) for r in (0, 1)]
    for global_batch, (first, second) in zip(labels(single), zip(*workers)):
        assert first == global_batch[0::2] and second == global_batch[1::2]


def test_epochs_are_shuffled_differently_but_reproducibly():
    split = to_splits((X, Y), 0.0).train
    run = labels(batches(split, shuffle=True, epochs=3)[0])
    assert run[0:2] != run[2:4]
    assert labels(batches(split, shuffle=True, first_epoch=2, epochs=3)[0]) == run[4:6]
    assert run == labels(batches(split, shuffle=True, epochs=3)[0])


def test_accepted_forms():
    dict_x = to_splits(({"a": X, "b": X}, Y), 0.25)
    assert (dict_x.train.size, dict_x.validation.size) == (15, 5)
    both = to_splits({"train": (X, Y), "validation": tf.data.Dataset.from_tensor_slices((X, Y))}, 0)
    assert (both.train.size, both.validation.size) == (20, 20)
    unknown_size = tf.data.Dataset.from_tensor_slices((X, Y)).filter(lambda x, y: y < 10)
    assert to_splits(unknown_size, 0).train.size == 10


@pytest.mark.parametrize("value, message", [
    (42, "returned a int"),
    ((X, Y[:5]), r"different numbers of rows \(x 20, y 5\)"),
    ({"training": (X, Y)}, "needs 'train'"),
    (tf.data.Dataset.from_tensor_slices((X, Y)).batch(4), "batched tf.data.Dataset"),
    (tf.data.Dataset.from_tensor_slices((X, Y)).repeat(), "infinite"),
    (tf.data.Dataset.from_tensor_slices(X), "elements are"),
])
def test_wrong_results_are_explained(value, message):
    with pytest.raises(UserError, match=message):
        to_splits(value, 0.0)


def test_too_little_data_for_one_global_batch():
    with pytest.raises(UserError, match="fewer than train.global_batch_size"):
        training_batches(to_splits((X[:4], Y[:4]), 0).train, global_batch_size=8, rank=0,
                         world_size=1, shuffle=False, shuffle_buffer=1, seed=0,
                         first_epoch=0, epochs=1)

