"""Elastic runs (strategy.workers: {min, max}): a group that loses a worker goes on with the
ones left, grows back, and still trains the config's math; the sizes it cannot keep exact
are refused before anything starts."""

import json
import os
import re
import signal
import subprocess
import textwrap
import time

import pytest

from helpers import (FIXTURES, KTRAIN, assert_same_weights, elastic_config, elastic_reference,
                     run_command, worker_pid, write_config)
from ktrain import strategies
from ktrain.config import load_config
from ktrain.errors import UserError, WorkersFailed
from ktrain.regroup import RegroupFolder
from ktrain.supervisor import LEFT_TO_GROW_OUTCOME, Failure


def test_a_lost_worker_is_absorbed_and_the_group_grows_back_with_the_weights_of_one_process(
        tmp_path, background):
    out = tmp_path / "elastic"
    config = elastic_config(out, report=True)  # with the world size drawn
    run = background("run", write_config(tmp_path / "elastic.yaml", config))
    run.wait_for(lambda: (out / "checkpoints" / "ckpt-000002-0000005.npz").exists()
                 and worker_pid(out, 2), timeout=180)  # at step 5 of epoch 3
    os.kill(worker_pid(out, 2), signal.SIGKILL)
    run.process.wait(timeout=300)
    output = run.process.stdout.read()
    assert run.process.returncode == 0, output[-3000:]
    # one line for each re-formation, from the new group's rank 0
    assert "the group re-formed on 2 workers after rank 2 was killed by SIGKILL: continuing " \
           "at step" in output, output[-3000:]  # of epoch 3, a step between two checkpoints
    assert "the group grew to 3 workers (workers are available again)" in output
    assert "warning" not in output and (out / "report.png").exists()
    history = json.loads((out / "summary.json").read_text())["world_size_history"]
    assert [(h["kind"], h["size"]) for h in history] == [("start", 3), ("shrink", 2),
                                                         ("grow", 3)], history
    assert 25 <= history[1]["step"] <= 30
    if history[1]["step"] < 30:  # mid-epoch (not while epoch 3's end was under way)
        assert history[1]["steps_lost"] == 0, output[-3000:]
        assert re.search(r"0 step\(s\) lost \(rank \d saved the last one from memory\)",
                         output), output[-3000:]
    assert history[2]["step"] > history[1]["step"] and history[2]["step"] % 5 == 0

    assert_same_weights(out, elastic_reference(tmp_path), atol=1e-6)


def test_an_elastic_group_in_a_two_node_slurm_job_goes_on_without_a_killed_rank_and_grows_back(
        tmp_path, slurm_on_two_hosts):
    """`ktrain run` in a batch script of `sbatch -N2`: each rank an srun step on its node; the
    rank on the second node is killed, rank 0 goes on alone on the first, then the group grows
    back onto the second node, and ends with the weights of one process."""
    slurm, out = slurm_on_two_hosts, tmp_path / "elastic"
    config = write_config(tmp_path / "elastic.yaml",
                          elastic_config(out, workers={"min": 1, "max": 2}))
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n{KTRAIN} run {config}\n")
    job = subprocess.Popen(slurm.command("sbatch", "--wait", "--parsable", "-N2",
                                         f"--output={tmp_path}/job.out", script),
                           env={**os.environ, **slurm.env}, stdout=subprocess.PIPE, text=True)
    job_id = job.stdout.readline().strip()
    try:
        deadline = time.monotonic() + 180
        while not ((out / "checkpoints" / "ckpt-000002-0000005.npz").exists()
                   and worker_pid(out, 1)):  # at step 5 of epoch 3
            assert job.poll() is None and time.monotonic() < deadline, _said(tmp_path)
            time.sleep(0.05)
        os.kill(worker_pid(out, 1), signal.SIGKILL)  # on 10.77.0.2, in this pid namespace
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        run_command(slurm.command("scancel", job_id), env=slurm.env)
    said = _said(tmp_path)
    assert job.returncode == 0, said
    assert "the group re-formed on 1 worker after rank 1 was killed by SIGKILL" in said, said
    history = json.loads((out / "summary.json").read_text())["world_size_history"]
    assert [(h["kind"], h["size"]) for h in history] == [("start", 2), ("shrink", 1),
                                                         ("grow", 2)], said
    hosts = [re.search(r"joined \(.*?host ([^,]+),", (out / "logs" / f"rank-{r}.log").read_text())
             for r in (0, 1)]
    assert [host and host.group(1) for host in hosts] == ["10.77.0.1", "10.77.0.2"], said
    assert_same_weights(out, elastic_reference(tmp_path), atol=1e-6)


def _said(folder) -> str:
    job = folder / "job.out"
    return job.read_text()[-4000:] if job.exists() else "(no job output yet)"


# ------------------------------------------------------------ the launcher's decisions


@pytest.mark.fast
@pytest.mark.parametrize("workers, outcomes, sizes", [
    # an elastic group shrinks by the ranks it lost, and grows back to max when asked
    ({"min": 2, "max": 3}, [[2], LEFT_TO_GROW_OUTCOME, None], [3, 2, 3]),
    # a loss below min restarts the group at its size, counted by max_restarts
    ({"min": 2, "max": 3}, [[2], [0], None], [3, 2, 2]),
    # one size: every loss is a restart (as with an integer)
    ({"min": 3, "max": 3}, [[2], None], [3, 3]),
])
def test_the_launcher_shrinks_grows_or_restarts_as_the_range_allows(tmp_path, workers,
                                                                    outcomes, sizes):
    (launcher, run), attempts = _launcher(tmp_path, workers, max_restarts=1), []

    def attempt(run, size, environment):
        attempts.append((size, json.loads(environment.get("KTRAIN_REFORMED", "{}"))))
        outcome = outcomes[len(attempts) - 1]
        return Failure(1, "rank 2 was killed by SIGKILL", lost=outcome, completed_step=7,
                       saved_by=0) if isinstance(outcome, list) else outcome

    launcher.run_with_restarts(run, attempt)
    assert [size for size, _ in attempts] == sizes
    kinds = [said.get("kind") for _, said in attempts[1:]]
    expected = {3: "grow", 2: "shrink"} if workers["min"] < workers["max"] else {}
    assert kinds == [expected.get(b, "restart") if a != b else "restart"
                     for a, b in zip(sizes, sizes[1:])]
    assert attempts[1][1]["completed_step"] == 7 and attempts[1][1]["saved_by"] == 0


@pytest.mark.fast
def test_losses_beyond_max_restarts_fail_naming_the_rank(tmp_path):
    launcher, run = _launcher(tmp_path, {"min": 2, "max": 3}, max_restarts=0)
    lost = iter([[2], [1]])
    with pytest.raises(WorkersFailed, match="rank 1 was killed"):
        launcher.run_with_restarts(run, lambda run, size, env: Failure(
            1, "rank 1 was killed by SIGKILL", lost=next(lost)))


@pytest.mark.fast
def test_the_survivor_holding_the_newest_step_is_asked_to_save_it(tmp_path):
    """A killed rank can cut a step's allreduce short on one survivor after another completed
    it: the one that completed it saves, the lowest of a tie, and ranks that never say wait
    no longer than the launcher does."""
    folder = RegroupFolder(str(tmp_path / "regroup"))
    folder.clear()
    for rank, step in [(0, 25), (1, 26), (3, 26), (4, -1)]:  # 4: between epoch end callbacks
        (tmp_path / "regroup" / f"completed-{rank}").write_text(str(step))
    assert folder.ask_newest_to_save(lambda: [0, 1, 3, 4]) == 1
    assert (tmp_path / "regroup" / "saver").read_text() == "1"
    assert folder.ask_newest_to_save(lambda: [0, 2], wait=0.3) == 0  # 2 never said
    assert folder.ask_newest_to_save(lambda: [2, 4], wait=0.3) == 2  # none holds a step


def _launcher(tmp_path, workers, max_restarts):
    """The strategy's launcher side and its run, whose output_dir holds a summary."""
    config = elastic_config(tmp_path / "out", max_restarts=max_restarts)
    config["strategy"]["workers"] = workers
    run = load_config(write_config(tmp_path / "c.yaml", config))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text("{}")
    return strategies.create(run.strategy), run


# ------------------------------------------------------------ what is refused, and why


def refusal(tmp_path, strategy: dict, **train) -> str:
    config = elastic_config(tmp_path / "out")
    config["strategy"] = {"name": "multiworker", "workers": {"min": 2, "max": 4}, **strategy}
    config["train"].update(train)
    with pytest.raises(UserError) as caught:
        run = load_config(write_config(tmp_path / "c.yaml", config))
        strategies.create(run.strategy).prepare(run)
    return caught.value.render()


@pytest.mark.fast
@pytest.mark.parametrize("strategy, train, said", [
    ({}, {"global_batch_size": 40}, "cannot be split evenly over 3 workers, sizes "
                                   "strategy.workers allows (2 to 4)"),
    ({}, {"global_batch_size": 30}, "use a multiple of 12"),
    ({"communicator": "mpi"}, {"global_batch_size": 48}, "communicator: mpi cannot carry an "
                                                        "elastic run"),
    ({"lr_scaling": "linear"}, {"global_batch_size": 48}, "strategy.lr_scaling: linear would "
                                                         "change the learning rate"),
    ({"name": "horovod"}, {"global_batch_size": 48}, "horovodrun starts a group of one size"),
    ({"workers": {"min": 3, "max": 2}}, {}, "min (3) is more than max (2)"),
])
def test_what_an_elastic_run_cannot_keep_exact_is_refused(tmp_path, strategy, train, said):
    if strategy.get("name") == "horovod":
        pytest.importorskip("horovod", reason="Horovod is installed by install_horovod.sh")
    message = refusal(tmp_path, strategy, **train)
    assert said in message, message
    assert "strategy" in message or "train.global_batch_size" in message


@pytest.mark.fast
def test_an_elastic_run_in_a_slurm_allocation_too_small_for_min_is_refused(tmp_path,
                                                                         monkeypatch):
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1",
                        "SLURM_TASKS_PER_NODE": "1"}.items():
        monkeypatch.setenv(name, value)
    said = refusal(tmp_path, {})
    assert "SLURM job 7 has 1 task(s) (1 node(s)), fewer than strategy.workers.min (2)" in said
    assert "sbatch --ntasks" in said and "strategy.workers" in said


@pytest.mark.fast
def test_grow_without_a_range_is_refused_where_it_is_set(tmp_path):
    text = textwrap.dedent(f"""\
        model: {{fn: {FIXTURES}:mlp}}
        data: {{fn: {FIXTURES}:digits_split}}
        train: {{epochs: 1, global_batch_size: 48, loss: sparse_categorical_crossentropy}}
        strategy:
          name: multiworker
          workers: 3
          grow: false
        """)
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError) as caught:
        load_config(tmp_path / "c.yaml")
    assert "strategy.grow applies to an elastic run" in caught.value.render()
    assert "c.yaml:" in caught.value.render()
