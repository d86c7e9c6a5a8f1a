"""Experiment tracking with MLflow (``mlflow:`` in the config; extra ``ktrain-launcher[mlflow]``).

The chief alone logs: the resolved config as params, each epoch's row of metrics.csv (the
global metrics the console shows, and the epoch's throughput) at step = epoch, the summary's
figures, and the run's files as artifacts. The MLflow run's id is kept in
output_dir/mlflow.json from the moment it starts, so a resumed run (after a crash or a
preemption) continues the same MLflow run. An epoch logged before a crash and trained again
after it (from an earlier checkpoint) is not logged twice: its metrics are the same numbers
(a resumed run repeats the uninterrupted one), and its timing stays the first attempt's.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import TYPE_CHECKING

from ktrain.errors import Stopped, UserError, first_line

RECORD = "mlflow.json"
_PARAM_LIMIT = 6000  # characters MLflow keeps of a param's value
_BATCH = 100  # params per log_batch call that MLflow accepts

if TYPE_CHECKING:
    import keras


def missing_mlflow() -> UserError | None:
    """Said before training where the config asks for MLflow and it is not installed."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        return None
    return UserError("the config has an mlflow section, and mlflow is not installed",
                     where="mlflow", hint="pip install 'ktrain-launcher[mlflow]', or remove the "
                                          "mlflow section")


_CLIENT_DEFAULTS = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # ktrain says where the run is
    # A server that does not answer is said within seconds, not after MLflow's two minutes of
    # retries (set these yourself to wait longer).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class MlflowRun:
    """The chief's MLflow run: started (or resumed) before the first epoch. If the tracking
    server stops answering during training, training goes on and the run's end logs the
    epochs it missed."""

    def __init__(self, run, output, say):
        from mlflow.tracking import MlflowClient

        for name, value in _CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
        spec = run.mlflow
        self.output, self.say = output, say
        self.history: list[dict] = []
        self.paused = False
        self.client = MlflowClient(tracking_uri=spec.tracking_uri)
        try:
            self._open(run, spec)
        except Exception as err:
            raise UserError(f"MLflow at {spec.tracking_uri} did not take the run: "
                            f"{first_line(err)[:300]}", where="mlflow.tracking_uri",
                            hint="start the tracking server or correct the URI (the chief "
                                 "must reach it), or remove the mlflow section") from None

    def _open(self, run, spec) -> None:
        record = self.output.read_json(RECORD)
        if record.get("tracking_uri") == spec.tracking_uri and self._exists(record["run_id"]):
            self.run_id = record["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(spec.experiment)
            experiment_id = (experiment.experiment_id if experiment
                             else self.client.create_experiment(spec.experiment))
            name = spec.run_name or os.path.basename(self.output.path.rstrip("/"))
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            self.output.write_json(RECORD, {"tracking_uri": spec.tracking_uri,
                                            "experiment_id": experiment_id,
                                            "run_id": self.run_id})
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        self.link = (f"{spec.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/"
                     f"{self.run_id}" if spec.tracking_uri.startswith("http")
                     else f"run {self.run_id} in {spec.tracking_uri}")
        self.say(f"mlflow: continuing {self.link}" if record.get("run_id") == self.run_id
                 else f"mlflow: experiment '{spec.experiment}', {self.link}")
        self._log_params(run)
        self.logged_epochs = {int(m.step) for m in self.client.get_metric_history(
            self.run_id, "loss")}

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _log_params(self, run) -> None:
        """The resolved config, one param per key path; a value logged before is kept (MLflow
        params cannot change), and a changed one is said."""
        from mlflow.entities import Param

        config = run.model_dump(mode="json", exclude={"base_dir"})
        params = {k: str(v)[:_PARAM_LIMIT] for k, v in _flatten(config).items()}
        logged = self.client.get_run(self.run_id).data.params
        changed = [k for k in params if k in logged and logged[k] != params[k]]
        if changed:
            self.say(f"mlflow: this run changed {', '.join(changed)}; MLflow keeps the values "
                     f"the run began with")
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(new), _BATCH):
            self.client.log_batch(self.run_id, params=new[start:start + _BATCH])

    def log_epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        epoch = int(row["epoch"])
        if epoch in self.logged_epochs:  # the run resumed before this epoch: it is logged
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, epoch) for k, v in row.items() if k != "epoch"])
        self.logged_epochs.add(epoch)

    def callback(self, history: list[dict]) -> keras.callbacks.Callback:
        """Logs each epoch's row of ``history`` (placed after the callback that appends it)."""
        import keras

        self.history = history
        tracker = self

        class _LogEpoch(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if tracker.paused:
                    return
                try:
                    tracker.log_epoch(history[-1])
                except Exception as err:
                    tracker.paused = True
                    tracker.say(f"warning: MLflow did not take epoch {epoch + 1}'s metrics "
                                f"({first_line(err)[:300]}); training goes on, and the run's end "
                                f"logs the epochs missed")

        return _LogEpoch()

    def finish(self, summary: dict) -> None:
        """Log the summary's figures and the run's files, and close the MLflow run."""
        from mlflow.entities import Metric

        for row in self.history:  # those a pause in the server's answers missed
            self.log_epoch(row)
        now = int(time.time() * 1000)
        figures = [Metric(f"summary.{k}", float(v), now, 0) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "first_step_unix_time"]
        self.client.log_batch(self.run_id, metrics=figures)
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("model.keras", "metrics.csv", "summary.json", "config.yaml",
                         "report.png", "report.html", "export"):
                local = self.output.local_copy(name, tmp)
                if local and os.path.isdir(local):
                    self.client.log_artifacts(self.run_id, local, artifact_path=name)
                elif local:
                    self.client.log_artifact(self.run_id, local)
        self.client.set_terminated(self.run_id, status="FINISHED")
        self.say(f"mlflow: logged the run to {self.link}")

    @contextlib.contextmanager
    def ending_on_failure(self):
        """Close the MLflow run when training ends early: KILLED on a stop signal (the re-run
        continues it), FAILED otherwise."""
        try:
            yield
        except BaseException as err:
            self.client.set_terminated(self.run_id,
                                       status="KILLED" if isinstance(err, Stopped) else "FAILED")
            raise


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(value) if isinstance(value, (list, dict))
            else value}
