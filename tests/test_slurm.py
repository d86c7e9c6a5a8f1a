"""ktrain inside a real SLURM (slurmctld + slurmd on 127.0.0.1): srun steps and sbatch jobs."""

import json

import pytest

from helpers import KTRAIN, assert_same_weights, base_config, run_command, with_strategy, write_config

try:
    import horovod.tensorflow  # noqa: F401
    HOROVOD = None
except ImportError as err:
    HOROVOD = f"Horovod is not installed ({err}): run bash scripts/install_horovod.sh"


def srun(slurm, *args, timeout: float = 300):
    return run_command(["srun", *args], env=slurm.env,
                       timeout=timeout)


@pytest.mark.parametrize("strategy, mpi", [
    pytest.param({"name": "multiworker", "communicator": "collective"}, "none", id="tf-collectives"),
    pytest.param({"name": "multiworker", "communicator": "mpi"}, "pmix", id="mpi4py"),
    pytest.param({"name": "horovod", "controller": "mpi"}, "pmix", id="horovod",
                 marks=pytest.mark.skipif(HOROVOD is not None, reason=str(HOROVOD))),
])
def test_two_srun_tasks_match_one_process(tmp_path, slurm, single_process_run, strategy, mpi):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", with_strategy(out, strategy["name"], strategy))
    result = srun(slurm, "-n2", f"--mpi={mpi}", KTRAIN, "run", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert_same_weights(single_process_run("mlp"), out)
    assert result.stdout.count("done:") == 1, result.stdout


@pytest.mark.parametrize("strategy", [
    pytest.param({"name": "multiworker", "communicator": "mpi"}, id="mpi4py"),
    pytest.param({"name": "horovod", "controller": "mpi"}, id="horovod",
                 marks=pytest.mark.skipif(HOROVOD is not None, reason=str(HOROVOD))),
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
