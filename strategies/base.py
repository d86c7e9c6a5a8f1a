"""The interface every execution strategy implements.

A strategy answers two questions: where do the ranks run (``launch``, handed the function
every rank runs), and what does a rank need to train (``open_session``: the device scope, its
rank and world size, and how it talks to its peers). What a rank does with its session is the
training function's business (``ktrain.worker``), which no strategy imports.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import ClassVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ktrain import STARTED_AT, backends, console
from ktrain.config import MultiProcessConfig, RunConfig, StrategyConfig
from ktrain.environment import detect
from ktrain.errors import UserError, WorkersFailed
from ktrain.launch import Train, train_here
from ktrain.output import RunOutput, RunResult
from ktrain.regroup import Reformation
from ktrain.session import Session
from ktrain.supervisor import (LEFT_TO_GROW_OUTCOME, Failure, WorkerGroup, is_supervised,
                               temporary_folder)

COMPRESSIONS = {"collective": ("fp16", "bf16"), "mpi": (), "horovod": ("fp16",)}
"""The ``compression`` values each transport can send: MPI has no standard half-precision
datatype, and Horovod's allreduce no bfloat16 kernel."""


class Strategy(abc.ABC):
    """One way of running workers. Subclasses live one per module in ``strategies/``."""

    name: ClassVar[str]
    """Its ``strategy.name``; its options are ``ktrain.config.STRATEGY_OPTIONS[name]``."""

    def __init__(self, config: StrategyConfig):
        self.config = config

    @abc.abstractmethod
    def prepare(self, run: RunConfig) -> None:
        """Check the machine can run this config, before anything is written. Raises UserError."""

    @abc.abstractmethod
    def launch(self, run: RunConfig, train: Train) -> RunResult:
        """Run ``train`` in every rank (here, or in the workers this starts and waits for);
        return the chief's result."""

    def trains_here(self) -> bool:
        """Whether this process trains; if not, it only starts and watches the workers, and
        never loads Keras or TensorFlow (seconds of start-up, on every run)."""
        return True

    @abc.abstractmethod
    def open_session(self, run: RunConfig) -> Session:
        """Called inside a worker: set up devices and communicators for this process."""


class MultiProcessStrategy(Strategy):
    """A strategy whose workers are separate processes.

    If this process is already one of several (started by srun, mpirun or ktrain itself), it
    is a worker and trains. Otherwise it is the launcher: ``run_group`` starts the workers and
    waits for them, and the group is restarted up to ``max_restarts`` times.
    """

    config: MultiProcessConfig

    fixed_size: ClassVar[str | None] = None
    """Why this strategy's groups cannot change size, and what to use instead; None where
    they can (``strategy.workers: {min, max}``)."""

    def world_size(self) -> int:
        found = detect()
        return found.world_size if found.world_size > 1 else self.config.size_range[1]

    def prepare(self, run: RunConfig) -> None:
        if self.config.compression != "none":
            backends.tensorflow_only(f"compression: {self.config.compression}",
                                     "strategy.compression",
                                     f"on {backends.current()} the gradients travel in the "
                                     f"model's own dtype (train.precision: mixed_bfloat16 halves "
                                     f"them): remove strategy.compression")
        if self.config.elastic:
            self.check_elastic(run)
        run.train.check_split(self.world_size(), "workers")

    def check_elastic(self, run: RunConfig) -> None:
        """An elastic run trains the config's math at every size in its range: each of them
        splits the global batch evenly."""
        fewest, most = self.config.size_range
        if self.fixed_size:
            raise UserError(f"strategy.workers is a range ({fewest} to {most}), and "
                            f"{self.fixed_size}", where="strategy.workers",
                            hint=f"use strategy.name: multiworker for an elastic run, or set "
                                 f"workers: {most}")
        found = detect()
        if found.world_size > 1:
            raise UserError(f"{found.launcher} started this group at a fixed size, and "
                            f"strategy.workers is a range ({fewest} to {most})",
                            where="strategy.workers",
                            hint=f"let `ktrain run` start the workers (outside {found.launcher}), "
                                 f"or set workers: {found.world_size}")
        uneven = [n for n in range(fewest, most + 1) if run.train.global_batch_size % n]
        if uneven:
            whole = math.lcm(*range(fewest, most + 1))
            raise UserError(
                f"train.global_batch_size {run.train.global_batch_size} cannot be split evenly "
                f"over {' or '.join(map(str, uneven))} workers, sizes strategy.workers allows "
                f"({fewest} to {most})", where="train.global_batch_size",
                hint=f"use a multiple of {whole} (every size from {fewest} to {most} divides "
                     f"it), or a narrower range")

    def check_compression(self, transport: str, said: str, elsewhere: str = "") -> None:
        """``strategy.compression`` must be one that ``transport`` (a key of COMPRESSIONS;
        ``said`` as the user knows it) can send; ``elsewhere``: where else it is, for the
        hint."""
        wanted, supported = self.config.compression, COMPRESSIONS[transport]
        if wanted != "none" and wanted not in supported:
            choices = " or ".join(f"compression: {c}" for c in ("none", *supported))
            raise UserError(f"compression: {wanted} is not available over {said}",
                            where="strategy.compression",
                            hint=" ".join(filter(None, (f"use {choices}", elsewhere))))

    def trains_here(self) -> bool:
        return detect().world_size > 1  # srun, mpirun or ktrain started this process

    def launch(self, run: RunConfig, train: Train) -> RunResult:
        if self.trains_here():
            return train_here(run, self.open_session, train)
        found = detect()
        if found.hint and not self.config.elastic:  # an elastic group uses the allocation
            console.info(f"HINT: {found.hint}")
        return self.run_with_restarts(
            run, lambda run, size, environment: self.run_group(run, train, size, environment))

    @abc.abstractmethod
    def run_group(self, run: RunConfig, train: Train, size: int, environment: dict[str, str]):
        """One attempt at running ``train`` in ``size`` workers to the end, each with
        ``environment`` besides its own: a ``ktrain.supervisor.Failure``,
        ``LEFT_TO_GROW_OUTCOME``, or None when they all finished."""

    def run_local_group(self, run: RunConfig, specs: list, environment: dict[str, str],
                        has_room=lambda: True):
        """Start ``specs`` (``ktrain.supervisor.WorkerSpec``) from this machine and watch them.
        A group smaller than the most workers allowed is offered to grow once ``has_room()``
        (by default at once: the workers run on this machine, which had room for them all)."""
        with group_log_dir(run.output_dir) as (logs, kept_at):
            grows = self.may_grow(sum(len(spec.ranks) for spec in specs))
            return WorkerGroup(specs, logs, start_timeout=self.config.start_timeout,
                               console_ranks=self.config.console_ranks,
                               stop_signals=tuple(run.checkpoint.stop_signals),
                               logs_kept_at=kept_at, environment=environment,
                               has_room=has_room if grows else None).run()

    def may_grow(self, size: int) -> bool:
        """Whether a group of ``size`` is offered to grow back to ``workers.max``."""
        return self.config.grow and size < self.config.size_range[1]

    def run_with_restarts(self, run: RunConfig, attempt) -> RunResult:
        """Call ``attempt(run, size, environment)`` until the workers finish; then return the
        chief's summary. An elastic group goes on with the workers left after a loss (no
        fewer than ``workers.min``) and grows back to ``workers.max`` when its workers stop
        to grow; any other failure restarts the group at its size, up to ``max_restarts``
        times. Each new group resumes from the newest checkpoint, and learns why it was
        formed (``environment``)."""
        fewest, most = self.config.size_range
        size, restarts, environment = most, 0, {}
        while (outcome := attempt(run, size, environment)) is not None:
            if outcome == LEFT_TO_GROW_OUTCOME:
                change = Reformation("workers are available again", time.time(), "grow")
                size = most
            elif self.config.elastic and _absorbed(outcome, size, fewest):
                change = Reformation(outcome.summary, outcome.since, "shrink",
                                     outcome.completed_step, outcome.saved_by)
                size -= len(outcome.lost)
            else:
                restarts += 1
                self._check_restart(outcome, restarts)
                console.info(f"{outcome.summary}; restarting all workers from the newest "
                             f"checkpoint (restart {restarts} of {self.config.max_restarts})")
                change = Reformation(outcome.summary, outcome.since, "restart",
                                     outcome.completed_step, outcome.saved_by)
            environment = change.environment()
            run = run.model_copy(update={"checkpoint": run.checkpoint.model_copy(
                update={"resume": "auto"})})
        # The command's wall time as the user saw it, workers' start-up and restarts included.
        return RunResult(RunOutput(run.output_dir).update_summary(
            wall_seconds=round(time.perf_counter() - STARTED_AT, 3)))


    def _check_restart(self, failure: Failure, restarts: int) -> None:
        """Raise the group's failure unless restart number ``restarts`` may happen."""
        if not failure.user_error and restarts <= self.config.max_restarts:
            return
        hint = f"see {failure.log} for the whole log" if failure.log else None
        advice = ("set strategy.max_restarts to restart the group from the newest checkpoint"
                  if not self.config.max_restarts else None)
        error = (UserError(failure.render(), hint=hint) if failure.user_error else
                 WorkersFailed(failure.render(),
                               hint="; ".join(h for h in (hint, advice) if h) or None))
        error.shown = failure.shown
        raise error


def _absorbed(failure: Failure, size: int, fewest: int) -> bool:
    """Whether an elastic group of ``size`` goes on without the ranks ``failure`` lost."""
    return not failure.user_error and bool(failure.lost) and size - len(failure.lost) >= fewest


@contextlib.contextmanager
def group_log_dir(output_dir: str):
    """Where the launcher writes its ranks' logs while the block runs, and where they are kept
    (as the user names it): output_dir/logs; for a URL (no appending there), a temporary folder,
    copied to the URL at the end and removed even if the launcher is killed."""
    fs, out = fsspec.core.url_to_fs(output_dir)
    if isinstance(fs, LocalFileSystem):
        yield Path(out, "logs"), str(Path(out, "logs"))
        return
    with temporary_folder("ktrain-logs-") as folder:
        try:
            yield folder, f"{output_dir.rstrip('/')}/logs"
        finally:
            with contextlib.suppress(OSError):
                for log in folder.glob("*.log"):
                    fs.put_file(str(log), f"{out}/logs/{log.name}")


def worker_session(communicator, device: str, found) -> Session:
    """The session of one worker process that owns one device and talks over ``communicator``,
    once the world it joined is the one its launcher (``found``, ktrain.environment) started."""
    check_world(found, communicator.world_size, communicator.rank,
                transport=type(communicator).__name__)
    return Session(rank=communicator.rank, world_size=communicator.world_size,
                   num_replicas=communicator.world_size, devices=(device,),
                   communicator=communicator, log_to_file=not is_supervised())


def check_world(found, world_size: int, rank: int, *, transport: str) -> None:
    """A transport that forms its own world (MPI, Horovod) must agree with the launcher: under
    ``srun`` without a PMI that the MPI library speaks, every task starts MPI alone and N
    copies would train into one output_dir."""
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
