"""What the user sees on the terminal. Verbosity travels to worker processes in the environment."""

from __future__ import annotations

import os
import re
import sys

QUIET, NORMAL, VERBOSE = 0, 1, 2
VERBOSITY_ENV = "KTRAIN_VERBOSITY"


def set_verbosity(level: int) -> None:
    os.environ[VERBOSITY_ENV] = str(level)


def verbosity() -> int:
    return int(os.environ.get(VERBOSITY_ENV, NORMAL))


def info(message: str) -> None:
    if verbosity() >= NORMAL:
        print(message, flush=True)


def debug(message: str) -> None:
    if verbosity() >= VERBOSE:
        print(message, flush=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error(message: str) -> None:
    print(f"ktrain: error: {_ANSI.sub('', message)}", file=sys.stderr, flush=True)
