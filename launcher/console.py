"""What the user sees on the terminal. Verbosity travels to worker processes in the environment.

When several ranks share one terminal (``srun``, ``mpirun``, Ray actors), only the chief speaks
at normal verbosity; the others print errors, prefixed with their rank.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

from ktrain import backends

QUIET, NORMAL, VERBOSE = 0, 1, 2
VERBOSITY_ENV = "KTRAIN_VERBOSITY"

_rank: int | None = None
_every_rank = False
_through_log = False


def set_verbosity(level: int) -> None:
    os.environ[VERBOSITY_ENV] = str(level)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if level >= VERBOSE else "2")


def environment() -> dict[str, str]:
    """What a process started far from this one (a Spark task, a Ray actor) needs in order to
    speak like it: verbosity and TensorFlow's log level."""
    return {name: os.environ[name] for name in (VERBOSITY_ENV, "TF_CPP_MIN_LOG_LEVEL")
            if name in os.environ}


def verbosity() -> int:
    return int(os.environ.get(VERBOSITY_ENV, NORMAL))


def share_terminal(rank: int, *, every_rank: bool) -> None:
    """This process is ``rank`` of several that print to one terminal: only rank 0 speaks,
    unless ``every_rank`` (then each line says whose it is)."""
    global _rank, _every_rank
    _rank, _every_rank = rank, every_rank


def speak_through_log() -> None:
    """This process' terminal does not reliably reach the user (a Ray actor's, forwarded by
    Ray): its errors go only to its log, which the driver shows (see ktrain.watchdog)."""
    global _through_log
    _through_log = True


def _speaks() -> bool:
    return _rank is None or _rank == 0 or _every_rank


def _prefix() -> str:
    return f"[rank {_rank}] " if _rank is not None and _every_rank else ""


def info(message: str) -> None:
    if verbosity() >= NORMAL and _speaks():
        print(_prefix() + message, flush=True)


def debug(message: str) -> None:
    if verbosity() >= VERBOSE and _speaks():
        print(_prefix() + message, flush=True)


def note(message: str) -> None:
    """Something the user should know about their input; on stderr, so that stdout stays data."""
    if verbosity() >= NORMAL and _speaks():
        print(f"ktrain: note: {message}", file=sys.stderr, flush=True)


def warning(message: str) -> None:
    """Something went wrong that the run works around (a damaged checkpoint skipped)."""
    if verbosity() >= NORMAL and _speaks():
        print(f"ktrain: warning: {message}", file=sys.stderr, flush=True)


ERROR_PREFIX = "ktrain: error: "
"""How every error line ktrain prints begins (launchers recognise ranks' reports by it)."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error(message: str) -> None:
    if _through_log:
        return
    rank = f"rank {_rank}: " if _rank else ""
    print(f"{ERROR_PREFIX}{rank}{_ANSI.sub('', message)}", file=sys.stderr, flush=True)


# What TensorFlow's C++ side prints while it loads, before anything can configure its logging
# (TF_CPP_MIN_LOG_LEVEL does not reach these absl lines).
_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
    r"Unable to register cu(DNN|FFT|BLAS) factory|TF-TRT Warning|"
    r"computation placer already registered|This TensorFlow binary is optimized|"
    r"To enable the following instructions|rebuild TensorFlow with the appropriate compiler")


def import_keras(backend: str) -> None:
    """Import Keras on ``backend`` (and TensorFlow, where installed: tf.data feeds every
    backend), without TensorFlow's start-up lines unless ``-v``.

    Every process ktrain starts calls this before anything else imports them. Whatever else
    they print while loading (a real error, say) still reaches stderr.
    """
    backends.activate(backend)
    if "keras" in sys.modules:
        return
    with tensorflow_loading_quietly():
        import keras  # noqa: F401
        with contextlib.suppress(ImportError):
            import tensorflow  # noqa: F401


@contextlib.contextmanager
def tensorflow_loading_quietly():
    """Hold back TensorFlow's start-up lines, should the block load it (unless ``-v``)."""
    if verbosity() >= VERBOSE:
        yield
        return
    with native_output_without(_STARTUP_NOISE):
        yield


@contextlib.contextmanager
def native_output_without(noise: re.Pattern, stream=None):
    """Capture ``stream``'s file descriptor (stderr by default; C++ writes there directly)
    while the block runs, and replay what was written without the lines ``noise`` matches."""
    stream = stream or sys.stderr
    fd = stream.fileno()
    stream.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            stream.flush()
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
                    if not noise.search(line)]
            if kept:
                stream.write("".join(kept))
                stream.flush()
