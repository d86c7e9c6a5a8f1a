"""The commands around `run`: init, validate, env, and --help on each."""

import json
import re
import sys

import pytest

from helpers import REPO, base_config, run_cli, run_command, write_config


@pytest.mark.fast
@pytest.mark.parametrize("command", ["run", "validate", "init", "export", "report", "spark-entry",
                                     "checkpoints", "env"])
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and f"usage: ktrain {command}" in result.stdout


@pytest.mark.fast
def test_init_writes_a_project_that_trains(tmp_path):
    project = tmp_path / "project"
    result = run_cli("init", project)
    assert result.returncode == 0, result.stderr
    assert (project / "config.yaml").read_text() == (REPO / "configs" / "quickstart.yaml").read_text()
    result = run_cli("run", project / "config.yaml", "train.epochs=2", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # a relative output_dir lands where ktrain runs, not beside the config
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["epochs_completed"] == 2
    again = run_cli("init", project)
    assert again.returncode == 2 and "already exist" in again.stderr


TRAIN_TEMPLATES = """
import json
from pathlib import Path
import keras, yaml
from ktrain.cli import TEMPLATES, main
for name in TEMPLATES:
    keras.backend.clear_session()
    assert main(["init", name, "--template", name, "-q"]) == 0
    assert main(["run", f"{name}/config.yaml", "-q"]) == 0
    out = Path(yaml.safe_load(Path(name, "config.yaml").read_text())["output_dir"])
    print(name, json.loads((out / "summary.json").read_text())["final_metrics"]["val_accuracy"])
"""


def test_every_template_trains_as_written(tmp_path):
    """ktrain init --template NAME: each starting point trains, as written, in one process
    (all in one, to load TensorFlow once), and learns."""
    result = run_command([sys.executable, "-c", TRAIN_TEMPLATES], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    accuracy = dict(line.split() for line in result.stdout.splitlines())
    chance = {"digits": 0.1, "images": 0.1, "text": 0.25, "tabular": 0.63, "custom-step": 0.1}
    assert accuracy.keys() == chance.keys()
    assert all(float(accuracy[name]) > 0.3 + chance[name] for name in chance), accuracy


@pytest.mark.fast
def test_validate_prints_the_resolved_config(tmp_path):
    result = run_cli("validate", REPO / "configs" / "quickstart.yaml", "train.epochs=7")
    assert result.returncode == 0, result.stderr
    assert "epochs: 7" in result.stdout
    assert f"{REPO / 'configs' / 'digits.py'}:build_model" in result.stdout
    bad = run_cli("validate", REPO / "configs" / "quickstart.yaml", "train.epochs=zero")
    assert bad.returncode == 2 and "train.epochs" in bad.stderr


@pytest.mark.fast
def test_env_reports_versions_devices_and_cluster():
    result = run_cli("env")
    assert result.returncode == 0, result.stderr
    for text in ("python", "tensorflow", "keras", "devices", "mpi4py"):
        assert text in result.stdout
    assert re.search(r"cluster\s+local: rank 0 of 1", result.stdout)


def test_a_launcher_of_workers_never_loads_tensorflow(tmp_path):
    """Starting and watching workers needs neither Keras nor TensorFlow, so the launcher skips
    their seconds of loading (each worker loads them)."""
    config = base_config(tmp_path / "out", train={"epochs": 1})
    config["strategy"] = {"name": "multiworker", "workers": 2}
    config = write_config(tmp_path / "c.yaml", config)
    result = run_command([sys.executable, "-X", "importtime", "-m", "ktrain", "run", config, "-q"])
    assert result.returncode == 0, result.stderr
    loaded = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
              if line.startswith("import time:")}
    assert "ktrain.strategies.multiworker" in loaded  # the launcher's own imports were listed
    assert not loaded & {"keras", "tensorflow"}
