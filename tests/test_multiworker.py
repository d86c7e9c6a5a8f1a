"""The multiworker strategy with real worker processes on 127.0.0.1: equal weights, supervision,
restarts."""

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import (FIXTURES, MPIRUN, assert_same_weights, base_config,
                     kill_rank_one_mid_training, needs_horovod, run_cli, run_command,
                     with_strategy, write_config)

RANK_DEPENDENT = FIXTURES.parent / "rank_dependent.py"


TRANSPORTS = [
    pytest.param({"name": "multiworker", "communicator": "collective"}, id="tf-collectives"),
    pytest.param({"name": "multiworker", "communicator": "mpi"}, id="mpi4py"),
    pytest.param({"name": "horovod", "controller": "gloo"}, id="horovod-gloo",
                 marks=needs_horovod),
    pytest.param({"name": "horovod", "controller": "mpi"}, id="horovod-mpi",
                 marks=needs_horovod),
]


def multiworker(out, strategy=None, **sections):
    return with_strategy(out, "multiworker", strategy, **sections)


# Horovod's two transports with ktrain's own compile (ktrain's own two: in the next test, with
# strangers at their ports; models that compile themselves, over MPI: the zoo in
# test_model_families). On mpi4py, also a 64 x 4096 first kernel (1 MiB): its bucket is summed
# by the MPI communicator's ring (MpiCommunicator.RING_FROM_BYTES), not by MPI's Allreduce. An
# Embedding under Adam on TF collectives (the zoo's text classifier gathers over MPI; Horovod's
# bucket sum serves the same gather, checked by hand): its sparse gradient's rows are gathered
# (summed into a dense tensor first, 2 workers ended 0.3 away from 1 process).
@pytest.mark.parametrize("model_fn, kwargs, transport", [
    *(pytest.param("mlp", {}, *t.values, id=f"mlp-{t.id}", marks=t.marks) for t in TRANSPORTS[2:]),
    pytest.param("mlp", {"hidden": 4096}, *TRANSPORTS[1].values,
                 id=f"mlp_4096-{TRANSPORTS[1].id}"),
    pytest.param("embedding_bag", {}, *TRANSPORTS[0].values,
                 id=f"embedding_bag-{TRANSPORTS[0].id}")])
def test_two_workers_match_one_process(tmp_path, model_fn, kwargs, transport,
                                       single_process_run):
    two = tmp_path / "two"
    model = {"fn": f"{FIXTURES}:{model_fn}", "kwargs": kwargs}
    config = multiworker(two, transport, model=model)
    result = run_cli("run", write_config(tmp_path / "two.yaml", config), "-q")
    assert result.returncode == 0, result.stderr
    assert_matches_one_process(single_process_run(model_fn, **kwargs), two, transport)


def assert_matches_one_process(one, two, transport) -> None:
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["strategy"], summary["world_size"], summary["epochs_completed"]) == (
        transport["name"], 2, 3)
    assert_same_weights(one, two)
    # Global metrics: the logged loss is the same number the single process saw.
    one_rows = np.genfromtxt(one / "metrics.csv", delimiter=",", names=True)
    two_rows = np.genfromtxt(two / "metrics.csv", delimiter=",", names=True)
    assert one_rows.dtype.names == two_rows.dtype.names
    for column in one_rows.dtype.names:
        if column not in ("epoch_seconds", "samples_per_second"):
            np.testing.assert_allclose(one_rows[column], two_rows[column], atol=1e-4)
    assert (two / "logs" / "rank-1.log").exists()


@pytest.mark.parametrize("transport", [t.values[0] for t in TRANSPORTS[:2]],
                         ids=[t.id for t in TRANSPORTS[:2]])
def test_strangers_at_every_port_of_the_ranks_change_nothing(tmp_path, background, transport,
                                                             single_process_run):
    """Mid-training, a process of this machine that does not know the run's secret connects
    to every port a rank listens on (ktrain's stall watchdog, TensorFlow's gRPC, MPI's):
    garbage, a forged report for rank 1, a forged proof, and a connection that says nothing.
    The run ends with 1 process' weights; rank 0 says at -v what it dropped."""
    two, pause = tmp_path / "two", tmp_path / "pause"
    pause.mkdir()
    config = multiworker(two, transport, train={"callbacks": {
        "fn": f"{FIXTURES}:pause_after_first_epoch", "kwargs": {"folder": str(pause)}}})
    run = background("run", write_config(tmp_path / "two.yaml", config), "-v",
                     env={"TF_CPP_MIN_LOG_LEVEL": "2"})
    run.wait_for(lambda: len(list(pause.glob("paused-*"))) == 2, timeout=180)
    pids = [int(p.name.split("-")[1]) for p in pause.glob("paused-*")]
    ports = sorted({port for pid in pids for port in listening_ports(pid)})
    assert ports  # rank 0's watchdog, and TensorFlow's gRPC (MPI's ranks share memory here)
    silent = [knock(port) for port in ports]
    try:
        (pause / "go").touch()
        output = run.process.communicate(timeout=180)[0]
    finally:
        for connection in silent:
            if connection is not None:
                connection.close()
    assert run.process.returncode == 0, output[-3000:]
    assert_matches_one_process(single_process_run("mlp"), two, transport)
    rank0 = (two / "logs" / "rank-0.log").read_text()
    assert rank0.count("stall watchdog: dropped a connection from 127.0.0.1") >= 3, rank0[-3000:]


def test_weights_that_drift_apart_stop_the_run_naming_the_variable(tmp_path):
    """Rank 1 takes an optimizer step of its own after step 10; the audit every 4 steps finds
    it at step 12 and stops the run before the checkpoint of epoch 2 (8 steps an epoch)."""
    out = tmp_path / "out"
    nudge = {"fn": f"{FIXTURES}:unaveraged_step_on_rank_one", "kwargs": {"at_step": 10}}
    config = multiworker(out, {"communicator": "mpi", "audit_steps": 4},
                         train={"callbacks": nudge})
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    said = result.stdout + result.stderr  # rank 0's report, as its launcher passed it on
    assert result.returncode == 1, said
    assert ("ktrain: error: strategy.audit_steps: rank(s) [1] diverged from rank 0: variable "
            "'sequential/dense/kernel' (layer 'sequential/dense') differs at step 12 (every "
            "rank was equal at step 8)") in said, said
    assert said.count("ktrain: error:") == 1 and "Traceback" not in said
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-000001.npz"]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (from /proc: its sockets' inodes)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def knock(port: int) -> socket.socket | None:
    """What a stranger can send to ``port``; returns a connection that says nothing, open."""
    forged_proof = {"challenge": "00", "proof": "00", "rank": 1, "address": "127.0.0.1:9"}
    for said in (os.urandom(2048) + b"\n", b'{"rank": 1, "count": 0}\n' * 3,
                 json.dumps(forged_proof).encode() + b"\n"):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2) as s:
            s.sendall(said)
            s.settimeout(0.5)
            s.recv(4096)  # a challenge, or nothing
    with contextlib.suppress(OSError):
        return socket.create_connection(("127.0.0.1", port), 2)
    return None


# mpi4py: the default transport, killed the same way in the restart test below; Horovod's MPI
# controller: mpirun reports its ranks as it does mpi4py's.
@pytest.mark.parametrize("transport",
                         [t for t in TRANSPORTS if t.id not in ("mpi4py", "horovod-mpi")])
def test_killed_worker_stops_the_group_with_a_root_cause(tmp_path, background, transport):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", multiworker(out, transport, train={"epochs": 400}))
    code, output, seconds = kill_rank_one_mid_training(background, config, out)
    assert seconds < 30 and code == 1, output[-3000:]
    assert "rank 1 was killed by SIGKILL" in output and "last lines of its log" in output, output[-3000:]
    assert "rank-1.log" in output and "strategy.max_restarts" in output


def test_max_restarts_resumes_the_group_and_completes(tmp_path, background):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", multiworker(out, {"max_restarts": 1},
                                                           train={"epochs": 60}))
    code, output, _ = kill_rank_one_mid_training(background, config, out)
    assert code == 0, output
    # no communicator in the config: MPI, since ktrain can start the ranks with mpirun here
    assert "communicator: mpi (mpi4py and mpirun are installed" in output
    assert "rank 1 was killed by SIGKILL; restarting all workers" in output
    assert "resuming from the checkpoint after epoch" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 60 and summary["resumed_from_epoch"] >= 2
    assert summary["transport"] == "mpi"


def test_bf16_gradients_in_small_buckets_match_one_process_loosely(tmp_path, single_process_run):
    one, two = single_process_run("mlp"), tmp_path / "two"
    config = multiworker(two, {"communicator": "collective", "compression": "bf16",
                               "bucket_mb": 0.001})  # a bucket per tensor or two
    result = run_cli("run", write_config(tmp_path / "two.yaml", config), "-q")
    assert result.returncode == 0, result.stderr
    assert_same_weights(one, two, atol=5e-3)
    with pytest.raises(AssertionError):  # half precision did change the numbers
        assert_same_weights(one, two, atol=1e-6)


def rank1_config(tmp_path, **strategy):
    return write_config(tmp_path / "c.yaml", multiworker(
        tmp_path / "out", strategy, model={"fn": f"{RANK_DEPENDENT}:mlp", "kwargs": {}},
        data={"fn": f"{RANK_DEPENDENT}:digits_split"}))


def test_bad_import_on_rank_one_fails_fast_naming_rank_one(tmp_path):
    started = time.monotonic()
    result = run_cli("run", rank1_config(tmp_path, start_timeout=60),
                     env={"KTRAIN_TEST_RANK1": "crash"})
    assert result.returncode == 2
    assert time.monotonic() - started < 60
    assert "rank 1 exited with status 2" in result.stderr
    assert "module_missing_on_rank_one" in result.stderr


def test_rank_that_never_joins_fails_at_the_start_deadline(tmp_path):
    result = run_cli("run", rank1_config(tmp_path, start_timeout=45),
                     env={"KTRAIN_TEST_RANK1": "hang"}, timeout=120)
    assert result.returncode == 1
    assert "rank(s) [1] did not arrive within strategy.start_timeout (45s)" in result.stderr
    assert "rank-1.log" in result.stderr


def test_checkpoint_from_two_workers_resumes_under_mirrored(tmp_path):
    out = tmp_path / "out"
    two = write_config(tmp_path / "two.yaml", multiworker(out, train={"epochs": 2}))
    assert run_cli("run", two, "-q").returncode == 0
    one = write_config(tmp_path / "one.yaml", base_config(out, train={"epochs": 4}))
    result = run_cli("run", one)
    assert result.returncode == 0, result.stderr
    assert "resuming from the checkpoint after epoch 2" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["strategy"], summary["epochs_completed"], summary["resumed_from_epoch"]) == (
        "mirrored", 4, 2)


@pytest.mark.parametrize("ranks", [2, 3])  # 3: the ring's chunks go round more than once
def test_mpi_sums_are_exact_and_stay_intact_while_their_buffers_are_reused(ranks):
    mpirun = [*MPIRUN[:-1], str(ranks)]  # MPIRUN ends with "-np", "2"
    result = run_command([*mpirun, sys.executable, FIXTURES.parent / "mpi_buffers.py"],
                         timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("sums intact") == ranks, result.stdout
