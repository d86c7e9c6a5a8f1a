"""The stall watchdog: names the rank the others wait for at a gradient allreduce, with its
Python stacks, and ends the group, wherever the ranks run (ktrain's launcher, ``srun``,
``mpirun``, Spark tasks, Ray actors), since the ranks watch themselves.

Every rank reports, once a second, how far it has come to rank 0 (on TensorFlow the gradient
allreduces it has arrived at; on JAX, whose reduction sits inside the compiled step, the
batches it has taken from its input), over one TCP connection. Rank 0's address and a key drawn
for this watch reach the others through the communicator as the watch starts; each connection
proves the key both ways (``ktrain.handshake``), so a stranger's is dropped and cannot report
for a rank. When the counts have not moved for ``strategy.stall_timeout`` seconds and are not
all equal, rank 0 asks the ranks behind for their stacks, tells every rank to end, prints
one message and ends first, so that its launcher reports it (and restarts the group, if
``max_restarts`` allows); the others end as soon as it is gone, since a launcher such as
``srun`` would leave them waiting forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from typing import Callable

from ktrain import console
from ktrain.environment import detect
from ktrain.errors import WorkersFailed
from ktrain.handshake import Stranger, admit, join, new_secret
from ktrain.rendezvous import chief_address

REPORT_EVERY = 1.0
_STACKS_WAIT = 5.0
_FRAMES_PER_THREAD = 6
STALLED_EXIT = 1
_KEY_PARTS = 4
"""The key travels as this many 48-bit integers: each exact in a float64 sum."""
_HANDSHAKE_TIMEOUT = 30.0


@contextlib.contextmanager
def watching_for_stalls(session, timeout: float | None, arrivals: Callable[[], int], output,
                        interface: str | None = None):
    """While the block trains, watch the group for a stalled rank (see the module's doc).
    Every rank must enter it at the same point: rank 0's address is broadcast."""
    if not timeout or session.communicator is None:
        yield
        return
    server = None
    offered = [0.0] * (5 + _KEY_PARTS)
    if session.is_chief:
        ip = chief_address(detect(), interface)
        server = socket.create_server((ip, 0))
        key = new_secret(6 * _KEY_PARTS)
        offered = ([float(part) for part in ip.split(".")] + [float(server.getsockname()[1])] +
                   [float(int.from_bytes(key[i:i + 6], "big")) for i in range(0, len(key), 6)])
    shared = session.communicator.sum_host(offered)
    ip, port = ".".join(str(int(part)) for part in shared[:4]), int(shared[4])
    key = b"".join(int(part).to_bytes(6, "big") for part in shared[5:])
    done = threading.Event()
    if server is not None:
        board = _Board(server, key, session.world_size, timeout, arrivals, output, done)
        threads = [threading.Thread(target=board.serve, daemon=True, name="ktrain-stalls"),
                   threading.Thread(target=board.judge, daemon=True, name="ktrain-judge")]
    else:
        threads = [threading.Thread(target=_report, args=(ip, port, key, session.rank, arrivals,
                                                          output, done),
                                    daemon=True, name="ktrain-stalls")]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if server is not None:
            server.close()


class _Board:
    """Rank 0's side: the counts every rank reported, and whether the group is ending."""

    def __init__(self, server: socket.socket, key: bytes, world_size: int, timeout: float,
                 own_count: Callable[[], int], output, done: threading.Event):
        self.server, self.key, self.world_size, self.timeout = server, key, world_size, timeout
        self.own_count, self.output, self.done = own_count, output, done
        self.lock = threading.Lock()
        self.counts: dict[int, int] = {}
        self.stacks: dict[int, str] = {}
        self.wanted: set[int] = set()
        self.ending = False
        self.told: set[int] = set()
        self.joined: set[int] = set()

    def serve(self) -> None:
        with contextlib.suppress(OSError):  # closed when training ends
            while True:
                connection, peer = self.server.accept()
                threading.Thread(target=self._answer, args=(connection, peer),
                                 daemon=True).start()

    def _admit(self, stream, peer) -> int | None:
        """The rank a connection proves it is, or None (dropped, said at -v)."""
        try:
            rank = admit(stream, self.key).get("rank")
            with self.lock:
                if not isinstance(rank, int) or rank in self.joined or \
                        rank not in range(1, self.world_size):
                    raise Stranger(f"rank {rank} has joined already, or is no rank of "
                                   f"{self.world_size}")
                self.joined.add(rank)
            return rank
        except (Stranger, OSError) as err:
            console.debug(f"stall watchdog: dropped a connection from {peer[0]}:{peer[1]}: "
                          f"{err or type(err).__name__}")
            return None

    def _answer(self, connection: socket.socket, peer) -> None:
        """One rank's reports: each gets an answer (send stacks? end?)."""
        connection.settimeout(_HANDSHAKE_TIMEOUT)
        stream = connection.makefile("rw", encoding="utf-8")
        with connection, stream, contextlib.suppress(OSError, ValueError):
            rank = self._admit(stream, peer)
            if rank is None:
                return
            connection.settimeout(None)
            for line in stream:
                report = json.loads(line)
                with self.lock:
                    self.counts[rank] = report["count"]
                    if "stacks" in report:
                        self.stacks[rank] = report["stacks"]
                    answer = {"stacks": rank in self.wanted and rank not in self.stacks,
                              "end": self.ending}
                    if self.ending:
                        self.told.add(rank)
                stream.write(json.dumps(answer) + "\n")
                stream.flush()
            # the rank's connection closed: it finished (or died, which its launcher reports)

    def judge(self) -> None:
        """Every second: have the counts stood still for ``timeout`` seconds, unequal?"""
        last, since = None, time.monotonic()
        while not self.done.wait(REPORT_EVERY):
            with self.lock:
                counts = {**self.counts, 0: self.own_count()}
            now = time.monotonic()
            if counts != last or len(counts) < self.world_size:
                last, since = counts, now
                continue
            if now - since >= self.timeout and len(set(counts.values())) > 1:
                return self._end_group(counts)

    def _end_group(self, counts: dict[int, int]) -> None:
        reached = min(counts.values())
        behind = sorted(rank for rank, count in counts.items() if count == reached)
        with self.lock:
            self.wanted = set(behind)
        deadline = time.monotonic() + _STACKS_WAIT
        while time.monotonic() < deadline and not self.wanted <= set(self.stacks) | {0}:
            time.sleep(0.1)
        shown = [f"rank {rank}'s Python stacks (innermost call last):\n{self.stacks[rank]}"
                 if rank in self.stacks else f"rank {rank} did not send its stacks (its process "
                 f"may be frozen, or hold Python's lock in native code)" for rank in behind
                 if rank != 0] or [f"rank 0's Python stacks:\n{python_stacks()}"]
        error = WorkersFailed(
            f"rank(s) {behind} stalled: the other ranks have waited {self.timeout:g}s "
            f"(strategy.stall_timeout) for them at gradient allreduce {reached + 1} since this "
            f"start (one a step, for each optimizer), so the group ends", details="\n".join(shown),
            hint="the stack shows where the rank is stuck (its input pipeline, I/O, a lock); "
                 "strategy.max_restarts restarts the group from the newest checkpoint, and a "
                 "larger strategy.stall_timeout allows longer waits")
        with self.lock:
            self.ending = True
        deadline = time.monotonic() + 2 * REPORT_EVERY + 1  # every rank hears of it
        while time.monotonic() < deadline and len(self.told) < len(self.counts):
            time.sleep(0.05)
        _say(self.output, error.render(), error=True)
        os._exit(STALLED_EXIT)  # the main thread waits in the allreduce, for good


def _report(ip: str, port: int, key: bytes, rank: int, count: Callable[[], int], output,
            done: threading.Event) -> None:
    """A rank's side: report the count every second; send the stacks when asked; end, after
    rank 0, when told."""
    try:
        connection = socket.create_connection((ip, port), timeout=_HANDSHAKE_TIMEOUT)
        stream = connection.makefile("rw", encoding="utf-8")
        join(stream, key, {"rank": rank})
    except (OSError, Stranger) as err:
        _say(output, f"the stall watchdog cannot join rank 0 at {ip}:{port} ({err}); "
                     f"training goes on without it")
        return
    with connection, contextlib.suppress(OSError, ValueError):
        connection.settimeout(None)
        report: dict = {}
        while not done.wait(REPORT_EVERY):
            report["count"] = count()
            stream.write(json.dumps(report) + "\n")
            stream.flush()
            answer = json.loads(stream.readline())
            report.pop("stacks", None)
            if answer["stacks"]:
                report["stacks"] = python_stacks()
                _say(output, f"rank 0 finds this rank stalled; its Python stacks:\n"
                             f"{report['stacks']}")
            if answer["end"]:
                _say(output, "rank 0 ends the group: a rank stalled (see rank 0's output)")
                stream.read()  # until rank 0 has ended, so that its launcher blames it
                os._exit(STALLED_EXIT)


def python_stacks() -> str:
    """The innermost Python frames of every other thread that is not idle, one line each."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    blocks = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident() or frame.f_code.co_filename == threading.__file__:
            continue  # this thread, or one idle at an Event or a Condition
        frames = traceback.extract_stack(frame)[-_FRAMES_PER_THREAD:]
        lines = [f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in frames]
        blocks.append(f"thread {names.get(ident, ident)}:\n" + "\n".join(lines))
    return "\n".join(blocks)


def _say(output, text: str, *, error: bool = False) -> None:
    """Into this rank's log, and (``error``) onto the console, before the process ends."""
    if error:
        console.error(text)
    elif not output.keep_log:  # the launcher makes this process' output its log
        print(text, file=sys.stderr, flush=True)
    output.log(console.ERROR_PREFIX + text if error else text)
    output.flush_log()
    sys.stdout.flush()
