"""Start a group of worker processes and watch them, the way torchrun does.

- Each rank's output goes to ``logs/rank-<r>.log``; the console shows rank 0 (all ranks,
  prefixed, on request).
- A start-up deadline: ranks that have not arrived at the group's first collective (see
  ``mark``) in time are named.
- Gang-kill on first failure: the other workers are stopped within seconds, and the failure
  is summarised (rank, exit status or signal, last lines of its log).

A child may run several ranks (``mpirun``/``horovodrun`` print ``[1,<rank>]<stdout>:`` tags);
its lines are routed by rank.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import fsspec

from ktrain import console
from ktrain.errors import Stopped
from ktrain.regroup import LEFT_TO_GROW, PEER_LOST, SURVIVORS_LEAVE, RegroupFolder
from ktrain.stopping import STOP_REPORT, StopRequest, reported_stop

_RENDEZVOUS_ENV = "KTRAIN_RENDEZVOUS_DIR"
# mpirun tags lines "[1,<rank>]<stdout>:", horovodrun's Gloo launcher "[<rank>]<stdout>:"
_RANK_TAG = re.compile(r"^\[(?:\d+,)?(\d+)\]<std(?:out|err)>:\s?(.*)$")
_TAIL = 20
# what a rank's log says when it ends because rank 0 ended the group (watchdog.py, worker.py)
_FOLLOWED_CHIEF = re.compile(r"rank 0 ends the group|lost contact with rank 0 ")
_PR_SET_PDEATHSIG = 1
# srun's report of a rank of an elastic group leaving as planned: kept in the log, not shown
_LEFT_AS_PLANNED = re.compile(rf"^srun: error: \S+: task \d+: Exited with exit code "
                              rf"({LEFT_TO_GROW}|{PEER_LOST})$")
_ROOM_EVERY = 2.0
"""Seconds between two asks whether there is room to grow."""


OUTPUT_CAPTURED_ENV = console.OUTPUT_CAPTURED_ENV


def is_supervised() -> bool:
    """True in a worker whose output a launcher (this module, a Spark or Ray task) already
    writes to logs/rank-<r>.log."""
    return OUTPUT_CAPTURED_ENV in os.environ


def captured_output_env(launcher: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a worker whose output becomes its rank's log: the console settings of
    the process the user started (``launcher``, from ``console.environment()``; this one's by
    default), but at least normal verbosity, whatever the console shows."""
    launcher = console.environment() if launcher is None else launcher
    level = int(launcher.get(console.VERBOSITY_ENV, console.NORMAL))
    return {**launcher, OUTPUT_CAPTURED_ENV: "1", "PYTHONUNBUFFERED": "1",
            console.VERBOSITY_ENV: str(max(level, console.NORMAL))}


def mark(rank: int, stage: str) -> None:
    """Called by a worker when it has ``arrived`` at its first collective, and once it has
    ``joined`` (that collective completed)."""
    folder = os.environ.get(_RENDEZVOUS_ENV)
    if folder:
        Path(folder, f"{stage}-{rank}").write_text(str(os.getpid()))


@dataclass
class WorkerSpec:
    command: list[str]
    env: dict[str, str]
    ranks: tuple[int, ...]
    """The ranks this process runs: one, or all of them for an mpirun-style launcher."""
    relays_signals: bool = False
    """The process is a client (``srun``) of a rank on another host, which passes the signals
    it gets on to it: a stop is sent to the client, not to the pid the rank marked."""


@dataclass
class Failure:
    rank: int | None
    summary: str
    log_tail: list[str] = field(default_factory=list)
    user_error: bool = False
    """The worker reported a mistake in the input (exit 2): restarting would not help."""
    log: str | None = None
    """Where the failed rank's whole log is."""
    shown: bool = False
    """The rank's own error report already reached the console: nothing to add."""
    lost: list[int] = field(default_factory=list)
    """The ranks the group lost: all but those that left because a peer was lost and those
    still running when the launcher ended them."""
    completed_step: int | None = None
    """The last global step a rank that lost a peer had completed."""
    saved_by: int | None = None
    """The rank that saved that step's state from its memory as a checkpoint."""
    since: float = field(default_factory=time.time)
    """Unix time the failure was seen."""

    def __post_init__(self):
        self.log_tail = self.log_tail[-_TAIL:]

    def render(self) -> str:
        tail = "\n".join(f"    {line}" for line in self.log_tail)
        return f"{self.summary}\n  last lines of its log:\n{tail}" if tail else self.summary


def describe_exit(returncode: int) -> str:
    """Negative codes (Python's) and 128+N (the shell's, as launchers report) are signals."""
    number = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 160 else 0
    if number:
        try:
            return f"was killed by {signal.Signals(number).name}"
        except ValueError:
            return f"was killed by signal {number}"
    return f"exited with status {returncode}"


LEFT_TO_GROW_OUTCOME = "left to grow"
"""What ``WorkerGroup.run`` returns when every rank stopped after a checkpoint to re-form
larger."""


class WorkerGroup:
    def __init__(self, specs: list[WorkerSpec], log_dir: Path, *, start_timeout: float,
                 console_ranks: str = "chief", stop_signals: tuple[str, ...] = (),
                 logs_kept_at: str | None = None, has_room: Callable[[], bool] | None = None,
                 environment: dict[str, str] | None = None):
        self.specs = specs
        self.stop = StopRequest(list(stop_signals))
        self.log_dir = log_dir
        self.logs_kept_at = logs_kept_at or str(log_dir)
        """Where the user finds the logs once the group ends (a URL, when ``log_dir`` is a
        temporary copy)."""
        self.rendezvous_dir = log_dir / ".rendezvous"
        """Where ranks mark their arrival (``mark``): beside the logs, not in /tmp, so that a
        launcher that is killed leaves nothing behind but what the next run clears."""
        self.start_timeout = start_timeout
        self.console_ranks = console_ranks
        self.world_size = sum(len(spec.ranks) for spec in specs)
        self._tails = {rank: deque(maxlen=_TAIL) for spec in specs for rank in spec.ranks}
        self._processes: list[subprocess.Popen] = []
        self._pumps: list[threading.Thread] = []
        self._quiet = console.verbosity() < console.NORMAL
        self._launcher_tail: deque[str] = deque(maxlen=200)
        self._stop_said: str | None = None
        """A rank's "stopped by SIG... at step ..." line."""
        self._reported: set[int] = set()
        """Ranks whose own error report the console showed."""
        self.regroup = RegroupFolder(str(self.rendezvous_dir / "regroup")) if all(
            len(spec.ranks) == 1 for spec in specs) else None
        """Where the ranks learn who saves after a loss, and of room to grow: where each rank
        is a process of its own (mpirun ends them all when one dies)."""
        self.has_room = has_room
        """Asked every few seconds while the group runs: growth is offered once it says there
        is room for more ranks (None: never)."""
        self.environment = environment or {}
        """Variables every rank gets besides its spec's."""

    def run(self) -> Failure | str | None:
        """Run every worker to the end; return the first failure, ``LEFT_TO_GROW_OUTCOME``, or
        None if all succeeded."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.rendezvous_dir, ignore_errors=True)
        self.rendezvous_dir.mkdir(parents=True)
        if self.regroup:
            self.regroup.clear()
        offering = (self.regroup.offering_growth(self.has_room, every=_ROOM_EVERY)
                    if self.regroup and self.has_room else contextlib.nullcontext())
        try:
            with self.stop.listening(on_signal=self._pass_on), offering:
                self._start()
                return self._watch()
        finally:
            self.terminate()
            shutil.rmtree(self.rendezvous_dir, ignore_errors=True)

    def _markers(self, stage: str) -> dict[int, int]:
        """The pid each rank wrote at ``stage`` (``arrived``, ``joined``, see ``mark``)."""
        return {int(p.name.split("-")[1]): int(p.read_text() or 0)
                for p in self.rendezvous_dir.glob(f"{stage}-*")}

    def _pass_on(self, sig: signal.Signals) -> None:
        """A stop signal reached the launcher: hand it to every rank, which stop together
        after a checkpoint; ranks that have not started training cannot, so they are ended."""
        pids = self._markers("joined")
        if len(pids) < self.world_size:
            raise Stopped(f"stopped by {sig.name} before every rank had started training; "
                          f"no checkpoint was taken", signal_number=sig.value,
                          hint="run the same command again to start over")
        relayed = {spec.ranks[0]: process.pid for spec, process in
                   zip(self.specs, self._processes) if spec.relays_signals}
        _signal_pids([relayed.get(rank, pid) for rank, pid in pids.items()], sig)

    def _start(self) -> None:
        for spec in self.specs:
            # Launchers (horovodrun) look for mpirun on PATH: put this environment's bin/ first.
            path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
            env = {**os.environ, **self.environment, **spec.env, **captured_output_env(),
                   _RENDEZVOUS_ENV: str(self.rendezvous_dir), "PATH": path,
                   **(self.regroup.environment() if self.regroup else {})}
            process = subprocess.Popen(spec.command, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, errors="replace",
                                       start_new_session=True, preexec_fn=die_with_parent)
            self._processes.append(process)
            pump = threading.Thread(target=self._pump, args=(process, spec.ranks), daemon=True)
            pump.start()
            self._pumps.append(pump)

    def _pump(self, process: subprocess.Popen, ranks: tuple[int, ...]) -> None:
        logs = {rank: open(self.log_dir / f"rank-{rank}.log", "a") for rank in ranks}
        try:
            for line in process.stdout:
                line = line.rstrip("\n").replace("\0", "")  # mpirun ends some output with NUL
                rank = ranks[0]
                tagged = _RANK_TAG.match(line) if len(ranks) > 1 else None
                if tagged:
                    rank, line = int(tagged.group(1)), tagged.group(2)
                elif len(ranks) > 1:
                    self._launcher_tail.append(line)  # mpirun's own messages go to rank 0's log
                if line.startswith(console.PROGRESS_PREFIX):  # redrawn, never logged
                    if not self._quiet and rank == 0:
                        console.progress(line.removeprefix(console.PROGRESS_PREFIX))
                    continue
                logs[rank].write(line + "\n")
                logs[rank].flush()
                self._tails[rank].append(line)
                if line.startswith(STOP_REPORT):  # see _stopped
                    self._stop_said = line
                if self._quiet or _LEFT_AS_PLANNED.match(line):
                    continue
                if rank == 0 or self.console_ranks == "all":
                    if line.startswith(console.ERROR_PREFIX):
                        self._reported.add(rank)
                    prefix = f"[rank {rank}] " if self.console_ranks == "all" else ""
                    print(prefix + line, flush=True)
        finally:
            for log in logs.values():
                log.close()

    def _watch(self) -> Failure | None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            codes = [p.poll() for p in self._processes]
            if None not in codes:  # all exited: after their last words, see how
                for pump in self._pumps:
                    pump.join(timeout=2)
                if self._stopping(codes):
                    return self._stopped(codes)
                if all(code == 0 for code in codes):
                    return None
                if all(code in (0, LEFT_TO_GROW) for code in codes):
                    return LEFT_TO_GROW_OUTCOME
            if self._stopping(codes):  # wait for every rank, the chief committing
                time.sleep(0.1)
                continue
            failed = [(spec, code) for spec, code in zip(self.specs, codes)
                      if code not in (None, 0, LEFT_TO_GROW)]
            if failed:  # a rank that left because of another is not the cause
                return self._after_loss(self._failure(*min(failed, key=lambda f: f[1] == PEER_LOST)))
            if time.monotonic() > deadline:
                everyone = set(range(self.world_size))
                missing = sorted(everyone - set(self._markers("arrived")))
                verb = "did not arrive" if missing else "arrived but did not join"
                missing = missing or sorted(everyone - set(self._markers("joined")))
                if missing:
                    return Failure(missing[0], f"rank(s) {missing} {verb} within "
                                   f"strategy.start_timeout ({self.start_timeout:g}s)",
                                   list(self._tails[missing[0]]), log=self._log(missing[0]))
            time.sleep(0.1)

    def _stopping(self, codes: list[int | None]) -> bool:
        """A stop signal reached the launcher, or a rank (as 128 + N): the ranks are stopping
        together, the chief committing a checkpoint, so none is ended early."""
        return self.stop.received is not None or self._stop_said is not None or any(
            code is not None and code - 128 in [s.value for s in self.stop.signals]
            for code in codes)

    def _stopped(self, codes: list[int]) -> Failure | None:
        if not self._stop_said:  # the ranks did not stop as asked: report how they ended
            failed = [(s, c) for s, c in zip(self.specs, codes) if c]
            return self._failure(*failed[0]) if failed else None
        raise reported_stop(self._stop_said, shown=not self._quiet)

    def _failure(self, spec: WorkerSpec, code: int) -> Failure:
        for pump in self._pumps:
            pump.join(timeout=2)  # let the log catch up with the dead process
        rank, how = spec.ranks[0], describe_exit(code)
        if len(spec.ranks) > 1:  # mpirun/horovodrun: its own messages name the rank that failed
            rank, how = self._launcher_blames() or (rank, how)
        failure = Failure(rank, f"rank {rank} {how}", list(self._tails[rank]),
                          user_error=code == 2, log=self._log(rank),
                          shown=rank in self._reported)
        return blame_chief_first(failure, self._log(0))

    def _after_loss(self, failure: Failure) -> Failure:
        """Where the group can re-form: ask the rank still running with the newest step to save
        the state it holds in memory, give the ranks left time to do so and leave, and note who
        was lost.
        A mistake in the input (exit 2), or a group that never trained, has nothing to save:
        the others are ended at once."""
        if not self.regroup:
            return failure
        if failure.user_error or len(self._markers("joined")) < self.world_size:
            failure.lost = [failure.rank] if failure.rank is not None else []
            return failure
        saver = self.regroup.ask_newest_to_save(lambda: [
            spec.ranks[0] for spec, p in zip(self.specs, self._processes) if p.poll() is None])
        deadline = time.monotonic() + SURVIVORS_LEAVE
        while any(p.poll() is None for p in self._processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        # ranks that left because of the loss, or were still running: not lost themselves
        codes = {spec.ranks[0]: p.poll() for spec, p in zip(self.specs, self._processes)}
        self.terminate()
        failure.lost = sorted(r for r, code in codes.items() if code not in (None, PEER_LOST))
        completed = self.regroup.held_steps()
        failure.completed_step = max(completed.values(), default=None)
        if saver is not None and codes[saver] == PEER_LOST and saver in completed:
            failure.saved_by = saver  # it left as asked, its state saved
        return failure

    def _log(self, rank: int) -> str:
        return f"{self.logs_kept_at}/rank-{rank}.log"

    def _launcher_blames(self) -> tuple[int, str] | None:
        """(rank, how it ended) from mpirun's or horovodrun's report; a rank that was killed
        by a signal is the root cause rather than the peers that failed after it."""
        said = " ".join(self._launcher_tail)
        everything = " ".join([said, *(line for tail in self._tails.values() for line in tail)])
        aborted = re.search(r"MPI_ABORT was invoked on rank (\d+) in communicator \S+ +Proc: "
                            r"\S+ +Errorcode: (\d+)", everything)  # python -m mpi4py, on exit
        if aborted:  # the rank that ended the world; mpirun then killed the others
            return int(aborted.group(1)), describe_exit(int(aborted.group(2)))
        exits = [(int(rank), int(code)) for rank, code in
                 re.findall(r"Process (\d+) exit with status code (-?\d+)", said)]  # horovodrun
        exits += [(int(rank), -int(sig)) for rank, sig in
                  re.findall(r"rank (\d+) with PID \d+ on node \S+ exited on\s+signal (\d+)", said)]
        exits += [(int(rank), int(code)) for rank, code in
                  re.findall(r"rank (\d+) with PID \d+ on node \S+ exited with status (\d+)", said)]
        if not exits:
            named = re.search(r"(?:rank|Process name:) (\d+)", said)
            return (int(named.group(1)), "failed") if named else None
        rank, code = next((e for e in exits if describe_exit(e[1]).startswith("was killed")),
                          exits[0])
        return rank, describe_exit(code)

    def terminate(self, grace: float = 5.0) -> None:
        """SIGTERM every worker's process group, then SIGKILL what is left after ``grace``."""
        for process in self._processes:
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self._processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        for pump in self._pumps:
            pump.join(timeout=2)


def die_with_parent() -> None:
    """In the child, before exec: be killed if the launcher dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's own stop() is the only guard


@contextlib.contextmanager
def temporary_folder(prefix: str):
    """A temporary folder that is gone when the block ends, or this process however it ends:
    a helper process waits on a pipe that the kernel closes when this one dies (SIGKILL
    included), then removes the folder."""
    folder = tempfile.mkdtemp(prefix=prefix)
    reaper = subprocess.Popen([sys.executable, "-c", _REAPER, folder], stdin=subprocess.PIPE,
                              start_new_session=True)  # outlives this process' group
    try:
        yield Path(folder)
    finally:
        reaper.stdin.close()
        reaper.wait()


_REAPER = "import shutil, sys; sys.stdin.buffer.read(); shutil.rmtree(sys.argv[1], True)"


def _signal_pids(pids, sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def log_tail(log_url: str, lines: int = 3 * _TAIL) -> list[str]:
    """The last ``lines`` of a rank's log (any fsspec URL); none if it has no log."""
    fs, path = fsspec.core.url_to_fs(log_url)
    if not fs.exists(path):
        return []
    return fs.cat_file(path).decode(errors="replace").splitlines()[-lines:]


def blame_chief_first(failure: Failure, chief_log: str) -> Failure:
    """Rank 0's own error report over that of a rank that only followed it. When rank 0 ends
    the group (a stalled rank, a broken data audit) the others exit with it, and whatever
    reports the process that ended first (a Spark stage, ``ray.wait``, horovodrun, the
    supervisor's own poll) must not name one of them."""
    if failure.rank == 0 or not any(_FOLLOWED_CHIEF.search(line) for line in failure.log_tail):
        return failure
    tail = log_tail(chief_log)
    said = [line for line in tail if line.startswith(console.ERROR_PREFIX)]
    if not said:
        return failure
    return Failure(0, f"rank 0: {said[0].removeprefix(console.ERROR_PREFIX)}", tail,
                   user_error=failure.user_error, log=chief_log, shown=echoed_report(0, tail))


def echoed_report(rank: int, lines: list[str]) -> bool:
    """Whether ``lines`` (of ``rank``'s log) hold the rank's own error report and ``echo_log``
    has put them on the console already (rank 0's, unless quiet)."""
    return rank == 0 and console.verbosity() >= console.NORMAL and any(
        line.startswith(console.ERROR_PREFIX) for line in lines)


@contextlib.contextmanager
def echo_log(log_url: str, every: float = 0.5):
    """Print what a rank appends to its log (any fsspec URL) while the block runs: how rank 0's
    lines reach the console of the process the user started when the workers run elsewhere
    (Spark executors, Ray actors)."""
    if console.verbosity() < console.NORMAL:
        yield
        return
    fs, path = fsspec.core.url_to_fs(log_url)
    start = fs.size(path) if fs.exists(path) else 0  # earlier attempts' lines are not news
    stop = threading.Event()

    def follow():
        offset, partial = start, b""
        while True:
            stopping = stop.wait(every)
            if fs.exists(path) and fs.size(path) > offset:
                with fs.open(path, "rb") as log:
                    log.seek(offset)
                    new = log.read()
                offset += len(new)
                *lines, partial = (partial + new).split(b"\n")
                for line in (raw.decode(errors="replace") for raw in lines):
                    if line.startswith(console.PROGRESS_PREFIX):
                        console.progress(line.removeprefix(console.PROGRESS_PREFIX))
                    else:
                        console.info(line)
            if stopping:
                return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        yield
    finally:
        stop.set()
        follower.join(timeout=10)
