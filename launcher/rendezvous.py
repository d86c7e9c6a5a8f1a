"""How the ranks of a launch that ktrain did not start find each other's addresses.

Each rank offers the address its own TensorFlow server will use: the interface that routes to
rank 0's host, and a port it picked. The list, in rank order, reaches every rank:

- under ``srun`` (``gather_addresses``): every rank can compute one address without talking to
  the others, rank 0's host (the first node of the step) and a port derived from the job and
  step ids. Rank 0 listens there, every rank reports, rank 0 answers with the list. So the task
  layout (block or cyclic distribution, a step on some of the nodes) does not matter, and
  concurrent steps of one job do not collide. This is torchrun's store, cut down to one exchange.
  Under ``torchrun`` the same, one port above its own store (MASTER_PORT + 1).
  Ranks that ktrain itself starts as ``srun`` steps (an elastic group in a SLURM allocation,
  ``ktrain.allocation``) are told where rank 0 listens (``KTRAIN_MASTER``) and do the same.
  Each connection proves the run's secret both ways (``ktrain.handshake``; the secret is in the
  run folder, ``ktrain.lease``): a stranger's is dropped, and cannot take a rank's place.
- under ``mpirun`` (``gather_addresses_over_mpi``): MPI itself carries the exchange.

``peer_addresses`` picks the right one for the launcher that ``ktrain.environment`` detected.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Callable

from ktrain import console, lease
from ktrain.environment import PEERS_ENV
from ktrain.errors import UserError, WorkersFailed
from ktrain.handshake import Stranger, admit, join

_CONNECT_RETRY = 0.2
_HANDSHAKE_TIMEOUT = 5.0
"""Seconds a connection to rank 0 has to prove itself: a silent one delays the others no more."""


def peer_addresses(found, timeout: float, output_dir: str,
                   interface: str | None = None) -> list[str]:
    """Every rank's ``host:port`` (a port free on its host) in rank order, for the launch
    ``found`` (a ``ktrain.environment.ClusterEnvironment``) of the run writing ``output_dir``;
    ``interface`` names the network interface whose address a rank offers, else the one that
    routes to rank 0's host."""
    if known := _given_peers(found):
        return known
    if found.name in _GATHERED_AT_MASTER:
        return gather_addresses(found.rank, found.world_size, found.master_addr,
                                found.master_port, timeout, lambda: lease.secret(output_dir),
                                interface)
    if found.name in ("openmpi", "mpich"):
        return gather_addresses_over_mpi(interface)
    raise UserError(f"ktrain cannot find the other ranks under {found.launcher}",
                    where="strategy",
                    hint="start the workers with ktrain, srun, mpirun or torchrun, or set "
                         "TF_CONFIG")


_GATHERED_AT_MASTER = ("slurm", "torchrun", "ktrain")  # ktrain: ranks it started as srun steps


def _given_peers(found) -> list[str] | None:
    """The addresses the launcher wrote into the environment (ktrain's own, TF_CONFIG)."""
    if os.environ.get(PEERS_ENV):
        return os.environ[PEERS_ENV].split(",")
    if found.name == "tf_config":
        return json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
    return None


def chief_address(found, interface: str | None = None) -> str:
    """On rank 0: the address of this host that the other ranks reach it at, from the same
    facts ``peer_addresses`` uses (no exchange needed)."""
    if interface:
        return own_address("", interface)
    if known := _given_peers(found):
        return _resolve(known[0].rsplit(":", 1)[0])
    if found.one_host:
        return "127.0.0.1"
    return _resolve(found.master_addr if found.name in _GATHERED_AT_MASTER else
                    socket.gethostname())


def gather_addresses(rank: int, world_size: int, root_host: str, root_port: int,
                     timeout: float, secret: Callable[[], bytes | None],
                     interface: str | None = None) -> list[str]:
    """Every rank's ``host:port``, exchanged through rank 0: the same list on every rank.
    ``secret`` reads the run's secret (``ktrain.lease``; None until rank 0 has written it),
    which every connection proves both ways (``ktrain.handshake``)."""
    root_ip = _resolve(root_host)
    own_ip = own_address(root_ip, interface)
    mine = f"{own_ip}:{free_ports(1, own_ip)[0]}"
    deadline = time.monotonic() + timeout
    if rank == 0:
        return _serve(mine, world_size, root_ip, root_port, deadline, _wait_for(secret, deadline))
    return _report(rank, mine, root_ip, root_port, deadline, secret)


def gather_addresses_over_mpi(interface: str | None = None) -> list[str]:
    """The same list, exchanged with MPI (which ``mpirun`` already connected)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    root_ip = comm.bcast(_resolve(socket.gethostname()) if comm.Get_rank() == 0 else None)
    own_ip = own_address(root_ip, interface)
    return comm.allgather(f"{own_ip}:{free_ports(1, own_ip)[0]}")


def _serve(mine: str, world_size: int, ip: str, port: int, deadline: float,
           secret: bytes) -> list[str]:
    try:
        server = socket.create_server((ip, port))
    except OSError as err:
        raise UserError(f"rank 0 cannot listen for the other ranks at {ip}:{port}: "
                        f"{err.strerror}", where="rendezvous",
                        hint="another job on this node may hold the port: set KTRAIN_PORT to a "
                             "free port in every task's environment") from None
    addresses, joined = {0: mine}, []
    with server:
        while len(addresses) < world_size:
            server.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                connection, (host, their_port) = server.accept()
            except TimeoutError:
                missing = sorted(set(range(world_size)) - set(addresses))
                raise WorkersFailed(f"rank(s) {missing} did not reach rank 0 at {ip}:{port} "
                                    f"within strategy.start_timeout", where="rendezvous",
                                    hint="check that every task started, and that this "
                                         "port is reachable from their nodes") from None
            connection.settimeout(min(_HANDSHAKE_TIMEOUT, max(0.01, deadline - time.monotonic())))
            stream = connection.makefile("rw", encoding="utf-8")
            try:
                said = admit(stream, secret)
                rank, address = said["rank"], said["address"]
                if rank in addresses or rank not in range(world_size):
                    raise Stranger(f"rank {rank} registered already, or is no rank of "
                                   f"{world_size}")
            except (Stranger, OSError, KeyError, TypeError) as err:
                console.debug(f"rendezvous: dropped a connection from {host}:{their_port}: "
                              f"{err or type(err).__name__}")
                stream.close()  # the socket closes with its last user
                connection.close()
                continue
            addresses[rank] = address
            joined.append((connection, stream))
        answer = json.dumps([addresses[r] for r in range(world_size)]) + "\n"
        for connection, stream in joined:
            with connection, stream, contextlib.suppress(OSError):
                stream.write(answer)
                stream.flush()
    return [addresses[r] for r in range(world_size)]


def _report(rank: int, mine: str, ip: str, port: int, deadline: float,
            secret: Callable[[], bytes | None]) -> list[str]:
    while True:
        key = _wait_for(secret, deadline)
        with _connect(ip, port, deadline) as connection, \
                connection.makefile("rw", encoding="utf-8") as stream:
            connection.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                join(stream, key, {"rank": rank, "address": mine})
            except (Stranger, OSError) as err:
                # An earlier run's secret, read before rank 0 wrote its own: read it again.
                if time.monotonic() > deadline:
                    raise WorkersFailed(
                        f"rank {rank}: what listens at {ip}:{port} did not prove this run's "
                        f"secret within strategy.start_timeout ({err})", where="rendezvous",
                        hint="another program may hold rank 0's port: set KTRAIN_PORT to a "
                             "free port in every task's environment") from None
                time.sleep(_CONNECT_RETRY)
                continue
            try:
                return json.loads(stream.readline())
            except (TimeoutError, ValueError):
                raise WorkersFailed(f"rank {rank} reached rank 0 at {ip}:{port}, but not every "
                                    f"rank did within strategy.start_timeout",
                                    where="rendezvous") from None


def _wait_for(secret: Callable[[], bytes | None], deadline: float) -> bytes:
    while (key := secret()) is None:
        if time.monotonic() > deadline:
            raise WorkersFailed(
                f"no run secret in output_dir's {lease.SECRET} within strategy.start_timeout "
                f"(rank 0 writes it as it starts)", where="rendezvous",
                hint="under srun, output_dir must be on storage every node reads (as resuming "
                     "needs): a shared file system or an fsspec URL")
        time.sleep(_CONNECT_RETRY)
    return key


def wait_for_listener(ip: str, port: int, timeout: float) -> None:
    """Return once rank 0 accepts connections at ``ip:port``."""
    _connect(ip, port, time.monotonic() + timeout).close()


def _connect(ip: str, port: int, deadline: float) -> socket.socket:
    while True:
        try:
            return socket.create_connection((ip, port), timeout=1)
        except OSError:
            if time.monotonic() > deadline:
                raise WorkersFailed(f"could not reach rank 0 at {ip}:{port} within "
                                    f"strategy.start_timeout", where="rendezvous",
                                    hint="rank 0 may have failed to start: see its output"
                                    ) from None
            time.sleep(_CONNECT_RETRY)


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise UserError(f"cannot resolve rank 0's host '{host}'", where="rendezvous",
                        hint="the node names the scheduler gives must resolve on every node"
                        ) from None


def own_address(root_ip: str, interface: str | None) -> str:
    """The address this rank offers its peers: ``interface``'s, or the one that reaches rank 0."""
    if interface is None:
        return _route_to(root_ip)
    addresses = interface_addresses()
    if interface not in addresses:
        raise UserError(f"strategy.network_interface '{interface}' is not an interface with an "
                        f"IPv4 address on {socket.gethostname()} (it has: "
                        f"{', '.join(sorted(addresses))})", where="strategy.network_interface",
                        hint="name an interface every node has (see `ip -brief address`), or "
                             "remove the key to use the one that routes to rank 0")
    return addresses[interface]


def interface_of(ip: str) -> str | None:
    """The name of this machine's network interface that has address ``ip``."""
    return next((name for name, address in interface_addresses().items() if address == ip), None)


def interface_addresses() -> dict[str, str]:
    """Each network interface's IPv4 address (Linux's SIOCGIFADDR ioctl; no extra package)."""
    import fcntl
    import struct

    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR,
                                     struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # down, or no IPv4 address
            found[name] = socket.inet_ntoa(answer[20:24])
    return found


_SIOCGIFADDR = 0x8915


def _route_to(ip: str) -> str:
    """This machine's address on the interface that reaches ``ip`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((ip, 9))
        return probe.getsockname()[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free on ``host`` right now (held open together so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
