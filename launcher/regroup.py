"""How a group of ranks re-forms at another size (an elastic run) or the same one (a restart):
the files its launcher and its ranks exchange in one folder (``$KTRAIN_REGROUP``, any fsspec
URL), and the exit statuses that tell the launcher why a rank left.

- A rank that loses a peer mid-training notes the last step it completed and waits a moment
  for the launcher to name the survivor holding the newest step (``ask_newest_to_save``),
  which commits the state it holds in memory as a checkpoint at that step, so that the next
  group loses no step.
- A launcher with room for more ranks offers it (``offering_growth``); rank 0 raises a flag that
  every rank learns at the same step, and they all stop right after the next checkpoint.
- The next group's rank 0 learns why it was formed from ``$KTRAIN_REFORMED`` (``Reformation``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import fsspec

from ktrain.stopping import polling

REGROUP_ENV = "KTRAIN_REGROUP"
"""The folder of a group whose launcher can re-form it."""
REFORMED_ENV = "KTRAIN_REFORMED"
"""Why this group was formed, when it replaces another (``Reformation`` as JSON)."""

LEFT_TO_GROW = 75
"""A rank's exit status when the group stopped after a checkpoint to re-form larger."""
PEER_LOST = 76
"""A rank's exit status when it left because a peer was lost (its state saved if asked)."""

SAVER_WAIT = 10.0
"""Seconds a rank that lost a peer waits for its launcher to name the rank that saves."""
SURVIVORS_LEAVE = 60.0
"""Seconds a launcher gives the ranks left after a loss to save and leave before it ends
them."""
_POLL = 0.1


@dataclass
class Reformation:
    """Why a group replaces the one before it, as its launcher tells the new rank 0."""

    reason: str
    """e.g. "rank 2 was killed by SIGKILL", "workers are available again"."""
    since: float
    """Unix time of the loss (or of the stop to grow): re-forming is timed from it."""
    kind: str
    """shrink (an elastic group goes on without the lost ranks), grow (back to the most
    workers), or restart (at the same size)."""
    completed_step: int | None = None
    """The last global step any survivor completed: what a checkpoint older than it loses."""
    saved_by: int | None = None
    """The rank whose state in memory became the checkpoint the new group starts from."""

    def environment(self) -> dict[str, str]:
        return {REFORMED_ENV: json.dumps(asdict(self))}

    @classmethod
    def of_this_group(cls) -> Reformation | None:
        said = os.environ.get(REFORMED_ENV)
        return cls(**json.loads(said)) if said else None


class RegroupFolder:
    """The launcher's side of the folder at ``url``."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)

    @classmethod
    def of_run(cls, output_dir: str) -> RegroupFolder:
        """The folder of a driver whose ranks run out of its reach (Spark tasks, Ray actors):
        beside their logs, which every rank reaches."""
        return cls(f"{output_dir.rstrip('/')}/logs/regroup")

    def environment(self) -> dict[str, str]:
        return {REGROUP_ENV: self.url}

    def clear(self) -> None:
        """Ready for a new group: nothing a group before it said remains."""
        self.remove()
        self.fs.makedirs(self.path, exist_ok=True)

    def remove(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def ask_newest_to_save(self, running: Callable[[], list[int]],
                           wait: float = SAVER_WAIT / 2) -> int | None:
        """Name the rank still running that completed the newest step (the lowest of a tie) to
        save it: a peer that dies can cut a step's allreduce short on some ranks after others
        completed it. Waits up to ``wait`` for every rank in ``running()`` to say its step."""
        deadline = time.monotonic() + wait
        while True:
            noted, alive = self.completed_steps(), running()
            if all(rank in noted for rank in alive) or time.monotonic() > deadline:
                break
            time.sleep(_POLL)
        held = {rank: step for rank, step in noted.items() if rank in alive and step >= 0}
        rank = max(held, key=lambda r: (held[r], -r)) if held else min(alive, default=None)
        if rank is not None:
            self.fs.pipe(f"{self.path}/saver", str(rank).encode())
        return rank

    @contextlib.contextmanager
    def offering_growth(self, has_room: Callable[[], bool], every: float):
        """While the block runs, ask ``has_room()`` every ``every`` seconds; offer growth once
        it says yes."""
        def offered() -> bool:
            if not has_room():
                return False
            self.fs.pipe(f"{self.path}/grow", b"1")
            return True

        with polling(offered, "ktrain-room-to-grow", every=every):
            yield

    def completed_steps(self) -> dict[int, int]:
        """The last global step each rank that lost a peer had completed."""
        return {int(path.rsplit("-", 1)[1]): int(self.fs.cat_file(path))
                for path in self.fs.glob(f"{self.path}/completed-*")}

    def held_steps(self) -> dict[int, int]:
        """``completed_steps`` of the ranks that hold a step they could save."""
        return {rank: step for rank, step in self.completed_steps().items() if step >= 0}


def _folder() -> tuple[fsspec.AbstractFileSystem, str] | None:
    url = os.environ.get(REGROUP_ENV)
    return fsspec.core.url_to_fs(url) if url else None


def can_regroup() -> bool:
    """Whether this rank's launcher re-forms its group (and so takes part in the above)."""
    return REGROUP_ENV in os.environ


def note_completed(rank: int, global_step: int | None) -> None:
    """Tell the launcher the last global step this rank completed (None: none it could save)."""
    fs, path = _folder()
    fs.pipe(f"{path}/completed-{rank}", str(-1 if global_step is None else global_step).encode())


def saver(wait: float = SAVER_WAIT) -> int | None:
    """The rank the launcher asked to save its state, once it says (None if it does not)."""
    fs, path = _folder()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if fs.exists(f"{path}/saver"):
            return int(fs.cat_file(f"{path}/saver"))
        time.sleep(_POLL)
    return None


@contextlib.contextmanager
def following_offers(on_offer: Callable[[], None], *, follow: bool):
    """If ``follow`` (rank 0) and the launcher re-forms groups: call ``on_offer`` once it
    offers room for more ranks."""
    if not follow or not can_regroup():
        yield
        return
    fs, path = _folder()

    def offered() -> bool:
        if not fs.exists(f"{path}/grow"):
            return False
        on_offer()
        return True

    with polling(offered, "ktrain-growth-offers"):
        yield
