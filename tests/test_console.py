"""What a user sees at default verbosity: no TensorFlow start-up lines, one summary per run,
whoever started the ranks."""

import pytest

from helpers import (KTRAIN, MPIRUN, TF_NATIVE_LINE, assert_quiet_console, base_config, run_cli,
                     run_command, with_strategy, write_config)


@pytest.mark.parametrize("strategy, world_size", [
    pytest.param("mirrored", 1, marks=pytest.mark.fast), ("multiworker", 2)])
def test_default_console_is_quiet_and_has_one_summary(tmp_path, strategy, world_size):
    config = (with_strategy(tmp_path / "out", strategy) if world_size > 1
              else base_config(tmp_path / "out"))
    result = run_cli("run", write_config(tmp_path / "config.yaml", config))
    assert_quiet_console(result, tmp_path / "out", world_size)


def test_ranks_started_by_mpirun_print_one_summary(tmp_path):
    config = with_strategy(tmp_path / "out", "multiworker", {"communicator": "mpi"})
    command = [*MPIRUN, KTRAIN, "run", write_config(tmp_path / "config.yaml", config)]
    assert_quiet_console(run_command(command), tmp_path / "out", 2)


@pytest.mark.fast
def test_verbose_brings_tensorflow_lines_back(tmp_path):
    config = base_config(tmp_path / "out", train={"epochs": 1})
    result = run_cli("run", write_config(tmp_path / "config.yaml", config), "-v")
    assert result.returncode == 0, result.stderr
    assert TF_NATIVE_LINE.search(result.stdout + result.stderr)
