"""Several worker processes averaging gradients over TF collectives (gRPC) or MPI (mpi4py).

``ktrain run`` with ``workers: N`` on one machine starts N processes on 127.0.0.1 itself (like
``torchrun --nproc-per-node``); under ``srun`` or ``mpirun`` it joins what the environment
describes instead.
"""

from __future__ import annotations

import os
from typing import Literal

from ktrain.errors import UserError
from ktrain.rendezvous import free_ports
from ktrain.strategies.base import (MultiProcessConfig, MultiProcessStrategy, Session,
                                    find_mpirun, mpirun_command, pin_local_device,
                                    worker_session)

PEERS_ENV = "KTRAIN_PEERS"


class MultiWorkerConfig(MultiProcessConfig):
    name: Literal["multiworker"] = "multiworker"
    communicator: Literal["collective", "mpi"] = "collective"
    """collective: TensorFlow's collective ops over gRPC; mpi: MPI Allreduce via mpi4py."""


class MultiWorkerStrategy(MultiProcessStrategy):
    name = "multiworker"
    config_type = MultiWorkerConfig

    def prepare(self, run) -> None:
        super().prepare(run)
        if self.config.communicator == "mpi":
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
        if self.config.communicator == "mpi":
            from ktrain.collectives import MpiCommunicator
            from ktrain.environment import detect

            found = detect()
            device = pin_local_device(found.local_rank)
            return worker_session(MpiCommunicator(), device, found)
        return collective_session(self.config.start_timeout)


def collective_session(start_timeout: float) -> Session:
    """A worker's session over TF collectives, with peers from the environment."""
    from ktrain.collectives import TensorFlowCollectives
    from ktrain.environment import detect

    found = detect()
    device = pin_local_device(found.local_rank)  # before TensorFlow's runtime starts
    return worker_session(TensorFlowCollectives(found.rank, _peers(found, start_timeout),
                                                timeout_seconds=start_timeout), device, found)


def _peers(found, start_timeout: float) -> list[str]:
    if os.environ.get(PEERS_ENV):
        return os.environ[PEERS_ENV].split(",")
    if found.name == "tf_config":
        import json

        return json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
    if found.name == "slurm":
        from ktrain.rendezvous import gather_addresses

        return gather_addresses(found.rank, found.world_size, found.master_addr,
                                found.master_port, start_timeout)
    if found.name in ("openmpi", "mpich"):
        from ktrain.rendezvous import gather_addresses_over_mpi

        return gather_addresses_over_mpi()
    raise UserError(f"the collective communicator cannot find its peers under {found.launcher}",
                    where="strategy.communicator",
                    hint="start the workers with ktrain, srun or mpirun, or set TF_CONFIG")


def _require_mpi() -> None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise UserError("communicator mpi needs mpi4py and an MPI library, which are not "
                        "installed", where="strategy.communicator",
                        hint='pip install "ktrain-launcher[mpi]" (mpi4py and Open MPI), or '
                             "use communicator: collective") from None
    find_mpirun()

