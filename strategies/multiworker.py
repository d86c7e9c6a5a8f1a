"""Several worker processes averaging gradients over MPI (mpi4py) or TF collectives (gRPC).

``ktrain run`` with ``workers: N`` on one machine starts N processes itself (under ``mpirun``,
or on 127.0.0.1 for TF collectives, like ``torchrun --nproc-per-node``); under ``srun`` or
``mpirun`` it joins what the environment describes instead. An elastic group (``workers: {min,
max}``) that ``ktrain run`` starts in a SLURM batch script runs each rank as an ``srun`` step of
its own, over the allocation's nodes (``ktrain.allocation``).
"""

from __future__ import annotations

import importlib.util
import os
import random

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ktrain import backends, console
from ktrain.allocation import Allocation
from ktrain.config import MultiWorkerConfig
from ktrain.environment import ClusterEnvironment, detect, visible_gpus
from ktrain.errors import UserError
from ktrain.jax_runtime import process_session
from ktrain.launch import worker_command, worker_environment
from ktrain.rendezvous import free_ports, peer_addresses
from ktrain.session import Session
from ktrain.torch_runtime import process_session as torch_session
from ktrain.strategies.base import (MultiProcessStrategy, find_mpirun, mpirun_command,
                                    pin_local_device, use_network_interface, worker_session)
from ktrain.supervisor import Failure, WorkerSpec


def choose_communicator(found: ClusterEnvironment, env: dict[str, str] | None = None,
                        compression: str = "none", elastic: bool = False) -> tuple[str, str]:
    """The transport ``communicator: auto`` uses in the world ``found`` describes, and why.

    On CPUs, MPI where it can join the ranks (ktrain starting them with mpirun, or mpirun or
    ``srun --mpi=pmix`` having started them): it was the fastest in every measurement (README,
    Performance). TF collectives everywhere else, on GPUs (NCCL, where MPI would copy through
    the host), with compression (MPI has no half-precision type), and on JAX.
    """
    if backends.current() in ("jax", "torch"):
        return "collective", f"on {backends.current()}, {backends.current()}.distributed " \
                             f"joins the workers"
    if elastic:
        return "collective", "an elastic group re-forms at other sizes, and an MPI world cannot"
    if visible_gpus(env):
        return "collective", "GPUs: TF collectives reduce on them with NCCL"
    if compression != "none":
        return "collective", f"compression: {compression} travels over TF collectives"
    if importlib.util.find_spec("mpi4py") is None:
        return "collective", "mpi4py is not installed"
    if found.world_size == 1:  # ktrain starts the workers
        try:
            find_mpirun()
        except UserError:
            return "collective", "mpirun was not found"
        return "mpi", "mpi4py and mpirun are installed"
    if found.name in ("openmpi", "mpich"):
        return "mpi", f"{found.launcher} started the ranks"
    if found.name == "slurm" and "PMIX_RANK" in (os.environ if env is None else env):
        return "mpi", "srun --mpi=pmix started the ranks"
    return "collective", f"{found.launcher} started the ranks without an MPI world"


class MultiWorkerStrategy(MultiProcessStrategy):
    name = "multiworker"
    config: MultiWorkerConfig

    def communicator(self, found: ClusterEnvironment | None = None) -> tuple[str, str | None]:
        """The transport this process uses in the world ``found`` (default: detected here):
        the config's, or the one auto chooses, and auto's reason."""
        if self.config.communicator != "auto":
            return self.config.communicator, None
        return choose_communicator(found or detect(), compression=self.config.compression,
                                   elastic=self.config.elastic)

    def prepare(self, run) -> None:
        super().prepare(run)
        found = detect()
        transport, why = self.communicator(found)
        if why and found.rank == 0:
            console.info(f"communicator: {transport} ({why}; set strategy.communicator to "
                         f"choose)")
        if self.config.communicator == "mpi" and self.config.elastic:
            raise UserError("communicator: mpi cannot carry an elastic run (strategy.workers "
                            "is a range): an MPI world cannot change size",
                            where="strategy.communicator",
                            hint="use communicator: collective (or auto, which picks it)")
        if self.config.elastic and (allocation := Allocation.of_this_process()):
            _check_allocation(allocation, self.config.size_range[0], run.output_dir)
        if self.config.communicator == "mpi":
            backends.tensorflow_only("communicator: mpi", "strategy.communicator",
                                     f"on {backends.current()}, "
                                     f"{backends.current()}.distributed joins the workers: use "
                                     f"communicator: collective (under mpirun too)")
            _require_mpi()
        self.check_compression(transport, f"communicator {transport}",
                               "or communicator: collective (fp16, bf16)")

    def run_group(self, run, train, size, environment):
        n = size
        if self.communicator()[0] == "mpi":  # mpirun gives each rank its place
            command = mpirun_command(n, worker_command("-m", "mpi4py"))
            return self.run_local_group(
                run, [WorkerSpec(command, worker_environment(run, train), tuple(range(n)))],
                environment)
        if self.config.elastic and (allocation := Allocation.of_this_process()):
            return self._run_steps(run, train, size, environment, allocation)
        peers = [f"127.0.0.1:{port}" for port in free_ports(n)]
        return self.run_local_group(run, [
            WorkerSpec(worker_command(), worker_environment(
                run, train, rank=r, world_size=n, local_rank=r, peers=peers), (r,))
            for r in range(n)], environment)

    def _run_steps(self, run, train, size: int, environment, allocation: Allocation):
        """An elastic group in a SLURM allocation: each rank an ``srun`` step of its own, on
        the allocation's nodes that are up, so that losing one ends no other."""
        fewest, most = self.config.size_range
        places = allocation.places(size, allocation.up())
        if len(places) < fewest:
            return Failure(None, f"the nodes of SLURM job {allocation.job_id} that are up take "
                                 f"{len(places)} worker(s), fewer than strategy.workers.min "
                                 f"({fewest})")
        master = f"{places[0][0]}:{_gathering_port(allocation, places[0][0])}"
        specs = [WorkerSpec(allocation.step(node, worker_command()), worker_environment(
            run, train, rank=r, world_size=len(places), local_rank=local, master=master), (r,),
            relays_signals=True) for r, (node, local) in enumerate(places)]

        def has_room() -> bool:  # nodes up that run a step, this group's and others
            used = {node for node, _ in places}
            nodes = tuple(node for node in allocation.up()
                          if node in used or allocation.runs_steps(node))
            return len(allocation.places(most, nodes)) > len(places)

        return self.run_local_group(run, specs, environment, has_room)

    def open_session(self, run) -> Session:
        use_network_interface(self.config.network_interface)
        found = detect()
        if self.communicator(found)[0] == "mpi":
            from ktrain.collectives import MpiCommunicator  # imports TensorFlow: ranks only

            device = pin_local_device(found.local_rank)
            return worker_session(MpiCommunicator(), device, found)
        return collective_session(self.config.start_timeout, run.output_dir,
                                  self.config.network_interface)


def collective_session(start_timeout: float, output_dir: str,
                       interface: str | None = None) -> Session:
    """A worker's session over TF collectives (or, on JAX, jax.distributed), with peers from
    the environment (or, under srun, ``ktrain.rendezvous`` in the run writing ``output_dir``)."""
    found = detect()
    if backends.current() in ("jax", "torch"):
        join = process_session if backends.current() == "jax" else torch_session
        return join(found.rank, found.local_rank,
                    peer_addresses(found, start_timeout, output_dir, interface), start_timeout)
    from ktrain.collectives import TensorFlowCollectives  # imports TensorFlow: ranks only

    device = pin_local_device(found.local_rank)  # before TensorFlow's runtime starts
    peers = peer_addresses(found, start_timeout, output_dir, interface)
    return worker_session(TensorFlowCollectives(found.rank, peers, timeout_seconds=start_timeout),
                          device, found)


def _check_allocation(allocation: Allocation, fewest: int, output_dir: str) -> None:
    """An elastic group's ranks run on the allocation's nodes: they must fit, and reach the
    run's folder (where they say where they are, and the launcher who saves)."""
    if allocation.tasks < fewest:
        raise UserError(f"SLURM job {allocation.job_id} has {allocation.tasks} task(s) "
                        f"({len(allocation.nodes)} node(s)), fewer than strategy.workers.min "
                        f"({fewest})", where="strategy.workers",
                        hint=f"submit with at least {fewest} tasks (sbatch --ntasks or "
                             f"--ntasks-per-node), or lower workers.min")
    if not isinstance(fsspec.core.url_to_fs(output_dir)[0], LocalFileSystem):
        raise UserError(f"an elastic group across a SLURM allocation needs output_dir on a "
                        f"file system every node mounts, and {output_dir} is a URL",
                        where="output_dir",
                        hint="use a path on a shared file system, or give workers one size")


def _gathering_port(allocation: Allocation, host: str) -> int:
    """A port for rank 0 on ``host`` to gather the others' addresses at: one free now where
    this launcher runs there (a batch script), else a random one (``salloc`` on a login node;
    rank 0 says so if it is taken)."""
    if host == allocation.launcher_host:
        return free_ports(1, "0.0.0.0")[0]
    return 20000 + random.randrange(10000)


def _require_mpi() -> None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise UserError("communicator mpi needs mpi4py and an MPI library, which are not "
                        "installed", where="strategy.communicator",
                        hint='pip install "ktrain-launcher[mpi]" (mpi4py and Open MPI), or '
                             "use communicator: collective") from None
    find_mpirun()

