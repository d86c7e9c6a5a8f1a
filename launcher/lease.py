"""One writer per output_dir: the run that ``ktrain run`` starts holds a lease on its folder for
its whole life, restarts of its group included.

The lease is a small JSON record, ``output_dir/.ktrain-lease.json``, created with an exclusive
create (fsspec's ``xb``: ``O_EXCL`` on local and shared file systems, a conditional write on the
object stores that have one) and rewritten by a heartbeat thread every ``HEARTBEAT`` seconds. A
second run into a held folder stops before it writes anything there. A lease whose holder is
gone is taken over, with a note: its process no longer exists on this host, its heartbeat is
older than ``STALE_AFTER`` seconds, or it belongs to the same SLURM job (a requeued job whose
predecessor is still shutting down).

The holder also writes the run's secret beside the lease, ``output_dir/.ktrain-secret`` (mode
0600 on a file system; on an object store, as private as the bucket): the ranks that ktrain
does not start (``srun``) read it there to prove to each other that they belong to this run
(``ktrain.handshake``). Whoever can read the run folder can change its checkpoints too, so the
secret trusts no one the folder does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ktrain import console
from ktrain.errors import UserError
from ktrain.handshake import new_secret
from ktrain.output import unwritable

NAME = ".ktrain-lease.json"
SECRET = ".ktrain-secret"
HEARTBEAT = 10.0
STALE_AFTER = 60.0
"""Seconds without a heartbeat after which a lease held from another host counts as gone."""


def _record(run_id: str, started: float) -> dict:
    return {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": started,
            "heartbeat": time.time()}


def _gone(holder: dict) -> str | None:
    """Why the lease ``holder`` wrote no longer holds, or None while it does."""
    if holder.get("slurm_job_id") and holder["slurm_job_id"] == os.environ.get("SLURM_JOB_ID"):
        return f"an earlier attempt of SLURM job {holder['slurm_job_id']}"
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return f"pid {holder['pid']} on this host has ended"
        except (PermissionError, KeyError, TypeError, ValueError):
            pass  # alive (another user's), or unreadable: judged by its heartbeat
    silent = time.time() - float(holder.get("heartbeat", 0))
    return f"no heartbeat for {silent:.0f} s" if silent > STALE_AFTER else None


@contextlib.contextmanager
def holding(output_dir: str):
    """Hold the lease on ``output_dir`` (created if need be) while the block runs; raise
    UserError, having written nothing, if another run holds it."""
    fs, folder = fsspec.core.url_to_fs(output_dir)
    path, secret_path = (f"{folder.rstrip('/')}/{name}" for name in (NAME, SECRET))
    run_id, started = uuid.uuid4().hex[:12], time.time()
    created = not fs.exists(folder)
    try:
        fs.makedirs(folder, exist_ok=True)
        _take(fs, path, output_dir, _record(run_id, started))
        _write_secret(fs, secret_path)
    except OSError as err:
        raise unwritable(output_dir, err) from None
    except UserError:
        if created:
            _remove_if_empty(fs, folder)
        raise
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(fs, path, run_id, started, stop), daemon=True,
                            name="ktrain-lease-heartbeat")
    beat.start()
    try:
        yield run_id
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError):
            if (_read(fs, path) or {}).get("run_id") == run_id:
                fs.rm(secret_path)
                fs.rm(path)
        if created:  # a run that wrote nothing leaves no folder
            _remove_if_empty(fs, folder)


def secret(output_dir: str) -> bytes | None:
    """The secret of the run that holds ``output_dir``; None while there is none."""
    fs, folder = fsspec.core.url_to_fs(output_dir)
    try:
        return bytes.fromhex(fs.cat_file(f"{folder.rstrip('/')}/{SECRET}").decode())
    except (OSError, ValueError):  # not written yet, or being written
        return None


def _write_secret(fs, path: str) -> None:
    """A new secret, replacing any earlier run's at once (readers see one or the other)."""
    text = new_secret().hex().encode()
    if isinstance(fs, LocalFileSystem):
        temporary = f"{path}.{os.getpid()}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(text)
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, text)


def _remove_if_empty(fs, folder: str) -> None:
    with contextlib.suppress(OSError):
        if not fs.ls(folder, detail=False):
            fs.rmdir(folder)


def _take(fs, path: str, output_dir: str, mine: dict) -> None:
    for _ in range(3):  # another run may take or drop the lease between two of our steps
        try:
            with fs.open(path, "xb") as f:
                f.write(json.dumps(mine).encode())
            return
        except FileExistsError:
            pass
        except (NotImplementedError, ValueError):  # a store without exclusive create
            if not fs.exists(path):
                fs.pipe_file(path, json.dumps(mine).encode())
                return
        holder = _read(fs, path)
        if holder is None:
            continue  # dropped meanwhile
        reason = _gone(holder)
        if reason is None:
            raise _in_use(output_dir, holder)
        if _read(fs, path) == holder:  # still the stale one: ours to remove
            console.note(f"taking over output_dir '{output_dir}' from run {holder.get('run_id')} "
                         f"(host {holder.get('host')}, pid {holder.get('pid')}): {reason}")
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
    holder = _read(fs, path) or {}
    raise _in_use(output_dir, holder)


def _read(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"heartbeat": time.time()}  # being written: held, by whom we cannot tell yet


def _in_use(output_dir: str, holder: dict) -> UserError:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    silent = time.time() - float(holder.get("heartbeat", time.time()))
    return UserError(
        f"output_dir '{output_dir}' is in use by run {holder.get('run_id', '?')} (host "
        f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {started}, last "
        f"heartbeat {silent:.0f} s ago)", where="output_dir",
        hint=f"let that run finish, or choose another output_dir; a lease whose holder is gone "
             f"is taken over (its process ended, or no heartbeat for {STALE_AFTER:.0f} s)")


def _beat(fs, path: str, run_id: str, started: float, stop: threading.Event) -> None:
    """Rewrite the record every HEARTBEAT seconds, by an atomic replace where the file system
    has one (readers never see half a record)."""
    while not stop.wait(HEARTBEAT):
        holder = _read(fs, path) or {}
        if holder.get("run_id") not in (run_id, None):
            console.warning(f"run {holder['run_id']} (host {holder.get('host')}) took over "
                            f"this run's output_dir after hearing no heartbeat; two runs now "
                            f"write it")
            return
        temporary = f"{path}.{run_id}.tmp"
        with contextlib.suppress(OSError):
            fs.pipe_file(temporary, json.dumps(_record(run_id, started)).encode())
            fs.mv(temporary, path)
