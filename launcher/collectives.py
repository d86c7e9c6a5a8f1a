"""Gradient averaging for Keras 3 across worker processes, over pluggable transports.

Public API (usable in your own training loops too):

- ``Communicator``: ``allreduce_sum`` / ``allreduce_mean`` / ``broadcast`` / ``barrier`` over a
  list of tensors, fused into one buffer per dtype. Implementations: ``TensorFlowCollectives``
  (TF's collective ops over gRPC, from a list of peers; no Horovod needed), ``MpiCommunicator``
  (mpi4py), ``HorovodCommunicator`` (``hvd.grouped_allreduce``).
- ``distribute_optimizer(optimizer, communicator)``: makes any Keras 3 optimizer (the user's own
  included) average gradients across workers before it applies them. The hook sits where Keras
  applies an update, so with ``gradient_accumulation_steps=K`` there is one allreduce per K steps.
- ``broadcast_variables``: copy rank 0's model and optimizer state to every worker.
- ``GlobalMetrics``: a callback that turns each worker's epoch metrics into global ones.

These are the TensorFlow backend's; on JAX, XLA reduces the gradients inside the compiled step
(``ktrain.jax_runtime``).

Sparse gradients (``tf.IndexedSlices``, e.g. from Embedding layers) are densified before
averaging, which is exact. Steps that call MPI through ``tf.numpy_function`` or Horovod cannot
be XLA-compiled: ``needs_eager_ops`` tells the caller to set ``jit_compile=False``.
"""

from __future__ import annotations

import abc
import itertools
import json
import os
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf


class Communicator(abc.ABC):
    """Sums tensors across all workers. Subclasses implement one flat-buffer reduction."""

    needs_eager_ops = False
    """True when the transport runs through tf.numpy_function or custom ops (no XLA)."""

    supports_fp16 = True

    reduces_gradients = True
    """The optimizer must be wrapped (``distribute_optimizer``) to average gradients."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size

    @abc.abstractmethod
    def _allreduce_flat(self, flat: tf.Tensor) -> tf.Tensor:
        """Sum one 1-D tensor elementwise over all workers (callable inside tf.function)."""

    def allreduce_sum(self, tensors: Sequence[tf.Tensor], *, fp16: bool = False) -> list[tf.Tensor]:
        """Sum each tensor over all workers; tensors of one dtype travel as one fused buffer."""
        tensors = [tf.convert_to_tensor(t) for t in tensors]  # densifies IndexedSlices
        results: list[tf.Tensor | None] = [None] * len(tensors)
        for dtype, indices in _indices_by_dtype(tensors).items():
            flat = tf.concat([tf.reshape(tensors[i], [-1]) for i in indices], axis=0)
            compress = fp16 and dtype in (tf.float32, tf.float64)
            if compress:
                flat = tf.cast(flat, tf.float16)
            reduced = self._allreduce_flat(flat)
            if compress:
                reduced = tf.cast(reduced, dtype)
            sizes = [int(np.prod(tensors[i].shape)) for i in indices]
            for i, part in zip(indices, tf.split(reduced, sizes)):
                results[i] = tf.reshape(part, tensors[i].shape)
        return results

    def allreduce_mean(self, tensors: Sequence[tf.Tensor], *, fp16: bool = False) -> list[tf.Tensor]:
        summed = self.allreduce_sum(tensors, fp16=fp16)
        return [s / tf.cast(self.world_size, s.dtype) if s.dtype.is_floating else s // self.world_size
                for s in summed]

    def broadcast(self, tensors: Sequence[tf.Tensor], root: int = 0) -> list[tf.Tensor]:
        """Every worker gets ``root``'s values (a sum where only root contributes)."""
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        if self.rank != root:
            tensors = [tf.zeros_like(t) for t in tensors]
        return self.allreduce_sum(tensors)

    def barrier(self) -> None:
        self.allreduce_sum([tf.zeros([1])])

    def sum_host(self, values) -> np.ndarray:
        """``values`` added up over all workers, as float64, outside any train step."""
        return self.allreduce_sum([tf.constant(values, tf.float64)])[0].numpy()

    def flags(self, count: int) -> SharedFlags:
        return SharedFlags(count)


def _indices_by_dtype(tensors: Sequence[tf.Tensor]) -> dict[tf.DType, list[int]]:
    groups: dict[tf.DType, list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(i)
    return groups


class TensorFlowCollectives(Communicator):
    """TensorFlow's collective ops between the given peers: NCCL when this worker has a GPU
    (one process per GPU), else a ring all-reduce over gRPC.

    ``MultiWorkerMirroredStrategy`` is created only to start TF's collective runtime from
    TF_CONFIG; the model is built outside its scope (Keras 3's fit fails inside it,
    keras-team/keras#20585), and gradients are reduced with ``CollectiveReduceV2``.
    Must be created before TensorFlow runs any op in this process.
    """

    _GROUP_KEY = 1

    def __init__(self, rank: int, peers: Sequence[str], timeout_seconds: float = 0):
        super().__init__(rank, len(peers))
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": list(peers)},
                                              "task": {"type": "worker", "index": rank}})
        implementations = tf.distribute.experimental.CommunicationImplementation
        gpu = bool(tf.config.list_physical_devices("GPU"))
        self._hint = "nccl" if gpu else "ring"
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementations.NCCL if gpu else implementations.RING,
            timeout_seconds=timeout_seconds or None)
        self._runtime = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        self._instance_keys = itertools.count(1000)

    def _allreduce_flat(self, flat: tf.Tensor) -> tf.Tensor:
        # Every worker creates its reductions in the same order, so keys agree across workers.
        return tf.raw_ops.CollectiveReduceV2(
            input=flat, group_size=self.world_size, group_key=self._GROUP_KEY,
            instance_key=next(self._instance_keys), ordering_token=[], merge_op="Add",
            final_op="Id", communication_hint=self._hint)


class MpiCommunicator(Communicator):
    """MPI ``Allreduce`` through mpi4py, called from the train step by ``tf.numpy_function``."""

    needs_eager_ops = True
    supports_fp16 = False  # MPI has no standard half-precision datatype

    def __init__(self):
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        super().__init__(self._comm.Get_rank(), self._comm.Get_size())

    def _allreduce_flat(self, flat: tf.Tensor) -> tf.Tensor:
        def reduce(array: np.ndarray) -> np.ndarray:
            out = np.empty_like(array)
            self._comm.Allreduce(np.ascontiguousarray(array), out, op=self._mpi.SUM)
            return out

        result = tf.numpy_function(reduce, [flat], flat.dtype, stateful=True)
        result.set_shape(flat.shape)
        return result


class HorovodCommunicator(Communicator):
    """Horovod (Gloo or MPI underneath); ``grouped_allreduce`` lets Horovod fuse the tensors."""

    needs_eager_ops = True

    def __init__(self):
        import horovod.tensorflow as hvd

        hvd.init()
        self._hvd = hvd
        super().__init__(hvd.rank(), hvd.size())

    def allreduce_sum(self, tensors: Sequence[tf.Tensor], *, fp16: bool = False) -> list[tf.Tensor]:
        hvd = self._hvd
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        compression = hvd.Compression.fp16 if fp16 else hvd.Compression.none
        results: list[tf.Tensor | None] = [None] * len(tensors)
        for indices in _indices_by_dtype(tensors).values():  # a group must share one dtype
            reduced = hvd.grouped_allreduce([tensors[i] for i in indices], op=hvd.Sum,
                                            compression=compression)
            for i, tensor in zip(indices, reduced):
                results[i] = tensor
        return results

    def _allreduce_flat(self, flat: tf.Tensor) -> tf.Tensor:
        return self._hvd.allreduce(flat, op=self._hvd.Sum)


class SharedFlags:
    """Flags any rank raises (e.g. "stop: a signal arrived") that every rank learns at the
    same step: their mean travels with the gradients, in the same allreduce, so agreeing costs
    no extra collective and no rank leaves a collective half-done."""

    def __init__(self, count: int = 1):
        self.raised = tf.Variable(tf.zeros([count]), trainable=False, name="ktrain_flags")
        self.agreed_values = tf.Variable(tf.zeros([count]), trainable=False,
                                         name="ktrain_agreed")
        self.arrivals = tf.Variable(0, dtype=tf.int64, trainable=False, name="ktrain_arrivals")
        """Gradient allreduces this rank has arrived at: a rank behind the others is the one
        they wait for (see ktrain.watchdog)."""

    def raise_flag(self, index: int = 0) -> None:
        self.raised.scatter_nd_update([[index]], [1.0])

    def agreed(self) -> list[int]:
        """The flags some rank had raised before the last update step."""
        return [int(i) for i in np.flatnonzero(self.agreed_values.numpy() > 0)]

    def arrived(self) -> int:
        return int(self.arrivals.numpy())


def distribute_optimizer(optimizer: keras.optimizers.Optimizer, communicator: Communicator,
                         *, fp16: bool = False,
                         flags: SharedFlags | None = None) -> keras.optimizers.Optimizer:
    """Make ``optimizer`` average gradients over ``communicator`` before every update
    (and ``flags``, if given, with them).

    The instance is changed in place (its class becomes a subclass of its own class), so the
    model keeps the same optimizer object, its variables and its config. ``undistribute``
    reverts it, e.g. before saving.
    """
    target = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer wraps one
    base = type(target)
    if getattr(base, "_ktrain_communicator", None) is not None:
        return optimizer

    class Averaging(base):
        _ktrain_communicator = communicator

        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            if flags is None:
                grads = communicator.allreduce_mean(grads, fp16=fp16)
            else:
                # Counted once this rank's gradients exist: its data and compute are done.
                computed = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads]
                with tf.control_dependencies(computed):
                    arrived = flags.arrivals.assign_add(1)
                with tf.control_dependencies([arrived]):
                    raised = flags.raised.read_value()
                *grads, agreed = communicator.allreduce_mean([*grads, raised], fp16=fp16)
                flags.agreed_values.assign(agreed)
            return super()._backend_update_step(grads, trainable_variables, learning_rate)

    Averaging.__name__ = Averaging.__qualname__ = base.__name__
    Averaging.__module__ = base.__module__
    target.__class__ = Averaging
    return optimizer


def undistribute(optimizer: keras.optimizers.Optimizer) -> None:
    target = getattr(optimizer, "inner_optimizer", optimizer)
    if getattr(type(target), "_ktrain_communicator", None) is not None:
        target.__class__ = type(target).__mro__[1]


def broadcast_variables(variables: Sequence[tf.Variable], communicator: Communicator,
                        root: int = 0) -> None:
    """Assign ``root``'s values to ``variables`` on every worker."""
    variables = list(variables)
    for variable, value in zip(variables, communicator.broadcast([v.value for v in variables],
                                                                 root)):
        variable.assign(value)


class GlobalMetrics(keras.callbacks.Callback):
    """Replace each worker's epoch metrics with the example-weighted mean over all workers.

    Put it first in the callback list: later callbacks (history, early stopping, checkpoints)
    then all see the same, global numbers on every worker.
    """

    def __init__(self, communicator: Communicator, train_examples: int, validation_examples: int):
        super().__init__()
        self.communicator = communicator
        self.weights = {"train": float(train_examples), "val": float(validation_examples)}

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        keys = sorted(logs)
        weight = [self.weights["val" if k.startswith("val_") else "train"] for k in keys]
        local = [float(logs[k]) * w for k, w in zip(keys, weight)] + list(self.weights.values())
        total = self.communicator.sum_host(local)
        train_total, val_total = total[-2:]
        for i, key in enumerate(keys):
            logs[key] = float(total[i] / (val_total if key.startswith("val_") else train_total))
