"""Stopping a run when asked: a scheduler's preemption notice (SIGTERM, SLURM's
``--signal=USR1@90``) or Ctrl-C.

A worker that receives one of ``checkpoint.stop_signals`` does not die: it raises a flag. Every
rank learns of it after the same training step (``ktrain.collectives.SharedFlags`` rides on
the gradient allreduce), the chief commits a checkpoint at that step, and every rank exits
with 128 + the signal's number and one message. A launcher (``ktrain run`` starting its own
workers) passes the signal on to its ranks and reports their stop the same way; a driver that
cannot signal its ranks (Spark, Ray) relays it through a request file that rank 0 follows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable

import fsspec

from ktrain.console import ERROR_PREFIX
from ktrain.errors import Stopped


RESUME_HINT = "run the same command again to resume from it"
STOP_REPORT = f"{ERROR_PREFIX}stopped by "
"""How rank 0's report of a stop begins, in its output (see ``reported_stop``)."""
STOP_REQUEST_ENV = "KTRAIN_STOP_REQUEST"
"""The URL of the file through which a Spark or Ray driver asks rank 0 to stop."""
_FOLLOW_EVERY = 1.0


class StopRequest:
    """The first of ``signal_names`` this process received while ``listening``."""

    def __init__(self, signal_names: list[str]):
        self.signals = [signal.Signals[name] for name in signal_names]
        self.received: signal.Signals | None = None

    @contextlib.contextmanager
    def listening(self, on_signal: Callable[[signal.Signals], None] | None = None):
        """Catch the signals (the previous handlers, TensorFlow's included, come back after);
        ``on_signal`` runs on the first one. A second Ctrl-C does not wait for the stop."""
        def handle(number, frame):
            if self.received is None:
                self.received = signal.Signals(number)
                if on_signal:
                    on_signal(self.received)
            elif number == signal.SIGINT:
                raise KeyboardInterrupt

        previous = {s: signal.signal(s, handle) for s in self.signals}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def following_requests(self, on_signal: Callable[[signal.Signals], None], *, follow: bool):
        """If ``follow`` (rank 0) and a driver cannot signal the ranks: take the signal named
        in the file at ``$KTRAIN_STOP_REQUEST`` (see ``relaying_stops``) as if it had arrived
        here."""
        url = os.environ.get(STOP_REQUEST_ENV)
        if not url or not follow:
            yield self
            return
        fs, path = fsspec.core.url_to_fs(url)

        def taken() -> bool:
            if self.received is not None:
                return True
            if not fs.exists(path):
                return False
            self.received = signal.Signals[fs.cat_file(path).decode().strip()]
            on_signal(self.received)
            return True

        with polling(taken, "ktrain-stop-requests"):
            yield self

    def stopped(self, where: str, requeued: str | None = None) -> Stopped:
        """The error every rank exits with once the checkpoint at ``where`` is committed."""
        return Stopped(f"stopped by {self.received.name} {where}; the checkpoint there is "
                       f"committed" + (f"; {requeued}" if requeued else ""),
                       signal_number=self.received.value,
                       hint=None if requeued else RESUME_HINT)


@contextlib.contextmanager
def relaying_stops(signal_names: list[str], output_dir: str):
    """On a driver whose ranks run out of its reach (Spark tasks, Ray actors): a stop signal
    becomes a request file that rank 0 follows. Yields the StopRequest and the environment
    the ranks need."""
    url = f"{output_dir.rstrip('/')}/logs/stop-request"
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)  # an earlier run's
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    stop = StopRequest(signal_names)
    try:
        with stop.listening(on_signal=lambda sig: fs.pipe(path, sig.name.encode())):
            yield stop, {STOP_REQUEST_ENV: url}
    finally:
        if fs.exists(path):
            fs.rm(path)


@contextlib.contextmanager
def polling(check: Callable[[], bool], name: str, every: float = _FOLLOW_EVERY):
    """Call ``check`` every ``every`` seconds, in a thread, while the block runs and until it
    returns True."""
    done = threading.Event()

    def poll():
        while not done.wait(every) and not check():
            pass

    poller = threading.Thread(target=poll, daemon=True, name=name)
    poller.start()
    try:
        yield
    finally:
        done.set()
        poller.join(timeout=5)


def reported_stop(said: str, *, shown: bool) -> Stopped:
    """The error a launcher exits with after its ranks stopped, from rank 0's report ("stopped
    by SIGTERM at step ..."); ``shown``: that report is on the console already."""
    message = said.split("stopped by ", 1)[1]
    return Stopped(f"stopped by {message}", signal_number=signal.Signals[message.split()[0]].value,
                   hint=RESUME_HINT, shown=shown)


REQUEUE_SIGNAL = signal.SIGUSR1
"""The stop that means "preempted, come back" (``sbatch --signal=USR1@90``), not "cancel"."""


def requeue_slurm_job(announce) -> str | None:
    """Put this SLURM job back in the queue (``scontrol requeue``). SLURM ends the job as it
    requeues it, so what is about to happen goes to ``announce`` first; returns what went
    wrong, in words, or None."""
    import os
    import subprocess

    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not requeued: this is not a SLURM job"
    announce(f"SLURM job {job} is being requeued and resumes from it when it runs again")
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not requeue SLURM job {job} ({err})"
    if done.returncode:
        return f"could not requeue SLURM job {job}: {done.stderr.strip()}"
    return None
