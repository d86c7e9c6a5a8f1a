"""After training: exports that predict as model.keras does, MLflow tracking, the report."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import FIXTURES, REPO, base_config, run_cli, write_config

SERVING = REPO / "tests" / "fixtures" / "serving.py"
PREDICT = REPO / "tests" / "fixtures" / "predict_exports.py"
FORMATS = ("saved_model", "tflite", "onnx")


def predictions_differ_by(run_dir) -> dict:
    """Each export's largest difference from model.keras on 20 validation inputs, measured in
    a fresh process that loads each export with its own runtime."""
    data = "two_inputs" if "two" in run_dir.name else "digits"
    done = subprocess.run([sys.executable, PREDICT, run_dir, data], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_two_input_model_trained_on_jax_exports_at_the_end_of_its_run(tmp_path):
    """Exports are made on TensorFlow from the JAX run's model.keras."""
    out = tmp_path / "two"
    config = base_config(out, model={"fn": f"{SERVING}:two_input_functional", "kwargs": {}},
                         data={"fn": f"{SERVING}:two_inputs"},
                         train={"epochs": 2, "validation_split": 0.2},
                         export=list(FORMATS), backend="jax")
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    assert result.returncode == 0, result.stderr
    for name in FORMATS:
        assert f"export: {name} of {out}/model.keras" in result.stdout, result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["exports"]) == sorted(FORMATS)
    assert not list((out / "export").glob(".*")), "no partial export is left behind"
    measured = predictions_differ_by(out)
    assert measured["rows"] == 20 and sorted(measured["onnx_inputs"]) == ["left", "right"]
    for name in FORMATS:
        assert measured[name] <= 1e-4, measured


def test_a_checkpoint_of_a_preprocessing_model_exports_later(tmp_path):
    """`ktrain export --checkpoint`: the model fn remade (its Normalization adapted again)
    with the newest checkpoint's weights; the statistics are constants of the exports."""
    out = tmp_path / "preprocessing"
    config = base_config(out, model={"fn": f"{SERVING}:preprocessing_mlp", "kwargs": {}},
                         data={"fn": f"{FIXTURES}:digits"},
                         train={"epochs": 2, "validation_split": 0.2}, report=False)
    assert run_cli("run", write_config(tmp_path / "c.yaml", config), "-q").returncode == 0
    assert not (out / "export").exists()
    result = run_cli("export", out, "--checkpoint", "latest", "--format", "saved_model",
                     "--format", "tflite,onnx")
    assert result.returncode == 0, result.stderr
    assert f"of {out}/checkpoints/ckpt-000002.npz" in result.stdout
    assert result.stderr.strip() == "", result.stderr  # converters' own chatter stays hidden
    measured = predictions_differ_by(out)
    assert measured["onnx_inputs"] == ["pixels"], measured
    for name in FORMATS:
        assert measured[name] <= 1e-4, measured


def test_a_layer_no_converter_takes_is_named_and_the_run_still_succeeds(tmp_path):
    out = tmp_path / "odd"
    config = base_config(out, model={"fn": f"{SERVING}:gaussianized_mlp", "kwargs": {}},
                         train={"epochs": 1}, export=list(FORMATS), report=False)
    result = run_cli("run", write_config(tmp_path / "c.yaml", config))
    assert result.returncode == 0, result.stderr
    for name in ("tflite", "onnx"):
        assert f"export {name}: layer 'gaussianize' (op Erfinv) cannot be exported" \
            in result.stdout, result.stdout
    assert f"`ktrain export {out}` tries again" in result.stdout
    assert (out / "model.keras").exists() and (out / "export" / "saved_model").is_dir()
    assert sorted(json.loads((out / "summary.json").read_text())["exports"]) == ["saved_model"]

    again = run_cli("export", out, "--format", "onnx")
    assert again.returncode == 2
    assert again.stderr.startswith("ktrain: error: export onnx: layer 'gaussianize' (op Erfinv)")
    assert "HINT:" in again.stderr and "Traceback" not in again.stderr


def test_export_user_errors(tmp_path):
    result = run_cli("export", tmp_path, "--format", "torchscript")
    assert result.returncode == 2 and "unknown export format torchscript" in result.stderr
    result = run_cli("export", tmp_path)
    assert result.returncode == 2 and "is not a ktrain run's output_dir" in result.stderr


def test_report_draws_one_run_and_two_side_by_side(tmp_path, single_process_run):
    from PIL import Image

    one = tmp_path / "one"
    config = base_config(one, train={"epochs": 4})
    del config["report"]  # the default: a report at the end of the run
    assert run_cli("run", write_config(tmp_path / "c.yaml", config), "-q").returncode == 0
    two = single_process_run("mlp")  # report: false
    assert not (two / "report.png").exists()
    result = run_cli("report", one, two, "-o", tmp_path / "both.png")
    assert result.returncode == 0, result.stderr
    for picture in (one / "report.png", tmp_path / "both.png"):
        with Image.open(picture) as image:
            width, height = image.size
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert width >= 800 and height >= 250, (picture, image.size)
        assert len(colours) > 50, f"{picture} looks blank"
    page = (tmp_path / "both.html").read_text()
    assert "data:image/png;base64," in page and page.count("<table>") == 2
    assert "samples_per_second" in page


def test_mlflow_logs_from_the_chief_and_a_resumed_run_continues(tmp_path, mlflow_server,
                                                                  background):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "tracked"
    sections = base_config(out, train={"epochs": 20}, report=True, mlflow={
        "tracking_uri": mlflow_server.url, "experiment": "ktrain-test"})
    sections["strategy"] = {"name": "multiworker", "workers": 2}
    config = write_config(tmp_path / "tracked.yaml", sections)
    first = background("run", config, "-q")
    first.wait_for(lambda: len(list((out / "checkpoints").glob("ckpt-*.npz"))) >= 2
                   if (out / "checkpoints").exists() else False)
    first.close()  # the whole group killed: a crash, not a stop
    result = run_cli("run", config)
    assert result.returncode == 0, result.stderr
    assert f"mlflow: continuing {mlflow_server.url}/#/experiments/" in result.stdout

    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("ktrain-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one MLflow run for the killed and the resumed run"
    run = runs[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlflow"]["run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "20"
    assert run.data.params["strategy.workers"] == "2"
    csv_rows = np.genfromtxt(out / "metrics.csv", delimiter=",", names=True)
    for metric in ("loss", "val_accuracy", "samples_per_second"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == list(range(1, 21)), metric  # each epoch once
        if metric != "samples_per_second":  # an epoch re-run after the crash keeps its first
            np.testing.assert_allclose([m.value for m in history], csv_rows[metric],  # timing
                                       rtol=1e-5)
    assert run.data.metrics["summary.epochs_completed"] == 20
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.keras", "metrics.csv", "summary.json", "report.png"} <= artifacts
    assert "mlflow" not in (out / "logs" / "rank-1.log").read_text().lower()


def test_mlflow_settings_come_from_the_config_or_mlflows_variables(tmp_path, monkeypatch):
    from ktrain.config import load_config
    from ktrain.errors import UserError

    config = write_config(tmp_path / "digits.yaml", base_config(tmp_path / "out", mlflow={}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    with pytest.raises(UserError) as missing:
        load_config(config)
    assert missing.value.exit_code == 2 and "mlflow.tracking_uri" in missing.value.render()
    assert "export MLFLOW_TRACKING_URI" in missing.value.render()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    settled = load_config(config).mlflow
    assert (settled.tracking_uri, settled.experiment) == ("http://127.0.0.1:9", "digits")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "theirs")
    assert load_config(config).mlflow.experiment == "theirs"
    assert load_config(config, ["mlflow.experiment=mine"]).mlflow.experiment == "mine"


def test_an_mlflow_server_that_does_not_answer_is_said_before_training(tmp_path):
    from clusters import free_port

    nobody = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "c.yaml", base_config(
        tmp_path / "out", mlflow={"tracking_uri": nobody}))
    result = run_cli("run", config, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"ktrain: error: mlflow.tracking_uri: MLflow at {nobody} "
                                    f"did not take the run"), result.stderr
    assert "HINT: start the tracking server" in result.stderr
    assert "epoch 1/" not in result.stdout and "Traceback" not in result.stderr
