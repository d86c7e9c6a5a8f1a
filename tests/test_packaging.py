"""ktrain as an installed library: one import package, a wheel that works without the checkout,
and no clash with a user's own modules named like ktrain's folders."""

import json
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from helpers import KTRAIN, REPO, run_command

_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info",
                                     "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tree (so the build leaves the checkout untouched)."""
    work = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, work / "src", ignore=_NOT_SOURCE)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "--wheel-dir", str(work / "dist"),
                            str(work / "src")], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    return next((work / "dist").glob("ktrain_launcher-*.whl"))


def test_wheel_installs_one_import_package_and_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"ktrain"}
    assert {"ktrain/strategies/ray.py", "ktrain/configs/quickstart.yaml",
            "ktrain/configs/digits.py", "ktrain/worker_entry.py"} <= set(names)
    assert "ktrain = ktrain.cli:entry" in entry_points


def test_installed_wheel_trains_the_quickstart_outside_the_checkout(wheel, tmp_path):
    """A fresh venv with only the wheel; the heavy dependencies (TensorFlow, scikit-learn) are
    borrowed from the test environment through a .pth file, after the install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                                "--quiet", "--no-deps", str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    venv_site = Path(run_command([python, "-c", purelib], cwd=tmp_path).stdout.strip())
    (venv_site / "borrowed-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    where = run_command([python, "-c", textwrap.dedent("""\
        import importlib.util, ktrain
        print(ktrain.__file__)
        print([n for n in ("launcher", "strategies", "configs") if importlib.util.find_spec(n)])
        """)], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.splitlines() == [str(venv_site / "ktrain" / "__init__.py"), "[]"]

    ktrain = venv / "bin" / "ktrain"
    assert run_command([ktrain, "init", "project"], cwd=tmp_path).returncode == 0
    result = run_command([ktrain, "run", "project/config.yaml", "-q"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["final_metrics"]["val_accuracy"] >= 0.9


@pytest.mark.parametrize("strategy, world_size", [("mirrored", 1), ("multiworker", 2)])
def test_user_modules_named_like_ktrain_folders_are_the_users(tmp_path, strategy, world_size):
    """A project with its own strategies.py, launcher.py and configs/ package, trained in the
    ktrain process itself and in worker processes (which import the user's modules afresh)."""
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "strategies.py").write_text("LR = 0.05\n")
    (project / "launcher.py").write_text("HIDDEN = 24\n")
    (project / "configs" / "__init__.py").write_text("")
    (project / "configs" / "sizes.py").write_text("TRAIN, VALIDATION = 600, 300\n")
    (project / "model.py").write_text(textwrap.dedent("""\
        import keras
        from sklearn.datasets import load_digits

        from configs.sizes import TRAIN, VALIDATION
        from launcher import HIDDEN
        from strategies import LR


        def build_model():
            model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(HIDDEN, activation="relu"),
                                      keras.layers.Dense(10, activation="softmax")])
            model.compile(optimizer=keras.optimizers.SGD(LR), metrics=["accuracy"],
                          loss="sparse_categorical_crossentropy")
            return model


        def load_data():
            x, y = load_digits(return_X_y=True)
            x = (x / 16.0).astype("float32")
            return {"train": (x[:TRAIN], y[:TRAIN]),
                    "validation": (x[TRAIN:TRAIN + VALIDATION], y[TRAIN:TRAIN + VALIDATION])}
        """))
    (project / "config.yaml").write_text(textwrap.dedent("""\
        model: {fn: model.py:build_model}
        data: {fn: model.py:load_data}
        train: {epochs: 2, global_batch_size: 60}
        output_dir: out
        """))
    result = run_command([KTRAIN, "run", "config.yaml", "-q", f"strategy.name={strategy}"],
                         cwd=project)
    assert result.returncode == 0, result.stderr
    summary = json.loads((project / "out" / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["epochs_completed"] == 2
    assert (project / "out" / "model.keras").exists()
