"""In-process data parallelism over the devices of one machine: ``tf.distribute.MirroredStrategy``
on TensorFlow, ``keras.distribution.DataParallel`` on JAX (``ktrain.jax_runtime``); on torch,
one device per process, so several are ``multiworker``'s processes (``ktrain.torch_runtime``)."""

from __future__ import annotations

import os

from ktrain import backends, console
from ktrain.config import MirroredConfig, MultiWorkerConfig
from ktrain.environment import detect, visible_gpus
from ktrain.errors import UserError
from ktrain.jax_runtime import local_session
from ktrain.launch import train_here
from ktrain.session import Session
from ktrain.torch_runtime import local_device
from ktrain.strategies.base import Strategy
from ktrain.strategies.multiworker import MultiWorkerStrategy


_ONE_PROCESS = {"slurm": " (`srun -n 1 ...`)", "openmpi": " (`mpirun -n 1 ...`)",
                "mpich": " (`mpiexec -n 1 ...`)", "horovodrun": " (`horovodrun -np 1 ...`)",
                "tf_config": " (unset TF_CONFIG)"}


class MirroredStrategy(Strategy):
    name = "mirrored"
    config: MirroredConfig

    def prepare(self, run) -> None:
        found = detect()
        if found.world_size > 1:  # N copies would train into one output_dir
            raise UserError(
                f"strategy mirrored runs in one process, but {found.launcher} started "
                f"{found.world_size} (this is rank {found.rank})", where="strategy.name",
                hint="use strategy.name=multiworker (one process per device, each with its "
                     "share of the batch), or start one process" + _ONE_PROCESS.get(found.name, ""))
        if backends.current() == "tensorflow":
            self._devices = self._configure_devices()
            run.train.check_split(len(self._devices), "devices")
        if backends.current() == "torch":
            run.train.check_split(self._torch_devices(), "devices")

    def launch(self, run, train):
        if backends.current() == "torch" and (devices := self._torch_devices()) > 1:
            return _process_per_device(run, devices, train)
        return train_here(run, self.open_session, train)

    def _torch_devices(self) -> int:
        """The devices a torch run trains on: every GPU, else one CPU ("auto"), or N."""
        return (visible_gpus() or 1) if self.config.devices == "auto" else self.config.devices

    def open_session(self, run) -> Session:
        if backends.current() == "jax":
            session = local_session(self.config.devices)
            run.train.check_split(session.num_replicas, "devices")
            return session
        if backends.current() == "torch":
            return Session(rank=0, world_size=1, num_replicas=1, devices=(local_device(),))
        import tensorflow as tf

        devices = self._devices
        # One device: Keras' default (no) strategy is the plain, fastest path.
        distribution = tf.distribute.MirroredStrategy(list(devices)) if len(devices) > 1 else None
        return Session(rank=0, world_size=1, num_replicas=len(devices),
                       distribution=distribution, devices=devices)

    def _configure_devices(self) -> tuple[str, ...]:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        wanted = self.config.devices
        if gpus:
            count = len(gpus) if wanted == "auto" else wanted
            if count > len(gpus):
                raise UserError(
                    f"strategy.devices is {count} but this machine has {len(gpus)} GPU(s)",
                    where="strategy.devices",
                    hint=f"set strategy.devices to at most {len(gpus)}, or to auto")
            devices = tuple(f"/gpu:{i}" for i in range(count))
        else:
            count = 1 if wanted == "auto" else wanted
            cores = os.cpu_count() or 1
            if count > cores:
                raise UserError(
                    f"strategy.devices is {count} but this machine has no GPU and only "
                    f"{cores} CPU core(s) to split into logical devices",
                    where="strategy.devices",
                    hint=f"set strategy.devices to at most {cores}, or to auto")
            if count > 1:
                _split_cpu(tf, count)
            devices = tuple(f"/cpu:{i}" for i in range(count))
        return devices


def _split_cpu(tf, count: int) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != count:
            raise RuntimeError(
                f"TensorFlow was initialised with {existing} CPU device(s) before ktrain could "
                f"split the CPU into {count}; run in a fresh process") from None


def _process_per_device(run, devices: int, train):
    """Keras' torch backend trains on one device per process: several are ``multiworker``'s
    processes on this machine, one per device, as torchrun starts them."""
    console.info(f"on torch, strategy mirrored runs one process per device: {devices} "
                 f"processes (strategy multiworker, workers: {devices})")
    as_workers = run.model_copy(update={"strategy": MultiWorkerConfig(
        workers=devices, communicator="collective")})
    workers = MultiWorkerStrategy(as_workers.strategy)
    workers.prepare(as_workers)
    return workers.launch(as_workers, train)
