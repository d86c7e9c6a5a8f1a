"""One checkpointing layer for every strategy.

A checkpoint is a single file holding the model's variables (weights and RNG state), the
optimizer's variables, the run's history and the state of stateful callbacks as plain arrays,
so one written under any strategy or device count loads under any other. It is named by its
position in the run: ``ckpt-<epochs done>.npz`` at an epoch's end, ``ckpt-<epochs
done>-<steps into the next>.npz`` mid-epoch (a step is one global batch, whatever the number
of workers). Files are written under a temporary
name and committed by a rename, so a crash never leaves a "latest" checkpoint that cannot be
loaded. Each carries a SHA-256 digest of its contents, checked on every load: a file damaged
later (a failed copy, a full disk, a flipped bit) is named and skipped for the newest intact
one. Storage goes through fsspec: any URL fsspec knows works (``memory://`` in tests).

Every worker calls ``save``; only the chief writes. Values are read locally (each worker holds
a full replica), so no worker waits on another. Writing can happen in the background while
training goes on (``background=True``); ``wait`` joins it.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

import fsspec
import numpy as np

from ktrain import console
from ktrain.errors import UserError

_NAME = re.compile(r"ckpt-(\d{6})(?:-(\d{7}))?\.npz$")


class DamagedCheckpoint(Exception):
    """A checkpoint file that cannot be trusted; the message says why."""


class Position(NamedTuple):
    """Where a run stands: ``epoch`` epochs done, and ``step`` global batches into the next."""

    epoch: int
    step: int = 0

    def __str__(self) -> str:
        return f"at step {self.step} of epoch {self.epoch + 1}" if self.step else \
            f"after epoch {self.epoch}"


@dataclass
class TrainingState:
    """Everything needed to continue a run from ``position``."""

    epoch: int
    model_variables: list[np.ndarray]
    optimizer_variables: list[np.ndarray]
    history: list[dict] = field(default_factory=list)
    variable_paths: list[str] = field(default_factory=list)
    step: int = 0
    """Global batches done in epoch ``epoch + 1`` (0: the epoch had not started)."""
    global_batch_size: int | None = None
    """What a step meant when this was written (a mid-epoch position depends on it)."""
    callbacks: dict = field(default_factory=dict)
    """JSON state of stateful callbacks (EarlyStopping's wait and best, ...) by name."""
    fingerprint: dict = field(default_factory=dict)
    """What decides the run's result (settings, model shapes, data sizes): a run resumed
    into the same output_dir must match it."""
    written_by: dict = field(default_factory=dict)
    """How the run that wrote it ran (strategy, backend, world size): for the record only;
    a checkpoint resumes under any of them."""
    world_sizes: list[dict] = field(default_factory=list)
    """The run's groups so far: the global step each started at, its size and why it was
    formed (summary.json's ``world_size_history``)."""

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.step)

    def write_to(self, file) -> None:
        """Write the ``.npz`` into an open binary file, array by array (no copy in memory)."""
        meta = {"epoch": self.epoch, "step": self.step, "history": self.history,
                "variable_paths": self.variable_paths, "callbacks": self.callbacks,
                "global_batch_size": self.global_batch_size, "fingerprint": self.fingerprint,
                "written_by": self.written_by, "world_sizes": self.world_sizes, "format": 4}
        arrays = {f"model_{i:05d}": v for i, v in enumerate(self.model_variables)}
        arrays |= {f"optimizer_{i:05d}": v for i, v in enumerate(self.optimizer_variables)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        arrays[_DIGEST] = np.frombuffer(_digest(arrays).encode(), dtype=np.uint8)
        np.savez(file, **arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainingState:
        """The state ``write_to`` wrote; DamagedCheckpoint if the bytes are not all intact."""
        if not data:
            raise DamagedCheckpoint("the file is empty")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DamagedCheckpoint(f"not a readable .npz ({err})") from None
        if _DIGEST in arrays:  # written since format 4
            digest = arrays.pop(_DIGEST).tobytes().decode(errors="replace")
            if digest != _digest(arrays):
                raise DamagedCheckpoint("its contents do not match their SHA-256 digest")
        try:
            meta = json.loads(arrays["meta"].tobytes())
        except (KeyError, ValueError) as err:
            raise DamagedCheckpoint(f"no readable meta record ({err})") from None
        model = [arrays[k] for k in sorted(k for k in arrays if k.startswith("model_"))]
        optimizer = [arrays[k] for k in sorted(k for k in arrays if k.startswith("optimizer_"))]
        return cls(meta["epoch"], model, optimizer, meta["history"], meta["variable_paths"],
                   meta.get("step", 0), meta.get("global_batch_size"), meta.get("callbacks", {}),
                   meta.get("fingerprint", {}), meta.get("written_by", {}),
                   meta.get("world_sizes", []))


_DIGEST = "sha256"


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def keep_latest(positions: list, keep: int) -> list:
    """Retention policy: the positions to delete so that only the newest ``keep`` remain."""
    return sorted(positions)[:-keep] if keep else []


class CheckpointStore:
    """The ``checkpoints/`` folder of a run, local or behind any fsspec URL."""

    def __init__(self, url: str, *, keep: int = 3, is_chief: bool = True):
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.url = url
        self.keep = keep
        self.is_chief = is_chief
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None

    def positions(self) -> list[Position]:
        """Where the committed checkpoints stand, oldest first."""
        if not self.fs.exists(self.path):
            return []
        names = (os.path.basename(p) for p in self.fs.ls(self.path, detail=False))
        return sorted(Position(int(m.group(1)), int(m.group(2) or 0))
                      for m in map(_NAME.match, names) if m)

    def file_for(self, position: Position | int) -> str:
        epoch, step = position if isinstance(position, tuple) else (position, 0)
        suffix = f"-{step:07d}" if step else ""
        return f"{self.path.rstrip('/')}/ckpt-{epoch:06d}{suffix}.npz"

    def save(self, state: TrainingState, *, background: bool = False) -> None:
        """Commit ``state``; with ``background``, return at once and write in a thread."""
        if not self.is_chief:
            return
        self.wait()  # one write at a time, in order
        if not background:
            self._write(state)
            return
        self._writer = threading.Thread(target=self._write_catching, args=(state,),
                                        name="ktrain-checkpoint-writer")
        self._writer.start()

    def wait(self) -> None:
        """Block until a background write is committed; re-raise its error if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            raise error

    def _write_catching(self, state: TrainingState) -> None:
        _lower_this_threads_priority()  # training keeps the cores; the write takes the gaps
        try:
            self._write(state)
        except OSError as err:  # surfaced to the training thread by wait()
            self._write_error = UserError(
                f"cannot write the checkpoint {state.position} to '{self.url}': {err}",
                where="output_dir", hint="check that output_dir is writable and has free space")
        except BaseException as err:
            self._write_error = err

    def _write(self, state: TrainingState) -> None:
        self.fs.makedirs(self.path, exist_ok=True)
        final = self.file_for(state.position)
        temporary = f"{self.path.rstrip('/')}/.tmp-{uuid.uuid4().hex}.npz"
        with self.fs.open(temporary, "wb") as f:
            state.write_to(f)
            _sync(f)
        self.fs.mv(temporary, final)
        for position in keep_latest(self.positions(), self.keep):
            self.fs.rm(self.file_for(position))
        for stale in self.fs.glob(f"{self.path.rstrip('/')}/.tmp-*"):
            if stale != temporary:
                self.fs.rm(stale)  # left by a crash during an earlier save

    def load_latest(self) -> TrainingState | None:
        """The newest intact checkpoint, each newer damaged one named in a warning; None when
        there is none; a UserError listing every one when none is intact."""
        damaged = []
        for position in reversed(self.positions()):
            path = self.file_for(position)
            try:
                state = self.load(path)
            except DamagedCheckpoint as err:
                damaged.append(f"{path}: {err}")
                continue
            for report in damaged:
                console.warning(f"skipping the damaged checkpoint {report}; resuming from "
                                f"{os.path.basename(path)} instead")
            return state
        if damaged:
            raise UserError(f"every checkpoint in '{self.url}' is damaged: "
                            + "; ".join(damaged), where="checkpoint.resume",
                            hint="restore the folder from a copy, or start afresh in a new "
                                 "output_dir (ktrain never deletes a run)")
        return None

    def load(self, path: str) -> TrainingState:
        """The checkpoint at ``path``; DamagedCheckpoint if it cannot be read or trusted."""
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise DamagedCheckpoint(f"cannot be read ({err})") from None
        return TrainingState.from_bytes(data)


def load_checkpoint_url(url: str) -> TrainingState:
    """Load ``checkpoint.resume: <path>``: a checkpoint file, or a folder whose newest one is used."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise UserError(f"checkpoint '{url}' does not exist", where="checkpoint.resume",
                        hint="point it at a ckpt-NNNNNN.npz file or a checkpoints/ folder, "
                             "or use auto")
    if fs.isdir(path):
        state = CheckpointStore(url).load_latest()
        if state is None:
            raise UserError(f"folder '{url}' holds no checkpoint", where="checkpoint.resume",
                            hint="point it at a ckpt-NNNNNN.npz file, or use auto")
        return state
    try:
        return CheckpointStore(url).load(path)
    except DamagedCheckpoint as err:
        raise UserError(f"'{url}' is not an intact ktrain checkpoint: {err}",
                        where="checkpoint.resume",
                        hint="point it at another ckpt-NNNNNN.npz (`ktrain checkpoints "
                             "RUN_DIR` lists them), or use auto") from None


def _lower_this_threads_priority() -> None:
    try:  # Linux: a thread id is a valid PRIO_PROCESS target and changes that thread only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _sync(f) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass  # not a local file: the store commits on close
