"""Long jobs: checkpoints mid-epoch, a stop on a signal at the same step on every rank, and a
resume that ends with the weights of the run that was never stopped, on any number of workers."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from helpers import (FIXTURES, KTRAIN, assert_same_weights, base_config, needs_horovod,
                     run_cli, run_command, write_config)
from ktrain.checkpoint import CheckpointStore, Position
from ktrain.supervisor import Failure, WorkerGroup, WorkerSpec, blame_chief_first

STRATEGIES = {
    "mirrored": {"name": "mirrored", "devices": 1},
    "tf-collectives": {"name": "multiworker", "workers": 2, "communicator": "collective"},
    "mpi4py": {"name": "multiworker", "workers": 2, "communicator": "mpi"},
    "horovod-gloo": {"name": "horovod", "workers": 2},
    "horovod-mpi": {"name": "horovod", "workers": 2, "controller": "mpi"},
}


def long_run(out, strategy: str, **train) -> dict:
    """Shuffled, 32 global batches an epoch, a checkpoint every 7 of them."""
    config = base_config(out, train={"epochs": 6, "global_batch_size": 16, "shuffle": True,
                                     **train},
                         checkpoint={"every_steps": 7, "keep": 100})
    config["strategy"] = dict(STRATEGIES[strategy])
    return config


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """One uninterrupted 1-process run (and every checkpoint it took), per train settings."""
    done = {}

    def get(**train):
        key = json.dumps(train, sort_keys=True)
        if key not in done:
            folder = tmp_path_factory.mktemp("unbroken")
            config = write_config(folder / "c.yaml", long_run(folder / "out", "mirrored", **train))
            result = run_cli("run", config, "-q")
            assert result.returncode == 0, result.stderr
            done[key] = folder / "out"
        return done[key]

    return get


# 1 process -> 2 workers: test_streaming's resumed run (file data, the default transport).
@pytest.mark.parametrize("written_by, resumed_by", [
    ("mirrored", "mirrored"), ("tf-collectives", "mirrored")])
def test_a_run_resumed_mid_epoch_ends_with_the_unbroken_runs_weights(
        tmp_path, unbroken, written_by, resumed_by):
    """The position is counted in global batches, so it means the same on 1 or 2 workers."""
    reference = unbroken()
    if written_by == "mirrored":
        source = reference
    else:  # the same run on 2 workers, which took the same checkpoints
        source = tmp_path / "written"
        result = run_cli("run", write_config(tmp_path / "w.yaml", long_run(source, written_by)),
                         "-q")
        assert result.returncode == 0, result.stderr
    checkpoint = CheckpointStore(str(source / "checkpoints")).file_for(Position(2, 13))
    resumed = tmp_path / "resumed"
    config = long_run(resumed, resumed_by)
    config["checkpoint"]["resume"] = checkpoint
    result = run_cli("run", write_config(tmp_path / "r.yaml", config))
    assert result.returncode == 0, result.stderr
    assert "resuming from the checkpoint at step 13 of epoch 3" in result.stdout
    assert json.loads((resumed / "summary.json").read_text())["epochs_completed"] == 6
    assert_same_weights(reference, resumed, atol=1e-6)


def stop_with_sigterm(run, out):
    """SIGTERM to ``ktrain run`` once it has a checkpoint: it stops at one step, with one
    message and a checkpoint there. Returns that checkpoint's position."""
    store = CheckpointStore(str(out / "checkpoints"))
    run.wait_for(lambda: store.fs.exists(store.path) and store.positions(), timeout=180)
    output = run.signal(signal.SIGTERM)
    assert run.process.returncode == 128 + signal.SIGTERM, output
    said = [line for line in output.splitlines() if "stopped by SIGTERM" in line]
    assert len(said) == 1, output  # one message, from rank 0, whatever the launcher
    assert "the checkpoint there is committed" in said[0] and "Traceback" not in output
    assert "run the same command again to resume" in output
    newest = store.positions()[-1]
    assert str(newest) in said[0]  # the checkpoint is at the step where every rank stopped
    assert not (out / "summary.json").exists()
    return newest


# Horovod's MPI controller: its mpirun launch is mpi4py's, its stop path horovod-gloo's.
@pytest.mark.parametrize("strategy, rerun_with", [
    *(pytest.param(name, name, marks=needs_horovod if name.startswith("horovod") else ())
      for name in STRATEGIES if name not in ("tf-collectives", "horovod-mpi")),
    ("tf-collectives", "mirrored")])
def test_sigterm_stops_every_rank_at_one_step_with_a_checkpoint_and_the_rerun_resumes(
        tmp_path, background, unbroken, strategy, rerun_with):
    """Re-run with the same command, or on another number of workers (2 -> 1; 1 -> 2 resumes
    as above)."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", long_run(out, strategy))
    newest = stop_with_sigterm(background("run", config), out)

    if rerun_with != strategy:
        config = write_config(tmp_path / "rerun.yaml", long_run(out, rerun_with))
    result = run_cli("run", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from the checkpoint {newest}" in result.stdout
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 6
    assert_same_weights(unbroken(), out, atol=1e-6)


@pytest.mark.parametrize("engine", ["spark", "ray"])
def test_a_sigterm_to_the_spark_or_ray_driver_stops_the_ranks_at_one_step(
        tmp_path, background, unbroken, engine):
    """The driver cannot signal its ranks: it relays the stop to rank 0, which raises the flag
    every rank learns of after the same step; a re-run resumes to the unbroken run's weights
    (at the end of the epoch after the stop: the rest would only add time)."""
    pytest.importorskip("pyspark" if engine == "spark" else "ray",
                        reason=f"{engine} is not installed: bash scripts/setup.sh")
    out = tmp_path / "out"
    config = long_run(out, "tf-collectives", epochs=60)  # rank 0 looks for a request each second
    config["strategy"] = {"name": engine, "workers": 2}
    config = write_config(tmp_path / "c.yaml", config)
    newest = stop_with_sigterm(background("run", config), out)
    epochs = newest.epoch + 1
    result = run_cli("run", config, f"train.epochs={epochs}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from the checkpoint {newest}" in result.stdout
    assert_same_weights(unbroken(epochs=epochs), out, atol=1e-6)


def test_early_stopping_resumes_its_patience(tmp_path, unbroken):
    """Resumed from an epoch's end, early stopping ends the run after the same epoch as the
    unbroken run did: its best value and patience left travel in the checkpoint."""
    stopping = {"epochs": 40, "early_stopping": {"monitor": "val_loss", "patience": 2}}
    reference = unbroken(**stopping)
    completed = json.loads((reference / "summary.json").read_text())["epochs_completed"]
    assert completed < 40, "the reference run should have stopped early"
    resumed = tmp_path / "resumed"
    config = long_run(resumed, "mirrored", **stopping)
    config["checkpoint"]["resume"] = CheckpointStore(
        str(reference / "checkpoints")).file_for(Position(completed - 1))
    result = run_cli("run", write_config(tmp_path / "r.yaml", config), "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads((resumed / "summary.json").read_text())["epochs_completed"] == completed
    assert_same_weights(reference, resumed, atol=1e-6)


def test_a_scaled_learning_rate_resumes_mid_warmup(tmp_path):
    """strategy.lr_scaling multiplies the configured rate once, also in a resumed run (the rate
    a checkpoint holds is already scaled): resumed mid-warmup, it ends with the unbroken run's
    weights."""
    def scaled(out):
        config = long_run(out, "tf-collectives", epochs=3)
        config["strategy"].update(lr_scaling="linear", warmup_epochs=2)
        return config

    reference = tmp_path / "reference"
    result = run_cli("run", write_config(tmp_path / "a.yaml", scaled(reference)), "-q")
    assert result.returncode == 0, result.stderr
    resumed = scaled(tmp_path / "resumed")
    resumed["checkpoint"]["resume"] = CheckpointStore(
        str(reference / "checkpoints")).file_for(Position(1, 3))
    result = run_cli("run", write_config(tmp_path / "b.yaml", resumed), "-q")
    assert result.returncode == 0, result.stderr
    assert_same_weights(reference, tmp_path / "resumed", atol=1e-6)


def hanging_rank_one(tmp_path, strategy: dict, **options) -> tuple:
    """A 2-worker run whose rank 1 stops for good in its input pipeline, the first time."""
    marker = tmp_path / "rank-1-hung"
    config = base_config(tmp_path / "out", train={"epochs": 3},
                         data={"fn": f"{FIXTURES}:digits_hanging_on_rank_one",
                               "kwargs": {"marker": str(marker)}})
    config["strategy"] = {**strategy, "stall_timeout": 10, **options}
    return write_config(tmp_path / "c.yaml", config), marker


def assert_stall_reported(run, marker) -> None:
    """Within stall_timeout + 10 s of the hang: one message naming rank 1, with its stack."""
    run.wait_for(marker.exists, timeout=180)
    hung = time.monotonic()
    output = run.process.communicate(timeout=120)[0]
    assert run.process.returncode == 1, output
    assert time.monotonic() - hung < 10 + 10
    assert "rank(s) [1] stalled" in output and "strategy.stall_timeout" in output, output
    assert "stuck_in_the_input_pipeline" in output  # rank 1's stack, down to the hanging frame
    assert output.count("ktrain: error:") == 1, output


# TF collectives: under srun below, and under ktrain in the restart test after; Horovod's MPI
# controller: mpi4py's launch and horovod-gloo's ops.
@pytest.mark.parametrize("strategy", [
    pytest.param(name, marks=needs_horovod if name.startswith("horovod") else ())
    for name in STRATEGIES if name not in ("mirrored", "tf-collectives", "horovod-mpi")])
def test_a_stalled_rank_is_named_with_its_stack_within_the_stall_timeout(
        tmp_path, background, strategy):
    config, marker = hanging_rank_one(tmp_path, STRATEGIES[strategy])
    assert_stall_reported(background("run", config), marker)


# MPI's transport stalls under ktrain's mpirun above (mpi4py); srun's launch is the same.
@pytest.mark.parametrize("launch", ["srun", "spark", "ray"])
def test_a_stalled_rank_is_named_under_srun_spark_and_ray(tmp_path, background, request,
                                                          launch):
    """No ktrain launcher watches these ranks: they watch themselves, through rank 0."""
    if launch.startswith("srun"):
        slurm = request.getfixturevalue("slurm")
        strategy = STRATEGIES["mpi4py" if "mpi" in launch else "tf-collectives"]
        config, marker = hanging_rank_one(tmp_path, strategy)
        run = background("run", config, env=slurm.env,
                         launcher=slurm.command(*launch.split(), "-n2"))
    else:
        pytest.importorskip("pyspark" if launch == "spark" else "ray",
                            reason=f"{launch} is not installed: bash scripts/setup.sh")
        config, marker = hanging_rank_one(tmp_path, {"name": launch, "workers": 2})
        run = background("run", config)
    assert_stall_reported(run, marker)


@pytest.mark.parametrize("follower_said", [
    "rank 0 ends the group: a rank stalled (see rank 0's output)",
    "ktrain: error: rank 1 lost contact with rank 0 during training, so the group is stopping"])
def test_spark_and_ray_blame_rank_0_when_the_engine_names_a_rank_that_followed_it(
        tmp_path, follower_said):
    """Spark and Ray report whichever task ended first: rank 1 ending because rank 0 ended
    the group must not hide rank 0's own report; rank 1 failing on its own still is named."""
    chief_log = tmp_path / "rank-0.log"
    chief_log.write_text("rank 0 of 2 joined\nktrain: error: rank(s) [1] stalled: ...\n")
    follower = Failure(1, "rank 1 exited with status 1", ["rank 1 of 2 joined", follower_said])
    blamed = blame_chief_first(follower, str(chief_log))
    assert (blamed.rank, blamed.log) == (0, str(chief_log))
    assert blamed.summary == "rank 0: rank(s) [1] stalled: ..."
    crashed = Failure(1, "rank 1 was killed by SIGKILL", ["rank 1 of 2 joined"])
    assert blame_chief_first(crashed, str(chief_log)) is crashed


def test_a_launcher_that_names_the_follower_first_still_blames_rank_0(tmp_path, capsys):
    """horovodrun reports whichever of its ranks exited first; when rank 1 exits because rank 0
    ended the group, the console shows rank 0's report alone (seen in CI, 2026-11-29). The child
    replays horovodrun's Gloo output in the order CI saw it."""
    said = ["[0]<stdout>:ktrain: error: rank(s) [1] stalled: ...",
            "[1]<stdout>:rank 0 ends the group: a rank stalled (see rank 0's output)",
            "Process 1 exit with status code 1.", "Process 0 exit with status code 1."]
    replay = f"import sys; print({chr(10).join(said)!r}); sys.exit(1)"
    group = WorkerGroup([WorkerSpec([sys.executable, "-c", replay], {}, (0, 1))],
                        tmp_path / "logs", start_timeout=60)
    failure = group.run()
    assert (failure.rank, failure.shown) == (0, True), failure
    assert failure.summary == "rank 0: rank(s) [1] stalled: ..."
    assert capsys.readouterr().out.count("ktrain: error:") == 1


def test_a_stalled_group_restarts_and_completes(tmp_path, background):
    config, marker = hanging_rank_one(tmp_path, STRATEGIES["tf-collectives"], max_restarts=1)
    result = run_cli("run", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stalled" in result.stdout + result.stderr and marker.exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["epochs_completed"] == 3


def test_scancel_signal_stops_an_srun_step_at_one_step_and_a_rerun_resumes(
        tmp_path, slurm, background, unbroken):
    """`scancel --signal=TERM` reaches every task of the step (TensorFlow's collective runtime
    would otherwise swallow it and train on): they stop after the same step."""
    out, name = tmp_path / "out", f"ktrain-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "c.yaml", long_run(out, "tf-collectives"))
    store = CheckpointStore(str(out / "checkpoints"))
    step = background("run", config, env=slurm.env,
                      launcher=slurm.command("srun", "-n2", f"--job-name={name}"))
    step.wait_for(lambda: store.fs.exists(store.path) and store.positions(), timeout=180)
    scancel = run_command(slurm.command("scancel", "--signal=TERM", f"--name={name}"),
                          env=slurm.env)
    assert scancel.returncode == 0, scancel.stderr
    output = step.process.communicate(timeout=120)[0]
    assert step.process.returncode == 128 + signal.SIGTERM, output
    assert output.count("stopped by SIGTERM") == 1 and "Traceback" not in output, output
    assert str(store.positions()[-1]) in output

    again = run_command(slurm.command("srun", "-n2", KTRAIN, "run", config), env=slurm.env,
                        timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same_weights(unbroken(), out, atol=1e-6)


def test_a_preempted_sbatch_job_requeues_itself_and_completes(tmp_path, slurm, unbroken):
    """USR1 (what `sbatch --signal=USR1@90` sends before the time limit) with
    checkpoint.requeue: the job stops at a step, puts itself back in the queue, runs again,
    resumes and finishes with the unbroken run's weights."""
    out, name = tmp_path / "out", f"ktrain-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "c.yaml", long_run(out, "tf-collectives"))
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --signal=USR1@90\n"
                      f"srun {KTRAIN} run {config} checkpoint.requeue=true\n")
    store = CheckpointStore(str(out / "checkpoints"))
    job = subprocess.Popen(slurm.command("sbatch", "--wait", "-n2", f"--job-name={name}",
                                         "--open-mode=append", f"--output={tmp_path}/job.out",
                                         script),
                           env={**os.environ, **slurm.env}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (store.fs.exists(store.path) and store.positions()):
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
            time.sleep(0.05)
        scancel = run_command(slurm.command("scancel", "--signal=USR1", f"--name={name}"),
                              env=slurm.env)
        assert scancel.returncode == 0, scancel.stderr
        # SLURM holds a requeued job for two minutes; the test lets it start at once. Watched
        # in squeue until it is gone: `sbatch --wait` may return when the job is requeued.
        # Released each time it is seen pending: a release that lands while the requeue is
        # still under way is undone by the requeue's own hold.
        deadline, released = time.monotonic() + 400, 0.0
        while time.monotonic() < deadline:
            state = run_command(slurm.command("squeue", "-h", f"--name={name}", "-o", "%i %T"),
                                env=slurm.env).stdout.split()
            if state and state[1] == "PENDING" and time.monotonic() - released > 2:
                run_command(slurm.command("scontrol", "update", f"JobId={state[0]}",
                                          "StartTime=now"), env=slurm.env)
                released = time.monotonic()
            if not state and (out / "summary.json").exists():
                break
            time.sleep(0.2)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        run_command(slurm.command("scancel", f"--name={name}"), env=slurm.env)
    said = (tmp_path / "job.out").read_text()
    assert "stopped by SIGUSR1" in said and "is being requeued" in said, said
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 6, said
    assert_same_weights(unbroken(), out, atol=1e-6)
