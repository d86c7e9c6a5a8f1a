"""Stopping a run when asked: a scheduler's preemption notice (SIGTERM, SLURM's
``--signal=USR1@90``) or Ctrl-C.

A worker that receives one of ``checkpoint.stop_signals`` does not die: it raises a flag. Every
rank learns of it after the same training step (``ktrain.collectives.SharedFlags`` rides on
the gradient allreduce), the chief commits a checkpoint at that step, and every rank exits
with 128 + the signal's number and one message. A launcher (``ktrain run`` starting its own
workers) passes the signal on to its ranks and reports their stop the same way.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Callable

from ktrain.errors import Stopped


RESUME_HINT = "run the same command again to resume from it"


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

    def stopped(self, where: str, requeued: str | None = None) -> Stopped:
        """The error every rank exits with once the checkpoint at ``where`` is committed."""
        return Stopped(f"stopped by {self.received.name} {where}; the checkpoint there is "
                       f"committed" + (f"; {requeued}" if requeued else ""),
                       signal_number=self.received.value,
                       hint=None if requeued else RESUME_HINT)


REQUEUE_SIGNAL = signal.SIGUSR1
"""The stop that means "preempted, come back" (``sbatch --signal=USR1@90``), not "cancel"."""


def requeue_slurm_job() -> str:
    """Put this SLURM job back in the queue (``scontrol requeue``); what happened, in words."""
    import os
    import subprocess

    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not requeued: this is not a SLURM job"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not requeue SLURM job {job} ({err})"
    if done.returncode:
        return f"could not requeue SLURM job {job}: {done.stderr.strip()}"
    return f"SLURM job {job} is requeued and resumes from it when it runs again"
