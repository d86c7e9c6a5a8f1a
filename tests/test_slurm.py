"""ktrain inside a real SLURM (slurmctld + slurmd on 127.0.0.1): srun steps and sbatch jobs."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from helpers import (KTRAIN, REPO, assert_same_weights, base_config, needs_horovod, run_cli,
                     run_command, with_strategy, worker_pid, write_config)



def srun(slurm, *args, timeout: float = 300):
    return run_command(slurm.command("srun", *args), env=slurm.env, timeout=timeout)


# Two MPI tasks on one node (PMIx); collectives and Gloo with two tasks on each of two nodes
# are in test_hosts.py.
@pytest.mark.parametrize("strategy", [
    pytest.param({"name": "multiworker", "communicator": "mpi"}, id="mpi4py"),
    pytest.param({"name": "horovod", "controller": "mpi"}, id="horovod", marks=needs_horovod),
])
def test_two_srun_tasks_match_one_process(tmp_path, slurm, single_process_run, strategy):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", with_strategy(out, strategy["name"], strategy))
    result = srun(slurm, "-n2", "--mpi=pmix", KTRAIN, "run", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert_same_weights(single_process_run("mlp"), out)
    assert result.stdout.count("done:") == 1, result.stdout
    assert "help file" not in result.stdout + result.stderr  # Open MPI/PMIx "Sorry!" boxes


@pytest.mark.parametrize("backend, package", [("jax", "JAX"), ("torch", "PyTorch")])
def test_two_srun_tasks_on_jax_or_torch_match_one_device(tmp_path, slurm, backend, package):
    """On JAX and torch the tasks find their coordinator (rank 0) through ktrain's rendezvous
    too."""
    pytest.importorskip(backend, reason=f"{package} is not installed: bash scripts/setup.sh")
    one = tmp_path / "one"
    done = run_cli("run", write_config(tmp_path / "one.yaml", base_config(one, backend=backend)),
                   "-q")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml",
                          {**with_strategy(out, "multiworker"), "backend": backend})
    result = srun(slurm, "-n2", "--mpi=none", KTRAIN, "run", config)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["backend"], summary["world_size"]) == (backend, 2)
    assert_same_weights(one, out)


@pytest.mark.parametrize("strategy", [
    pytest.param({"name": "multiworker", "communicator": "mpi"}, id="mpi4py"),
    pytest.param({"name": "horovod", "controller": "mpi"}, id="horovod",
                 marks=needs_horovod),
])
def test_mpi_without_pmi_under_srun_is_a_clear_error(tmp_path, slurm, strategy):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", with_strategy(out, strategy["name"], strategy))
    result = srun(slurm, "-n2", "--mpi=none", KTRAIN, "run", config, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "srun started 2 tasks" in result.stderr and "srun --mpi=pmix" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not (out / "summary.json").exists()


def test_mirrored_under_a_two_task_step_names_the_fix(tmp_path, slurm):
    out = tmp_path / "out"
    result = srun(slurm, "-n2", KTRAIN, "run", write_config(tmp_path / "c.yaml", base_config(out)),
                  timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "strategy mirrored runs in one process, but srun started 2" in result.stderr
    assert "strategy.name=multiworker" in result.stderr and "srun -n 1" in result.stderr
    assert not out.exists()


def test_two_concurrent_steps_in_one_allocation_both_finish(tmp_path, slurm, single_process_run):
    outs = [tmp_path / "a", tmp_path / "b"]
    configs = [write_config(tmp_path / f"{out.name}.yaml", with_strategy(out, "multiworker"))
               for out in outs]
    script = tmp_path / "two_steps.sh"
    script.write_text("#!/bin/bash\n" + "".join(
        f"srun --exact -n2 {KTRAIN} run {config} &\n" for config in configs) + "wait\n")
    result = run_command(slurm.command("sbatch", "--wait", "-n4", f"--output={tmp_path}/job.out",
                                       script), env=slurm.env, timeout=400)
    assert result.returncode == 0, (tmp_path / "job.out").read_text()
    for out in outs:
        assert json.loads((out / "summary.json").read_text())["world_size"] == 2
        assert_same_weights(single_process_run("mlp"), out)


def test_a_killed_task_ends_the_step_with_one_message_and_a_rerun_resumes(tmp_path, slurm,
                                                                          background):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", with_strategy(out, "multiworker",
                                                             train={"epochs": 150}))
    step = background("run", config, launcher=slurm.command("srun", "-n2"), env=slurm.env)
    step.wait_for(lambda: (out / "checkpoints" / "ckpt-000002.npz").exists()
                  and worker_pid(out, 1), timeout=180)
    os.kill(worker_pid(out, 1), signal.SIGKILL)
    step.process.wait(timeout=120)
    output = step.process.stdout.read()
    assert step.process.returncode != 0, output
    assert "rank 0 lost contact with" in output and "re-run the same command" in output, output
    assert "Traceback" not in output, output
    again = srun(slurm, "-n2", KTRAIN, "run", config)
    assert again.returncode == 0, again.stdout + again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 150 and summary["resumed_from_epoch"] >= 2


@pytest.mark.parametrize("script", ["cpu.sbatch", "gpu.sbatch"])
def test_sbatch_examples_run_as_written_from_another_folder(tmp_path, slurm, script):
    """The examples unchanged but for the size of the job, submitted from a project folder."""
    assert run_command([KTRAIN, "init", "project"], cwd=tmp_path).returncode == 0
    project = tmp_path / "project"
    size = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    result = run_command(slurm.command("sbatch", "--wait", *size,
                                       REPO / "scripts" / "slurm" / script, "config.yaml",
                                       "train.epochs=3"), cwd=project, timeout=300,
                         env={**slurm.env, "KTRAIN_VENV": str(Path(sys.executable).parent.parent)})
    job_output = "".join(p.read_text() for p in project.glob("ktrain-*.out"))
    assert result.returncode == 0, result.stderr + job_output
    summary = json.loads((project / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 3
    assert job_output.count("done:") == 1, job_output


def test_env_shows_the_step_world_rendezvous_and_pmix(slurm):
    with_pmix = srun(slurm, "-n2", "--mpi=pmix", KTRAIN, "env", timeout=120)
    assert with_pmix.returncode == 0, with_pmix.stderr
    assert with_pmix.stdout.count("slurm: rank") == 2 and "of 2" in with_pmix.stdout
    assert "rank 0 listens at" in with_pmix.stdout and "PMIx is available" in with_pmix.stdout
    without = srun(slurm, "-n1", KTRAIN, "env", timeout=120)
    assert "start with `srun --mpi=pmix`" in without.stdout
