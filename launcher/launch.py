"""What a rank runs, and how that crosses process boundaries.

``ktrain run`` hands its strategy the training function (``Strategy.launch(run, train)``); the
strategy decides where ranks run and hands the function on, never knowing what it does. A rank
that is this process calls ``train_here``; a rank that is another process (started by ktrain,
mpirun, horovodrun or a Spark task) gets the run plan and the function's name in its
environment (``worker_environment``), reads them back with ``read_plan`` and runs
``python -m ktrain.worker_entry``; a Ray actor is handed both as arguments.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping

from ktrain import console
from ktrain.config import RunConfig
from ktrain.environment import rank_environment
from ktrain.output import RunResult
from ktrain.session import Session

Train = Callable[[RunConfig, Session], RunResult]
"""The function every rank calls with the run and its session; a module-level function, so
that other processes can import it by name."""

PLAN_ENV = "KTRAIN_PLAN"
"""The validated config, as JSON: the only description of the run that crosses a process
boundary."""
TRAIN_ENV = "KTRAIN_TRAIN"
"""``module:function`` of the training function."""
WORKER_ENTRY = "ktrain.worker_entry"


def train_here(run: RunConfig, open_session: Callable[[RunConfig], Session],
               train: Train) -> RunResult:
    """Be a rank in this process: Keras loaded first (without TensorFlow's start-up lines), then
    the strategy's session opened (``open_session``), then ``train``."""
    console.import_keras(run.backend)
    return train(run, open_session(run))


def worker_environment(run: RunConfig, train: Train, *, rank: int | None = None,
                       world_size: int | None = None, local_rank: int = 0,
                       peers: list[str] | None = None,
                       master: str | None = None) -> dict[str, str]:
    """The variables a rank process reads: the plan and the training function; with ``rank``,
    its place in a group that ktrain itself forms (read back by ``ktrain.environment.detect``;
    ``peers`` or ``master``, see ``rank_environment``)."""
    env = {PLAN_ENV: run.model_dump_json(), TRAIN_ENV: f"{train.__module__}:{train.__qualname__}"}
    if rank is not None:
        env.update(rank_environment(rank, world_size, local_rank, peers, master))
    return env


def read_plan(env: Mapping[str, str] | None = None) -> tuple[RunConfig, Train]:
    """The run and the training function ``worker_environment`` wrote."""
    env = os.environ if env is None else env
    module, _, name = env[TRAIN_ENV].partition(":")
    return (RunConfig.model_validate_json(env[PLAN_ENV]),
            getattr(importlib.import_module(module), name))


def worker_command(*python_options: str) -> list[str]:
    """The command of a rank process: this Python running ``ktrain.worker_entry``."""
    return [sys.executable, *python_options, "-m", WORKER_ENTRY]
