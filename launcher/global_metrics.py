"""Epoch metrics over every worker: each worker's, weighted by the examples it saw, added up
through whatever its communicator is (``sum_host``), on any backend."""

from __future__ import annotations

import keras


class GlobalMetrics(keras.callbacks.Callback):
    """Replace each worker's epoch metrics with the example-weighted mean over all workers.

    Put it first in the callback list: later callbacks (history, early stopping, checkpoints)
    then all see the same, global numbers on every worker.

    Args:
        communicator: the transport (a ``ktrain.collectives.Communicator``, or any with
            ``sum_host``).
        train_examples: the training examples this worker sees per epoch (its weight).
        validation_examples: the validation examples it evaluates per epoch.
    """

    def __init__(self, communicator, train_examples: int, validation_examples: int):
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
