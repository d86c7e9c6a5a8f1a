"""Porting real Keras code: the data shapes, command lines and saved models a Keras user
already has work as they are (issue 12's findings, one test each)."""

import json
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from helpers import FIXTURES, REPO, base_config, cli_env, run_cli, write_config
from ktrain import cli

PORTING = FIXTURES.parent / "porting.py"
sys.path.insert(0, str(PORTING.parent))  # the fixture files import each other, as users' do
from porting import WRONG_RESULTS  # noqa: E402
from user_models import digits_split  # noqa: E402


def train(tmp_path, strategy: dict | None = None, **sections) -> dict:
    """Run ``base_config`` with ``sections`` (and ``strategy`` instead of its own); the run's
    summary."""
    out = tmp_path / "out"
    config = base_config(out, **sections)
    config["strategy"] = strategy or config["strategy"]
    result = run_cli("run", write_config(tmp_path / "c.yaml", config), "-q")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads((out / "summary.json").read_text())


def test_a_keras_datasets_style_result_trains_with_its_test_part_as_validation(tmp_path):
    """((x_train, y_train), (x_test, y_test)) was `Dimensions 1500 and 297 are not compatible`."""
    summary = train(tmp_path, data={"fn": f"{PORTING}:keras_datasets_style"})
    assert "val_loss" in summary["final_metrics"]
    assert summary["final_metrics"]["accuracy"] > 0.5


def test_multi_input_x_as_a_list_trains(tmp_path):
    """Was `the data fn returned x with 2 rows but y with 1797`."""
    summary = train(tmp_path, data={"fn": f"{PORTING}:two_inputs_as_a_list"},
                    model={"fn": f"{PORTING}:two_inputs_mlp", "kwargs": {}})
    assert summary["final_metrics"]["accuracy"] > 0.5


def test_an_unbatched_generator_with_an_unknown_width_trains(tmp_path):
    """TensorSpec((None,)) was taken for a batched dataset (`remove .batch()`)."""
    summary = train(tmp_path, data={"fn": f"{PORTING}:generator_with_unknown_width"})
    assert summary["final_metrics"]["accuracy"] > 0.5


def test_a_model_fn_that_asks_for_train_data_adapts_to_it(tmp_path):
    """No second load for Normalization.adapt(): the saved layer holds the training mean."""
    train(tmp_path, model={"fn": f"{PORTING}:adapted_mlp", "kwargs": {}})
    model = keras.saving.load_model(tmp_path / "out" / "model.keras")
    x_train = digits_split()["train"][0]
    np.testing.assert_allclose(np.ravel(model.layers[0].mean), x_train.mean(axis=0), atol=1e-5)


def test_early_stopping_says_so_and_a_rerun_trains_nothing_and_keeps_the_model(tmp_path):
    """It said nothing; summary.json had the last epoch only; a re-run trained on from the
    last checkpoint and overwrote model.keras with the last (not the best) weights."""
    config = base_config(tmp_path / "out", train={
        "epochs": 60, "global_batch_size": 16, "shuffle": True,  # overfits within 60 epochs
        "early_stopping": {"monitor": "val_loss", "patience": 2, "restore_best_weights": True}})
    path = write_config(tmp_path / "c.yaml", config)
    result = run_cli("run", path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    report = summary["early_stopping"]
    assert report["stopped_after_epoch"] == summary["epochs_completed"] < 60
    assert report["weights_of_epoch"] == report["best_epoch"] < report["stopped_after_epoch"]
    assert (f"early stopping ended the run after epoch {report['stopped_after_epoch']}"
            in result.stdout and f"epoch {report['best_epoch']}'s weights" in result.stdout)
    model = (tmp_path / "out" / "model.keras").read_bytes()

    again = run_cli("run", path)
    assert again.returncode == 0, again.stderr
    assert "nothing to train: early stopping ended this run" in again.stdout, again.stdout
    assert "done:" not in again.stdout and "samples/s" not in again.stdout
    assert (tmp_path / "out" / "model.keras").read_bytes() == model


def test_user_callbacks_run_on_two_workers_with_global_metrics(tmp_path):
    """Was `unknown key 'train.callbacks'`. ReduceLROnPlateau acts on the same (global) loss on
    both ranks; the file-writing ModelCheckpoint and CSVLogger run on rank 0 only."""
    summary = train(tmp_path, strategy={"name": "multiworker", "workers": 2},
                    train={"callbacks": {"fn": f"{PORTING}:plateau_and_best_checkpoint",
                                         "kwargs": {"folder": str(tmp_path)}}})
    assert summary["epochs_completed"] == 3
    model = keras.saving.load_model(tmp_path / "out" / "model.keras")
    assert float(model.optimizer.learning_rate) == pytest.approx(0.1 * 0.5 ** 2)
    assert keras.saving.load_model(tmp_path / "best.keras").count_params() == model.count_params()
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 3


def test_a_callbacks_fn_that_returns_something_else_is_a_user_error(tmp_path):
    config = base_config(tmp_path / "out", train={
        "callbacks": {"fn": f"{PORTING}:not_callbacks", "kwargs": {"folder": str(tmp_path)}}})
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    assert result.returncode == 2 and "train.callbacks.fn" in result.stderr, result.stderr
    assert "not a list of Keras callbacks" in result.stderr and "Traceback" not in result.stderr


def test_a_rerun_with_other_data_or_settings_does_not_resume_the_old_run(tmp_path):
    """It resumed silently (`all 20 epochs are already done ... 0 samples/s`) and saved the old
    model again. Now: exit 2 naming what differs; the old run's files are untouched; more
    epochs, another strategy or an explicit checkpoint still resume."""
    out = tmp_path / "out"
    path = write_config(tmp_path / "c.yaml", base_config(out, train={"epochs": 2}))
    assert run_cli("run", path, "-q").returncode == 0
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}

    edited = run_cli("run", path, "data.kwargs={n_train: 400}", "train.optimizer.learning_rate=0.05")
    assert edited.returncode == 2 and "Traceback" not in edited.stderr, edited.stderr
    for said in ("differs from this one", "data.kwargs", "training examples 512 -> 400",
                 "train.optimizer", "choose a new output_dir", "checkpoint.resume: "):
        assert said in edited.stderr, edited.stderr
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before

    longer = run_cli("run", path, "train.epochs=3", "strategy={name: multiworker, workers: 2}")
    assert longer.returncode == 0 and "resuming from the checkpoint after epoch 2" in longer.stdout


def test_a_dataset_that_shuffles_itself_trains_with_a_note_on_resume(tmp_path):
    """Its order differs run to run, so resume equivalence cannot hold: the run says so."""
    config = base_config(tmp_path / "out", data={"fn": f"{PORTING}:shuffles_itself"})
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    assert result.returncode == 0, result.stderr
    note = [line for line in result.stderr.splitlines() if ".shuffle()" in line]
    assert len(note) == 1 and "train.shuffle: true" in note[0], result.stderr


def test_a_batched_dataset_is_still_refused(tmp_path):
    config = base_config(tmp_path / "out", data={"fn": f"{PORTING}:batched"})
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    assert result.returncode == 2 and "remove .batch()" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_custom_layer_is_saved_under_the_users_module_and_reloads_in_their_code(tmp_path):
    """model.keras records the user's module (porting), not ktrain's internal name for it (it
    was ktrain_user_porting), and plain Keras in the user's folder loads it."""
    train(tmp_path, model={"fn": f"{PORTING}:mlp_with_a_custom_layer", "kwargs": {}})
    saved = tmp_path / "out" / "model.keras"
    with zipfile.ZipFile(saved) as archive:
        layers = json.loads(archive.read("config.json"))["config"]["layers"]
    assert [layer["module"] for layer in layers if layer["class_name"] == "Scale"] == ["porting"]
    load = f"import keras, porting; print(type(keras.saving.load_model({str(saved)!r}).layers[0]))"
    loaded = subprocess.run([sys.executable, "-c", load], cwd=PORTING.parent, env=cli_env(),
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert "porting.Scale" in loaded.stdout


@pytest.mark.parametrize("command", [
    ["-q", "validate", "{config}"],
    ["validate", "-q", "{config}", "train.epochs=2"],
    ["validate", "{config}", "-q", "output_dir=/tmp/elsewhere", "train.epochs=2"],
    ["validate", "{config}", "train.epochs=2", "-v", "train.seed=3"],
])
def test_global_flags_go_anywhere_on_the_command_line(command, capsys, monkeypatch):
    """In-process, as the fuzz test below: what is checked is how the command line is read."""
    monkeypatch.setenv("KTRAIN_VERBOSITY", "1")  # cli.main sets both for this process,
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")  # as in the fuzz test below
    config = str(REPO / "configs" / "quickstart.yaml")
    code = cli.main([part.format(config=config) for part in command])
    said = capsys.readouterr()
    assert code == 0, said.err
    for override in (part for part in command if "=" in part and part.startswith("train.")):
        key, value = override.removeprefix("train.").split("=")
        assert f"  {key}: {value}\n" in said.out  # every override counted, wherever it is


def test_validate_reports_every_problem_run_would_find(tmp_path):
    """A misspelled fn, loss, metric and optimizer argument all exited 0 before."""
    config = base_config(tmp_path / "out", model={"fn": f"{FIXTURES}:mlpp"},
                         train={"loss": "sparse_categorical_crossentropyy",
                                "metrics": ["acuracy"],
                                "optimizer": {"name": "adam", "momentum": 0.9}})
    path = write_config(tmp_path / "c.yaml", config)
    result = run_cli("validate", path, "train.epochs=zero", "train.sed=3")
    assert result.returncode == 2 and "2 problems" in result.stderr, result.stderr  # keys first
    assert "'train.epochs'" in result.stderr and "did you mean 'seed'" in result.stderr
    result = run_cli("validate", path)
    assert result.returncode == 2 and "4 problems" in result.stderr, result.stderr
    for said in ("has no function 'mlpp'", "did you mean", "unknown loss",
                 "unknown metric 'acuracy'", "{'momentum': 0.9}"):
        assert said in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", WRONG_RESULTS)
def test_a_wrong_data_fn_result_is_a_user_error_without_a_traceback(tmp_path, capsys,
                                                                     monkeypatch, case):
    """Fuzz: every one of these exits 2 with one ktrain message, no launcher frames (run
    in-process: the CLI's own code path, without paying for a Python start per case)."""
    monkeypatch.setenv("KTRAIN_VERBOSITY", "1")  # cli.main sets both for this process,
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")  # and later tests' runs would inherit them
    config = base_config(tmp_path / "out", data={"fn": f"{PORTING}:wrong_result",
                                                 "kwargs": {"case": case}},
                         train={"epochs": 1})
    code = cli.main(["run", str(write_config(tmp_path / "c.yaml", config)), "-q"])
    said = capsys.readouterr().err
    assert code == 2, said
    assert said.startswith("ktrain: error: ") and said.count("ktrain: error: ") == 1, said
    assert "Traceback" not in said and "/launcher/" not in said, said
