"""Gradient averaging for Keras 3 across worker processes, over pluggable transports.

Public API (usable in your own training loops too; ``__all__``):

- ``Communicator``: ``allreduce_sum`` / ``allreduce_mean`` / ``broadcast`` / ``barrier`` over a
  list of tensors, fused into buckets (one per dtype, or of a chosen size). Implementations:
  ``TensorFlowCollectives`` (TF's collective ops over gRPC, from a list of peers; no Horovod
  needed), ``MpiCommunicator`` (mpi4py), ``HorovodCommunicator`` (``hvd.grouped_allreduce``).
- ``distribute_optimizer(optimizer, communicator)``: makes any Keras 3 optimizer (the user's own
  included) average gradients across workers before it applies them. The hook sits where Keras
  applies an update, so with ``gradient_accumulation_steps=K`` there is one allreduce per K steps.
- ``broadcast_variables``: copy rank 0's model and optimizer state to every worker.
- ``synchronize_batch_norm(model, communicator)``: ``BatchNormalization(synchronized=True)``
  layers take the statistics of the whole global batch, as on one process' devices.
- ``GlobalMetrics``: a callback that turns each worker's epoch metrics into global ones.

These are the TensorFlow backend's; on JAX, XLA reduces the gradients inside the compiled step
(``ktrain.jax_runtime``).

Sparse gradients (``tf.IndexedSlices``, e.g. from Embedding layers) stay sparse: every
worker's rows are gathered (``Communicator.allgather``), as one process would have made them.
Steps that call MPI through ``tf.numpy_function`` or Horovod cannot be XLA-compiled:
``needs_eager_ops`` tells the caller to set ``jit_compile=False``.
"""

from __future__ import annotations

__all__ = ["Communicator", "TensorFlowCollectives", "MpiCommunicator", "HorovodCommunicator",
           "distribute_optimizer", "undistribute", "broadcast_variables", "GlobalMetrics",
           "synchronize_batch_norm", "desynchronize_batch_norm"]

import abc
import itertools
import json
import os
import sys
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from ktrain.global_metrics import GlobalMetrics
from ktrain.optimizers import averaging, optimizers_of, plain


COMPRESSED = {"fp16": tf.float16, "bf16": tf.bfloat16}
"""The dtypes ``compression`` may send float32 and float64 gradients in."""


class Communicator(abc.ABC):
    """Sums tensors across all workers. Subclasses implement the reduction of one bucket."""

    name: str
    """The transport, as ``strategy.communicator`` names it."""

    needs_eager_ops = False
    """True when the transport runs through tf.numpy_function or custom ops (no XLA)."""

    reduces_gradients = True
    """The optimizer must be wrapped (``distribute_optimizer``) to average gradients."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size

    @abc.abstractmethod
    def _allreduce_bucket(self, parts: list[tf.Tensor]) -> list[tf.Tensor]:
        """Sum tensors of one dtype elementwise over all workers, as one fused message
        (callable inside tf.function)."""

    def allreduce_sum(self, tensors: Sequence[tf.Tensor], *, compression: str = "none",
                      bucket_bytes: int | None = None) -> list[tf.Tensor]:
        """Sum each tensor over all workers: tensors of one dtype travel fused, in buckets of at
        most ``bucket_bytes`` (None: one per dtype), float ones in the ``compression`` dtype."""
        tensors = [tf.convert_to_tensor(t) for t in tensors]  # densifies IndexedSlices
        wire = COMPRESSED.get(compression)
        sent = [tf.cast(t, wire) if wire is not None and t.dtype in (tf.float32, tf.float64)
                else t for t in tensors]
        results: list[tf.Tensor | None] = [None] * len(tensors)
        for indices in buckets(sent, bucket_bytes):
            for i, reduced in zip(indices, self._allreduce_bucket([sent[i] for i in indices])):
                results[i] = tf.cast(reduced, tensors[i].dtype) if sent[i] is not tensors[i] \
                    else reduced
        return results

    def allreduce_mean(self, tensors: Sequence[tf.Tensor], **options) -> list[tf.Tensor]:
        summed = self.allreduce_sum(tensors, **options)
        return [s / tf.cast(self.world_size, s.dtype) if s.dtype.is_floating else s // self.world_size
                for s in summed]

    def allgather(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Each tensor of every worker, concatenated along its first axis in rank order (its
        first dimension may differ between workers; callable inside tf.function).

        It travels as a sum in which each worker contributes only its own rows (padded to the
        longest) and zeros elsewhere: every transport can carry it, and x + 0 is x, so every
        value arrives exact."""
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        mine = tf.stack([tf.shape(t, out_type=tf.int64)[0] for t in tensors])
        owner = tf.one_hot(self.rank, self.world_size, dtype=tf.int64)
        rows = self._allreduce_bucket([owner[:, None] * mine[None, :]])[0]  # [world, tensors]
        gathered = []
        for i, tensor in enumerate(tensors):
            missing = tf.reduce_max(rows[:, i]) - mine[i]  # rows short of the longest
            padding = tf.concat([[[0, missing]], tf.zeros([tensor.shape.rank - 1, 2], tf.int64)],
                                axis=0)
            padded = tf.pad(tensor, padding)
            slots = tf.stack([padded if r == self.rank else tf.zeros_like(padded)
                              for r in range(self.world_size)])
            everyone = self._allreduce_bucket([slots])[0]
            gathered.append(tf.concat([everyone[r, :rows[r, i]]
                                       for r in range(self.world_size)], axis=0))
        return gathered

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

    def average_updates(self, model: keras.Model, flags: SharedFlags | None = None, *,
                        compression: str = "none", bucket_bytes: int | None = None) -> None:
        """Every optimizer ``model`` updates with (a GAN has one per sub-model) averages its
        gradients, and ``flags``, over the workers; its synchronized BatchNormalization layers
        take their statistics over them."""
        for optimizer in optimizers_of(model).values():
            distribute_optimizer(optimizer, self, flags=flags, compression=compression,
                                 bucket_bytes=bucket_bytes)
        synchronize_batch_norm(model, self)

    def plain_updates(self, model: keras.Model) -> None:
        """``average_updates`` undone (before the model is saved)."""
        for optimizer in optimizers_of(model).values():
            undistribute(optimizer)
        desynchronize_batch_norm(model)

    def copy_from_chief(self, variables: Sequence) -> None:
        """Every worker's ``variables`` take rank 0's values."""
        broadcast_variables(variables, self)


def buckets(tensors: Sequence[tf.Tensor], bucket_bytes: int | None) -> list[list[int]]:
    """Indices of ``tensors`` in groups of one dtype and at most ``bucket_bytes`` (a larger
    tensor alone), from the last tensor to the first: backprop makes the gradients of the last
    layers first, so their exchange can start while the first layers' are computed."""
    done: list[list[int]] = []
    filling: dict[tf.DType, tuple[list[int], int]] = {}
    for i in reversed(range(len(tensors))):
        dtype = tensors[i].dtype
        size = tensors[i].shape.num_elements() * dtype.size
        indices, total = filling.get(dtype, ([], 0))
        if indices and bucket_bytes and total + size > bucket_bytes:
            done.append(indices)
            indices, total = [], 0
        filling[dtype] = (indices + [i], total + size)
    return done + [indices for indices, _ in filling.values()]


class TensorFlowCollectives(Communicator):
    """TensorFlow's collective ops between the given peers: NCCL when this worker has a GPU
    (one process per GPU), else a ring all-reduce over gRPC.

    ``MultiWorkerMirroredStrategy`` is created only to start TF's collective runtime from
    TF_CONFIG; the model is built outside its scope (Keras 3's fit fails inside it,
    keras-team/keras#20585), and gradients are reduced with ``CollectiveReduceV2``.
    Must be created before TensorFlow runs any op in this process.
    """

    name = "collective"
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

    def _allreduce_bucket(self, parts: list[tf.Tensor]) -> list[tf.Tensor]:
        flat = tf.concat([tf.reshape(p, [-1]) for p in parts], axis=0)
        # Every worker creates its reductions in the same order, so keys agree across workers.
        reduced = tf.raw_ops.CollectiveReduceV2(
            input=flat, group_size=self.world_size, group_key=self._GROUP_KEY,
            instance_key=next(self._instance_keys), ordering_token=[], merge_op="Add",
            final_op="Id", communication_hint=self._hint)
        if all(p.shape.is_fully_defined() for p in parts):
            sizes, shapes = [p.shape.num_elements() for p in parts], [p.shape for p in parts]
        else:  # known only when the step runs (ktrain's allgather)
            sizes, shapes = tf.stack([tf.size(p) for p in parts]), [tf.shape(p) for p in parts]
        return [tf.reshape(r, shape) for r, shape in zip(tf.split(reduced, sizes), shapes)]


class MpiCommunicator(Communicator):
    """MPI through mpi4py, called from the train step by ``tf.numpy_function``.

    A bucket's tensors reach NumPy as views of TensorFlow's memory. A bucket of one tensor is
    summed from there straight into a buffer kept from step to step (``_FusedBuffers``);
    several are first copied into one buffer's slots and summed there in place. The sums go
    back as views of the buffer, which TensorFlow adopts without copying.

    Buckets from ``RING_FROM_BYTES`` on are summed by a ring (``_ring_allreduce``) of MPI
    ``Sendrecv`` calls, smaller ones by MPI's ``Allreduce``: Open MPI's out-of-place
    ``Allreduce`` first copies the whole input into the result, and the ring does not (on 2
    ranks of this machine it was 1.3-1.7x faster from 1 MB to 64 MB, as fast as Open MPI's
    in-place form; see the README).
    """

    name = "mpi"
    needs_eager_ops = True

    RING_FROM_BYTES = 2**20
    """Below this, a bucket's exchange costs its latency, and MPI's own Allreduce has less."""

    def __init__(self):
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self._buffers = _FusedBuffers()
        self._received = np.empty(0, np.uint8)
        super().__init__(self._comm.Get_rank(), self._comm.Get_size())

    def _allreduce_bucket(self, parts: list[tf.Tensor]) -> list[tf.Tensor]:
        def reduce(*arrays: np.ndarray) -> list[np.ndarray]:
            fused = self._buffers.take(arrays)
            if len(arrays) == 1:
                self._sum(arrays[0].reshape(-1), fused.slots[0])
            else:
                for slot, array in zip(fused.slots, arrays):
                    slot[...] = array.reshape(-1)
                self._sum(fused.flat, fused.flat)
            return [slot.reshape(array.shape) for slot, array in zip(fused.slots, arrays)]

        results = tf.nest.flatten(  # eagerly, one output comes back as a tensor, not a list
            tf.numpy_function(reduce, parts, [p.dtype for p in parts], stateful=True))
        for result, part in zip(results, parts):
            result.set_shape(part.shape)
        return results

    def _sum(self, send: np.ndarray, out: np.ndarray) -> None:
        """``out`` = ``send`` summed over all ranks (``send`` may be ``out``)."""
        if out.nbytes >= self.RING_FROM_BYTES and self.world_size > 1:
            self._ring_allreduce(send, out)
        else:
            self._comm.Allreduce(self._mpi.IN_PLACE if send is out else send, out,
                                 op=self._mpi.SUM)

    def _ring_allreduce(self, send: np.ndarray, out: np.ndarray) -> None:
        """The ring all-reduce (as in Horovod and NCCL): in N-1 steps each rank adds the chunk
        its left neighbour sends to its own, ending with the whole sum of one chunk; in N-1 more
        the summed chunks go round. Each chunk is summed on one rank only, so every rank gets
        the same bits; ``send`` is read where it lies, never copied."""
        world, rank = self.world_size, self.rank
        bounds = [out.size * i // world for i in range(world + 1)]

        def chunk(array: np.ndarray, index: int) -> np.ndarray:
            index %= world
            return array[bounds[index]:bounds[index + 1]]

        right, left = (rank + 1) % world, (rank - 1) % world
        largest = max(b - a for a, b in zip(bounds, bounds[1:])) * out.itemsize
        if self._received.nbytes < largest:
            self._received = np.empty(largest, np.uint8)
        for step in range(world - 1):  # after it, chunk rank-step-1 holds step+2 ranks' sum
            sent, summed = rank - step, rank - step - 1
            received = self._received[:chunk(out, summed).nbytes].view(out.dtype)
            self._comm.Sendrecv(chunk(send if step == 0 else out, sent), dest=right,
                                recvbuf=received, source=left)
            np.add(received, chunk(send, summed), out=chunk(out, summed))
        for step in range(world - 1):  # this rank holds the whole sum of chunk rank+1
            self._comm.Sendrecv(chunk(out, rank + 1 - step), dest=right,
                                recvbuf=chunk(out, rank - step), source=left)


_ALIGNMENT = 64
"""TensorFlow adopts a NumPy array returned to it, without copying, when its data is aligned
so (EIGEN_MAX_ALIGN_BYTES)."""


class _FusedBuffers:
    """Fused buffers by layout (dtype and tensor sizes), kept from step to step: no allocation
    or page faults per step, and buckets of one layout share them, warm in the cache. A buffer
    is reused only once TensorFlow has let go of every view it was handed; until then a bucket
    gets another one, so a layout keeps as many as were ever in use at once (the stateful
    reductions of a step run one after another, in program order)."""

    def __init__(self):
        self._kept: dict[tuple, list[_Fused]] = {}

    def take(self, arrays: Sequence[np.ndarray]) -> _Fused:
        sizes = [a.size for a in arrays]
        kept = self._kept.setdefault((arrays[0].dtype.str, *sizes), [])
        for fused in kept:
            if fused.idle():
                return fused
        kept.append(_Fused(arrays[0].dtype, sizes))
        return kept[-1]


class _Fused:
    """One buffer with a slot per tensor, each slot starting at an aligned address."""

    def __init__(self, dtype: np.dtype, sizes: list[int]):
        step = max(1, _ALIGNMENT // dtype.itemsize)
        offsets = np.cumsum([0] + [-(-size // step) * step for size in sizes])
        nbytes = int(offsets[-1]) * dtype.itemsize
        self._memory = np.empty(nbytes + _ALIGNMENT, np.uint8)
        start = -self._memory.ctypes.data % _ALIGNMENT
        self.flat = self._memory[start:start + nbytes].view(dtype)
        self.flat[...] = 0  # the padding between slots is summed too
        self.slots = [self.flat[o:o + size] for o, size in zip(offsets, sizes)]
        self._references = sys.getrefcount(self._memory)  # every view NumPy made from it

    def idle(self) -> bool:
        """No view of it handed out is still alive."""
        return sys.getrefcount(self._memory) == self._references


class HorovodCommunicator(Communicator):
    """Horovod (Gloo or MPI underneath); ``grouped_allreduce`` lets Horovod fuse the tensors."""

    name = "horovod"
    needs_eager_ops = True

    def __init__(self):
        import horovod.tensorflow as hvd

        hvd.init()
        self._hvd = hvd
        super().__init__(hvd.rank(), hvd.size())

    def _allreduce_bucket(self, parts: list[tf.Tensor]) -> list[tf.Tensor]:
        return self._hvd.grouped_allreduce(parts, op=self._hvd.Sum)


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
                         *, compression: str = "none", bucket_bytes: int | None = None,
                         flags: SharedFlags | None = None) -> keras.optimizers.Optimizer:
    """Make ``optimizer`` average gradients over ``communicator`` before every update.

    The instance is changed in place (``ktrain.optimizers.averaging``), so the model keeps the
    same optimizer object, its variables and its config. ``undistribute`` reverts it, e.g.
    before saving.

    Args:
        optimizer: any Keras 3 optimizer (a ``LossScaleOptimizer``'s inner one is wrapped).
        communicator: the transport, e.g. ``MpiCommunicator()``.
        compression: ``none``, ``fp16`` or ``bf16``: the dtype float gradients travel in
            (see ``Communicator.allreduce_sum``).
        bucket_bytes: gradients travel in fused buckets of at most this many bytes, the last
            layers' first; None: one buffer per dtype.
        flags: ``SharedFlags`` whose values travel in the same allreduce (ktrain's stop flags).

    Returns:
        ``optimizer`` itself.
    """
    options = {"compression": compression, "bucket_bytes": bucket_bytes}

    def average(grads):
        sparse = [i for i, g in enumerate(grads) if isinstance(g, tf.IndexedSlices)]
        dense = [g for i, g in enumerate(grads) if i not in sparse]
        if flags is None:
            dense = communicator.allreduce_mean(dense, **options)
        else:
            # Counted once this rank's gradients exist: its data and compute are done.
            computed = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads]
            with tf.control_dependencies(computed):
                arrived = flags.arrivals.assign_add(1)
            with tf.control_dependencies([arrived]):
                raised = flags.raised.read_value()
            *dense, agreed = communicator.allreduce_mean([*dense, raised], **options)
            flags.agreed_values.assign(agreed)
        averaged = iter(dense)
        gathered = iter(_gathered_slices([grads[i] for i in sparse], communicator))
        return [next(gathered) if i in sparse else next(averaged) for i in range(len(grads))]

    return averaging(optimizer, average)


def _gathered_slices(slices: list[tf.IndexedSlices],
                     communicator: Communicator) -> list[tf.IndexedSlices]:
    """Sparse gradients (an Embedding's rows) averaged as rows, every worker's gathered: the
    optimizer then meets the rows one process would have made, in another order. Plain Keras
    updates sparse gradients row by row (Adam squares each row), so summing them into a dense
    tensor first would train other weights than one process does."""
    if not slices:
        return []
    gathered = communicator.allgather([t for g in slices for t in (g.values, g.indices)])
    return [tf.IndexedSlices(values / tf.cast(communicator.world_size, values.dtype), indices,
                             g.dense_shape)
            for g, values, indices in zip(slices, gathered[::2], gathered[1::2])]


def undistribute(optimizer: keras.optimizers.Optimizer) -> None:
    """Give ``optimizer`` back its own class (``distribute_optimizer`` undone)."""
    plain(optimizer)


def synchronize_batch_norm(model: keras.Model, communicator: Communicator) -> None:
    """Make every ``BatchNormalization(synchronized=True)`` layer of ``model`` take its batch
    statistics over every worker's share of the batch, as TensorFlow's MirroredStrategy does
    over one process' devices: count, sum and sum of squares travel in one sum, and the
    gradient flows back through the same sum. ``desynchronize_batch_norm`` undoes it (before
    the model is saved)."""
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.synchronized:
            plain = type(layer)
            layer.__class__ = type(plain.__name__, (plain,), {
                "_moments": _moments_over_workers, "_ktrain_communicator": communicator})


def desynchronize_batch_norm(model: keras.Model) -> None:
    for layer in model._flatten_layers(include_self=False):
        if hasattr(type(layer), "_ktrain_communicator"):
            layer.__class__ = type(layer).__mro__[1]


def _moments_over_workers(self, inputs, mask):
    """BatchNormalization._moments with the statistics of the whole global batch. With a mask,
    Keras takes local statistics whether synchronized or not, and so does this."""
    if mask is not None:
        return super(type(self), self)._moments(inputs, mask)
    x = tf.cast(inputs, tf.float32) if inputs.dtype in (tf.float16, tf.bfloat16) else inputs
    sums = tf.reduce_sum(x, self._reduction_axes)
    squares = tf.reduce_sum(tf.square(x), self._reduction_axes)
    count = tf.cast(tf.size(x) // tf.size(sums), x.dtype)
    total = _summed_over_workers(self._ktrain_communicator,
                                 tf.concat([sums, squares, count[None]], axis=0))
    channels = tf.size(sums)
    mean = total[:channels] / total[-1]
    variance = tf.maximum(total[channels:2 * channels] / total[-1] - tf.square(mean), 0.0)
    return tf.cast(mean, inputs.dtype), tf.cast(variance, inputs.dtype)


def _summed_over_workers(communicator: Communicator, tensor: tf.Tensor) -> tf.Tensor:
    """``tensor`` summed over the workers, differentiably: each worker's loss depends on every
    worker's input to the sum, so the gradient that flows back is the sum of theirs."""
    @tf.custom_gradient
    def total(x):
        return communicator.allreduce_sum([x])[0], \
            lambda upstream: communicator.allreduce_sum([upstream])[0]

    return total(tensor)


def broadcast_variables(variables: Sequence[tf.Variable], communicator: Communicator,
                        root: int = 0) -> None:
    """Assign ``root``'s values to ``variables`` on every worker (every worker calls it).

    Args:
        variables: the same variables, in the same order, on every worker (e.g.
            ``model.variables + model.optimizer.variables``).
        communicator: the transport.
        root: the rank whose values win.
    """
    variables = list(variables)
    for variable, value in zip(variables, communicator.broadcast([v.value for v in variables],
                                                                 root)):
        variable.assign(value)
