"""How the ranks of a launch that ktrain did not start find each other's addresses.

Each rank offers the address its own TensorFlow server will use: the interface that routes to
rank 0's host, and a port it picked. The list, in rank order, reaches every rank:

- under ``srun`` (``gather_addresses``): every rank can compute one address without talking to
  the others, rank 0's host (the first node of the step) and a port derived from the job and
  step ids. Rank 0 listens there, every rank reports, rank 0 answers with the list. So the task
  layout (block or cyclic distribution, a step on some of the nodes) does not matter, and
  concurrent steps of one job do not collide. This is torchrun's store, cut down to one exchange.
- under ``mpirun`` (``gather_addresses_over_mpi``): MPI itself carries the exchange.

``peer_addresses`` picks the right one for the launcher that ``ktrain.environment`` detected.
"""

from __future__ import annotations

import json
import os
import socket
import time

from ktrain.environment import PEERS_ENV
from ktrain.errors import UserError, WorkersFailed

_CONNECT_RETRY = 0.2


def peer_addresses(found, timeout: float, interface: str | None = None) -> list[str]:
    """Every rank's ``host:port`` (a port free on its host) in rank order, for the launch
    ``found`` (a ``ktrain.environment.ClusterEnvironment``); ``interface`` names the network
    interface whose address a rank offers, else the one that routes to rank 0's host."""
    if os.environ.get(PEERS_ENV):
        return os.environ[PEERS_ENV].split(",")
    if found.name == "tf_config":
        return json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
    if found.name == "slurm":
        return gather_addresses(found.rank, found.world_size, found.master_addr,
                                found.master_port, timeout, interface)
    if found.name in ("openmpi", "mpich"):
        return gather_addresses_over_mpi(interface)
    raise UserError(f"ktrain cannot find the other ranks under {found.launcher}",
                    where="strategy",
                    hint="start the workers with ktrain, srun or mpirun, or set TF_CONFIG")


def chief_address(found, interface: str | None = None) -> str:
    """On rank 0: the address of this host that the other ranks reach it at, from the same
    facts ``peer_addresses`` uses (no exchange needed)."""
    if interface:
        return own_address("", interface)
    if os.environ.get(PEERS_ENV) or found.name == "tf_config":
        return _resolve(peer_addresses(found, timeout=0)[0].rsplit(":", 1)[0])
    if found.one_host:
        return "127.0.0.1"
    return _resolve(found.master_addr if found.name == "slurm" else socket.gethostname())


def gather_addresses(rank: int, world_size: int, root_host: str, root_port: int,
                     timeout: float, interface: str | None = None) -> list[str]:
    """Every rank's ``host:port``, exchanged through rank 0: the same list on every rank."""
    root_ip = _resolve(root_host)
    own_ip = own_address(root_ip, interface)
    mine = f"{own_ip}:{free_ports(1, own_ip)[0]}"
    deadline = time.monotonic() + timeout
    if rank == 0:
        return _serve(mine, world_size, root_ip, root_port, deadline)
    return _report(rank, mine, root_ip, root_port, deadline)


def gather_addresses_over_mpi(interface: str | None = None) -> list[str]:
    """The same list, exchanged with MPI (which ``mpirun`` already connected)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    root_ip = comm.bcast(_resolve(socket.gethostname()) if comm.Get_rank() == 0 else None)
    own_ip = own_address(root_ip, interface)
    return comm.allgather(f"{own_ip}:{free_ports(1, own_ip)[0]}")


def _serve(mine: str, world_size: int, ip: str, port: int, deadline: float) -> list[str]:
    try:
        server = socket.create_server((ip, port))
    except OSError as err:
        raise UserError(f"rank 0 cannot listen for the other ranks at {ip}:{port}: "
                        f"{err.strerror}", where="rendezvous",
                        hint="another job on this node may hold the port: set KTRAIN_PORT to a "
                             "free port in every task's environment") from None
    addresses, connections = {0: mine}, []
    with server:
        while len(addresses) < world_size:
            server.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                connection, _ = server.accept()
            except TimeoutError:
                missing = sorted(set(range(world_size)) - set(addresses))
                raise WorkersFailed(f"rank(s) {missing} did not reach rank 0 at {ip}:{port} "
                                    f"within strategy.start_timeout", where="rendezvous",
                                    hint="check that every task started, and that this "
                                         "port is reachable from their nodes") from None
            connection.settimeout(max(0.01, deadline - time.monotonic()))
            report = json.loads(_read_line(connection))
            addresses[report["rank"]] = report["address"]
            connections.append(connection)
        answer = (json.dumps([addresses[r] for r in range(world_size)]) + "\n").encode()
        for connection in connections:
            with connection:
                connection.sendall(answer)
    return [addresses[r] for r in range(world_size)]


def _report(rank: int, mine: str, ip: str, port: int, deadline: float) -> list[str]:
    with _connect(ip, port, deadline) as connection:
        connection.sendall((json.dumps({"rank": rank, "address": mine}) + "\n").encode())
        connection.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            return json.loads(_read_line(connection))
        except (TimeoutError, ValueError):
            raise WorkersFailed(f"rank {rank} reached rank 0 at {ip}:{port}, but not every rank "
                                f"did within strategy.start_timeout", where="rendezvous") from None


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


def _read_line(connection: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode()


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
