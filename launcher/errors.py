"""The one kind of error a user should ever see: what, where, and how to fix it."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input. The CLI prints it without a traceback and exits with 2."""

    exit_code = 2

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
