"""The one training path every strategy runs in every worker.

Flow: open the strategy's session -> call the user's data and model fns -> check everything ->
only then touch output_dir -> restore the newest checkpoint -> fit -> write model and summary.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import resource
import socket
import time

import keras
import numpy as np

from ktrain import STARTED_AT, backends, console
from ktrain.checkpoint import CheckpointStore, Position, TrainingState, load_checkpoint_url
from ktrain.config import RunConfig, TrainSpec
from ktrain.data import (ArraySplit, RayStreamSplit, Splits, evaluation_batches,
                         first_features, partition_splits, ray_stream_splits, steps_per_epoch,
                         to_splits, training_batches)
from ktrain.environment import PARTITION_ENV
from ktrain.errors import UserError, WorkersFailed, all_of, first_line
from ktrain.jax_runtime import even_share
from ktrain.output import RunOutput, RunResult
from ktrain.report import TIMING
from ktrain.sources import Files, FileSplit, ShardAudit
from ktrain.stopping import REQUEUE_SIGNAL, StopRequest, requeue_slurm_job
from ktrain.strategies.base import Session, Strategy
from ktrain.strategies.ray import is_ray_dataset
from ktrain.supervisor import is_supervised, mark
from ktrain.userfn import call_user, load_function
from ktrain.watchdog import watching_for_stalls


tf = backends.optional_tensorflow()
# What model.fit raises when the model and the data do not fit together, and when a collective
# fails (TensorFlow's own errors, where it is installed).
_MISFIT = (ValueError, TypeError) + ((tf.errors.InvalidArgumentError,
                                      tf.errors.UnimplementedError) if tf else ())
_OP_ERROR = tf.errors.OpError if tf else ()


class TrainingFailed(UserError):
    """The user's model or data failed inside ``fit`` (e.g. a shape mismatch)."""


def run_worker(run: RunConfig, strategy: Strategy) -> RunResult:
    session = strategy.open_session()
    if session.world_size > 1 and session.log_to_file:  # no supervisor sorts our output by rank
        console.share_terminal(session.rank, every_rank=getattr(
            run.strategy, "console_ranks", "chief") == "all")
    model, splits = _model_and_data(run, session)
    output = RunOutput(run.output_dir, is_chief=session.is_chief, rank=session.rank,
                       keep_log=session.log_to_file)
    store = CheckpointStore(output.checkpoints_url, keep=run.checkpoint.keep,
                            is_chief=session.is_chief)
    fingerprint = _fingerprint(run, model, splits)
    state = _starting_state(run, store, fingerprint)
    output.check_writable()
    if state is not None:
        _restore(model, state)
    flags = None
    if session.communicator is not None:
        if run.checkpoint.stop_signals or getattr(run.strategy, "stall_timeout", None):
            flags = session.communicator.flags(max(1, len(run.checkpoint.stop_signals)))
        output.say(_join_group(run, session, model, flags))
    return _fit(run, session, model, splits, output, store, state, flags, fingerprint)


def _model_and_data(run: RunConfig, session: Session) -> tuple[keras.Model, Splits]:
    """The user's model, compiled and built in the session's scope, and the data's splits."""
    model_fn = load_function(run.model.fn, "model.fn", run.base_dir)
    keras.utils.set_random_seed(run.train.seed)
    if run.train.precision != "float32":
        keras.mixed_precision.set_global_policy(run.train.precision)

    splits = _load_data(run, session)
    with session.scope():
        model = call_user(model_fn, {**_training_data_for(model_fn, splits), **run.model.kwargs},
                          "model.fn")
        _check_model(model)
        if not model.compiled:
            compile_from_config(model, run.train)
        _build(model, splits)
    return model, splits


def checkpoint_model(run: RunConfig, state: TrainingState) -> keras.Model:
    """The run's model holding a checkpoint's weights, made as one process would make it
    (``ktrain export --checkpoint``)."""
    if run.data.read_by_spark:
        raise UserError("the run's data is read by Spark, and exporting a checkpoint remakes "
                        "the model in this process", where="ktrain export --checkpoint",
                        hint="export the run's model.keras (what a finished run leaves)")
    model, _ = _model_and_data(run, Session(rank=0, world_size=1, num_replicas=1))
    _restore(model, state)
    return model


def _load_data(run: RunConfig, session: Session) -> Splits:
    if session.data_shard is not None:  # Ray Data streams this worker its share
        return ray_stream_splits(session.data_shard, run.train.global_batch_size,
                                 session.world_size)
    if os.environ.get(PARTITION_ENV):  # a Spark task's own partition
        path, _, steps = os.environ[PARTITION_ENV].rpartition(":")
        return partition_splits(path, int(steps), list(run.data.features), run.data.label)
    if run.data.files is not None:
        splits = to_splits(_files_from_config(run), 0.0, key="data")
    elif run.data.read_by_spark:
        raise UserError("data.parquet and data.table are read by Spark, so they need the spark "
                        "strategy", where="data",
                        hint="use strategy.name: spark, or point data.fn at a function")
    else:
        data_fn = load_function(run.data.fn, "data.fn", run.base_dir)
        result = call_user(data_fn, run.data.kwargs, "data.fn")
        if is_ray_dataset(result):
            raise UserError("the data fn returned a ray.data.Dataset, which the ray strategy "
                            "streams to its workers when data.features and data.label name "
                            "its columns", where="data.fn",
                            hint="use strategy.name: ray and set data.features and data.label")
        splits = to_splits(result, run.train.validation_split)
    splits.train.check_workers(session.world_size, "strategy.workers")
    if run.data.audit and not isinstance(splits.train, FileSplit):
        raise UserError("data.audit checks how workers share a dataset in files, and this "
                        "run's data is in memory", where="data.audit",
                        hint="remove data.audit, or read the data with data.files (or a data "
                             "fn that returns ktrain.Files)")
    return splits


def _files_from_config(run: RunConfig) -> dict[str, Files]:
    """data.files (and data.validation_files) as the Files a data fn would return."""
    data = run.data
    map_fn = None
    if data.map:
        map_fn = functools.partial(load_function(data.map.fn, "data.map.fn", run.base_dir),
                                   **data.map.kwargs)
    options = {"format": data.format, "features": tuple(data.features), "label": data.label,
               "map": map_fn, "lanes": data.lanes}
    files = {"train": Files(data.files, **options)}
    if data.validation_files is not None:
        files["validation"] = Files(data.validation_files, **options)
    return files


TRAIN_DATA_PARAMETER = "train_data"


def _training_data_for(model_fn, splits: Splits) -> dict:
    """``train_data`` for a model fn that has such a parameter: the training examples as a
    batched tf.data.Dataset of (features, label), e.g. for a preprocessing layer's
    ``adapt()``, so the data is not loaded twice."""
    try:
        wanted = TRAIN_DATA_PARAMETER in inspect.signature(model_fn).parameters
    except (TypeError, ValueError):
        wanted = False
    if wanted and isinstance(splits.train, ArraySplit):
        backends.require_tensorflow("train_data (a tf.data.Dataset for the model fn)",
                                    "model.fn")
    if wanted and isinstance(splits.train, RayStreamSplit):
        raise UserError("the model fn asks for train_data, and a ray.data.Dataset streams "
                        "each worker only its share, once per epoch", where="model.fn",
                        hint="adapt preprocessing in the data pipeline (ray.data "
                             "preprocessors), or pass the statistics in model.kwargs")
    return {TRAIN_DATA_PARAMETER: splits.train.dataset.batch(256)} if wanted else {}


def _join_group(run: RunConfig, session: Session, model: keras.Model, flags) -> str:
    """Average gradients (and ``flags``) over the workers, and start every worker from rank
    0's state; on JAX the train step reduces the gradients, and every worker built the same
    state from the same seed (or checkpoint)."""
    communicator = session.communicator
    if communicator.reduces_gradients:
        from ktrain.collectives import broadcast_variables, distribute_optimizer

        distribute_optimizer(model.optimizer, communicator, flags=flags,
                             compression=run.strategy.compression,
                             bucket_bytes=run.strategy.bucket_bytes)
        model.jit_compile = False  # numpy_function, Horovod and collective ops are not XLA ops
    mark(session.rank, "arrived")
    if communicator.reduces_gradients:
        broadcast_variables(model.variables + list(model.optimizer.variables), communicator)
    else:
        communicator.barrier()
    mark(session.rank, "joined")
    return (f"rank {session.rank} of {session.world_size} joined "
            f"({communicator.name}, host {socket.gethostname()}, pid {os.getpid()}, "
            f"{', '.join(session.devices)})")


def _check_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise UserError(f"the model fn returned a {type(model).__name__}, not a keras.Model",
                        where="model.fn", hint="return the model object, e.g. "
                                               "`return keras.Sequential([...])`")


def compile_from_config(model: keras.Model, train: TrainSpec) -> None:
    """Compile an uncompiled model with the optimizer, loss and metrics of the config."""
    if train.loss is None:
        raise UserError("the model fn returned an uncompiled model and train.loss is not set",
                        where="train.loss", hint="set train.loss (e.g. "
                        "sparse_categorical_crossentropy), or compile the model in your fn")
    problems = train_option_problems(train)
    if problems:
        raise all_of(problems)
    options = train.optimizer.model_dump()
    optimizer = type(keras.optimizers.get(options.pop("name")))(**options)
    model.compile(optimizer=optimizer, loss=keras.losses.get(train.loss),
                  metrics=list(train.metrics), jit_compile=train.jit_compile)


def train_option_problems(train: TrainSpec) -> list[UserError]:
    """What Keras would reject in train.loss, train.metrics and train.optimizer (names and
    arguments), all of it, without training."""
    problems = []
    if train.loss is not None:
        try:
            keras.losses.get(train.loss)
        except ValueError:
            problems.append(UserError(
                f"unknown loss '{train.loss}'", where="train.loss",
                hint="use a Keras loss name such as sparse_categorical_crossentropy, "
                     "categorical_crossentropy, binary_crossentropy or mse"))
    for metric in train.metrics:
        try:
            keras.metrics.get(metric)
        except ValueError:
            problems.append(UserError(f"unknown metric '{metric}'", where="train.metrics",
                                      hint="use Keras metric names such as accuracy, auc, mae"))
    options = train.optimizer.model_dump()
    name = options.pop("name")
    try:
        kind = type(keras.optimizers.get(name))
    except ValueError:
        return problems + [UserError(f"unknown optimizer '{name}'", where="train.optimizer.name",
                                     hint="use a Keras optimizer name such as adam, sgd, "
                                          "rmsprop or adamw")]
    try:
        kind(**options)
    except (TypeError, ValueError) as err:
        problems.append(UserError(f"cannot create optimizer '{name}': {err}",
                                  where="train.optimizer",
                                  hint=f"check the arguments of keras.optimizers.{kind.__name__}"))
    return problems


def _build(model: keras.Model, splits: Splits) -> None:
    """Create the model's and optimizer's variables, so a checkpoint can be restored into them."""
    if not model.built:
        model(first_features(splits.train))
    model.optimizer.build(model.trainable_variables)


# The train settings that decide the result (not how long, how often or where to report).
_DECISIVE_TRAIN = ("global_batch_size", "shuffle", "shuffle_buffer", "seed", "optimizer", "loss",
                   "metrics", "validation_split", "precision")


def _fingerprint(run: RunConfig, model: keras.Model, splits: Splits) -> dict[str, str]:
    """What decides a run's result, readably: the settings, the model's variables (paths and
    shapes) and the data's size. The strategy and worker count are not in it: a run may resume
    on any number of workers."""
    shapes = json.dumps([(v.path, list(v.shape)) for v in model.variables])
    train = run.train.model_dump(include=set(_DECISIVE_TRAIN))
    return {"model.fn": run.model.fn, "model.kwargs": json.dumps(run.model.kwargs, sort_keys=True),
            "data.fn": str(run.data.fn or run.data.files or run.data.parquet or run.data.table),
            "data.kwargs": json.dumps(run.data.kwargs, sort_keys=True),
            **{f"train.{key}": json.dumps(value, sort_keys=True) for key, value in train.items()},
            "model variables": hashlib.sha256(shapes.encode()).hexdigest()[:16],
            "training examples": str(splits.train.size),
            "validation examples": str(splits.validation.size if splits.validation else 0),
            **({"data.lanes": str(splits.train.source.lanes)}
               if isinstance(splits.train, FileSplit) else {})}


def _starting_state(run: RunConfig, store: CheckpointStore,
                    fingerprint: dict) -> TrainingState | None:
    resume = run.checkpoint.resume
    existing = store.positions()
    if resume == "never":
        if existing:
            raise UserError(
                f"output_dir '{run.output_dir}' already holds checkpoints (the newest "
                f"{existing[-1]}) "
                f"and checkpoint.resume is never", where="checkpoint.resume",
                hint="set checkpoint.resume: auto to continue that run, or choose a new "
                     "output_dir; ktrain never deletes an earlier run")
        return None
    if resume == "auto":
        state = store.load_latest()
        if state is not None and state.fingerprint and state.fingerprint != fingerprint:
            _refuse_to_mix(run, store, state.fingerprint, fingerprint)
        return state
    return load_checkpoint_url(resume)


def _refuse_to_mix(run: RunConfig, store: CheckpointStore, saved: dict, now: dict):
    """A re-run into an output_dir whose run was different: resuming would mix the two."""
    differences = "; ".join(
        f"{key} {saved.get(key, '?')[:40]} -> {now.get(key, '?')[:40]}"
        if key not in ("model variables",) else f"{key} (paths or shapes) changed"
        for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key))
    newest = store.file_for(store.positions()[-1])
    raise UserError(
        f"output_dir '{run.output_dir}' holds a run that differs from this one "
        f"({differences}); resuming it would mix two runs", where="checkpoint.resume",
        hint=f"choose a new output_dir to start fresh (ktrain never deletes a run), or, to "
             f"continue the old run with these settings anyway, set checkpoint.resume: {newest}")


def _capture(model: keras.Model, position: Position, history: list[dict],
             callbacks: dict, global_batch_size: int, fingerprint: dict) -> TrainingState:
    return TrainingState(fingerprint=fingerprint, 
        epoch=position.epoch, step=position.step,
        model_variables=[np.asarray(v.numpy()) for v in model.variables],
        optimizer_variables=[np.asarray(v.numpy()) for v in model.optimizer.variables],
        history=list(history), variable_paths=[v.path for v in model.variables],
        callbacks=callbacks, global_batch_size=global_batch_size)


def _restore(model: keras.Model, state: TrainingState) -> None:
    variables = model.variables
    shapes = [tuple(v.shape) for v in variables]
    saved = [a.shape for a in state.model_variables]
    if shapes != saved:
        raise UserError(
            f"the checkpoint (epoch {state.epoch}) does not fit this model: it holds "
            f"{len(saved)} variables, the model has {len(shapes)}"
            + _first_mismatch(state.variable_paths, saved, variables),
            where="checkpoint.resume",
            hint="resume with the model that wrote it, or start in a new output_dir")
    for variable, value in zip(variables, state.model_variables):
        variable.assign(value)
    optimizer_variables = model.optimizer.variables
    if len(optimizer_variables) != len(state.optimizer_variables):
        raise UserError(
            f"the checkpoint's optimizer state ({len(state.optimizer_variables)} variables) does "
            f"not fit this optimizer ({len(optimizer_variables)})", where="checkpoint.resume",
            hint="resume with the optimizer that wrote it, or start in a new output_dir")
    for variable, value in zip(optimizer_variables, state.optimizer_variables):
        variable.assign(value)


def _first_mismatch(paths, saved, variables) -> str:
    for i, (variable, shape) in enumerate(zip(variables, saved)):
        if tuple(variable.shape) != shape:
            name = paths[i] if i < len(paths) else f"#{i}"
            return f"; first difference: {name} {shape} vs {variable.path} {tuple(variable.shape)}"
    return ""


class _RunRecorder(keras.callbacks.Callback):
    """Per epoch: record history, write metrics.csv and the log, and print."""

    def __init__(self, run: RunConfig, output: RunOutput, history: list[dict]):
        super().__init__()
        self.run, self.output, self.history = run, output, history
        self.first_step_done: float | None = None
        self.first_step_unix_time: float | None = None
        self.steps = 0
        self._epoch_started = 0.0
        self._steps_before = 0
        self._config_written = False

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.first_step_done is None:
            self.first_step_done = time.perf_counter()
            self.first_step_unix_time = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.perf_counter()
        self._steps_before = self.steps

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        seconds = time.perf_counter() - self._epoch_started
        samples = (self.steps - self._steps_before) * self.run.train.global_batch_size
        row = {"epoch": done, **{k: float(v) for k, v in (logs or {}).items()},
               "epoch_seconds": round(seconds, 3),
               "samples_per_second": round(samples / seconds, 2) if seconds else 0.0}
        self.history.append(row)
        if not self._config_written:  # only once training works: a failing run changes nothing
            self.output.write_config(self.run.dump_yaml())
            self._config_written = True
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in _metrics_of(row).items())
        self.output.say(f"epoch {done}/{self.run.train.epochs}  {metrics}  ({seconds:.1f}s)")
        self.output.write_metrics(self.history)
        self.output.flush_log()




class ShardsBroken(WorkersFailed):
    """data.audit found that the workers did not read the epoch's examples once each."""


class _AuditShards(keras.callbacks.Callback):
    """data.audit, at each epoch's end. Every rank finds the same problem; rank 0 reports it
    (the others fail on the next collective once it is gone, after it)."""

    def __init__(self, audit: ShardAudit, session: Session):
        super().__init__()
        self.audit, self.session = audit, session

    def on_epoch_end(self, epoch, logs=None):
        problem = self.audit.problem(epoch, lambda values: _summed(self.session, values))
        if not problem:
            console.debug(f"data.audit: epoch {epoch + 1}'s shards are disjoint and complete")
        elif self.session.is_chief:
            raise ShardsBroken(
                f"data.audit: {problem}", hint="ktrain's own lanes never overlap: look for code "
                "that changes how the data is shared (a data fn, a map fn, a patched "
                "ktrain.sources); the run stops before checkpointing this epoch")


class _StopNow(Exception):
    """Raised out of ``fit`` once the checkpoint at ``position`` is taken."""

    def __init__(self, position: Position):
        super().__init__(str(position))
        self.position = position


class _Checkpoints(keras.callbacks.Callback):
    """Checkpoints at epoch ends, every ``every_steps`` global batches and every
    ``every_minutes``; and the stop on a signal, at the step every rank agreed on.

    Goes after the stateful callbacks: its ``on_train_begin`` gives them back their state."""

    def __init__(self, run: RunConfig, store: CheckpointStore, history: list[dict],
                 steps_per_epoch: int, stop: StopRequest, flags,
                 callbacks: list[keras.callbacks.Callback], saved_callbacks: dict,
                 fingerprint: dict):
        super().__init__()
        self.stateful = [c for c in callbacks if type(c) in _CALLBACK_STATE]
        self.run, self.store, self.history = run, store, history
        self.steps_per_epoch, self.stop, self.flags = steps_per_epoch, stop, flags
        self.callback_state = dict(saved_callbacks)
        self.fingerprint = fingerprint
        self.first_step = 0
        """Global batches of the current epoch done before this fit call (a resumed epoch)."""
        self._epoch = 0
        self._last_saved = time.monotonic()
        self._stop_at_epoch_end = False

    def on_train_begin(self, logs=None):
        for callback in self.stateful:
            for name, value in self.callback_state.get(type(callback).__name__, {}).items():
                setattr(callback, name, value)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.first_step + batch + 1
        if self._stop_requested():
            if step < self.steps_per_epoch:
                self._save(Position(self._epoch, step), background=False)
                raise _StopNow(Position(self._epoch, step))
            self._stop_at_epoch_end = True  # the last step: finish the epoch, then stop
        if step >= self.steps_per_epoch:
            return  # the epoch's end checkpoints this position
        every = self.run.checkpoint
        if (every.every_steps and (self._epoch * self.steps_per_epoch + step) % every.every_steps
                == 0) or (every.every_minutes and
                          time.monotonic() - self._last_saved >= every.every_minutes * 60):
            self._save(Position(self._epoch, step))

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if (done % self.run.checkpoint.every_epochs == 0 or done == self.run.train.epochs
                or self.model.stop_training or self._stop_at_epoch_end):
            self._save(Position(done, 0))
        if self._stop_at_epoch_end:
            raise _StopNow(Position(done, 0))

    def _stop_requested(self) -> bool:
        if self.flags is not None:  # every rank learns it after the same step
            agreed = self.flags.agreed()  # one flag per stop signal
            if agreed:  # every rank names the same signal, received or not
                self.stop.received = self.stop.signals[agreed[0]]
            return bool(agreed)
        return self.stop.received is not None

    def _save(self, position: Position, background: bool = True) -> None:
        self.callback_state = {type(c).__name__: {name: _plain(getattr(c, name))
                                                  for name in _CALLBACK_STATE[type(c)]}
                               for c in self.stateful}
        started = time.perf_counter()
        self.store.save(_capture(self.model, position, self.history, self.callback_state,
                                 self.run.train.global_batch_size, self.fingerprint),
                        background=background)
        self._last_saved = time.monotonic()
        console.debug(f"checkpoint {position} captured in {time.perf_counter() - started:.2f}s")


def _plain(value):
    """A callback attribute as JSON can hold it (numpy scalars become Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value


def _fit(run: RunConfig, session: Session, model: keras.Model, splits: Splits,
         output: RunOutput, store: CheckpointStore, state: TrainingState | None,
         flags, fingerprint: dict) -> RunResult:
    train = run.train
    start = state.position if state else Position(0)
    history = list(state.history) if state else []
    if state:
        _check_resumable(state, train)
        output.say(f"resuming from the checkpoint {start}")
    early_stopped = (state.callbacks.get("EarlyStopping", {}).get("stopped_epoch", 0)
                     if state else 0)
    if (start.epoch >= train.epochs or early_stopped) and output.has_model():
        return _nothing_to_train(output, start, train.epochs, early_stopped)
    partitioned = splits.partition_steps is not None
    communicator = session.communicator
    validation, validation_share = evaluation_batches(
        splits.validation, global_batch_size=train.global_batch_size, rank=session.rank,
        world_size=session.world_size, partitioned=partitioned,
        common_share=even_share(session)) if splits.validation else (None, 0)
    phases = [] if early_stopped else _phases(start, train.epochs)
    steps = steps_per_epoch(splits.train, train.global_batch_size, splits.partition_steps)
    stop = StopRequest(run.checkpoint.stop_signals)
    recorder = _RunRecorder(run, output, history)
    optional = _optional_callbacks(run, session, steps)
    checkpoints = _Checkpoints(run, store, history, steps, stop, flags, optional,
                               state.callbacks if state else {}, fingerprint)
    tracker = None
    if run.mlflow and session.is_chief:
        from ktrain.tracking import MlflowRun

        tracker = MlflowRun(run, output, output.say)
    audit = ShardAudit(splits.train, session.rank, session.world_size) if run.data.audit \
        else None
    callbacks = _callbacks_in_order(session, recorder, tracker, history, optional, checkpoints,
                                    audit, steps * train.global_batch_size // session.world_size,
                                    validation_share)
    fit_started = time.perf_counter()
    arrivals = flags.arrived if flags else (lambda: recorder.steps)

    def raise_flag(received) -> None:  # every rank learns of the stop after the same step
        if flags is not None:
            flags.raise_flag(stop.signals.index(received))

    with tracker.ending_on_failure() if tracker else contextlib.nullcontext():
        try:
            with stop.listening(on_signal=raise_flag), \
                    stop.following_requests(raise_flag, follow=session.is_chief), \
                    watching_for_stalls(session, getattr(run.strategy, "stall_timeout", None),
                                        arrivals, output,
                                        getattr(run.strategy, "network_interface", None)):
                for first_epoch, end_epoch, first_step in phases:
                    batches, _ = training_batches(
                        splits.train, global_batch_size=train.global_batch_size,
                        rank=session.rank, world_size=session.world_size, shuffle=train.shuffle,
                        shuffle_buffer=train.shuffle_buffer, seed=train.seed,
                        first_epoch=first_epoch, epochs=end_epoch, first_step=first_step,
                        partition_steps=splits.partition_steps, audit=audit)
                    if flags is not None and not communicator.reduces_gradients:
                        batches = flags.counting(batches)
                    checkpoints.first_step = first_step
                    _fit_phase(run, session, model, store, batches, first_epoch, end_epoch,
                               steps - first_step, validation, callbacks)
                    if model.stop_training:  # early stopping
                        break
        except _StopNow as stopped:
            raise _stopped(run, session, store, stop, stopped.position) from None
    fit_ended = time.perf_counter()
    store.wait()
    early_stopping = _early_stopping_report(model, optional, output)
    if communicator is not None and communicator.reduces_gradients:
        from ktrain.collectives import undistribute

        undistribute(model.optimizer)
    summary = {**_summary(run, session, recorder, history, start.epoch, fit_started, fit_ended,
                          output.save_model(model)),
               "early_stopping": early_stopping,
               "peak_memory_mib": _peak_memory_by_rank(session),
               **_audit_report(audit, output)}
    output.write_summary(summary)
    if session.is_chief:
        summary = _after_training(run, output, summary, tracker)
    output.flush_log()
    return RunResult(summary, model)


def _nothing_to_train(output: RunOutput, start: Position, epochs: int,
                      early_stopped: int) -> RunResult:
    """A re-run of a finished run: it says where the model is and changes nothing."""
    reason = (f"early stopping ended this run after epoch {start.epoch}" if early_stopped
              else f"all {epochs} epochs are done")
    output.say(f"nothing to train: {reason}; the model is {output.url}/model.keras "
               f"(raise train.epochs to train on, or use a new output_dir)")
    output.flush_log()
    return RunResult(output.update_summary(epochs_this_run=0, nothing_to_train=reason))


def _callbacks_in_order(session: Session, recorder: _RunRecorder, tracker, history: list[dict],
                        optional: list, checkpoints: _Checkpoints, audit: ShardAudit | None,
                        train_share: int, validation_share: int) -> list:
    """Global metrics first, so that every later callback sees the same numbers on every rank;
    the shard audit before any checkpoint takes the epoch; checkpoints last."""
    callbacks = [recorder, *([tracker.callback(history)] if tracker else []), *optional,
                 checkpoints]
    if audit:
        callbacks.insert(0, _AuditShards(audit, session))
    if session.communicator is not None and session.communicator.reduces_gradients:
        from ktrain.collectives import GlobalMetrics

        callbacks.insert(0, GlobalMetrics(session.communicator, train_share, validation_share))
    return callbacks


def _stopped(run: RunConfig, session: Session, store: CheckpointStore, stop: StopRequest,
             position: Position) -> UserError:
    """The error a stop request ends the run with, once its checkpoint is committed."""
    store.wait()
    if session.communicator is not None:
        session.communicator.barrier()  # no rank exits before the chief committed
    requeued = None
    if run.checkpoint.requeue and stop.received == REQUEUE_SIGNAL and session.is_chief:
        requeued = requeue_slurm_job()
    error = stop.stopped(str(position), requeued)
    if not session.is_chief:  # rank 0 tells the user; the others say it in their logs
        console.info(error.render())
        error.shown = True
    if is_supervised():  # ktrain's launcher, a Spark task or a Ray actor reports the stop
        error.exit_code = 0  # so that mpirun or horovodrun do not call it a crash
    return error


def _audit_report(audit: ShardAudit | None, output: RunOutput) -> dict:
    if not audit:
        return {}
    output.say(f"data.audit: in each of {audit.epochs_checked} epoch(s) the workers read "
               f"every example once")
    return {"data_audit": {"epochs_checked": audit.epochs_checked}}


def _after_training(run: RunConfig, output: RunOutput, summary: dict,
                    tracker) -> dict:
    """The chief's exports, report and MLflow artifacts. The run is complete by now, so a
    failure here is a warning that says how to retry, never the run's failure."""
    if run.export:
        from ktrain.exports import export_after_run

        export_after_run(output.url, run.export, output.say)
    fields = {}
    if run.report:
        try:
            from ktrain.report import write_report

            fields["report"] = write_report([output.url])
        except Exception as err:
            output.say(f"warning: the report was not drawn: {err} (`ktrain report "
                       f"{output.url}` tries again)")
    if tracker:
        fields["mlflow"] = {"tracking_uri": run.mlflow.tracking_uri, "run_id": tracker.run_id}
    summary = output.update_summary(**fields)
    if tracker:
        try:
            tracker.finish(summary)
        except Exception as err:
            output.say(f"warning: MLflow did not take the run's files and figures: {err}")
    return summary


def _summed(session: Session, values: np.ndarray) -> np.ndarray:
    """``values`` added up over the ranks (as float64; every rank calls this)."""
    return values if session.communicator is None else session.communicator.sum_host(values)


def _peak_memory_by_rank(session: Session) -> list[float]:
    """Each rank's peak resident memory so far, in MiB (every rank calls this)."""
    mine = np.zeros(session.world_size)
    mine[session.rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    return [round(float(m), 1) for m in _summed(session, mine)]


def _early_stopping_report(model: keras.Model, callbacks: list, output: RunOutput) -> dict | None:
    """When early stopping ended the run (said to the user), and which epoch's weights the
    model holds; None when it did not."""
    stopper = next((c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)), None)
    if not (model.stop_training and stopper):
        return None
    stopped, best = stopper.stopped_epoch + 1, stopper.best_epoch + 1
    restored = stopper.restore_best_weights and stopper.best_weights is not None
    output.say(f"early stopping ended the run after epoch {stopped}: {stopper.monitor} has not "
               f"improved for {stopper.patience} epoch(s) since epoch {best} "
               f"({stopper.monitor} {float(stopper.best):.4f}); the model holds "
               + (f"epoch {best}'s weights (restore_best_weights)" if restored
                  else f"epoch {stopped}'s weights (set restore_best_weights for the best)"))
    return {"stopped_after_epoch": stopped, "best_epoch": best, "monitor": stopper.monitor,
            "best_value": float(stopper.best), "weights_of_epoch": best if restored else stopped}


def _phases(start: Position, epochs: int) -> list[tuple[int, int, int]]:
    """The ``fit`` calls from ``start`` to the end, as (first epoch, end epoch, global batches
    of the first already done): a resumed epoch's remaining steps are a call of their own."""
    phases = [(start.epoch, start.epoch + 1, start.step)] if start.step else []
    rest = start.epoch + bool(start.step)
    return phases + ([(rest, epochs, 0)] if rest < epochs else [])


def _check_resumable(state: TrainingState, train: TrainSpec) -> None:
    if state.step and state.global_batch_size not in (None, train.global_batch_size):
        raise UserError(
            f"the checkpoint stands {state.position}, counted in global batches of "
            f"{state.global_batch_size}; train.global_batch_size is now "
            f"{train.global_batch_size}", where="train.global_batch_size",
            hint=f"resume with global_batch_size {state.global_batch_size}, or from a "
                 f"checkpoint taken at an epoch's end (checkpoint.resume: <its path>)")


def _fit_phase(run, session, model, store, batches, first_epoch, end_epoch, steps, validation,
               callbacks) -> None:
    """``model.fit`` over epochs [first_epoch, end_epoch) of ``steps`` steps each, with
    ktrain's failure messages."""
    try:
        with session.scope():
            model.fit(batches, epochs=end_epoch, initial_epoch=first_epoch,
                      steps_per_epoch=steps, validation_data=validation or None,
                      validation_freq=run.train.validation_freq, shuffle=False,
                      callbacks=callbacks,
                      verbose=1 if console.verbosity() >= console.VERBOSE else 0)
    except _MISFIT as err:
        raise TrainingFailed(
            f"training failed: {type(err).__name__}: {_without_graph_stack(err)}",
            where="model.fit",
            hint="this usually means the model and the data do not fit together (input "
                 "shape, number of classes, label format): check your model and data fns"
        ) from err
    except _OP_ERROR as err:
        if session.communicator is None:
            raise
        raise _peer_lost(session, err, store) from err


def _without_graph_stack(err: Exception) -> str:
    """TensorFlow's message without the Python stack where the failing op was defined (the
    launcher's frames, not the user's) and the op names around it."""
    message = err.message if tf and isinstance(err, tf.errors.OpError) else str(err)
    kept = [line.strip() for line in message.splitlines()
            if line.strip() and not line.startswith("  File ") and not line.lstrip().startswith("[[")
            and line.strip() not in ("Graph execution error:",)
            and not line.startswith("Detected at node")]
    return re.sub(r"\s*\[Op:[^\]]*\]", "", " ".join(kept)).strip()


def _peer_lost(session: Session, err: Exception, store: CheckpointStore) -> WorkersFailed:
    """A collective failed mid-training: almost always another rank died. Say so, once."""
    store.wait()
    message = first_line(err)
    peer = re.search(r"/task:(\d+)", str(err))
    lost = f"rank {peer.group(1)}" if peer and int(peer.group(1)) != session.rank else "a peer"
    saved = store.positions()
    resume = f" ({saved[-1]})" if saved else ""
    return WorkersFailed(
        f"rank {session.rank} lost contact with {lost} during training, so the group is "
        f"stopping ({type(err).__name__}: {message})",
        hint=f"see the other ranks' output for the first failure; re-run the same command to "
             f"resume from the newest checkpoint{resume}")


class _ScaledLearningRate(keras.callbacks.Callback):
    """Scale the learning rate by ``factor``, ramping up linearly over ``warmup_epochs``
    (counted in the optimizer's steps, so a resumed run ramps exactly as an unbroken one)."""

    def __init__(self, factor: float, warmup_epochs: int, steps_per_epoch: int):
        super().__init__()
        self.factor, self.warmup_steps = factor, warmup_epochs * steps_per_epoch
        self.base: float | None = None
        self._ramping = True

    def on_train_begin(self, logs=None):
        if not isinstance(self.model.optimizer.learning_rate,
                          (keras.Variable, *((tf.Variable,) if tf else ()))):
            raise UserError("strategy.lr_scaling needs a constant learning rate, not a schedule",
                            where="strategy.lr_scaling", hint="set lr_scaling: off")
        if self.base is None:  # fit may be called again (a resumed epoch, then the rest)
            self.base = float(self.model.optimizer.learning_rate.numpy())
        self._ramping = True

    def on_train_batch_begin(self, batch, logs=None):
        if not self._ramping:
            return
        done = int(self.model.optimizer.iterations.numpy())
        progress = min(1.0, done / self.warmup_steps) if self.warmup_steps else 1.0
        self.model.optimizer.learning_rate.assign(self.base * (1 + (self.factor - 1) * progress))
        self._ramping = progress < 1.0


# The state of callbacks that decides a run's outcome, carried across fit calls and restarts
# (their on_train_begin resets it; the learning rate a checkpoint holds is already scaled).
_CALLBACK_STATE = {keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch", "stopped_epoch"),
                   keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
                   keras.callbacks.ModelCheckpoint: ("best",),
                   _ScaledLearningRate: ("base",)}


def _optional_callbacks(run: RunConfig, session: Session,
                        steps: int) -> list[keras.callbacks.Callback]:
    callbacks = []
    scaling = getattr(run.strategy, "lr_scaling", "off")
    if scaling != "off" and session.world_size > 1:
        factor = session.world_size if scaling == "linear" else session.world_size ** 0.5
        callbacks.append(_ScaledLearningRate(factor, run.strategy.warmup_epochs, steps))
    if run.train.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(**run.train.early_stopping.model_dump()))
    if run.train.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=f"{run.output_dir}/logs/tensorboard"))
    if run.train.callbacks:
        callbacks += _user_callbacks(run, session)
    return callbacks


# Callbacks that write files: on rank 0 only, so that ranks do not overwrite each other.
_CHIEF_ONLY = (keras.callbacks.ModelCheckpoint, keras.callbacks.CSVLogger,
               keras.callbacks.TensorBoard)


def _user_callbacks(run: RunConfig, session: Session) -> list[keras.callbacks.Callback]:
    """The callbacks the user's ``train.callbacks`` fn returns; they see global metrics."""
    spec = run.train.callbacks
    made = call_user(load_function(spec.fn, "train.callbacks.fn", run.base_dir), spec.kwargs,
                     "train.callbacks.fn")
    made = list(made) if isinstance(made, (list, tuple)) else made
    if not isinstance(made, list) or not all(isinstance(c, keras.callbacks.Callback)
                                             for c in made):
        raise UserError(f"the callbacks fn returned {made!r:.80}, not a list of Keras callbacks",
                        where="train.callbacks.fn",
                        hint="return a list, e.g. [keras.callbacks.ReduceLROnPlateau(patience=2)]")
    if any(isinstance(c, keras.callbacks.BackupAndRestore) for c in made):
        raise UserError("BackupAndRestore would fight ktrain's own checkpoints",
                        where="train.callbacks.fn",
                        hint="remove it: ktrain checkpoints (checkpoint.every_epochs, "
                             "every_steps, every_minutes) and resumes by itself")
    return [c for c in made if session.is_chief or not isinstance(c, _CHIEF_ONLY)]


def _metrics_of(row: dict) -> dict:
    """A metrics.csv row's metrics: without the epoch's number and timing."""
    return {k: v for k, v in row.items() if k != "epoch" and k not in TIMING}


def _summary(run, session, recorder, history, first_epoch, fit_started, fit_ended,
             model_path) -> dict:
    train = run.train
    steps = recorder.steps
    if steps > 1 and recorder.first_step_done is not None:
        per_second = (steps - 1) * train.global_batch_size / (fit_ended - recorder.first_step_done)
    elif steps:
        per_second = steps * train.global_batch_size / (fit_ended - fit_started)
    else:
        per_second = 0.0
    first_step = (recorder.first_step_done - fit_started) if recorder.first_step_done else None
    return {
        "strategy": run.strategy.name,
        "backend": keras.backend.backend(),
        "world_size": session.world_size,
        "num_replicas": session.num_replicas,
        "transport": session.communicator.name if session.communicator else None,
        "devices": list(session.devices),
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "epochs_this_run": (history[-1]["epoch"] - first_epoch) if history else 0,
        "resumed_from_epoch": first_epoch or None,
        "final_metrics": _metrics_of(history[-1]) if history else {},
        "samples_per_second": round(per_second, 2),
        "time_to_first_step_seconds": round(first_step, 3) if first_step else None,
        "seconds_to_first_step_since_start": (
            round(recorder.first_step_done - STARTED_AT, 3) if first_step else None),
        "first_step_unix_time": recorder.first_step_unix_time,
        "wall_seconds": round(time.perf_counter() - STARTED_AT, 3),
        "model_path": model_path,
    }
