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
OUTPUT_CAPTURED_ENV = "KTRAIN_OUTPUT_CAPTURED"
"""Set for a rank whose output a launcher writes to its log (its stdout may still be a pty:
mpirun gives ranks one)."""
LIVE_ENV = "KTRAIN_LIVE_PROGRESS"
"""Set for ranks whose launcher's console is a terminal: it redraws their progress lines."""
PROGRESS_PREFIX = "ktrain: progress: "
"""How a progress line a launcher should redraw in place begins."""

_rank: int | None = None
_every_rank = False
_through_log = False
_live_line = False


def set_verbosity(level: int) -> None:
    os.environ[VERBOSITY_ENV] = str(level)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if level >= VERBOSE else "2")


def environment() -> dict[str, str]:
    """What a process started far from this one (a Spark task, a Ray actor) needs in order to
    speak like it: verbosity, TensorFlow's log level, and whether its progress is redrawn on a
    terminal (this process relays it)."""
    settings = {name: os.environ[name] for name in (VERBOSITY_ENV, "TF_CPP_MIN_LOG_LEVEL")
                if name in os.environ}
    return {**settings, LIVE_ENV: "1"} if live_progress() else settings


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


def _on_terminal() -> bool:
    return sys.stdout.isatty() and OUTPUT_CAPTURED_ENV not in os.environ


def live_progress() -> bool:
    """Whether progress lines can be redrawn in place: this process' console is a terminal, or
    its launcher's is and redraws them."""
    return verbosity() == NORMAL and (_on_terminal() or os.environ.get(LIVE_ENV) == "1")


def progress(text: str) -> None:
    """Rank 0's progress through an epoch, redrawn in place on a terminal; where a launcher
    relays this process' output, a marked line it redraws (see ktrain.supervisor)."""
    global _live_line
    if verbosity() != NORMAL or _rank not in (None, 0):
        return
    if _on_terminal():
        sys.stdout.write(f"\r{_prefix()}{text}\x1b[K")
        sys.stdout.flush()
        _live_line = True
    else:
        print(PROGRESS_PREFIX + text, flush=True)


def _end_live_line() -> None:
    """Clear a progress line, so that the next line does not start in its middle."""
    global _live_line
    if _live_line:
        sys.stdout.write("\r\x1b[K")
        sys.stdout.flush()
        _live_line = False


def info(message: str) -> None:
    if verbosity() >= NORMAL and _speaks():
        _end_live_line()
        print(_prefix() + message, flush=True)


def debug(message: str) -> None:
    if verbosity() >= VERBOSE and _speaks():
        print(_prefix() + message, flush=True)


def note(message: str) -> None:
    """Something the user should know about their input; on stderr, so that stdout stays data."""
    if verbosity() >= NORMAL and _speaks():
        _end_live_line()
        print(f"ktrain: note: {message}", file=sys.stderr, flush=True)


def warning(message: str) -> None:
    """Something went wrong that the run works around (a damaged checkpoint skipped)."""
    if verbosity() >= NORMAL and _speaks():
        _end_live_line()
        print(f"ktrain: warning: {message}", file=sys.stderr, flush=True)


ERROR_PREFIX = "ktrain: error: "
"""How every error line ktrain prints begins (launchers recognise ranks' reports by it)."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error(message: str) -> None:
    if _through_log:
        return
    rank = f"rank {_rank}: " if _rank else ""
    _end_live_line()
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
