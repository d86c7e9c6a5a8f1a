"""Which Keras backend a run uses: settled once, before anything imports Keras.

Keras reads KERAS_BACKEND when it is first imported, so every process ktrain starts (the
launcher, its workers, Spark tasks' workers, Ray actors) calls ``activate`` with the run's
backend first. Config, data order, checkpoints, supervision and outputs are the same on every
backend; what differs is how replicas share the work:

- tensorflow: ``tf.distribute.MirroredStrategy`` in one process; across processes ktrain's own
  gradient averaging (``ktrain.collectives``) over TF collectives, MPI or Horovod.
- jax: ``keras.distribution.DataParallel`` over the devices of every process (joined by
  ``jax.distributed``); XLA's collectives reduce the gradients (gloo on CPU, NCCL on GPU).
  See ``ktrain.jax_runtime``.
- torch: one device per process; across processes ktrain averages the gradients over
  ``torch.distributed`` (Gloo on CPU, NCCL on GPU). See ``ktrain.torch_runtime``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from ktrain.errors import UserError

BACKENDS = ("tensorflow", "jax", "torch")
_PACKAGES = {"jax": "JAX", "torch": "PyTorch"}
DEFAULT = "tensorflow"
ENV = "KERAS_BACKEND"


def resolve(configured: str | None, env=None) -> str:
    """The config's ``backend``, else KERAS_BACKEND, else tensorflow; a conflict is an error."""
    env = os.environ if env is None else env
    from_env = env.get(ENV) or None
    if configured and from_env and configured != from_env:
        raise UserError(f"the config says backend: {configured}, but KERAS_BACKEND is "
                        f"'{from_env}'", where="backend",
                        hint="remove one of them (unset KERAS_BACKEND, or drop backend from "
                             "the config), or make them agree")
    chosen = configured or from_env or DEFAULT
    if chosen not in BACKENDS:
        raise UserError(f"KERAS_BACKEND is '{chosen}'; ktrain trains on {', '.join(BACKENDS)}",
                        where="KERAS_BACKEND",
                        hint=f"set KERAS_BACKEND to one of {', '.join(BACKENDS)}, or unset it")
    if chosen != DEFAULT and importlib.util.find_spec(chosen) is None:
        raise UserError(f"backend {chosen} needs {_PACKAGES[chosen]}, which is not installed",
                        where="backend" if configured else "KERAS_BACKEND",
                        hint=f'pip install "ktrain-launcher[{chosen}]"')
    return chosen


def activate(backend: str) -> None:
    """Make ``backend`` the one Keras loads in this process (and in the processes it starts)."""
    os.environ[ENV] = backend
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise UserError(f"Keras was already imported with the {keras.backend.backend()} "
                            f"backend in this process, before ktrain could select {backend}",
                            where="backend",
                            hint=f"set KERAS_BACKEND={backend} in the environment that starts "
                                 f"this process, or import ktrain before Keras")


def current() -> str:
    """The backend this process' Keras runs on (once ``activate`` has been called)."""
    return os.environ.get(ENV) or DEFAULT


def optional_tensorflow():
    """TensorFlow, or None where it is not installed: tf.data feeds every backend where it
    exists; JAX without it trains on arrays in memory (``ktrain.data.ArraySplit``)."""
    try:
        import tensorflow

        return tensorflow
    except ImportError:
        return None


def require_tensorflow(what: str, where: str) -> None:
    """Refuse ``what`` (which reads through tf.data) where TensorFlow is not installed."""
    if optional_tensorflow() is None:
        raise UserError(f"{what} is read through TensorFlow's tf.data, and TensorFlow is not "
                        f"installed", where=where,
                        hint="pip install tensorflow-cpu (its CPU build is enough, beside JAX "
                             "on GPUs too), or return the examples as NumPy arrays")


def tensorflow_only(feature: str, where: str, hint: str) -> None:
    """Refuse, on another backend, ``feature``, which exists on TensorFlow only."""
    if current() != "tensorflow":
        raise UserError(f"{feature} runs on the TensorFlow backend only, and this run uses "
                        f"{current()}", where=where, hint=hint)
