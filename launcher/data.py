"""Turn whatever the user's data fn returns into the batched pipelines every worker trains on.

Three kinds of split: examples in memory (here), data in files (``ktrain.sources``) and a
worker's own share handed over by its engine (a Spark partition, a Ray Data stream). For the
first two the order of examples is a pure function of (seed, epoch): a resumed run, or a run on
N workers, sees exactly the global batches an uninterrupted single-worker run would see.

tf.data carries the batches wherever TensorFlow is installed, whatever the backend. On JAX
without TensorFlow, arrays in memory are the one kind of data, fed by NumPy (``ArraySplit``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import keras
import numpy as np

from ktrain import backends, console
from ktrain.errors import UserError
from ktrain.sources import Files, FileSplit, PieceRows, ShardAudit

tf = backends.optional_tensorflow()
_EXPECTED = ("(x, y), ((x, y), (x_val, y_val)) as keras.datasets returns, {'train': (x, y), "
             "'validation': (x, y)}, an unbatched tf.data.Dataset of (features, label), or a "
             "dict of such datasets; x may be a list or dict of arrays for several inputs")


@dataclass(frozen=True)
class Split:
    """Examples in memory (arrays, or a tf.data.Dataset the data fn made)."""

    dataset: tf.data.Dataset  # unbatched (features, label) elements
    size: int

    def batches_by_epoch(self, *, first_epoch: int, epochs: int, rank: int, world_size: int,
                         rows: int, batch_size: int, shuffle: bool, shuffle_buffer: int,
                         seed: int) -> Callable[[tf.Tensor], tf.data.Dataset]:
        """For an epoch: this worker's batches. The epoch is shuffled with a seed derived
        from (seed, epoch), then sharded interleaved (worker r takes elements r, r+N, ...)."""
        buffer = min(shuffle_buffer, self.size)

        def batches(epoch):
            data = self.dataset
            if shuffle:
                # The order must depend on (seed, epoch) only, not on TF's global seed, so this
                # function's graph gets its own graph-level seed (never 0, which TF special-cases).
                tf.compat.v1.get_default_graph().seed = seed % (2**31 - 2) + 1
                data = data.shuffle(buffer, seed=epoch, reshuffle_each_iteration=False)
            data = data.shard(world_size, rank) if world_size > 1 else data
            return data.batch(batch_size, drop_remainder=True)

        return batches

    def evaluation_examples(self, rank: int, world_size: int) -> tuple[tf.data.Dataset, int]:
        """This worker's interleaved share, and its size."""
        if world_size == 1:
            return self.dataset, self.size
        return self.dataset.shard(world_size, rank), len(range(rank, self.size, world_size))

    def check_workers(self, world_size: int, where: str) -> None:
        """Any number of workers can share examples in memory."""


@dataclass(frozen=True)
class ArraySplit:
    """Examples in memory as NumPy arrays, fed without TensorFlow (``backend: jax`` where
    it is not installed). Shared as ``Split`` shares them (worker r takes global positions r,
    r+N, ...), but a shuffled epoch is one NumPy permutation drawn from (seed, epoch), so its
    batches differ from those of the same config where tf.data orders them."""

    x: Any
    y: Any
    size: int

    def rows(self, index) -> tuple[Any, Any]:
        return keras.tree.map_structure(lambda a: a[index], (self.x, self.y))

    def part(self, start: int, stop: int) -> ArraySplit:
        return ArraySplit(*self.rows(slice(start, stop)), stop - start)

    def batches(self, *, first_epoch: int, epochs: int, first_step: int, steps: int, rank: int,
                world_size: int, batch_size: int, shuffle: bool, seed: int):
        """This worker's batches of every remaining epoch, one after the other."""
        for epoch in range(first_epoch, epochs):
            order = np.random.default_rng([seed, epoch]).permutation(self.size) if shuffle \
                else np.arange(self.size)
            mine = order[:steps * batch_size * world_size][rank::world_size]
            for step in range(first_step if epoch == first_epoch else 0, steps):
                yield self.rows(mine[step * batch_size:(step + 1) * batch_size])

    def evaluation_examples(self, rank: int, world_size: int) -> tuple[ArraySplit, int]:
        """This worker's interleaved share, and its size."""
        if world_size == 1:
            return self, self.size
        share = ArraySplit(*self.rows(slice(rank, None, world_size)),
                           len(range(rank, self.size, world_size)))
        return share, share.size

    def check_workers(self, world_size: int, where: str) -> None:
        """Any number of workers can share examples in memory."""


class _EvaluationBatches(keras.utils.PyDataset):
    """An ``ArraySplit``'s examples in batches, as often as Keras evaluates them."""

    def __init__(self, split: ArraySplit, batch_size: int):
        super().__init__()
        self.split, self.batch_size = split, batch_size

    def __len__(self) -> int:
        return -(-self.split.size // self.batch_size)

    def __getitem__(self, index: int):
        return self.split.rows(slice(index * self.batch_size, (index + 1) * self.batch_size))


AnySplit = Union[Split, ArraySplit, FileSplit, "RayStreamSplit"]


@dataclass(frozen=True)
class Splits:
    train: AnySplit
    validation: AnySplit | None
    partition_steps: int | None = None
    """Set when this worker was handed its own partition (Spark DataFrame input): the data is
    already this worker's share, and every worker takes this many steps per epoch."""


def partition_splits(folder: str, steps_per_epoch: int, features: list[str],
                     label: str) -> Splits:
    """This worker's own partition, as the spark strategy's task streamed it to Parquet
    (train.parquet, validation.parquet in ``folder``); read in streaming fashion too."""
    def split(name: str) -> FileSplit | None:  # none if the partition held no such rows
        path = f"{folder}/{name}.parquet"
        if not os.path.exists(path):
            return None
        files = FileSplit(Files(path, features=tuple(features), label=label, lanes=1), "data")
        return files if files.size else None

    nothing = (np.zeros((0, len(features)), np.float32), np.zeros(0, np.int64))
    return Splits(split("train") or _to_split(nothing, "data"), split("validation"),
                  steps_per_epoch)


def to_splits(result: Any, validation_split: float, key: str = "data.fn") -> Splits:
    """Validate the data fn's result and wrap it as datasets with known sizes."""
    if isinstance(result, dict):
        unknown = set(result) - {"train", "validation"}
        if "train" not in result or unknown:
            raise UserError(
                f"the data fn returned a dict with keys {sorted(result)}; it needs 'train' "
                f"and optionally 'validation'", where=key, hint=f"return {_EXPECTED}")
        train = _to_split(result["train"], key)
        validation = _to_split(result["validation"], key) if result.get("validation") is not None else None
        return Splits(train, validation)
    if _train_and_validation(result):  # what keras.datasets.*.load_data() returns
        return Splits(_to_split(result[0], key), _to_split(result[1], key))
    train = _to_split(result, key)
    if validation_split and isinstance(train, FileSplit):
        raise UserError("train.validation_split cannot hold out part of a dataset in files",
                        where="train.validation_split",
                        hint="set it to 0 and name validation files (data.validation_files, "
                             "or return {'train': Files(...), 'validation': Files(...)})")
    if validation_split and train.size:
        n_val = int(train.size * validation_split)
        n_train = train.size - n_val
        # The last fraction is held out, as Keras' own validation_split does.
        if isinstance(train, ArraySplit):
            return Splits(train.part(0, n_train), train.part(n_train, train.size))
        return Splits(Split(train.dataset.take(n_train), n_train),
                      Split(train.dataset.skip(n_train), n_val))
    return Splits(train, None)


class RayStreamSplit:
    """This worker's share of a ray.data.Dataset, as Ray Data streams it (``streaming_split``).

    Which rows reach which worker, and in what order, is Ray Data's choice: a run on N workers
    does not see one worker's batches, and a resumed run continues at the right step but with
    other examples. For an exact, resumable order, use files (ktrain.sources)."""

    def __init__(self, iterator: Any, rows: int, shard: Any):
        self.iterator, self.size, self.shard = iterator, rows, shard
        self.spec = (tf.TensorSpec((None, len(shard.features)), tf.float32),
                     tf.TensorSpec((None,), tf.as_dtype(shard.label_dtype)))

    @property
    def dataset(self) -> tf.data.Dataset:
        """One example of zeros: the shapes, to build the model (the rows stream per epoch)."""
        return tf.data.Dataset.from_tensors(tuple(tf.zeros(s.shape[1:], s.dtype)
                                                  for s in self.spec))

    def batches_by_epoch(self, *, first_epoch: int, epochs: int, rank: int, world_size: int,
                         rows: int, batch_size: int, shuffle: bool, shuffle_buffer: int,
                         seed: int) -> Callable[[tf.Tensor], tf.data.Dataset]:
        shuffling = {"local_shuffle_buffer_size": min(shuffle_buffer, self.size)} if shuffle \
            else {}
        # Run as it is: AutoGraph cannot convert the generator inside, and would warn so.
        return tf.autograph.experimental.do_not_convert(
            lambda epoch: self._stream(rows, epoch, shuffling, seed).rebatch(
                batch_size, drop_remainder=True))

    def evaluation_examples(self, rank: int, world_size: int) -> tuple[tf.data.Dataset, int]:
        # Its length stated, Keras ends evaluation there instead of warning that it ran out.
        examples = self._stream(self.size, tf.constant(0, tf.int64), {}, 0).unbatch()
        return examples.apply(tf.data.experimental.assert_cardinality(self.size)), self.size

    def check_workers(self, world_size: int, where: str) -> None:
        """Ray Data gives every worker an equal share."""

    def _stream(self, rows: int, epoch: tf.Tensor, shuffling: dict, seed: int) -> tf.data.Dataset:
        """``rows`` rows of the share, in chunks."""
        features, label = list(self.shard.features), self.shard.label

        def chunks(epoch):
            """``rows`` rows in chunks; the rest of the share is read too (every worker reads
            its whole share each epoch, or Ray Data's split waits for it)."""
            done, last = 0, None
            options = {**shuffling, "local_shuffle_seed": seed * 1_000_003 + int(epoch)} \
                if shuffling else {}
            for batch in self.iterator.iter_batches(batch_size=1024, batch_format="numpy",
                                                    **options):
                if done >= rows:
                    continue
                take = min(len(batch[label]), rows - done)
                x = np.stack([batch[c][:take] for c in features], axis=1).astype(np.float32)
                chunk, done = (x, batch[label][:take]), done + take
                if done < rows:
                    yield chunk
                else:
                    last = chunk
            if last is not None:
                yield last

        return tf.data.Dataset.from_generator(chunks, args=(epoch,), output_signature=self.spec)


def ray_stream_splits(shard: Any, global_batch_size: int, world_size: int) -> Splits:
    """Splits over this worker's ``ktrain.ray_data.RayShard``."""
    validation = RayStreamSplit(shard.validation, shard.validation_rows, shard) \
        if shard.validation is not None and shard.validation_rows else None
    return Splits(RayStreamSplit(shard.train, shard.train_rows, shard), validation,
                  shard.train_rows // (global_batch_size // world_size))


def _train_and_validation(result: Any) -> bool:
    """``((x, y), (x_val, y_val))``: two pairs whose second items are labels, not a pair of
    inputs (``([x1, x2], y)`` is one multi-input pair)."""
    return (_is_pair(result) and all(_is_pair(part) for part in result)
            and not any(_several_arrays(part[1]) for part in result))


def _is_pair(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2


def _several_arrays(value: Any) -> bool:
    """A list/tuple of arrays (several inputs or outputs), not a list of labels."""
    return isinstance(value, (tuple, list)) and bool(value) and np.ndim(value[0]) > 0


def _to_split(value: Any, key: str) -> AnySplit:
    if isinstance(value, Files):
        return FileSplit(value, key)
    if tf is not None and isinstance(value, tf.data.Dataset):
        return _dataset_split(value, key)
    if _is_pair(value):
        x, y = (_arrays(part) for part in value)
        rows = {**_rows(x, "x", key), **_rows(y, "y", key)}
        if len(set(rows.values())) > 1:
            counts = ", ".join(f"{name} {n}" for name, n in rows.items())
            raise UserError(f"the data fn returned arrays with different numbers of rows "
                            f"({counts})", where=key,
                            hint="features and labels need one row per example")
        if tf is None or backends.current() == "torch":
            x, y = keras.tree.map_structure(np.asarray, (x, y))
            return ArraySplit(x, y, next(iter(rows.values())))
        try:
            dataset = tf.data.Dataset.from_tensor_slices((x, y))
        except (ValueError, TypeError) as err:
            raise UserError(f"the data fn returned arrays TensorFlow cannot hold ({err})",
                            where=key, hint="return numeric NumPy arrays (convert object or "
                                            "mixed columns with .astype(...))") from None
        return Split(dataset, next(iter(rows.values())))
    raise UserError(f"the data fn returned a {type(value).__name__}", where=key,
                    hint=f"return {_EXPECTED}")


def _arrays(value: Any) -> Any:
    """Several inputs (or outputs) as a tuple: tf.data would stack a list into one tensor."""
    return tuple(value) if _several_arrays(value) else value


def _rows(value: Any, name: str, key: str) -> dict[str, int]:
    if isinstance(value, dict):
        parts = value.items()
    elif isinstance(value, tuple) and _several_arrays(value):
        parts = ((f"{name}[{i}]", part) for i, part in enumerate(value))
    else:
        parts = [(name, value)]
    return {part_name: _length(part, part_name, key) for part_name, part in parts}


def _length(array: Any, name: str, key: str) -> int:
    try:
        return len(array)
    except TypeError:
        raise UserError(f"the data fn returned {name} as a {type(array).__name__}, which has no "
                        f"length", where=key, hint="use NumPy arrays (or a dict of them for "
                                                   "multi-input models)") from None


def _dataset_split(dataset: tf.data.Dataset, key: str) -> Split:
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise UserError(f"the data fn returned a tf.data.Dataset whose elements are {spec}",
                        where=key, hint="make each element a (features, label) pair")
    steps = _transformations(dataset)
    if _batched(steps):
        raise UserError("the data fn returned a batched tf.data.Dataset", where=key,
                        hint="return it unbatched (remove .batch()); ktrain batches to "
                             "train.global_batch_size")
    if "Shuffle" in steps:
        console.note(f"{key}: the dataset shuffles itself (.shuffle()), so its order differs "
                     f"from run to run: a resumed run cannot end with an unbroken run's weights. "
                     f"Remove .shuffle() and set train.shuffle: true (ktrain shuffles each epoch "
                     f"from train.seed)")
    size = int(dataset.cardinality())
    if size == tf.data.INFINITE_CARDINALITY:
        raise UserError("the data fn returned an infinite tf.data.Dataset", where=key,
                        hint="remove .repeat(); ktrain repeats the data once per epoch")
    if size == tf.data.UNKNOWN_CARDINALITY:
        size = int(dataset.reduce(np.int64(0), lambda count, _: count + 1))
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(size))
    return Split(dataset, size)


def _transformations(dataset: tf.data.Dataset) -> list[str]:
    """The dataset's transformations, newest first, by name (Batch, Shuffle, Map, ...)."""
    names = []
    while dataset is not None:
        names.append(type(dataset).__name__.strip("_").removesuffix("Dataset"))
        inputs = dataset._inputs()  # tf.data's own record of what a dataset was made from
        dataset = inputs[0] if inputs else None
    return names


def _batched(transformations: list[str]) -> bool:
    """Batched by the user: a batching step with no unbatch after it."""
    for name in transformations:
        if name == "Unbatch":
            return False
        if name.endswith("Batch"):
            return True
    return False


def steps_per_epoch(split: AnySplit, global_batch_size: int,
                    partition_steps: int | None = None) -> int:
    """Global batches per epoch (the last partial one is dropped)."""
    steps = partition_steps if partition_steps is not None else split.size // global_batch_size
    if steps == 0:
        raise UserError(f"the training data has {split.size} examples, fewer than "
                        f"train.global_batch_size {global_batch_size}",
                        where="train.global_batch_size", hint="lower the global batch size")
    return steps


def first_batch(split: AnySplit) -> tuple[Any, Any]:
    """The first example, as a batch of one: (features, label)."""
    if isinstance(split, ArraySplit) or getattr(split, "feeds_numpy", False):
        return split.rows(slice(0, 1))
    return next(iter(split.dataset.batch(1)))


def first_features(split: AnySplit) -> Any:
    """The first example's features, as a batch of one (to build a model)."""
    return first_batch(split)[0]


def training_batches(split: AnySplit, *, global_batch_size: int, rank: int, world_size: int,
                     shuffle: bool, shuffle_buffer: int, seed: int,
                     first_epoch: int, epochs: int, first_step: int = 0,
                     partition_steps: int | None = None,
                     audit: ShardAudit | None = None) -> tuple[tf.data.Dataset, int]:
    """Every remaining epoch of this worker's batches, in one dataset (or a generator of NumPy
    batches, for an ``ArraySplit`` or files read without TensorFlow); and steps per epoch.

    The split puts each epoch in an order that depends on (seed, epoch) only and gives worker
    r the global positions r, r+N, ...; so the union of the workers' k-th batches is the k-th
    global batch a single worker would take, whatever N, and ``first_step`` (global batches
    of ``first_epoch`` already done) means the same on any number of workers. With
    ``partition_steps`` the split is already this worker's own partition: it is not shared
    again, and yields that many steps.
    """
    steps = steps_per_epoch(split, global_batch_size, partition_steps)
    local_batch = global_batch_size // world_size
    if isinstance(split, ArraySplit):
        return split.batches(first_epoch=first_epoch, epochs=epochs, first_step=first_step,
                             steps=steps, rank=rank, world_size=world_size,
                             batch_size=local_batch, shuffle=shuffle, seed=seed), steps
    own = partition_steps is not None
    share = {"first_epoch": first_epoch, "epochs": epochs, "rank": 0 if own else rank,
             "world_size": 1 if own else world_size, "batch_size": local_batch,
             "rows": steps * (local_batch if own else global_batch_size), "shuffle": shuffle,
             "shuffle_buffer": shuffle_buffer, "seed": seed, **({"audit": audit} if audit else {})}
    if getattr(split, "feeds_numpy", False):
        return split.numpy_batches(first_step=first_step, **share), steps
    batches_of = split.batches_by_epoch(**share)

    def one_epoch(epoch):
        batches = batches_of(epoch).take(steps)
        skip = tf.where(epoch == first_epoch, tf.constant(first_step, tf.int64), 0)
        return batches.skip(skip)

    epochs_left = tf.data.Dataset.range(first_epoch, epochs)
    return epochs_left.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE), steps


def evaluation_batches(split: AnySplit, *, global_batch_size: int, rank: int,
                       world_size: int, partitioned: bool = False,
                       common_share: Callable[[int], int] | None = None
                       ) -> tuple[tf.data.Dataset, int]:
    """This worker's validation batches, and how many examples they hold. With
    ``common_share`` (this worker's share -> how many it evaluates) only the first of its
    examples are evaluated; the chief says how many are left out."""
    data, size = split.evaluation_examples(0, 1) if partitioned else \
        split.evaluation_examples(rank, world_size)
    if common_share is not None:
        common = common_share(size)
        if rank == 0 and common * world_size < split.size and not partitioned:
            console.note(f"validation: {common * world_size} of {split.size} examples are "
                         f"evaluated, {common} per worker (on JAX every batch splits evenly "
                         f"over the devices, and the workers' batches form one array)")
        data, size = (data.part(0, common) if isinstance(data, (ArraySplit, PieceRows)) else
                      data.take(common)), common
    if isinstance(data, (ArraySplit, PieceRows)):
        return _EvaluationBatches(data, global_batch_size // world_size), size
    return data.batch(global_batch_size // world_size).prefetch(tf.data.AUTOTUNE), size
