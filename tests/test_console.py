"""What a user sees at default verbosity: no TensorFlow start-up lines, one summary per run,
whoever started the ranks."""

import os
import pty
import re
import subprocess

import pytest

from helpers import (FIXTURES, KTRAIN, MPIRUN, REPO, TF_NATIVE_LINE, assert_quiet_console,
                     base_config, cli_env, run_cli, run_command, with_strategy, write_config)


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


@pytest.mark.fast
def test_progress_through_an_epoch_is_redrawn_on_a_terminal_and_timed_elsewhere(tmp_path):
    """A 3-second epoch: in a pseudo-terminal its progress line is redrawn in place several
    times before the epoch's line; through a pipe (a SLURM log, say) it is printed every
    progress_seconds."""
    slow = {"fn": f"{FIXTURES}:slow_steps", "kwargs": {"seconds": 0.1}}
    config = base_config(tmp_path / "tty", train={"epochs": 1, "global_batch_size": 16,
                                                 "callbacks": slow})  # 32 steps
    terminal = pseudo_terminal_output([KTRAIN, "run", write_config(tmp_path / "t.yaml", config)])
    redrawn = re.findall(r"\r(epoch 1/1  step (\d+)/32  \d+ samples/s  0:0\d left  loss [\d.]+)"
                         r"\x1b\[K", terminal)
    assert len({step for _, step in redrawn}) >= 4, terminal
    assert terminal.index(redrawn[-1][0]) < terminal.index("\r\x1b[Kepoch 1/1  accuracy")

    config["output_dir"], config["progress_seconds"] = str(tmp_path / "pipe"), 1
    piped = run_cli("run", write_config(tmp_path / "p.yaml", config))
    assert piped.returncode == 0, piped.stderr
    timed = re.findall(r"^epoch 1/1  step \d+/32 .* left  loss [\d.]+$", piped.stdout, re.M)
    assert 1 <= len(timed) <= 4 and "\r" not in piped.stdout, piped.stdout
    assert "step" not in (tmp_path / "pipe" / "metrics.csv").read_text()


def pseudo_terminal_output(command: list) -> str:
    """What ``command`` writes to a terminal (stdout and stderr), once it has ended."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(list(map(str, command)), stdout=terminal, stderr=terminal,
                               env=cli_env(), cwd=REPO)
    os.close(terminal)
    written = b""
    try:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every end of the terminal is closed
                break
            if not chunk:
                break
            written += chunk
    finally:
        os.close(controller)
        process.kill()
        process.wait()
    return written.decode(errors="replace")
