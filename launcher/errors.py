"""The errors a user sees: one message that says what, where, and how to fix it; no traceback."""

from __future__ import annotations


class KtrainError(Exception):
    """Printed by the CLI as one message (a traceback only with --debug)."""

    exit_code = 1

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None,
                 details: str | None = None):
        self.what = what
        self.where = where
        self.hint = hint
        self.details = details
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        lines = [head]
        if self.details:
            lines.append(self.details.rstrip())
        if self.hint:
            lines.append(f"HINT: {self.hint}")
        return "\n".join(lines)


class UserError(KtrainError):
    """A mistake in the user's input: exit status 2."""

    exit_code = 2


def first_line(err: BaseException) -> str:
    """An exception's first line, for a one-line message (its type if it says nothing)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def all_of(problems: list[UserError]) -> UserError:
    """One error for every problem found (``ktrain validate`` reports them all at once)."""
    if len(problems) == 1:
        return problems[0]
    listed = "\n".join(f"{n}. " + problem.render().replace("\n", "\n   ")
                       for n, problem in enumerate(problems, 1))
    return UserError(f"{len(problems)} problems:\n{listed}")


class WorkersFailed(KtrainError):
    """A worker process crashed or never joined; the message carries the root cause."""

    @classmethod
    def could_not_join(cls, rank: int, peers: list[str], group: str,
                       err: BaseException) -> WorkersFailed:
        """Rank ``rank`` could not join ``group`` (jax.distributed, torch.distributed) at
        rank 0's address, the first of ``peers``."""
        return cls(f"rank {rank} could not join the other {len(peers) - 1} process(es) of "
                   f"{group} at {peers[0]}: {first_line(err)}",
                   hint="see the other ranks' logs; strategy.start_timeout allows slower starts")


class Stopped(KtrainError):
    """The run stopped on request (a signal) after committing a checkpoint: exit status
    128 + the signal's number, as a shell reports a process ended by that signal."""

    def __init__(self, what: str, *, signal_number: int, hint: str | None = None,
                 shown: bool = False):
        super().__init__(what, hint=hint)
        self.exit_code = 128 + signal_number
        self.shown = shown
        """Already on the console (rank 0's own words, passed on by its launcher)."""
