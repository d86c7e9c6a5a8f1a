"""The user's model and data, assembled in a worker's session: the data fn's (or files')
splits, the model fn's model compiled from the config and built, so that a checkpoint can be
restored into it. Training (ktrain.worker) and ``ktrain export --checkpoint`` both start here."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os

import keras

from ktrain import backends, console
from ktrain.checkpoint import TrainingState
from ktrain.config import RunConfig, TrainSpec
from ktrain.data import (ArraySplit, RayStreamSplit, Splits, first_batch, first_features,
                         partition_splits, ray_stream_splits, to_splits)
from ktrain.environment import PARTITION_ENV
from ktrain.errors import UserError, all_of, first_line
from ktrain.optimizers import optimizers_of
from ktrain.ray_data import is_ray_dataset
from ktrain.resume import restore
from ktrain.session import Session
from ktrain.sources import Files, FileSplit
from ktrain.userfn import call_user, load_function


def model_and_data(run: RunConfig, session: Session) -> tuple[keras.Model, Splits]:
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
        else:
            _note_compile_options_unused(run.train)
        _build(model, splits)
    _check_devices_can_split(splits, session)
    return model, splits


def _check_devices_can_split(splits: Splits, session: Session) -> None:
    """TensorFlow's MirroredStrategy cannot split string features over several devices of one
    process (its AddN has no string kernel): refused before training, with what works."""
    if session.num_replicas < 2 or session.communicator is not None or \
            backends.current() != "tensorflow":
        return
    if any(_is_text(x) for x in keras.tree.flatten(first_features(splits.train))):
        raise UserError(
            f"the data's features include strings, which TensorFlow's MirroredStrategy cannot "
            f"split over {session.num_replicas} devices of one process", where="strategy.devices",
            hint="turn the strings into numbers in the data fn (map the dataset through the "
                 "adapted TextVectorization layer), train on one device (devices: 1), or use "
                 "strategy.name: multiworker (a process per device), which takes strings")


def _is_text(value) -> bool:
    dtype = getattr(value, "dtype", None)
    return getattr(dtype, "kind", "") in ("U", "S", "O") or getattr(dtype, "name", "") == "string"


def checkpoint_model(run: RunConfig, state: TrainingState) -> keras.Model:
    """The run's model holding a checkpoint's weights, made as one process would make it
    (``ktrain export --checkpoint``)."""
    if run.data.read_by_spark:
        raise UserError("the run's data is read by Spark, and exporting a checkpoint remakes "
                        "the model in this process", where="ktrain export --checkpoint",
                        hint="export the run's model.keras (what a finished run leaves)")
    model, _ = model_and_data(run, Session(rank=0, world_size=1, num_replicas=1))
    restore(model, state)
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
    fewest, most = getattr(run.strategy, "size_range", (1, 1))
    for size in sorted({session.world_size, *range(fewest, most + 1)}):  # each it may train at
        splits.train.check_workers(size, "strategy.workers")
    stopping = run.train.early_stopping
    if stopping and stopping.monitor.startswith("val_") and splits.validation is None:
        raise UserError(f"train.early_stopping watches {stopping.monitor}, and this run has no "
                        f"validation data, so it would never stop the run",
                        where="train.early_stopping.monitor",
                        hint="give validation data (train.validation_split, a 'validation' "
                             "split from the data fn, or data.validation_files), or watch a "
                             "training metric such as loss")
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


def _check_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise UserError(f"the model fn returned a {type(model).__name__}, not a keras.Model",
                        where="model.fn", hint="return the model object, e.g. "
                                               "`return keras.Sequential([...])`")


_COMPILE_OPTIONS = ("optimizer", "loss", "metrics", "jit_compile")


def _note_compile_options_unused(train: TrainSpec) -> None:
    """The config's compile options do nothing for a model its fn compiled: said, not ignored."""
    unused = [f"train.{key}" for key in _COMPILE_OPTIONS
              if getattr(train, key) != TrainSpec.model_fields[key].default]
    if unused:
        console.note(f"the model fn returned a compiled model, so {', '.join(unused)} "
                     f"{'is' if len(unused) == 1 else 'are'} not used (the model's own compile "
                     f"settings are); remove {'it' if len(unused) == 1 else 'them'}, or return "
                     f"the model uncompiled")


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
    """Create the variables of the model and of every optimizer it updates with, so that a
    checkpoint can be restored into them and every rank starts from the same ones: by calling
    the model on the training features, and where that cannot make them all (a GAN: call()
    takes latent vectors, and its optimizers build on their first update), by tracing a train
    step, as Keras' first step would, without taking it."""
    call_failed = None
    if not model.built:
        try:
            model(first_features(splits.train))
        except Exception as err:  # noqa: BLE001 - whatever the user's call() raises
            call_failed = err
    unbuilt = [name for name, optimizer in optimizers_of(model).items()
               if not optimizer.built and optimizer is not model.optimizer]
    own_step = type(model).train_step is not keras.Model.train_step
    if call_failed is not None or unbuilt or (own_step and backends.current() == "tensorflow"):
        _trace_train_step(model, splits, call_failed, unbuilt)
    if call_failed is None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _trace_train_step(model: keras.Model, splits: Splits, call_failed: Exception | None,
                      unbuilt: list[str]) -> None:
    """TensorFlow traces ``model.train_step`` into a graph on the data's structure, which
    builds the layers it calls; an unbuilt optimizer's ``apply`` meanwhile only notes the
    variables it was given, and each is built with them afterwards, outside the graph (a
    MirroredStrategy cannot lift optimizer state created inside one). An optimizer the step
    applies that the model does not hold is refused. The graph never runs."""
    tf = backends.optional_tensorflow()
    if tf is None or backends.current() != "tensorflow":
        raise _cannot_build(call_failed) if call_failed is not None else UserError(
            f"the model's optimizer(s) {', '.join(unbuilt)} have no state before the first "
            f"step, and on {backends.current()} ktrain cannot create it by tracing a step",
            where="model.fn", hint="build them in the model fn, e.g. "
                                   "`d_optimizer.build(discriminator.trainable_variables)`")
    spec = tf.nest.map_structure(
        lambda t: tf.TensorSpec((None, *t.shape[1:]), t.dtype),
        tf.nest.map_structure(tf.convert_to_tensor, first_batch(splits.train)))
    strategy = tf.distribute.get_strategy()
    with _noting_applies() as applied:
        try:
            tf.function(lambda data: strategy.run(model.train_step, args=(data,))
                        ).get_concrete_function(spec)
        except Exception as err:  # noqa: BLE001 - whatever the user's train_step raises
            if call_failed is not None:
                raise _cannot_build(call_failed) from None
            raise UserError(
                f"the model's train_step fails on the training data's structure "
                f"({type(err).__name__}: {first_line(err)})", where="model.fn",
                hint="ktrain traces it before training to create every variable it needs; "
                     "`model.fit` on a batch of the data fn's output shows the same error "
                     "with its whole stack") from None
    held = [o for optimizer in optimizers_of(model).values()
            for o in (optimizer, getattr(optimizer, "inner_optimizer", None))]
    strangers = [o for o in applied if all(o is not h for h in held)]
    if strangers:
        raise UserError(
            f"the model's train_step applies optimizer(s) the model does not hold "
            f"({', '.join(f'{o.name!r} ({type(o).__name__})' for o in strangers)}): ktrain "
            f"could neither average their gradients across workers nor keep their state in "
            f"checkpoints", where="model.fn",
            hint="keep every optimizer on the model, e.g. `self.d_optimizer = ...` in its "
                 "compile() or __init__()")
    for optimizer, variables in applied.items():
        if not optimizer.built:
            with keras.name_scope(optimizer.name, caller=optimizer):
                optimizer.build(variables)


@contextlib.contextmanager
def _noting_applies():
    """While tracing: every optimizer applied, with the variables it was given (in order);
    an unbuilt one applies nothing, so that it creates no state inside the graph."""
    applied: dict = {}
    holder = next(c for c in keras.optimizers.Optimizer.__mro__ if "apply" in vars(c))
    original = holder.apply

    def apply(optimizer, grads, trainable_variables=None):
        given = applied.setdefault(optimizer, [])
        given += [v for v in trainable_variables or () if all(v is not g for g in given)]
        if optimizer.built:
            return original(optimizer, grads, trainable_variables)

    holder.apply = apply
    try:
        yield applied
    finally:
        holder.apply = original


def _cannot_build(err: Exception) -> UserError:
    return UserError(
        f"the model cannot be called on the training features to create its variables "
        f"({type(err).__name__}: {first_line(err)})", where="model.fn",
        hint="ktrain creates them so, before the first step, to restore a checkpoint and start "
             "every rank alike: make call() take the features the data yields, or build the "
             "model in the model fn (model.build(shape), or call it once on a sample)")
