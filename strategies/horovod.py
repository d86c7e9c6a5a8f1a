"""Horovod allreduce (Gloo or MPI) under ktrain's own gradient averaging.

Horovod's Keras integration fails on Keras 3, so only its low-level ``horovod.tensorflow`` ops
are used (``ktrain.collectives.HorovodCommunicator``). ktrain starts the workers with
``horovodrun --gloo``, or with ``mpirun`` for the MPI controller (``horovodrun --mpi`` passes
Open MPI 4 options that Open MPI 5 rejects), or runs inside an existing
``horovodrun``/``mpirun``/``srun`` launch. Inside a launch that horovodrun did not make, the
Gloo controller needs what horovodrun would have provided: ``_join_gloo`` has rank 0 serve
Horovod's rendezvous and gives every rank its place, so ``srun`` needs no PMI for Horovod.
"""

from __future__ import annotations

import importlib.util
import os
import threading

from ktrain import backends
from ktrain.config import HorovodConfig
from ktrain.environment import detect
from ktrain.errors import UserError
from ktrain.launch import worker_command, worker_environment
from ktrain.rendezvous import interface_of, peer_addresses, wait_for_listener
from ktrain.session import Session
from ktrain.strategies.base import (MultiProcessStrategy, find_mpirun, find_tool,
                                    mpirun_command, pin_local_device, use_network_interface,
                                    worker_session)
from ktrain.supervisor import WorkerSpec

_INSTALL_HINT = "install it with `bash scripts/install_horovod.sh` (see the README's Horovod section)"


class HorovodStrategy(MultiProcessStrategy):
    name = "horovod"
    config: HorovodConfig

    fixed_size = ("horovodrun starts a group of one size (Horovod Elastic does not run on "
                  "TensorFlow 2.16 or later)")

    def prepare(self, run) -> None:
        backends.tensorflow_only("the horovod strategy", "strategy.name",
                                 f"use strategy.name: multiworker, which on "
                                 f"{backends.current()} joins the workers with "
                                 f"{backends.current()}.distributed and averages their gradients "
                                 f"(under horovodrun, mpirun or srun too)")
        super().prepare(run)
        if importlib.util.find_spec("horovod") is None:  # its TensorFlow part: in the workers
            raise _not_installed("No module named 'horovod'")
        if self.config.controller == "gloo":
            _horovodrun()
        else:
            find_mpirun()
        self.check_compression("horovod", "Horovod")

    def run_group(self, run, train, size, environment):
        n = size
        worker = worker_command()
        if self.config.controller == "gloo":
            command = [_horovodrun(), "-np", str(n), "-H", f"localhost:{n}", "--gloo",
                       "--network-interface", "lo", *worker]
        else:
            command = mpirun_command(n, worker)
        return self.run_local_group(
            run, [WorkerSpec(command, worker_environment(run, train), tuple(range(n)))],
            environment)

    def open_session(self, run) -> Session:
        from ktrain.collectives import HorovodCommunicator  # imports TensorFlow: ranks only

        found = detect()
        use_network_interface(self.config.network_interface)
        if self.config.controller == "gloo" and found.name not in ("horovodrun", "ktrain"):
            _join_gloo(found, self.config, run.output_dir)
        device = pin_local_device(found.local_rank)
        try:
            communicator = HorovodCommunicator()
        except ImportError as err:  # horovod.tensorflow, e.g. built without TensorFlow
            raise _not_installed(str(err)) from None
        return worker_session(communicator, device, found)


def _not_installed(why: str) -> UserError:
    return UserError(f"Horovod is not installed ({why})", where="strategy.name",
                     hint=_INSTALL_HINT)


def _horovodrun() -> str:
    return find_tool("horovodrun", where="strategy.name", hint=_INSTALL_HINT)


def _join_gloo(found, config: HorovodConfig, output_dir: str) -> None:
    """Set up, in this rank's environment, the Gloo world horovodrun would have: every rank's
    address comes from ``ktrain.rendezvous``; rank 0 serves Horovod's rendezvous on its own."""
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

    addresses = peer_addresses(found, config.start_timeout, output_dir, config.network_interface)
    hosts = [address.rsplit(":", 1)[0] for address in addresses]
    if len(set(hosts)) > 1:
        _check_host_name(hosts[found.rank])
    slots = _slots(hosts)
    root_ip, root_port = addresses[0].rsplit(":", 1)
    if found.rank == 0:
        # Bound to rank 0's own address (not all interfaces, as horovodrun does); the listener
        # is up before the plan is set, and requests are served only after.
        server = RendezvousHTTPServer((root_ip, int(root_port)), RendezvousHandler, 0)
        server.init(slots)
        threading.Thread(target=server.serve_forever, daemon=True,
                         name="horovod-rendezvous").start()
    else:
        wait_for_listener(root_ip, int(root_port), config.start_timeout)
    mine = slots[found.rank]
    os.environ.update({
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": root_ip, "HOROVOD_GLOO_RENDEZVOUS_PORT": root_port,
        "HOROVOD_GLOO_IFACE": config.network_interface or interface_of(mine.hostname) or "lo",
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(int(config.start_timeout)),
        "HOROVOD_HOSTNAME": mine.hostname, "HOROVOD_RANK": str(mine.rank),
        "HOROVOD_SIZE": str(mine.size), "HOROVOD_LOCAL_RANK": str(mine.local_rank),
        "HOROVOD_LOCAL_SIZE": str(mine.local_size), "HOROVOD_CROSS_RANK": str(mine.cross_rank),
        "HOROVOD_CROSS_SIZE": str(mine.cross_size)})


def _check_host_name(own_ip: str) -> None:
    """Horovod 0.28 binds the Gloo connections of its process sets (the global one included)
    to the address the host's name resolves to, ignoring the interface it was given; where the
    name resolves to loopback (Debian's 127.0.1.1 line), the other hosts cannot connect and
    Gloo aborts with "connect [127.0.0.1]:N: Connection refused"."""
    import ipaddress
    import socket

    name = socket.gethostname()
    try:
        resolved = socket.gethostbyname(name)
    except OSError:
        resolved = None
    if resolved is None or ipaddress.ip_address(resolved).is_loopback:
        raise UserError(f"Horovod's Gloo controller needs this host's name to resolve to an "
                        f"address the other hosts reach, but '{name}' resolves to "
                        f"{resolved or 'nothing'}", where="strategy.controller",
                        hint=f"map '{name}' to {own_ip} (this host's address toward rank 0) "
                             "in /etc/hosts or DNS, or use controller: mpi under "
                             "`srun --mpi=pmix`")


def _slots(hosts: list[str]):
    """Horovod's place for each rank, given the host of each: local ranks count within a host,
    cross ranks count the hosts that have a given local rank (as horovodrun assigns them)."""
    from horovod.runner.common.util.hosts import SlotInfo

    local_ranks = [hosts[:rank].count(host) for rank, host in enumerate(hosts)]
    crosses = {}  # local rank -> hosts having it, in rank order
    for host, local in zip(hosts, local_ranks):
        crosses.setdefault(local, []).append(host)
    return [SlotInfo(hostname=host, rank=rank, local_rank=local,
                     cross_rank=crosses[local].index(host), cross_size=len(crosses[local]),
                     size=len(hosts), local_size=hosts.count(host))
            for rank, (host, local) in enumerate(zip(hosts, local_ranks))]
