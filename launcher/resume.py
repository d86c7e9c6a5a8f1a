"""Where a run starts: what decides its result (its fingerprint, kept in every checkpoint),
which checkpoint it resumes from, and a model's state captured into and restored from one."""

from __future__ import annotations

import hashlib
import json

import keras

from ktrain.checkpoint import CheckpointStore, Position, TrainingState, load_checkpoint_url
from ktrain.config import RunConfig, TrainSpec
from ktrain.data import Splits
from ktrain.errors import UserError
from ktrain.optimizers import optimizer_variables
from ktrain.sharding import host_value
from ktrain.sources import FileSplit


# The train settings that decide the result (not how long, how often or where to report).
_DECISIVE_TRAIN = ("global_batch_size", "shuffle", "shuffle_buffer", "seed", "optimizer", "loss",
                   "metrics", "validation_split", "precision")


def run_fingerprint(run: RunConfig, model: keras.Model, splits: Splits) -> dict[str, str]:
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


def starting_state(run: RunConfig, store: CheckpointStore,
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


def check_resumable(state: TrainingState, train: TrainSpec) -> None:
    if state.step and state.global_batch_size not in (None, train.global_batch_size):
        raise UserError(
            f"the checkpoint stands {state.position}, counted in global batches of "
            f"{state.global_batch_size}; train.global_batch_size is now "
            f"{train.global_batch_size}", where="train.global_batch_size",
            hint=f"resume with global_batch_size {state.global_batch_size}, or from a "
                 f"checkpoint taken at an epoch's end (checkpoint.resume: <its path>)")


def fit_phases(start: Position, epochs: int) -> list[tuple[int, int, int]]:
    """The ``fit`` calls from ``start`` to the end, as (first epoch, end epoch, global batches
    of the first already done): a resumed epoch's remaining steps are a call of their own."""
    phases = [(start.epoch, start.epoch + 1, start.step)] if start.step else []
    rest = start.epoch + bool(start.step)
    return phases + ([(rest, epochs, 0)] if rest < epochs else [])


def capture(model: keras.Model, position: Position, history: list[dict],
            **record) -> TrainingState:
    """The model's and its optimizers' state at ``position``, with ``record``'s fields
    (callbacks' state, global batch size, fingerprint, written_by: see TrainingState)."""
    return TrainingState(
        epoch=position.epoch, step=position.step,
        model_variables=[host_value(v) for v in model.variables],
        optimizer_variables=[host_value(v) for v in optimizer_variables(model)],
        history=list(history), variable_paths=[v.path for v in model.variables], **record)


def restore(model: keras.Model, state: TrainingState) -> None:
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
    optimizers = optimizer_variables(model)
    if len(optimizers) != len(state.optimizer_variables):
        raise UserError(
            f"the checkpoint's optimizer state ({len(state.optimizer_variables)} variables) does "
            f"not fit this model's optimizer(s) ({len(optimizers)})", where="checkpoint.resume",
            hint="resume with the optimizer(s) that wrote it, or start in a new output_dir")
    for variable, value in zip(optimizers, state.optimizer_variables):
        variable.assign(value)


def _first_mismatch(paths, saved, variables) -> str:
    for i, (variable, shape) in enumerate(zip(variables, saved)):
        if tuple(variable.shape) != shape:
            name = paths[i] if i < len(paths) else f"#{i}"
            return f"; first difference: {name} {shape} vs {variable.path} {tuple(variable.shape)}"
    return ""
