"""Test helpers: write a config for the fixture models, run the real CLI in a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _horovod_missing() -> str | None:
    try:
        import horovod.tensorflow  # noqa: F401
    except ImportError as err:
        return f"Horovod is not installed ({err}): run bash scripts/install_horovod.sh"
    return None


_HOROVOD_MISSING = _horovod_missing()
needs_horovod = pytest.mark.skipif(_HOROVOD_MISSING is not None, reason=str(_HOROVOD_MISSING))
"""Marks a test (or a parameter) that runs Horovod."""
FIXTURES = REPO / "tests" / "fixtures" / "user_models.py"


def base_config(output_dir: Path, **sections) -> dict:
    """A small, fast, deterministic run on the digits data; sections override whole keys."""
    config = {
        "model": {"fn": f"{FIXTURES}:mlp", "kwargs": {"hidden": 32}},
        "data": {"fn": f"{FIXTURES}:digits_split", "kwargs": {}},
        "train": {"epochs": 3, "global_batch_size": 64, "shuffle": False, "seed": 1,
                  "optimizer": {"name": "sgd", "learning_rate": 0.1},
                  "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "strategy": {"name": "mirrored", "devices": 1},
        "checkpoint": {"every_epochs": 1, "keep": 3, "resume": "auto"},
        "report": False,  # drawn in the tests of the report (test_after_training)
        "output_dir": str(output_dir),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def elastic_config(out: Path, report: bool = False, **strategy) -> dict:
    """Digits on {min: 2, max: 3} multiworker workers (10 steps an epoch), a checkpoint every
    5 steps, steps slow enough to kill a worker between two; a global batch of 48 splits evenly
    over 2 and 3 workers."""
    config = base_config(out, train={
        "epochs": 6, "global_batch_size": 48,
        "callbacks": {"fn": f"{FIXTURES}:slow_steps", "kwargs": {"seconds": 0.1}}})
    config["strategy"] = {"name": "multiworker", "workers": {"min": 2, "max": 3}, **strategy}
    config["checkpoint"] = {**config["checkpoint"], "every_steps": 5, "keep": 10}
    config["report"] = report
    return config


def elastic_reference(folder: Path, **train) -> Path:
    """The output folder of ``elastic_config``'s run (``train`` settings changed) in one
    process, whose weights an elastic run ends with whatever sizes it went through."""
    config = elastic_config(folder / "one")
    config["train"].update(train)
    config["strategy"] = {"name": "mirrored", "devices": 1}
    del config["train"]["callbacks"]
    result = run_cli("run", write_config(folder / "one.yaml", config), "-q")
    assert result.returncode == 0, result.stderr
    return folder / "one"


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


KTRAIN = str(Path(sys.executable).parent / "ktrain")
"""The console script, as a user runs it."""
MPIRUN = [str(Path(sys.executable).parent / "mpirun"), "--allow-run-as-root", "--oversubscribe",
          "--mca", "btl", "self,vader", "-np", "2"]
"""Open MPI's mpirun starting 2 ranks on this machine, data over shared memory."""

# What TensorFlow's C++ side prints (absl's format, e.g. "I0000 00:00:17.9 123 port.cc:153] ...").
TF_NATIVE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d|All log messages before absl|"
                            r"oneDNN custom operations", re.M)


def cli_env(extra: dict | None = None) -> dict:
    """The test's environment, minus what would change ktrain's console (TF's log level)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    for name in ("KTRAIN_VERBOSITY", "TF_CPP_MIN_LOG_LEVEL"):
        if name not in (extra or {}):
            env.pop(name, None)
    return env


def run_command(command: list, *, timeout: float = 240, cwd: Path | None = None,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` to completion; killed with its process group if it outlives ``timeout``."""
    with subprocess.Popen(list(map(str, command)), cwd=cwd or REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=cli_env(env),
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_cli(*args: str, timeout: float = 240, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``ktrain ARGS`` to completion in a fresh process (TF device setup needs one)."""
    return run_command([KTRAIN, *args], timeout=timeout, cwd=cwd, env=env)


def _like_a_terminal() -> None:
    """Ctrl-C works as in a terminal, even if the tests run as a background job (which
    ignores SIGINT, and so would ktrain)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Background:
    """A ``ktrain`` process (started by ``launcher``, e.g. srun, if given) the test can signal;
    always reaped when the test ends."""

    def __init__(self, *args: str, launcher: tuple = (), env: dict | None = None):
        self.process = subprocess.Popen([*launcher, KTRAIN, *map(str, args)], cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=cli_env(env), start_new_session=True,
                                        preexec_fn=_like_a_terminal)

    def wait_for(self, condition, timeout: float = 120, interval: float = 0.01) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"ktrain exited early:\n{self.process.stdout.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the condition")
            time.sleep(interval)

    def signal(self, sig: int) -> str:
        self.process.send_signal(sig)
        out, _ = self.process.communicate(timeout=60)
        return out

    def close(self) -> None:
        """Kill ktrain and everything it started (its workers share its process group)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not self.process.stdout.closed:  # closed once before
            self.process.communicate()


def worker_pid(out: Path, rank: int) -> int | None:
    """The pid a worker logged when it joined its group (see ktrain.worker)."""
    log = out / "logs" / f"rank-{rank}.log"
    found = re.findall(r"rank \d+ of \d+ joined .*pid (\d+)", log.read_text()) if log.exists() else []
    return int(found[-1]) if found else None


def kill_rank_one_mid_training(background, config: Path, out: Path,
                               env: dict | None = None) -> tuple[int, str, float]:
    """Start `ktrain run`, SIGKILL rank 1 once epoch 2 is checkpointed; return ktrain's exit
    status, its output and how many seconds it took to exit after the kill."""
    run = background("run", config, env=env)
    run.wait_for(lambda: (out / "checkpoints" / "ckpt-000002.npz").exists() and worker_pid(out, 1),
                 timeout=180)
    os.kill(worker_pid(out, 1), signal.SIGKILL)
    killed = time.monotonic()
    run.process.wait(timeout=300)
    return run.process.returncode, run.process.stdout.read(), time.monotonic() - killed


def hosts_of_ranks(out: Path, world_size: int = 2) -> list[str]:
    """The host each rank ran on, from its log's "rank r of n joined (..., host H, ...)" line."""
    return [re.search(r"joined \(\w+, host (\S+),", (out / "logs" / f"rank-{r}.log").read_text())
            .group(1) for r in range(world_size)]


def with_strategy(out: Path, name: str, strategy: dict | None = None, **sections) -> dict:
    """``base_config`` under a 2-worker multi-process strategy."""
    config = base_config(out, **sections)
    config["strategy"] = {"name": name, "workers": 2, **(strategy or {})}
    return config


def assert_same_weights(one: Path, two: Path, atol: float = 1e-5) -> None:
    """The final models in two output folders have equal weights."""
    import keras
    import numpy as np

    for a, b in zip(keras.saving.load_model(one / "model.keras").get_weights(),
                    keras.saving.load_model(two / "model.keras").get_weights()):
        np.testing.assert_allclose(a, b, atol=atol)


def assert_quiet_console(result: subprocess.CompletedProcess, out: Path, world_size: int) -> None:
    """A finished run's console at default verbosity: no TensorFlow start-up lines, rank 0's
    epoch lines once, one summary."""
    import json

    console = result.stdout + result.stderr
    assert result.returncode == 0, console
    assert not TF_NATIVE_LINE.search(console), console
    lines = console.splitlines()
    assert sum(line.startswith("done:") for line in lines) == 1, console
    assert sum(line.startswith("model:") for line in lines) == 1, console
    epochs = json.loads((out / "summary.json").read_text())
    assert console.count(f"epoch {epochs['epochs_completed']}/") == 1, console
    assert epochs["world_size"] == world_size
