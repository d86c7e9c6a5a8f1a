"""How the ranks of a launch that ktrain did not start find each other's addresses.

Each rank offers the address its own TensorFlow server will use: the interface that routes to
rank 0's host, and a port it picked. The list, in rank order, reaches every rank:

- under ``srun`` (``gather_addresses``): every rank can compute one address without talking to
  the others, rank 0's host (the first node of the step) and a port derived from the job and
  step ids. Rank 0 listens there, every rank reports, rank 0 answers with the list. So the task
  layout (block or cyclic distribution, a step on some of the nodes) does not matter, and
  concurrent steps of one job do not collide. This is torchrun's store, cut down to one exchange.
- under ``mpirun`` (``gather_addresses_over_mpi``): MPI itself carries the exchange.
"""

from __future__ import annotations

import json
import socket
import time

from ktrain.errors import UserError, WorkersFailed

_CONNECT_RETRY = 0.2


def gather_addresses(rank: int, world_size: int, root_host: str, root_port: int,
                     timeout: float) -> list[str]:
    """Every rank's ``host:port`` for its TensorFlow server, the same list on every rank."""
    root_ip = _resolve(root_host)
    own_ip = _route_to(root_ip)
    mine = f"{own_ip}:{free_ports(1, own_ip)[0]}"
    deadline = time.monotonic() + timeout
    if rank == 0:
        return _serve(mine, world_size, root_ip, root_port, deadline)
    return _report(rank, mine, root_ip, root_port, deadline)


def gather_addresses_over_mpi() -> list[str]:
    """The same list, exchanged with MPI (which ``mpirun`` already connected)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    root_ip = comm.bcast(_resolve(socket.gethostname()) if comm.Get_rank() == 0 else None)
    own_ip = _route_to(root_ip)
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
    while True:
        try:
            connection = socket.create_connection((ip, port), timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise WorkersFailed(f"rank {rank} could not reach rank 0 at {ip}:{port} within "
                                    f"strategy.start_timeout", where="rendezvous",
                                    hint="rank 0 may have failed to start: see its output")
            time.sleep(_CONNECT_RETRY)
    with connection:
        connection.sendall((json.dumps({"rank": rank, "address": mine}) + "\n").encode())
        connection.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            return json.loads(_read_line(connection))
        except (TimeoutError, ValueError):
            raise WorkersFailed(f"rank {rank} reached rank 0 at {ip}:{port}, but not every rank "
                                f"did within strategy.start_timeout", where="rendezvous") from None


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
