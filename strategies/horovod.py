"""Horovod allreduce (Gloo or MPI) under ktrain's own gradient averaging.

Horovod's Keras integration fails on Keras 3, so only its low-level ``horovod.tensorflow`` ops
are used (``ktrain.collectives.HorovodCommunicator``). ktrain starts the workers with
``horovodrun --gloo``, or with ``mpirun`` for the MPI controller (``horovodrun --mpi`` passes
Open MPI 4 options that Open MPI 5 rejects), or runs inside an existing
``horovodrun``/``mpirun``/``srun`` launch.
"""

from __future__ import annotations

from typing import Literal

from ktrain.errors import UserError
from ktrain.strategies.base import (MultiProcessConfig, MultiProcessStrategy, Session,
                                    find_mpirun, find_tool, mpirun_command,
                                    pin_local_device, worker_session)

_INSTALL_HINT = "install it with `bash scripts/install_horovod.sh` (see the README's Horovod section)"


class HorovodConfig(MultiProcessConfig):
    name: Literal["horovod"] = "horovod"
    controller: Literal["gloo", "mpi"] = "gloo"
    """How horovodrun starts and connects the workers."""


class HorovodStrategy(MultiProcessStrategy):
    name = "horovod"
    config_type = HorovodConfig

    def prepare(self, run) -> None:
        super().prepare(run)
        try:
            import horovod.tensorflow  # noqa: F401
        except ImportError as err:
            raise UserError(f"Horovod is not installed ({err})", where="strategy.name",
                            hint=_INSTALL_HINT) from None
        if self.config.controller == "gloo":
            _horovodrun()
        else:
            find_mpirun()

    def run_group(self, run):
        from ktrain.supervisor import WorkerSpec, python_command

        n = self.config.workers
        worker = python_command("-m", "ktrain.worker_entry")
        if self.config.controller == "gloo":
            command = [_horovodrun(), "-np", str(n), "-H", f"localhost:{n}", "--gloo",
                       "--network-interface", "lo", *worker]
        else:
            command = mpirun_command(n, worker)
        plan = {"KTRAIN_PLAN": run.model_dump_json()}
        return self.run_local_group(run, [WorkerSpec(command, plan, tuple(range(n)))])

    def open_session(self) -> Session:
        from ktrain.collectives import HorovodCommunicator
        from ktrain.environment import detect

        found = detect()
        device = pin_local_device(found.local_rank)
        return worker_session(HorovodCommunicator(), device, found)


def _horovodrun() -> str:
    return find_tool("horovodrun", where="strategy.name", hint=_INSTALL_HINT)
