"""The interface every execution strategy implements, and what a worker gets from it.

A strategy answers two questions: how are workers started (``launch``), and what does a
worker need to train (``open_session``: the device scope, its rank and world size, and how
it talks to its peers). Everything else (data, model, checkpoints, metrics) is shared and
lives in ``ktrain.worker``.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from ktrain.schema import Section

if TYPE_CHECKING:
    from ktrain.config import RunConfig
    from ktrain.output import RunResult


class StrategyConfig(Section):
    """The ``strategy:`` section; each strategy subclasses it with ``name: Literal[...]``."""

    name: str


COMPRESSIONS = {"collective": ("fp16", "bf16"), "mpi": (), "horovod": ("fp16",)}
"""The ``compression`` values each transport can send: MPI has no standard half-precision
datatype, and Horovod's allreduce no bfloat16 kernel."""


class MultiProcessConfig(StrategyConfig):
    """Options shared by every strategy that runs several worker processes."""

    workers: PositiveInt = 2
    start_timeout: PositiveFloat = 120.0
    """Seconds for every worker to start and join; the ranks that did not are named."""
    max_restarts: NonNegativeInt = 0
    """Restart the whole group from the last checkpoint up to this many times."""
    compression: Literal["none", "fp16", "bf16"] = "none"
    """fp16 or bf16 halves the bytes sent per gradient, where the transport supports it."""
    bucket_mb: PositiveFloat | None = 4.0
    """Gradients travel in fused buckets of at most this many MB, the last layers' first;
    null: one buffer per dtype. The default is the fastest measured (README, Performance)."""
    lr_scaling: Literal["off", "linear", "sqrt"] = "off"
    """Multiply the learning rate by the world size (linear) or its square root."""
    warmup_epochs: NonNegativeInt = 0
    """Ramp the scaled learning rate up from the unscaled one over this many epochs."""
    stall_timeout: PositiveFloat | None = 300.0
    """Seconds the other ranks may wait at a gradient allreduce for a rank that does not come;
    it is then named, with its Python stacks, and the group stops (or restarts). null: off."""
    console_ranks: Literal["chief", "all"] = "chief"
    """Which ranks' output the console shows (every rank's goes to logs/rank-<r>.log)."""

    @property
    def bucket_bytes(self) -> int | None:
        """``bucket_mb`` as ``ktrain.collectives`` takes it."""
        return int(self.bucket_mb * 2**20) if self.bucket_mb else None

    @field_validator("lr_scaling", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class ClusterProcessConfig(MultiProcessConfig):
    """Options of the strategies whose workers may run on several hosts under srun or mpirun."""

    network_interface: str | None = None
    """The interface peers talk over (e.g. ib0, eth1); default: the one routing to rank 0."""


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


class Strategy(abc.ABC):
    """One way of running workers. Subclasses live one per module in ``strategies/``."""

    name: ClassVar[str]
    config_type: ClassVar[type[StrategyConfig]]

    def __init__(self, config: StrategyConfig):
        self.config = config

    @abc.abstractmethod
    def prepare(self, run: RunConfig) -> None:
        """Check the machine can run this config, before anything is written. Raises UserError."""

    @abc.abstractmethod
    def launch(self, run: RunConfig) -> RunResult:
        """Start the workers, wait for them, and return the chief's result."""

    def trains_here(self) -> bool:
        """Whether this process trains; if not, it only starts and watches the workers, and
        never loads Keras or TensorFlow (seconds of start-up, on every run)."""
        return True

    @abc.abstractmethod
    def open_session(self) -> Session:
        """Called inside a worker: set up devices and communicators for this process."""


class MultiProcessStrategy(Strategy):
    """A strategy whose workers are separate processes.

    If this process is already one of several (started by srun, mpirun or ktrain itself), it
    is a worker and trains. Otherwise it is the launcher: ``run_group`` starts the workers and
    waits for them, and the group is restarted up to ``max_restarts`` times.
    """

    config: MultiProcessConfig

    def world_size(self) -> int:
        from ktrain.environment import detect

        found = detect()
        return found.world_size if found.world_size > 1 else self.config.workers

    def prepare(self, run: RunConfig) -> None:
        from ktrain import backends
        from ktrain.errors import UserError

        if self.config.compression != "none":
            backends.tensorflow_only(f"compression: {self.config.compression}",
                                     "strategy.compression",
                                     "on JAX the gradients travel in the model's own dtype "
                                     "(train.precision: mixed_bfloat16 halves them): remove "
                                     "strategy.compression")
        workers = self.world_size()
        if run.train.global_batch_size % workers:
            size = run.train.global_batch_size
            raise UserError(
                f"train.global_batch_size {size} cannot be split evenly over {workers} workers",
                where="train.global_batch_size",
                hint=f"use a multiple of {workers}, e.g. {(size // workers + 1) * workers}")

    def check_compression(self, transport: str, said: str, elsewhere: str = "") -> None:
        """``strategy.compression`` must be one that ``transport`` (a key of COMPRESSIONS;
        ``said`` as the user knows it) can send; ``elsewhere``: where else it is, for the
        hint."""
        from ktrain.errors import UserError

        wanted, supported = self.config.compression, COMPRESSIONS[transport]
        if wanted != "none" and wanted not in supported:
            choices = " or ".join(f"compression: {c}" for c in ("none", *supported))
            raise UserError(f"compression: {wanted} is not available over {said}",
                            where="strategy.compression",
                            hint=" ".join(filter(None, (f"use {choices}", elsewhere))))

    def trains_here(self) -> bool:
        from ktrain.environment import detect

        return detect().world_size > 1  # srun, mpirun or ktrain started this process

    def launch(self, run: RunConfig) -> RunResult:
        from ktrain import console
        from ktrain.environment import detect

        if self.trains_here():
            return train_here(run, self)
        found = detect()
        if found.hint:
            console.info(f"HINT: {found.hint}")
        return self.run_with_restarts(run, self.run_group)

    @abc.abstractmethod
    def run_group(self, run: RunConfig):
        """One attempt at running all workers to the end: a ``ktrain.supervisor.Failure``,
        or None when they all finished."""

    def run_local_group(self, run: RunConfig, specs: list):
        """Start ``specs`` (``ktrain.supervisor.WorkerSpec``) on this machine and watch them."""
        import tempfile
        from pathlib import Path

        from ktrain.supervisor import WorkerGroup

        with tempfile.TemporaryDirectory(prefix="ktrain-rendezvous-") as rendezvous:
            group = WorkerGroup(specs, local_log_dir(run.output_dir), Path(rendezvous),
                                start_timeout=self.config.start_timeout,
                                console_ranks=self.config.console_ranks,
                                stop_signals=tuple(run.checkpoint.stop_signals))
            return group.run()

    def run_with_restarts(self, run: RunConfig, attempt) -> RunResult:
        """Call ``attempt(run)`` until it returns no Failure, up to ``max_restarts`` more times,
        resuming from the newest checkpoint; then return the chief's summary."""
        import time

        from ktrain import STARTED_AT, console
        from ktrain.errors import UserError, WorkersFailed
        from ktrain.output import RunOutput, RunResult

        restarts = 0
        while (failure := attempt(run)) is not None:
            hint = f"see {failure.log} for the whole log" if failure.log else None
            if failure.user_error or restarts >= self.config.max_restarts:
                advice = ("set strategy.max_restarts to restart the group from the newest "
                          "checkpoint" if not self.config.max_restarts else None)
                error = (UserError(failure.render(), hint=hint) if failure.user_error else
                         WorkersFailed(failure.render(),
                                       hint="; ".join(h for h in (hint, advice) if h) or None))
                error.shown = failure.shown
                raise error
            restarts += 1
            console.info(f"{failure.summary}; restarting all workers from the newest "
                         f"checkpoint (restart {restarts} of {self.config.max_restarts})")
            run = run.model_copy(update={"checkpoint": run.checkpoint.model_copy(
                update={"resume": "auto"})})
        # The command's wall time as the user saw it, workers' start-up and restarts included.
        return RunResult(RunOutput(run.output_dir).update_summary(
            wall_seconds=round(time.perf_counter() - STARTED_AT, 3)))


def train_here(run: RunConfig, strategy: Strategy) -> RunResult:
    """Run the worker in this process, Keras loaded first without TensorFlow's start-up lines
    (``ktrain.worker`` imports it)."""
    from ktrain import console

    console.import_keras(run.backend)
    from ktrain.worker import run_worker

    return run_worker(run, strategy)


def local_log_dir(output_dir: str):
    """Where the supervisor writes rank logs: output_dir/logs, or a temporary folder for URLs."""
    import tempfile
    from pathlib import Path

    import fsspec

    fs, out = fsspec.core.url_to_fs(output_dir)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return Path(out, "logs")
    return Path(tempfile.mkdtemp(prefix="ktrain-logs-"))


def worker_session(communicator, device: str, found) -> Session:
    """The session of one worker process that owns one device and talks over ``communicator``,
    once the world it joined is the one its launcher (``found``, ktrain.environment) started."""
    from ktrain.supervisor import is_supervised

    check_world(found, communicator.world_size, communicator.rank,
                transport=type(communicator).__name__)
    return Session(rank=communicator.rank, world_size=communicator.world_size,
                   num_replicas=communicator.world_size, devices=(device,),
                   communicator=communicator, log_to_file=not is_supervised())


def check_world(found, world_size: int, rank: int, *, transport: str) -> None:
    """A transport that forms its own world (MPI, Horovod) must agree with the launcher: under
    ``srun`` without a PMI that the MPI library speaks, every task starts MPI alone and N
    copies would train into one output_dir."""
    from ktrain.errors import UserError

    if (world_size, rank) == (found.world_size, found.rank):
        return
    hint = ("start the tasks with `srun --mpi=pmix` (see `srun --mpi=list`), or use "
            "communicator: collective, which needs no MPI" if found.name == "slurm" else
            f"start every rank with the same {found.launcher} command")
    raise UserError(f"{found.launcher} started {found.world_size} tasks (this one is rank "
                    f"{found.rank}), but {transport} sees {world_size} process(es) and calls this "
                    f"one rank {rank}", where="strategy", hint=hint)


def use_network_interface(interface: str | None) -> None:
    """Make the MPI and NCCL libraries talk over ``interface`` too (before they start), unless
    the user's environment already says which."""
    import os

    if interface:
        for variable in ("OMPI_MCA_btl_tcp_if_include", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, interface)


def pin_local_device(local_rank: int) -> str:
    """In a worker process: one GPU per worker (by local rank), else the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "/cpu:0"
    tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")
    return "/gpu:0"


def find_tool(name: str, *, where: str, hint: str) -> str:
    """A launcher executable (mpirun, horovodrun), looked up beside Python first."""
    import os
    import shutil
    import sys

    from ktrain.errors import UserError

    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    found = shutil.which(name, path=search)
    if not found:
        raise UserError(f"{name} was not found", where=where, hint=hint)
    return found


def find_mpirun() -> str:
    return find_tool("mpirun", where="strategy",
                     hint='pip install "ktrain-launcher[mpi]" puts Open MPI\'s mpirun in the '
                          "environment's bin/")


def mpirun_command(workers: int, command: list[str]) -> list[str]:
    """``mpirun`` starting ``workers`` copies of ``command`` on this machine, tagging each output
    line with its rank (see ktrain.supervisor), data over shared memory only."""
    return [find_mpirun(), "-np", str(workers), "--oversubscribe", "--allow-run-as-root",
            "--tag-output", "--mca", "btl", "self,vader", *command]
