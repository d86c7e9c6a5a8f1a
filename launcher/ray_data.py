"""A ray.data.Dataset that a data fn returns, split in the Ray driver into one streamed share
per worker (``ray_data_shards``) before the workers start; each worker streams its share
through ``ktrain.data.ray_stream_splits``. Light: the driver never loads Keras for it."""

from __future__ import annotations

import dataclasses
from typing import Any

from ktrain import console
from ktrain.config import RunConfig
from ktrain.errors import UserError
from ktrain.userfn import call_user, load_function


def is_ray_dataset(value: Any) -> bool:
    return type(value).__module__.startswith("ray.data")


@dataclasses.dataclass(frozen=True)
class RayShard:
    """One worker's share of a ray.data.Dataset: Ray Data streams it (``streaming_split``),
    so no worker holds the dataset; every share has the same number of rows."""

    train: Any  # ray.data.DataIterator
    train_rows: int
    validation: Any | None
    validation_rows: int
    features: tuple[str, ...]
    label: str
    label_dtype: str


def ray_data_shards(run: RunConfig, workers: int) -> list[RayShard] | None:
    """Call a data fn that names columns (data.features, data.label) here, in the driver; if it
    returns a ray.data.Dataset (or {'train': ..., 'validation': ...} of them), split it into
    one streamed share per worker. Else None: each worker calls the data fn itself."""
    data = run.data
    if data.fn is None or not data.label:
        return None
    with console.tensorflow_loading_quietly():  # the fn's module may import Keras or TensorFlow
        fn = load_function(data.fn, "data.fn", run.base_dir)
    _ray_data_speaks_like_ktrain()
    result = call_user(fn, data.kwargs, "data.fn")
    train, validation = (result.get("train"), result.get("validation")) \
        if isinstance(result, dict) else (result, None)
    if not is_ray_dataset(train):
        return None
    if not data.features:
        raise UserError("the data fn returned a ray.data.Dataset but data.features is not set",
                        where="data.features", hint="name the feature columns, e.g. "
                                                    "features: [x0, x1]")
    columns = train.schema()
    missing = [c for c in [*data.features, data.label] if c not in columns.names]
    if missing:
        raise UserError(f"column(s) {missing} are not in the ray.data.Dataset",
                        where="data.features", hint=f"its columns are: {', '.join(columns.names)}")
    if validation is None and run.train.validation_split:
        # Ray holds the split in its object store (spilling to disk), not in a worker.
        train, validation = train.train_test_split(run.train.validation_split, shuffle=True,
                                                   seed=run.train.seed)
    label_type = columns.types[columns.names.index(data.label)]
    label_dtype = str(label_type.to_pandas_dtype().__name__) if hasattr(
        label_type, "to_pandas_dtype") else "int64"
    trains, train_rows = train.streaming_split(workers, equal=True), train.count()
    validations, validation_rows = ([None] * workers, 0) if validation is None else (
        validation.streaming_split(workers, equal=True), validation.count())
    return [RayShard(trains[r], train_rows // workers, validations[r], validation_rows // workers,
                     tuple(data.features), data.label, label_dtype) for r in range(workers)]


def _ray_data_speaks_like_ktrain() -> None:
    """Below --verbose, no "Starting execution of Dataset ..." lines or progress bars from Ray
    Data. Set before the data fn runs: a dataset keeps a copy of the context it was made in
    (and the data fn may still set its own)."""
    from ray.data import DataContext

    if console.verbosity() < console.VERBOSE:
        context = DataContext.get_current()
        context.print_on_execution_start = False
        context.enable_progress_bars = False
