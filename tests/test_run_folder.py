"""The run folder has one writer: a run holds a lease on output_dir for its whole life; a
second run into it stops before writing anything, and a lease whose holder is gone is taken
over (a SIGKILLed run's is, in test_resume, by the re-run that resumes it). The holder writes
the run's secret beside the lease, which ranks prove on ktrain's own sockets (the rendezvous
here; the stall watchdog in test_multiworker). A launcher that is killed leaves no temporary
folder behind."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import fsspec
import pytest

from helpers import base_config, run_cli, with_strategy, worker_pid, write_config
from ktrain import console, handshake, lease, rendezvous
from ktrain.errors import UserError
from ktrain.strategies.base import group_log_dir


def snapshot(folder):
    """Every file and its modification time, but the lease (its holder's heartbeat rewrites it)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if not p.name.startswith(lease.NAME)}


@pytest.mark.fast
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


@pytest.mark.fast
def test_a_lease_with_a_live_heartbeat_from_another_host_holds(tmp_path):
    hold(tmp_path)
    with pytest.raises(UserError, match=r"in use by run elsewhere1 \(host node-17, pid 4242"):
        with lease.holding(str(tmp_path)):
            pass
    assert json.loads((tmp_path / lease.NAME).read_text())["run_id"] == "elsewhere1"


@pytest.mark.fast
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
    (tmp_path / lease.SECRET).write_text("an earlier run's")
    with lease.holding(str(tmp_path)) as mine:
        assert json.loads((tmp_path / lease.NAME).read_text())["run_id"] == mine
        assert len(lease.secret(str(tmp_path))) == 32  # the new run's own, for its ranks only:
        assert (tmp_path / lease.SECRET).stat().st_mode & 0o777 == 0o600
    note = capsys.readouterr().err
    assert f"taking over output_dir '{tmp_path}' from run elsewhere1" in note and reason in note
    assert not (tmp_path / lease.NAME).exists() and not (tmp_path / lease.SECRET).exists()


def _ended_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.mark.fast
def test_the_handshake_proves_the_secret_both_ways():
    def exchange(listener_key: bytes, peer_key: bytes):
        ours, theirs = socket.socketpair()
        admitted = []

        def listen():
            admitted.append(_raised(handshake.admit, ours.makefile("rw"), listener_key))
            ours.shutdown(socket.SHUT_RDWR)  # as a listener drops a stranger

        with ours, theirs:
            side = threading.Thread(target=listen)
            side.start()
            joined = _raised(handshake.join, theirs.makefile("rw"), peer_key, {"rank": 3})
            side.join()
        return admitted[0], joined

    key = handshake.new_secret()
    assert exchange(key, key) == ({"rank": 3}, None)
    refused, told = exchange(key, handshake.new_secret())
    assert isinstance(refused, handshake.Stranger) and isinstance(told, handshake.Stranger)


def _raised(function, *args):
    try:
        return function(*args)
    except (handshake.Stranger, OSError) as err:
        return err


@pytest.mark.fast
def test_strangers_at_the_rendezvous_neither_join_nor_take_a_rank(tmp_path, monkeypatch,
                                                                  capsys):
    """Under srun, ranks meet at rank 0's port (ktrain.rendezvous), proving the secret that
    rank 0, the lease holder, wrote into the run folder. A rank that read an earlier run's
    secret reads it again; a stranger (garbage, a forged claim, a wrong key, silence, a
    claim to a rank that is taken) is dropped, and the ranks get the same list."""
    monkeypatch.setenv(console.VERBOSITY_ENV, str(console.VERBOSE))
    monkeypatch.setattr(rendezvous, "_HANDSHAKE_TIMEOUT", 0.5)
    out, port, found = tmp_path / "out", rendezvous.free_ports(1)[0], {}
    out.mkdir()
    (out / lease.SECRET).write_text(handshake.new_secret().hex())  # an earlier run's

    def rank(r: int) -> threading.Thread:
        def meet():
            found[r] = _raised(rendezvous.gather_addresses, r, 3, "127.0.0.1", port, 60,
                               lambda: lease.secret(str(out)))
        thread = threading.Thread(target=meet)
        thread.start()
        return thread

    ranks = [rank(1)]  # reads the earlier run's secret
    time.sleep(0.5)
    with lease.holding(str(out)):
        ranks.append(rank(0))
        rendezvous.wait_for_listener("127.0.0.1", port, 30)  # a connection that says nothing
        with socket.create_connection(("127.0.0.1", port)) as garbage:
            garbage.sendall(os.urandom(1024) + b"\n")
        forged = {"challenge": "00", "proof": "00", "rank": 2, "address": "127.0.0.1:9"}
        with socket.create_connection(("127.0.0.1", port)) as liar:
            liar.sendall(json.dumps(forged).encode() + b"\n")
        for key, claim in [(handshake.new_secret(), 2), (lease.secret(str(out)), 0)]:
            with socket.create_connection(("127.0.0.1", port)) as claimant:
                stream = claimant.makefile("rw")
                joined = _raised(handshake.join, stream, key,
                                 {"rank": claim, "address": "127.0.0.1:9"})
                assert stream.readline() == ""  # no list: dropped
            assert isinstance(joined, handshake.Stranger) == (claim == 2)
        ranks.append(rank(2))
        for thread in ranks:
            thread.join(timeout=90)
    assert found[0] == found[1] == found[2], found
    assert len(set(found[0])) == 3 and "127.0.0.1:9" not in found[0]
    said = capsys.readouterr().out
    assert said.count("rendezvous: dropped a connection from 127.0.0.1") >= 6, said
    assert "a wrong proof of the run's secret" in said and "rank 0 registered already" in said


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


@pytest.mark.fast
def test_a_url_output_dirs_logs_reach_it_and_leave_no_temporary_folder(tmp_path, monkeypatch):
    """Logs are appended line by line, which object stores cannot do: for a URL output_dir the
    launcher writes them into a temporary folder, copied to the URL at the end, and removed
    even when the launcher is SIGKILLed (below)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    url = f"memory://{tmp_path.name}/out"
    with group_log_dir(url) as (logs, kept_at):
        assert kept_at == f"{url}/logs" and logs.parent == tmp_path
        (logs / "rank-1.log").write_text("rank 1's lines\n")
    assert fsspec.filesystem("memory").cat(f"{url}/logs/rank-1.log") == b"rank 1's lines\n"
    assert list(tmp_path.iterdir()) == []

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ktrain.supervisor import temporary_folder\n"
        "with temporary_folder('ktrain-logs-') as folder:\n"
        "    print(folder, flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        folder = Path(holder.stdout.readline().strip())
        assert folder.parent == tmp_path and folder.is_dir()
    finally:
        holder.kill()
        holder.communicate()
    deadline = time.monotonic() + 30
    while folder.exists():
        assert time.monotonic() < deadline, "the killed process' temporary folder stayed"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody has reaped yet has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
