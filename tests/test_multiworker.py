"""The multiworker strategy with real worker processes on 127.0.0.1: equal weights, supervision,
restarts."""

import json
import sys
import time

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


# Every transport with ktrain's own compile; the user's compiled optimizer (momentum state,
# wrapped in place) on one: the wrapper is the same whatever transport reduces for it. On
# mpi4py, also a 64 x 4096 first kernel (1 MiB): its bucket is summed by the MPI communicator's
# ring (MpiCommunicator.RING_FROM_BYTES), not by MPI's Allreduce. An Embedding under Adam, on
# ktrain's own two transports (Horovod's bucket sum serves the same gather; checked by hand):
# its sparse gradient's rows are gathered (summed into a dense tensor first, 2 workers ended
# 0.3 away from 1 process).
@pytest.mark.parametrize("model_fn, kwargs, transport", [
    *(pytest.param("mlp", {}, *t.values, id=f"mlp-{t.id}", marks=t.marks) for t in TRANSPORTS),
    pytest.param("mlp_compiled_momentum", {}, *TRANSPORTS[0].values,
                 id=f"mlp_compiled_momentum-{TRANSPORTS[0].id}"),
    pytest.param("mlp", {"hidden": 4096}, *TRANSPORTS[1].values,
                 id=f"mlp_4096-{TRANSPORTS[1].id}"),
    *(pytest.param("embedding_bag", {}, *t.values, id=f"embedding_bag-{t.id}")
      for t in TRANSPORTS[:2])])
def test_two_workers_match_one_process(tmp_path, model_fn, kwargs, transport,
                                       single_process_run):
    one, two = single_process_run(model_fn, **kwargs), tmp_path / "two"
    model = {"fn": f"{FIXTURES}:{model_fn}", "kwargs": kwargs}
    config = multiworker(two, transport, model=model)
    result = run_cli("run", write_config(tmp_path / "two.yaml", config), "-q")
    assert result.returncode == 0, result.stderr
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
