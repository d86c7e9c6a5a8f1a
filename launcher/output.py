"""The run's ``output_dir``: config, metrics, summary, final model and logs, through fsspec.

Nothing is written here until the config, the user's functions and the data have all been
checked, so a bad input never touches an existing output folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ktrain import console
from ktrain.errors import UserError


@dataclass
class RunResult:
    """What a finished run hands back: its summary, and in the process that trained, the model."""

    summary: dict
    model: Any = None


def unwritable(url: str, err: OSError) -> UserError:
    """The error for an output_dir this process cannot write."""
    return UserError(f"cannot write to output_dir '{url}': {err}", where="output_dir",
                     hint="choose a folder (or URL) this process can write to")


class RunOutput:
    def __init__(self, url: str, *, is_chief: bool = True, rank: int = 0, keep_log: bool = True):
        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.is_chief = is_chief
        self.rank = rank
        self.keep_log = keep_log
        """False when a supervisor already writes this rank's log from its output."""
        self._log_lines: list[str] = []

    @classmethod
    def named(cls, run_dir: str) -> RunOutput:
        """A run's folder as a command's argument names it: a URL, or a path from here."""
        return cls(run_dir if "://" in run_dir else os.path.abspath(run_dir))

    @property
    def checkpoints_url(self) -> str:
        return f"{self.url}/checkpoints"

    def check_writable(self) -> None:
        """Fail before training, not after the first epoch, if output_dir cannot be written."""
        probe = f"{self.path}/.ktrain-write-test-{self.rank}"
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            self.fs.pipe(probe, b"")
            self.fs.rm(probe)
        except OSError as err:
            raise unwritable(self.url, err) from None

    def _write(self, name: str, data: str | bytes) -> None:
        target = f"{self.path}/{name}"
        self.fs.makedirs(os.path.dirname(target), exist_ok=True)
        mode = "wb" if isinstance(data, bytes) else "w"
        with self.fs.open(target, mode) as f:
            f.write(data)

    def write_config(self, text: str) -> None:
        if self.is_chief:
            self._write("config.yaml", text)

    def write_metrics(self, history: list[dict]) -> None:
        if not self.is_chief or not history:
            return
        columns = list(dict.fromkeys(k for row in history for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
        self._write("metrics.csv", buffer.getvalue())

    def write_summary(self, summary: dict) -> None:
        self.write_json("summary.json", summary)

    def save_model(self, model) -> str:
        """Save ``model.keras`` (Keras writes local files only, so stage it locally first)."""
        if not self.is_chief:
            return f"{self.url}/model.keras"
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "model.keras")
            model.save(local)
            return self.publish(local, "model.keras")

    def publish(self, local: str, name: str) -> str:
        """Copy a local file or folder to ``name`` under output_dir so that no reader (and
        no crash) meets half of it: it is written beside the target, then renamed into place;
        a previous version is set aside first and removed last."""
        target = f"{self.path}/{name}"
        folder, base = os.path.split(target)
        partial, previous = f"{folder}/.{base}.partial", f"{folder}/.{base}.previous"
        self.fs.makedirs(folder, exist_ok=True)
        if self.fs.exists(partial):  # left by a crash while copying
            self.fs.rm(partial, recursive=True)
        self.fs.put(local, partial, recursive=os.path.isdir(local))
        if self.fs.exists(target):
            if self.fs.exists(previous):
                self.fs.rm(previous, recursive=True)
            self.fs.mv(target, previous, recursive=True)
        self.fs.mv(partial, target, recursive=True)
        if self.fs.exists(previous):
            self.fs.rm(previous, recursive=True)
        return f"{self.url}/{name}"

    def has_model(self) -> bool:
        return self.fs.exists(f"{self.path}/model.keras")

    def read_json(self, name: str) -> dict:
        if self.fs.exists(f"{self.path}/{name}"):
            return json.loads(self.fs.cat_file(f"{self.path}/{name}"))
        return {}

    def write_json(self, name: str, data: dict) -> None:
        if self.is_chief:
            self._write(name, json.dumps(data, indent=2) + "\n")

    def read_summary(self) -> dict:
        return self.read_json("summary.json")

    def local_copy(self, name: str, tmp: str) -> str | None:
        """A local path of ``name`` (a file or folder here), copied into ``tmp`` if output_dir
        is remote; None if there is no such thing."""
        source = f"{self.path}/{name}"
        if not self.fs.exists(source):
            return None
        if isinstance(self.fs, LocalFileSystem):
            return source
        local = os.path.join(tmp, name)
        self.fs.get(source, local, recursive=self.fs.isdir(source))
        return local

    def update_summary(self, **fields) -> dict:
        """Change ``fields`` of summary.json, keeping the rest as the run left it."""
        summary = self.read_summary()
        summary.update(fields)
        self.write_summary(summary)
        return summary

    def say(self, line: str) -> None:
        """Print a line (see ktrain.console for who speaks) and keep it for the rank's log."""
        console.info(line)
        self.log(line)

    def log(self, line: str) -> None:
        """Keep a line for ``logs/rank-<r>.log``; ``flush_log`` appends it to the file."""
        if self.keep_log:
            self._log_lines.append(line)

    def flush_log(self) -> None:
        if not self._log_lines:
            return
        target = f"{self.path}/logs/rank-{self.rank}.log"
        self.fs.makedirs(os.path.dirname(target), exist_ok=True)
        with self.fs.open(target, "a") as f:
            f.write("\n".join(self._log_lines) + "\n")
        self._log_lines.clear()
