"""Several worker processes averaging gradients over TF collectives (gRPC) or MPI (mpi4py).

``ktrain run`` with ``workers: N`` on one machine starts N processes on 127.0.0.1 itself (like
``torchrun --nproc-per-node``); under ``srun`` or ``mpirun`` it joins what the environment
describes instead.
"""

from __future__ import annotations

from typing import Literal

from ktrain import backends
from ktrain.errors import UserError
from ktrain.environment import PEERS_ENV
from ktrain.rendezvous import free_ports
from ktrain.strategies.base import (ClusterProcessConfig, MultiProcessStrategy, Session,
                                    find_mpirun, mpirun_command, pin_local_device,
                                    use_network_interface, worker_session)


class MultiWorkerConfig(ClusterProcessConfig):
    name: Literal["multiworker"] = "multiworker"
    communicator: Literal["collective", "mpi"] = "collective"
    """collective: TensorFlow's collective ops over gRPC; mpi: MPI Allreduce via mpi4py."""


class MultiWorkerStrategy(MultiProcessStrategy):
    name = "multiworker"
    config_type = MultiWorkerConfig

    def prepare(self, run) -> None:
        super().prepare(run)
        if self.config.communicator == "mpi":
            backends.tensorflow_only("communicator: mpi", "strategy.communicator",
                                     "on JAX, XLA's collectives join the workers: use "
                                     "communicator: collective (under mpirun too)")
            _require_mpi()
            if self.config.compression == "fp16":
                raise UserError("fp16 compression is not available over MPI",
                                where="strategy.compression",
                                hint="use communicator: collective, or compression: none")

    def run_group(self, run):
        from ktrain.supervisor import WorkerSpec, python_command

        n = self.config.workers
        plan = {"KTRAIN_PLAN": run.model_dump_json()}
        if self.config.communicator == "mpi":
            command = python_command("-m", "mpi4py", "-m", "ktrain.worker_entry")
            return self.run_local_group(run, [WorkerSpec(mpirun_command(n, command), plan,
                                                         tuple(range(n)))])
        peers = ",".join(f"127.0.0.1:{port}" for port in free_ports(n))
        return self.run_local_group(run, [
            WorkerSpec(python_command("-m", "ktrain.worker_entry"),
                       {**plan, "KTRAIN_RANK": str(r), "KTRAIN_LOCAL_RANK": str(r),
                        "KTRAIN_WORLD_SIZE": str(n), PEERS_ENV: peers}, (r,))
            for r in range(n)])

    def open_session(self) -> Session:
        use_network_interface(self.config.network_interface)
        if self.config.communicator == "mpi":
            from ktrain.collectives import MpiCommunicator
            from ktrain.environment import detect

            found = detect()
            device = pin_local_device(found.local_rank)
            return worker_session(MpiCommunicator(), device, found)
        return collective_session(self.config.start_timeout, self.config.network_interface)


def collective_session(start_timeout: float, interface: str | None = None) -> Session:
    """A worker's session over TF collectives (or, on JAX, jax.distributed), with peers from
    the environment."""
    from ktrain.environment import detect
    from ktrain.rendezvous import peer_addresses

    found = detect()
    if backends.current() == "jax":
        from ktrain.jax_runtime import process_session

        peers = peer_addresses(found, start_timeout, interface)
        return process_session(found.rank, found.local_rank, peers, start_timeout)
    from ktrain.collectives import TensorFlowCollectives

    device = pin_local_device(found.local_rank)  # before TensorFlow's runtime starts
    peers = peer_addresses(found, start_timeout, interface)
    return worker_session(TensorFlowCollectives(found.rank, peers, timeout_seconds=start_timeout),
                          device, found)


def _require_mpi() -> None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise UserError("communicator mpi needs mpi4py and an MPI library, which are not "
                        "installed", where="strategy.communicator",
                        hint='pip install "ktrain-launcher[mpi]" (mpi4py and Open MPI), or '
                             "use communicator: collective") from None
    find_mpirun()

