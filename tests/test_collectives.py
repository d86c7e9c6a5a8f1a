"""The optimizer hook and helpers of ktrain.collectives, in one process.

The transport here is a one-worker loopback that counts its calls: these tests check where
and how often ktrain reduces, and that sparse gradients survive it. The real transports are
exercised with real processes in test_multiworker.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ktrain.collectives import Communicator, buckets, distribute_optimizer, undistribute
from ktrain.callbacks import ScaledLearningRate

pytestmark = pytest.mark.fast  # the fast tier: README, Development


class Loopback(Communicator):
    def __init__(self):
        super().__init__(rank=0, world_size=1)
        self.calls = tf.Variable(0, dtype=tf.int64)

    def _allreduce_bucket(self, parts):
        self.calls.assign_add(1)
        return [tf.identity(p) for p in parts]


def embedding_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(50, 4),
                             keras.layers.Flatten(), keras.layers.Dense(2)])


DATA = (np.random.default_rng(0).integers(0, 50, (32, 3)), np.arange(32) % 2)


def train(model, optimizer, steps_per_epoch=4):
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(*DATA, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model.get_weights()


def test_sparse_gradients_are_averaged_exactly():
    plain = train(embedding_model(), keras.optimizers.SGD(0.5))
    model, comm = embedding_model(), Loopback()
    optimizer = distribute_optimizer(keras.optimizers.SGD(0.5), comm)
    model.jit_compile = False
    for a, b in zip(plain, train(model, optimizer)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Per step: the dense gradients in one fused reduction; the Embedding's rows gathered in
    # three (every worker's row count, then the rows' values, then their indices).
    assert int(comm.calls.numpy()) == 4 * (1 + 3)


def test_gradient_accumulation_reduces_once_per_k_steps():
    comm = Loopback()
    optimizer = distribute_optimizer(keras.optimizers.SGD(0.5, gradient_accumulation_steps=2), comm)
    train(embedding_model(), optimizer)
    assert int(comm.calls.numpy()) == 2


def test_undistribute_restores_a_savable_optimizer(tmp_path):
    model = embedding_model()
    optimizer = distribute_optimizer(keras.optimizers.SGD(0.5, momentum=0.9), Loopback())
    assert type(optimizer).__name__ == "SGD"
    train(model, optimizer)
    undistribute(optimizer)
    assert type(optimizer) is keras.optimizers.SGD
    model.save(tmp_path / "m.keras")
    assert type(keras.saving.load_model(tmp_path / "m.keras").optimizer) is keras.optimizers.SGD


@pytest.mark.parametrize("compression", ["none", "fp16", "bf16"])
def test_fused_buffers_keep_shapes_dtypes_and_values(compression):
    tensors = [tf.ones([2, 3]), tf.range(4), tf.zeros([5], tf.float64), tf.fill([7], 0.25)]
    out = Loopback().allreduce_sum(tensors, compression=compression, bucket_bytes=32)
    assert [t.shape for t in out] == [t.shape for t in tensors]
    assert [t.dtype for t in out] == [t.dtype for t in tensors]
    for before, after in zip(tensors, out):
        np.testing.assert_array_equal(after.numpy(), before.numpy())


def test_buckets_hold_one_dtype_up_to_the_size_last_tensor_first():
    tensors = [tf.zeros([4]), tf.zeros([4]), tf.zeros([2], tf.int32), tf.zeros([8]),
               tf.zeros([1]), tf.zeros([1])]  # float32: 16, 16, 32, 4, 4 bytes
    assert buckets(tensors, 24) == [[5, 4], [3], [1], [0], [2]]
    assert buckets(tensors, None) == [[5, 4, 3, 1, 0], [2]]


def test_each_bucket_is_one_reduction_per_step():
    comm = Loopback()
    model = embedding_model()  # embeddings of 50x4 (sparse), a 12x2 kernel and 2 biases
    optimizer = distribute_optimizer(keras.optimizers.SGD(0.5), comm, bucket_bytes=90)
    model.jit_compile = False
    train(model, optimizer)
    # The dense kernel's 96 bytes and the bias' 8 exceed 90: two buckets; and the Embedding's
    # rows in three gathers (not in a bucket: sparse).
    assert int(comm.calls.numpy()) == 4 * (2 + 3)


def test_learning_rate_scaling_warms_up_linearly():
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(round(float(self.model.optimizer.learning_rate.numpy()), 6))

    model = embedding_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.fit(*DATA, batch_size=8, epochs=3, shuffle=False, verbose=0,
              callbacks=[ScaledLearningRate(4.0, warmup_epochs=2, steps_per_epoch=4), Record()])
    assert seen[0] == 0.1  # starts unscaled
    assert seen[4] == round(0.1 * (1 + 3 * 0.5), 6)  # half way through the warm-up
    assert seen[8:] == [0.4] * 4  # fully scaled afterwards
    assert seen == sorted(seen)
