"""The interface every execution strategy implements, and what a worker gets from it.

A strategy answers two questions: how are workers started (``launch``), and what does a
worker need to train (``open_session``: the device scope, its rank and world size, and how
it talks to its peers). Everything else (data, model, checkpoints, metrics) is shared and
lives in ``launcher.worker``.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from launcher.schema import Section

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from launcher.worker import RunResult


class StrategyConfig(Section):
    """The ``strategy:`` section; each strategy subclasses it with ``name: Literal[...]``."""

    name: str


@dataclass
class Session:
    """What one worker knows about the run it is part of."""

    rank: int
    world_size: int
    num_replicas: int
    distribution: Any = None
    """The ``tf.distribute.Strategy`` whose scope the model is built in; None for the default."""
    devices: tuple[str, ...] = ()

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def scope(self):
        return self.distribution.scope() if self.distribution else contextlib.nullcontext()


class Strategy(abc.ABC):
    """One way of running workers. Subclasses live one per module in ``strategies/``."""

    name: ClassVar[str]
    config_type: ClassVar[type[StrategyConfig]]

    def __init__(self, config: StrategyConfig):
        self.config = config

    @abc.abstractmethod
    def prepare(self, run: RunConfig) -> None:
        """Check the machine can run this config, before anything is written. Raises UserError."""

    @abc.abstractmethod
    def launch(self, run: RunConfig) -> RunResult:
        """Start the workers, wait for them, and return the chief's result."""

    @abc.abstractmethod
    def open_session(self) -> Session:
        """Called inside a worker: set up devices and communicators for this process."""
