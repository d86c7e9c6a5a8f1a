"""The one training path every strategy runs in every worker.

Flow: open the strategy's session -> call the user's data and model fns -> check everything ->
only then touch output_dir -> restore the newest checkpoint -> fit -> write model and summary.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ktrain import STARTED_AT, console
from ktrain.checkpoint import CheckpointStore, TrainingState, load_checkpoint_url
from ktrain.collectives import (GlobalMetrics, broadcast_variables, distribute_optimizer,
                                undistribute)
from ktrain.config import RunConfig, TrainSpec
from ktrain.data import (Splits, evaluation_batches, is_ray_dataset, partition_splits,
                         ray_dataset_splits, to_splits, training_batches)
from ktrain.environment import PARTITION_ENV
from ktrain.errors import UserError, WorkersFailed
from ktrain.output import RunOutput
from ktrain.strategies.base import Session, Strategy
from ktrain.supervisor import mark
from ktrain.userfn import call_user, load_function


@dataclass
class RunResult:
    summary: dict
    model: keras.Model | None = None


class TrainingFailed(UserError):
    """The user's model or data failed inside ``fit`` (e.g. a shape mismatch)."""


def run_worker(run: RunConfig, strategy: Strategy) -> RunResult:
    session = strategy.open_session()
    if session.world_size > 1 and session.log_to_file:  # no supervisor sorts our output by rank
        console.share_terminal(session.rank, every_rank=getattr(
            run.strategy, "console_ranks", "chief") == "all")
    model_fn = load_function(run.model.fn, "model.fn", run.base_dir)
    keras.utils.set_random_seed(run.train.seed)
    if run.train.precision != "float32":
        keras.mixed_precision.set_global_policy(run.train.precision)

    splits = _load_data(run, session)
    with session.scope():
        model = call_user(model_fn, run.model.kwargs, "model.fn")
        _check_model(model)
        if not model.compiled:
            compile_from_config(model, run.train)
        _build(model, splits)

    output = RunOutput(run.output_dir, is_chief=session.is_chief, rank=session.rank,
                       keep_log=session.log_to_file)
    store = CheckpointStore(output.checkpoints_url, keep=run.checkpoint.keep,
                            is_chief=session.is_chief)
    state = _starting_state(run, store)
    output.check_writable()
    if state is not None:
        _restore(model, state)
    if session.communicator is not None:
        output.say(_join_group(run, session, model))
    return _fit(run, session, model, splits, output, store, state)


def _load_data(run: RunConfig, session: Session) -> Splits:
    if os.environ.get(PARTITION_ENV):  # a Spark task's own partition
        path, _, steps = os.environ[PARTITION_ENV].rpartition(":")
        return partition_splits(path, int(steps))
    if run.data.fn is None:
        raise UserError("data.parquet and data.table are read by Spark, so they need the spark "
                        "strategy", where="data",
                        hint="use strategy.name: spark, or point data.fn at a function")
    data_fn = load_function(run.data.fn, "data.fn", run.base_dir)
    result = call_user(data_fn, run.data.kwargs, "data.fn")
    if is_ray_dataset(result):
        return ray_dataset_splits(
            result, features=list(run.data.features), label=run.data.label, rank=session.rank,
            world_size=session.world_size, validation_split=run.train.validation_split,
            global_batch_size=run.train.global_batch_size)
    return to_splits(result, run.train.validation_split)


def _join_group(run: RunConfig, session: Session, model: keras.Model) -> str:
    """Average gradients over the workers, and start every worker from rank 0's state."""
    communicator = session.communicator
    distribute_optimizer(model.optimizer, communicator,
                         fp16=getattr(run.strategy, "compression", "none") == "fp16")
    model.jit_compile = False  # numpy_function, Horovod and collective ops are not XLA ops
    mark(session.rank, "arrived")
    broadcast_variables(model.variables + list(model.optimizer.variables), communicator)
    mark(session.rank, "joined")
    return (f"rank {session.rank} of {session.world_size} joined "
            f"({type(communicator).__name__}, host {socket.gethostname()}, pid {os.getpid()}, "
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
    try:
        loss = keras.losses.get(train.loss)
    except ValueError:
        raise UserError(f"unknown loss '{train.loss}'", where="train.loss",
                        hint="use a Keras loss name such as sparse_categorical_crossentropy, "
                             "categorical_crossentropy, binary_crossentropy or mse") from None
    for metric in train.metrics:
        try:
            keras.metrics.get(metric)
        except ValueError:
            raise UserError(f"unknown metric '{metric}'", where="train.metrics",
                            hint="use Keras metric names such as accuracy, auc, mae") from None
    options = train.optimizer.model_dump()
    name = options.pop("name")
    try:
        optimizer = type(keras.optimizers.get(name))(**options)
    except (TypeError, ValueError) as err:
        raise UserError(f"cannot create optimizer '{name}': {err}", where="train.optimizer",
                        hint=f"check the arguments of keras.optimizers.{type(keras.optimizers.get(name)).__name__}") from None
    model.compile(optimizer=optimizer, loss=loss, metrics=list(train.metrics),
                  jit_compile=train.jit_compile)


def _build(model: keras.Model, splits: Splits) -> None:
    """Create the model's and optimizer's variables, so a checkpoint can be restored into them."""
    if not model.built:
        features, _ = next(iter(splits.train.dataset.batch(1)))
        model(features)
    model.optimizer.build(model.trainable_variables)


def _starting_state(run: RunConfig, store: CheckpointStore) -> TrainingState | None:
    resume = run.checkpoint.resume
    existing = store.epochs()
    if resume == "never":
        if existing:
            raise UserError(
                f"output_dir '{run.output_dir}' already holds checkpoints (epochs {existing}) "
                f"and checkpoint.resume is never", where="checkpoint.resume",
                hint="set checkpoint.resume: auto to continue that run, or choose a new "
                     "output_dir; ktrain never deletes an earlier run")
        return None
    if resume == "auto":
        return store.load_latest()
    return load_checkpoint_url(resume)


def _capture(model: keras.Model, epoch: int, history: list[dict]) -> TrainingState:
    return TrainingState(
        epoch=epoch,
        model_variables=[np.asarray(v.numpy()) for v in model.variables],
        optimizer_variables=[np.asarray(v.numpy()) for v in model.optimizer.variables],
        history=list(history),
        variable_paths=[v.path for v in model.variables])


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
    """Per epoch: record history, write metrics.csv and the log, print, and checkpoint."""

    def __init__(self, run: RunConfig, output: RunOutput, store: CheckpointStore,
                 history: list[dict], session: Session):
        super().__init__()
        self.run, self.output, self.store = run, output, store
        self.history, self.session = history, session
        self.first_step_done: float | None = None
        self.first_step_unix_time: float | None = None
        self.steps = 0
        self._epoch_started = 0.0
        self._config_written = False

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.first_step_done is None:
            self.first_step_done = time.perf_counter()
            self.first_step_unix_time = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        row = {"epoch": done, **{k: float(v) for k, v in (logs or {}).items()}}
        self.history.append(row)
        if not self._config_written:  # only once training works: a failing run changes nothing
            self.output.write_config(self.run.dump_yaml())
            self._config_written = True
        seconds = time.perf_counter() - self._epoch_started
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch")
        line = f"epoch {done}/{self.run.train.epochs}  {metrics}  ({seconds:.1f}s)"
        self.output.say(line)
        every = self.run.checkpoint.every_epochs
        if done % every == 0 or done == self.run.train.epochs or self.model.stop_training:
            started = time.perf_counter()
            self.store.save(_capture(self.model, done, self.history), background=True)
            console.debug(f"checkpoint after epoch {done} captured in "
                          f"{time.perf_counter() - started:.2f}s, writing in the background")
        self.output.write_metrics(self.history)
        self.output.flush_log()


def _fit(run: RunConfig, session: Session, model: keras.Model, splits: Splits,
         output: RunOutput, store: CheckpointStore, state: TrainingState | None) -> RunResult:
    train = run.train
    first_epoch = state.epoch if state else 0
    history = list(state.history) if state else []
    if state:
        output.say(f"resuming from the checkpoint after epoch {state.epoch}")
    if first_epoch >= train.epochs:
        output.say(f"all {train.epochs} epochs are already done")
    batches, steps = training_batches(
        splits.train, global_batch_size=train.global_batch_size, rank=session.rank,
        world_size=session.world_size, shuffle=train.shuffle,
        shuffle_buffer=train.shuffle_buffer, seed=train.seed, first_epoch=first_epoch,
        epochs=max(train.epochs, first_epoch), partition_steps=splits.partition_steps)
    partitioned = splits.partition_steps is not None
    validation = splits.validation and evaluation_batches(
        splits.validation, global_batch_size=train.global_batch_size, rank=session.rank,
        world_size=session.world_size, partitioned=partitioned)
    recorder = _RunRecorder(run, output, store, history, session)
    callbacks = [recorder, *_optional_callbacks(run, session, steps)]
    if session.communicator is not None:  # first, so the others see global metrics
        callbacks.insert(0, GlobalMetrics(
            session.communicator, steps * train.global_batch_size // session.world_size,
            _shard_size(splits.validation.size if splits.validation else 0, session,
                        partitioned)))
    fit_started = time.perf_counter()
    if first_epoch < train.epochs:
        try:
            with session.scope():
                model.fit(batches, epochs=train.epochs, initial_epoch=first_epoch,
                          steps_per_epoch=steps, validation_data=validation or None,
                          validation_freq=train.validation_freq, shuffle=False,
                          callbacks=callbacks,
                          verbose=1 if console.verbosity() >= console.VERBOSE else 0)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as err:
            raise TrainingFailed(
                f"training failed: {type(err).__name__}: {err}".rstrip(), where="model.fit",
                hint="this usually means the model and the data do not fit together (input "
                     "shape, number of classes, label format): check your model and data fns"
            ) from err
        except tf.errors.OpError as err:
            if session.communicator is None:
                raise
            raise _peer_lost(session, err, store) from err
    fit_ended = time.perf_counter()
    store.wait()
    undistribute(model.optimizer)
    model_path = output.save_model(model)
    summary = _summary(run, session, recorder, history, first_epoch, fit_started, fit_ended,
                       model_path)
    output.write_summary(summary)
    output.flush_log()
    return RunResult(summary, model)


def _peer_lost(session: Session, err: Exception, store: CheckpointStore) -> WorkersFailed:
    """A collective failed mid-training: almost always another rank died. Say so, once."""
    store.wait()
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    peer = re.search(r"/task:(\d+)", str(err))
    lost = f"rank {peer.group(1)}" if peer and int(peer.group(1)) != session.rank else "a peer"
    saved = store.epochs()
    resume = f" (after epoch {saved[-1]})" if saved else ""
    return WorkersFailed(
        f"rank {session.rank} lost contact with {lost} during training, so the group is "
        f"stopping ({type(err).__name__}: {message})",
        hint=f"see the other ranks' output for the first failure; re-run the same command to "
             f"resume from the newest checkpoint{resume}")


def _shard_size(size: int, session: Session, partitioned: bool) -> int:
    """Examples this worker evaluates: all of its partition, or its interleaved share."""
    return size if partitioned else len(range(session.rank, size, session.world_size))


class _ScaledLearningRate(keras.callbacks.Callback):
    """Scale the learning rate by ``factor``, ramping up linearly over ``warmup_epochs``."""

    def __init__(self, factor: float, warmup_epochs: int, steps_per_epoch: int):
        super().__init__()
        self.factor, self.warmup, self.steps = factor, warmup_epochs, steps_per_epoch
        self.base: float | None = None
        self.epoch = 0

    def on_train_begin(self, logs=None):
        if not isinstance(self.model.optimizer.learning_rate, (tf.Variable, keras.Variable)):
            raise UserError("strategy.lr_scaling needs a constant learning rate, not a schedule",
                            where="strategy.lr_scaling", hint="set lr_scaling: off")
        self.base = float(self.model.optimizer.learning_rate.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        progress = min(1.0, (self.epoch + batch / self.steps) / self.warmup) if self.warmup else 1.0
        if progress < 1.0 or batch == 0:
            self.model.optimizer.learning_rate.assign(self.base * (1 + (self.factor - 1) * progress))


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
    return callbacks


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
        "world_size": session.world_size,
        "num_replicas": session.num_replicas,
        "devices": list(session.devices),
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "epochs_this_run": (history[-1]["epoch"] - first_epoch) if history else 0,
        "resumed_from_epoch": first_epoch or None,
        "final_metrics": {k: v for k, v in (history[-1] if history else {}).items()
                          if k != "epoch"},
        "samples_per_second": round(per_second, 2),
        "time_to_first_step_seconds": round(first_step, 3) if first_step else None,
        "seconds_to_first_step_since_start": (
            round(recorder.first_step_done - STARTED_AT, 3) if first_step else None),
        "first_step_unix_time": recorder.first_step_unix_time,
        "wall_seconds": round(time.perf_counter() - STARTED_AT, 3),
        "model_path": model_path,
    }
