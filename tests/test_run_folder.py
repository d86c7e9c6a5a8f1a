"""The run folder has one writer: a run holds a lease on output_dir for its whole life; a
second run into it stops before writing anything, and a lease whose holder is gone is taken
over (a SIGKILLed run's is, in test_resume, by the re-run that resumes it). A launcher that
is killed leaves no temporary folder behind."""

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from helpers import base_config, run_cli, with_strategy, worker_pid, write_config
from ktrain import lease
from ktrain.errors import UserError


def snapshot(folder):
    """Every file and its modification time, but the lease (its holder's heartbeat rewrites it)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if not p.name.startswith(lease.NAME)}


def test_a_second_run_into_a_held_folder_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "ckpt-000001.npz").write_bytes(b"an earlier run's work")
    config = write_config(tmp_path / "config.yaml", base_config(out, train={"epochs": 1}))
    with lease.holding(str(out)) as holder:  # this test's own process is the first run
        before = snapshot(out)
        started = time.monotonic()
        result = run_cli("run", config)
        assert result.returncode == 2, result.stderr
        assert snapshot(out) == before
    assert time.monotonic() - started < 20  # told before anything loads Keras
    error = result.stderr.strip()
    assert error.startswith(f"ktrain: error: output_dir: output_dir '{out}' is in use by run "
                            f"{holder} (host {socket.gethostname()}, pid {os.getpid()}")
    assert "Traceback" not in result.stderr and "let that run finish" in error
    assert not (out / lease.NAME).exists()  # released with its holder


def hold(folder, **record) -> None:
    """A lease as another run left it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / lease.NAME).write_text(json.dumps({
        "run_id": "elsewhere1", "host": "node-17", "pid": 4242, "slurm_job_id": None,
        "started": time.time() - 600, "heartbeat": time.time(), **record}))


def test_a_lease_with_a_live_heartbeat_from_another_host_holds(tmp_path):
    hold(tmp_path)
    with pytest.raises(UserError, match=r"in use by run elsewhere1 \(host node-17, pid 4242"):
        with lease.holding(str(tmp_path)):
            pass
    assert json.loads((tmp_path / lease.NAME).read_text())["run_id"] == "elsewhere1"


@pytest.mark.parametrize("gone", ["silent", "ended", "same SLURM job"])
def test_a_lease_whose_holder_is_gone_is_taken_over_with_a_note(tmp_path, gone, capsys,
                                                                 monkeypatch):
    if gone == "silent":  # its host went away: no heartbeat for longer than STALE_AFTER
        hold(tmp_path, heartbeat=time.time() - lease.STALE_AFTER - 5)
        reason = "no heartbeat for"
    elif gone == "ended":  # a process of this host that no longer exists
        hold(tmp_path, host=socket.gethostname(), pid=_ended_pid())
        reason = "on this host has ended"
    else:  # requeued: the same job's earlier attempt may still be shutting down
        monkeypatch.setenv("SLURM_JOB_ID", "5150")
        hold(tmp_path, slurm_job_id="5150")
        reason = "an earlier attempt of SLURM job 5150"
    with lease.holding(str(tmp_path)) as mine:
        assert json.loads((tmp_path / lease.NAME).read_text())["run_id"] == mine
    note = capsys.readouterr().err
    assert f"taking over output_dir '{tmp_path}' from run elsewhere1" in note and reason in note
    assert not (tmp_path / lease.NAME).exists()


def _ended_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_killed_launcher_leaves_no_temporary_folder(tmp_path, background):
    out, temporary = tmp_path / "out", tmp_path / "tmp"
    temporary.mkdir()
    config = write_config(tmp_path / "config.yaml", with_strategy(
        out, "multiworker", {"communicator": "collective"}, train={"epochs": 500}))
    run = background("run", config, "-q", env={"TMPDIR": str(temporary)})
    run.wait_for(lambda: worker_pid(out, 0) and worker_pid(out, 1), timeout=180)
    workers = [worker_pid(out, rank) for rank in (0, 1)]
    run.signal(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers):  # they die with their launcher
        assert time.monotonic() < deadline, "the workers outlived their launcher"
        time.sleep(0.1)
    assert not [p.name for p in temporary.iterdir() if p.name.startswith("ktrain")]


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody has reaped yet has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
