"""Sessions on Keras' JAX backend: ``keras.distribution.DataParallel`` over the devices of
this process (mirrored) or of several processes joined by ``jax.distributed`` (multiworker,
spark, ray).

The model's variables are replicated on every device and each batch is split over them, so
the train step XLA compiles reduces the gradients itself (gloo between CPU processes, NCCL
between GPUs): no optimizer wrapper, and metrics come out global. Each process feeds its own
part of the global batch (ktrain's sharding, not Keras' auto-sharding), so the processes'
batches must have one shape: see ``common_share``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

import numpy as np

from ktrain import backends, console
from ktrain.errors import UserError, WorkersFailed
from ktrain.session import Session
from ktrain.supervisor import is_supervised


def local_session(wanted: int | str) -> Session:
    """DataParallel over ``wanted`` local devices ("auto": every GPU, else one CPU); N CPU
    devices when there is no GPU (XLA splits the host)."""
    import jax
    import keras

    if wanted != "auto":  # only the CPU platform reads it, and only before it starts
        jax.config.update("jax_num_cpu_devices", int(wanted))
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    available = gpus or jax.devices("cpu")
    count = (len(gpus) or 1) if wanted == "auto" else int(wanted)
    if count > len(available):
        kind = "GPU(s)" if gpus else "CPU devices"
        raise UserError(f"strategy.devices is {count} but JAX sees {len(available)} {kind}",
                        where="strategy.devices",
                        hint=f"set strategy.devices to at most {len(available)}, or to auto")
    devices = available[:count]
    distribution = keras.distribution.DataParallel(devices=devices) if count > 1 else None
    return Session(rank=0, world_size=1, num_replicas=count, distribution=distribution,
                   devices=tuple(_name(d) for d in devices))


def process_session(rank: int, local_rank: int, peers: list[str],
                    start_timeout: float) -> Session:
    """Join the other processes (rank 0's address in ``peers`` is the coordinator's), then
    DataParallel over every process' devices: one GPU per process, by local rank, unless the
    launcher already chose (``srun --gpus-per-task`` sets CUDA_VISIBLE_DEVICES); else the CPU."""
    import jax
    import keras

    os.environ.setdefault("CUDA_VISIBLE_DEVICES", str(local_rank))  # read as JAX's GPUs start
    try:
        jax.distributed.initialize(coordinator_address=peers[0], num_processes=len(peers),
                                   process_id=rank, coordinator_bind_address=peers[0],
                                   initialization_timeout=max(1, int(start_timeout)))
    except Exception as err:  # JAX reports a missing peer as a RuntimeError or XlaRuntimeError
        raise WorkersFailed.could_not_join(rank, peers, "jax.distributed", err) from None
    processes = JaxProcesses(rank, len(peers))
    with console.native_output_without(_GLOO_CONNECTED, sys.stdout):
        processes.barrier()  # the first collective: gloo connects, and says so
    distribution = keras.distribution.DataParallel(devices=jax.devices(),
                                                   auto_shard_dataset=False)
    return Session(rank=rank, world_size=len(peers), num_replicas=jax.device_count(),
                   distribution=distribution, devices=tuple(_name(d) for d in jax.local_devices()),
                   communicator=processes, log_to_file=not is_supervised())


_GLOO_CONNECTED = re.compile(r"^\[Gloo\] Rank \d+ is connected to")


def _name(device) -> str:
    return f"/{device.platform}:{device.id}"


class JaxProcesses:
    """The processes ``jax.distributed`` joined. XLA reduces the gradients inside the train
    step; this adds up the small host-side values ktrain shares (stop flags, the validation
    share, memory, the audit) through JAX's own collectives."""

    name = "jax.distributed"
    reduces_gradients = False
    """The train step reduces gradients by itself: nothing to wrap."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def sum_host(self, values) -> np.ndarray:
        """``values`` (float64) added up over the processes, exactly: they travel as bytes,
        since JAX computes in 32 bits unless told otherwise."""
        from jax.experimental import multihost_utils

        values = np.ascontiguousarray(values, np.float64)
        raw = multihost_utils.process_allgather(values.reshape(-1).view(np.uint8))
        every = np.asarray(raw).reshape(self.world_size, -1).view(np.float64)
        return every.sum(axis=0).reshape(values.shape)

    def barrier(self) -> None:
        self.sum_host(np.zeros(1))

    def flags(self, count: int) -> HostFlags:
        return HostFlags(self, count)


class HostFlags:
    """Flags any rank raises (a stop signal arrived) that every rank learns after the same
    step: summed over the processes after each step (``agreed``, called once a step)."""

    def __init__(self, processes: JaxProcesses, count: int):
        self.processes = processes
        self.raised = np.zeros(count)
        self.taken = 0

    def raise_flag(self, index: int = 0) -> None:
        self.raised[index] = 1.0

    def agreed(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.processes.sum_host(self.raised) > 0)]

    def counting(self, batches):
        """``batches`` (a tf.data.Dataset or NumPy batches), counted as this rank takes them.
        A rank ahead waits for the others inside the compiled step, where ktrain cannot count,
        so the stall watchdog compares how many batches each rank has taken instead."""
        for batch in batches.as_numpy_iterator() if hasattr(batches, "as_numpy_iterator") \
                else batches:
            self.taken += 1
            yield batch

    def arrived(self) -> int:
        """Batches this rank has taken from its input (see ktrain.watchdog)."""
        return self.taken


def even_share(session: Session) -> Callable[[int], int] | None:
    """On JAX with several devices: how many of its validation examples a process evaluates.
    Every batch is split evenly over the devices, and the processes' batches form one array:
    so the smallest share of any process, less what its devices cannot split."""
    if backends.current() != "jax" or session.distribution is None:
        return None

    def share(mine: int) -> int:
        if session.communicator is not None:
            shares = np.zeros(session.world_size)
            shares[session.rank] = mine
            mine = int(session.communicator.sum_host(shares).min())
        return mine - mine % len(session.devices)

    return share
