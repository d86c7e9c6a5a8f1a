"""What one worker knows about the run it is part of: the ``Session`` a strategy opens in each
rank and the training code reads (rank, world, device scope, how it talks to its peers)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any


@dataclass
class Session:
    """What one worker knows about the run it is part of."""

    rank: int
    world_size: int
    num_replicas: int
    distribution: Any = None
    """Whose scope the model is built and trained in: a ``tf.distribute.Strategy`` (TensorFlow)
    or a ``keras.distribution.Distribution`` (JAX); None for Keras' plain single device."""
    devices: tuple[str, ...] = ()
    communicator: Any = None
    """When the worker has peer processes: a ``ktrain.collectives.Communicator`` (TensorFlow;
    it averages the gradients) or a ``ktrain.jax_runtime.JaxProcesses`` (XLA does)."""
    log_to_file: bool = True
    """False when a supervisor already captures this process' output into logs/rank-<r>.log."""
    data_shard: Any = None
    """This worker's share of the data, when the strategy's driver split it (Ray Data)."""

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def scope(self):
        return self.distribution.scope() if self.distribution else contextlib.nullcontext()

    def summed(self, values):
        """``values`` (a NumPy array) added up over the ranks, as float64; every rank calls
        this."""
        return values if self.communicator is None else self.communicator.sum_host(values)
