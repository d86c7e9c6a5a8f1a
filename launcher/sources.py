"""Datasets in files (Parquet, TFRecord), streamed: each worker reads only its share and holds
no more than a row group and a window of rows per lane, whatever the dataset's size.

An epoch's order is a pure function of (seed, epoch, lanes), never of the number of workers.
The blocks (Parquet row groups, TFRecord files) are put in an order drawn from (seed, epoch);
the rows the epoch trains on (whole global batches) are cut, in that order, into ``lanes``
contiguous spans of nearly equal length; each span is mixed a window at a time, by a
permutation drawn from (seed, epoch, lane, window); and the epoch's global order takes one
example from each lane in turn. Worker r of N reads lanes
r, r+N, ... and so produces global positions r, r+N, ...: its k-th local batch is its part of
global batch k, as with in-memory data, so N workers train on 1 worker's global batches and a
run resumes at any step on any N that divides ``lanes``. The user's per-example ``map`` runs
after this split, so each example is decoded once, by the worker that trains on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ktrain import backends, console
from ktrain.config import DEFAULT_LANES
from ktrain.errors import UserError
from ktrain.readers import (Block, ParquetArrays, ParquetReader, TFRecordReader, expand,
                            format_of, parquet_blocks, tfrecord_blocks)

tf = backends.optional_tensorflow()
CHUNK_BYTES = 2 << 20
"""About this many bytes of rows are read, mixed and interleaved at a time (at most 4096
rows): few steps per row, and memory bounded whatever a row's size."""


@dataclass(frozen=True)
class Files:
    """A dataset in files, for ``data.files`` or as a data fn's result
    (``return ktrain.Files("s3://bucket/train-*.parquet", features=[...], label="y")``);
    each worker streams only its share.

    Args:
        files: a path, glob or fsspec URL (s3://, gs://, ...), or a list of them.
        format: ``parquet`` or ``tfrecord``; default: from the files' extension.
        features: Parquet columns or tf.train.Example keys; numeric ones are joined into one
            float32 vector, a single string/bytes one is passed as is (e.g. to a ``map``).
        label: the label's column or key.
        map: per-example ``(x, y) -> (x, y)`` (or ``record -> (x, y)`` for TFRecord without
            features), run by the one worker that trains on the example.
        lanes: interleaved parts of each epoch; the number of workers must divide it. It
            decides the order, so keep it to compare or resume runs.
    """

    files: str | Sequence[str]
    format: Literal["parquet", "tfrecord"] | None = None
    features: Sequence[str] = ()
    label: str | None = None
    map: Callable | None = None
    lanes: int = DEFAULT_LANES


@dataclass(frozen=True)
class Piece:
    block: int
    start: int
    stop: int


def lane_plan(blocks: Sequence[Block], lanes: int, *, rows: int, seed: int, epoch: int,
              shuffle: bool) -> list[list[Piece]]:
    """The epoch's first ``rows`` rows, cut into ``lanes`` contiguous spans (the first
    ``rows % lanes`` one row longer), as pieces of blocks: a pure function of its arguments."""
    order = (np.random.default_rng([seed, epoch]).permutation(len(blocks)) if shuffle
             else np.arange(len(blocks)))
    sizes = [rows // lanes + (lane < rows % lanes) for lane in range(lanes)]
    plan: list[list[Piece]] = [[] for _ in range(lanes)]
    lane, wanted = 0, sizes[0]
    for index in order:
        start = 0
        while start < blocks[index].rows and lane < lanes:
            take = min(wanted, blocks[index].rows - start)
            if take:
                plan[lane].append(Piece(int(index), start, start + take))
            start, wanted = start + take, wanted - take
            if wanted == 0:
                lane += 1
                wanted = sizes[lane] if lane < lanes else 0
    return plan


class FileSplit:
    """A training or validation split in files (see the module's docstring)."""

    def __init__(self, source: Files, key: str):
        self.format = source.format or format_of(source.files, key)
        if tf is None and self.format != "parquet":
            backends.require_tensorflow(f"a dataset in {self.format} files", key)
        self.feeds_numpy = tf is None or (self.format == "parquet" and source.map is None
                                          and backends.current() == "torch")
        """Parquet read with pyarrow into NumPy batches, where TensorFlow is not installed and
        on torch (whose threads tf.data's would compete with, as for arrays): the same lanes
        and plan, mixed by NumPy permutations, so in other orders than tf.data's."""
        if source.lanes < 1:
            raise UserError(f"lanes must be at least 1, not {source.lanes}", where=key,
                            hint=f"use the default, {DEFAULT_LANES}")
        self.source, self.key = source, key
        self.paths = expand(source.files, key)
        self.blocks = parquet_blocks(self.paths) if self.format == "parquet" else \
            tfrecord_blocks(self.paths)
        self.size = sum(block.rows for block in self.blocks)
        self.offsets = np.cumsum([0] + [block.rows for block in self.blocks])
        self.chunk_rows = int(np.clip(CHUNK_BYTES * self.size // max(
            1, sum(block.bytes for block in self.blocks)), 16, 4096))
        reader = ParquetArrays if self.feeds_numpy else ParquetReader
        self._read = reader(self) if self.format == "parquet" else TFRecordReader(self)

    @property
    def dataset(self) -> tf.data.Dataset:
        """Every example in file order, as (features, label): to build the model or adapt
        preprocessing (``train_data``)."""
        pieces = [Piece(i, 0, block.rows) for i, block in enumerate(self.blocks)]
        return self._examples(self._pieces(pieces).unbatch()).apply(
            tf.data.experimental.assert_cardinality(self.size))

    def check_workers(self, world_size: int, where: str) -> None:
        lanes = self.source.lanes
        if lanes % world_size:
            multiple = lanes * world_size // np.gcd(lanes, world_size)
            raise UserError(
                f"{world_size} workers cannot share {lanes} lanes (the interleaved parts of "
                f"each epoch) evenly", where=where,
                hint=f"set data.lanes (or Files(lanes=...)) to a multiple of {world_size}, e.g. "
                     f"{multiple}; the order of examples then differs from runs with {lanes}")
        if len(self.blocks) < lanes:
            console.note(f"{self.key}: {len(self.blocks)} {self._unit} for {lanes} lanes, so "
                         f"lanes share {self._unit} and read rows they skip; write at least "
                         f"{lanes} {self._unit} for the best throughput")

    @property
    def _unit(self) -> str:
        return "row groups" if self.format == "parquet" else "files"

    def batches_by_epoch(self, *, first_epoch: int, epochs: int, rank: int, world_size: int,
                         rows: int, batch_size: int, shuffle: bool, shuffle_buffer: int,
                         seed: int, audit: ShardAudit | None = None
                         ) -> Callable[[tf.Tensor], tf.data.Dataset]:
        """For an epoch (a tensor in [first_epoch, epochs)): this worker's batches of its
        examples, in the order of its global positions; ``audit`` learns the ids read."""
        lanes = self.source.lanes
        self._check_rows(rows)
        plans = [lane_plan(self.blocks, lanes, rows=rows, seed=seed, epoch=e, shuffle=shuffle)
                 for e in range(first_epoch, epochs)]
        if audit is not None:
            audit.plans.update(zip(range(first_epoch, epochs), plans))
        # Every epoch's lanes' pieces in one table: lane (e - first_epoch) * lanes + l holds
        # rows [starts[i], starts[i] + counts[i]).
        counts = [len(lane) for plan in plans for lane in plan]
        starts = tf.constant(np.cumsum([0] + counts[:-1]), tf.int64)
        counts = tf.constant(counts, tf.int64)
        table = tf.constant([(p.block, p.start, p.stop) for plan in plans for lane in plan
                             for p in lane] or np.zeros((0, 3), np.int64), tf.int64)
        mine = list(self.lanes_of(rank, world_size))
        buffer = max(1, shuffle_buffer // lanes)
        group = _group_size(rows // lanes, self.chunk_rows)

        def lane_groups(epoch, lane):
            """A lane's examples, ``group`` at a time."""
            i = (epoch - first_epoch) * lanes + lane
            pieces = self._pieces_tensor(table[starts[i]:starts[i] + counts[i]],
                                         with_ids=audit is not None)
            if not shuffle:
                return pieces.rebatch(group)
            # Mixed a window (the lane's share of the shuffle buffer) at a time, by a
            # permutation drawn from (seed, epoch, lane, window) only: no per-example work.
            stream = (epoch * lanes + lane) * 1_000_003

            def mix(window_index, window):
                rows = tf.shape(tf.nest.flatten(window)[0])[0]
                order = tf.random.experimental.stateless_shuffle(
                    tf.range(rows), seed=tf.stack([tf.constant(seed, tf.int64),
                                                   stream + window_index]))
                return tf.nest.map_structure(lambda column: tf.gather(column, order), window)

            return pieces.rebatch(buffer).enumerate().map(mix).rebatch(group)

        def batches(epoch):
            # One example from each of my lanes in turn, ``group`` rounds at a time: each lane
            # is read (in the background) a group at a time and the groups are interleaved.
            groups = [lane_groups(epoch, tf.constant(lane, tf.int64)).prefetch(1)
                      for lane in mine]
            interleaved = tf.data.Dataset.zip(tuple(groups)).map(_round_robin)
            if audit is not None:
                interleaved = interleaved.map(lambda raw, ids: audit.noted(epoch, raw, ids))
            return self._batches(interleaved, batch_size)

        return batches

    def numpy_batches(self, *, first_epoch: int, epochs: int, first_step: int, rank: int,
                      world_size: int, rows: int, batch_size: int, shuffle: bool,
                      shuffle_buffer: int, seed: int, audit: ShardAudit | None = None):
        """``batches_by_epoch`` without TensorFlow: every remaining epoch's batches of this
        worker, one generator of NumPy (features, label), from the same plan and lanes (each
        mixed a window at a time by a NumPy permutation of (seed, epoch, lane, window))."""
        lanes = self.source.lanes
        self._check_rows(rows)
        steps, group = rows // (world_size * batch_size), _group_size(rows // lanes,
                                                                      self.chunk_rows)
        window = max(1, shuffle_buffer // lanes) if shuffle else 0
        for epoch in range(first_epoch, epochs):
            plan = lane_plan(self.blocks, lanes, rows=rows, seed=seed, epoch=epoch,
                             shuffle=shuffle)
            if audit is not None:
                audit.plans[epoch] = plan
            streams = [_rebatch(_mixed(self._rows_of(plan[lane]), window,
                                       (seed, (epoch * lanes + lane) * 1_000_003)), group)
                       for lane in self.lanes_of(rank, world_size)]
            interleaved = (_interleave(groups) for groups in zip(*streams))
            for step, (x, y, ids) in enumerate(_rebatch(interleaved, batch_size)):
                if step == steps:
                    break
                if audit is not None:
                    audit.note(epoch, ids)
                if epoch > first_epoch or step >= first_step:
                    yield x, y

    def rows(self, index: slice) -> tuple[np.ndarray, np.ndarray]:
        """Examples in file order, read with pyarrow (``feeds_numpy``)."""
        return PieceRows(self, [Piece(i, 0, b.rows) for i, b in enumerate(self.blocks)]).rows(
            index)

    def _rows_of(self, pieces: Sequence[Piece]):
        """The pieces' rows, a chunk at a time: (features, label, example ids)."""
        for piece in pieces:
            first = int(self.offsets[piece.block]) + piece.start
            for x, y in self._read(piece.block, piece.start, piece.stop):
                yield x, y, np.arange(first, first + len(y))
                first += len(y)

    def _check_rows(self, rows: int) -> None:
        if rows < self.source.lanes:
            raise UserError(f"an epoch trains on {rows} examples, too few to fill "
                            f"{self.source.lanes} lanes", where="data.lanes",
                            hint=f"set data.lanes to at most {rows} (a multiple of the workers)")

    def lanes_of(self, rank: int, world_size: int) -> range:
        """The lanes worker ``rank`` reads: every N-th, from its rank."""
        return range(rank, self.source.lanes, world_size)

    def evaluation_examples(self, rank: int, world_size: int
                            ) -> tuple[tf.data.Dataset | PieceRows, int]:
        """This worker's part of the split (every example evaluated once), and its size."""
        plan = lane_plan(self.blocks, world_size, rows=self.size, seed=0, epoch=0, shuffle=False)
        size = sum(p.stop - p.start for p in plan[rank])
        if self.feeds_numpy:
            return PieceRows(self, plan[rank]), size
        examples = self._examples(self._pieces(plan[rank]).unbatch())
        return examples.apply(tf.data.experimental.assert_cardinality(size)), size

    def _pieces(self, pieces: Sequence[Piece]) -> tf.data.Dataset:
        table = tf.constant([(p.block, p.start, p.stop) for p in pieces] or
                            np.zeros((0, 3), np.int64), dtype=tf.int64)
        return self._pieces_tensor(table)

    def _pieces_tensor(self, table: tf.Tensor, with_ids: bool = False) -> tf.data.Dataset:
        """The rows the (block, start, stop) rows of ``table`` name, in chunks; with
        ``with_ids``, paired with their example ids (their indices in file order)."""
        offsets = tf.constant(self.offsets, tf.int64)

        def piece(row):
            chunks = self._read(row[0], row[1], row[2])
            if not with_ids:
                return chunks
            first = offsets[row[0]] + row[1]
            ids = tf.data.Dataset.range(first, first + row[2] - row[1])
            return tf.data.Dataset.zip(chunks.unbatch(), ids).batch(self.chunk_rows)

        return tf.data.Dataset.from_tensor_slices(table).flat_map(piece)

    def _examples(self, read: tf.data.Dataset) -> tf.data.Dataset:
        """The examples the reader parsed, through the user's map."""
        if self.source.map is None:
            return read
        return read.map(self.source.map, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)

    def _batches(self, groups: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
        """Batches of the examples in ``groups``: cut from them as they are, unless the user's
        map must see one example at a time."""
        if self.source.map is None:
            return groups.rebatch(batch_size, drop_remainder=True)
        return self._examples(groups.unbatch()).batch(batch_size, drop_remainder=True)


class PieceRows:
    """Some pieces' rows in order, read as they are asked for (in order), holding one piece at
    a time: a worker's validation examples in files without TensorFlow (``ArraySplit``'s
    ``rows``/``part``/``size``, for ``ktrain.data``'s evaluation batches)."""

    def __init__(self, split: FileSplit, pieces: Sequence[Piece]):
        self.split, self.pieces = split, list(pieces)
        self.size = sum(p.stop - p.start for p in self.pieces)
        self._held: tuple[int, tuple] | None = None

    def part(self, start: int, stop: int) -> PieceRows:
        """The first ``stop`` rows (``start`` is 0: evaluation keeps a common prefix)."""
        assert start == 0, "only a prefix is taken"
        kept, left = [], stop
        for piece in self.pieces:
            take = min(left, piece.stop - piece.start)
            if take:
                kept.append(Piece(piece.block, piece.start, piece.start + take))
            left -= take
        return PieceRows(self.split, kept)

    def rows(self, index: slice) -> tuple[np.ndarray, np.ndarray]:
        start, stop, _ = index.indices(self.size)
        parts, position = [], 0
        for i, piece in enumerate(self.pieces):
            count = piece.stop - piece.start
            if position < stop and position + count > start:
                x, y = self._piece(i)
                parts.append((x[max(start - position, 0):stop - position],
                              y[max(start - position, 0):stop - position]))
            position += count
        return tuple(np.concatenate(columns) for columns in zip(*parts))

    def _piece(self, i: int) -> tuple:
        if self._held is None or self._held[0] != i:
            chunks = list(self.split._rows_of([self.pieces[i]]))
            self._held = i, tuple(np.concatenate(c) for c in list(zip(*chunks))[:2])
        return self._held[1]


def _mixed(chunks, window: int, stream: tuple[int, int]):
    """Rows mixed a ``window`` at a time, by a permutation drawn from (seed, stream + window
    index) only; as they are if ``window`` is 0."""
    if not window:
        yield from chunks
        return
    seed, first = stream
    for index, rows in enumerate(_rebatch(chunks, window)):
        order = np.random.default_rng([seed, first + index]).permutation(len(rows[0]))
        yield tuple(column[order] for column in rows)


def _rebatch(chunks, size: int):
    """Tuples of columns, re-cut into ``size`` rows each (the last one what is left)."""
    held, count = [], 0
    for chunk in chunks:
        held.append(chunk)
        count += len(chunk[0])
        while count >= size:
            joined = held[0] if len(held) == 1 else tuple(map(np.concatenate, zip(*held)))
            yield tuple(column[:size] for column in joined)
            rest = tuple(column[size:] for column in joined)
            held, count = ([rest] if count > size else []), count - size
    if count:
        yield held[0] if len(held) == 1 else tuple(map(np.concatenate, zip(*held)))


def _interleave(groups: tuple) -> tuple:
    """``_round_robin`` in NumPy: one row of each lane's group in turn (groups as long as the
    next, or one row longer)."""
    if len(groups) == 1:
        return groups[0]
    sizes = np.array([len(group[0]) for group in groups])
    longest = int(sizes.max())
    kept = (np.arange(longest)[:, None] < sizes[None, :]).reshape(-1)

    def weave(*parts):
        padded = [p if len(p) == longest else
                  np.concatenate([p, np.zeros((longest - len(p), *p.shape[1:]), p.dtype)])
                  for p in parts]
        woven = np.stack(padded, axis=1).reshape(-1, *parts[0].shape[1:])
        return woven if kept.all() else woven[kept]

    return tuple(weave(*columns) for columns in zip(*groups))


def _group_size(lane_rows: int, wanted: int) -> int:
    """Examples per lane per interleaving round: lanes hold ``lane_rows`` or one more examples,
    so a size that does not divide ``lane_rows`` (or exceeds it) gives every lane the same
    number of groups (the last ones one example apart)."""
    size = wanted
    while lane_rows >= size and lane_rows % size == 0:
        size += 1
    return size


def _round_robin(*groups):
    """Groups of examples, one per lane (each as long as the next, or one longer), as the
    interleaving of their examples: the first of each, then the second of each, ..."""
    sizes = tf.stack([tf.shape(tf.nest.flatten(g)[0])[0] for g in groups])
    kept = tf.transpose(tf.sequence_mask(sizes, tf.reduce_max(sizes)))  # [round, lane]

    def interleave(*parts):
        def equal():  # all but the last groups of an epoch: one copy
            stacked = tf.stack(parts, axis=1)  # [round, lane, ...]
            return tf.reshape(stacked, tf.concat([[-1], tf.shape(stacked)[2:]], 0))

        def ragged():
            padded = tf.ragged.stack(list(parts)).to_tensor()  # [lane, round, ...]
            rounds_first = tf.transpose(padded, [1, 0] + list(range(2, padded.shape.rank)))
            return tf.boolean_mask(rounds_first, kept)

        if len(parts) == 1:
            return parts[0]
        mixed = tf.cond(tf.reduce_all(sizes == sizes[0]), equal, ragged)
        return tf.ensure_shape(mixed, [None, *parts[0].shape[1:]])  # the model needs the width

    return tf.nest.map_structure(interleave, *groups)


class ShardAudit:
    """``data.audit``: every rank notes the id of each example it reads; at an epoch's end the
    ranks add up (count, hash of ids) and compare the sums with the epoch's plan, so a shard
    that overlaps another or leaves examples out is caught without gathering ids."""

    def __init__(self, split: FileSplit, rank: int, world_size: int):
        self.split, self.rank, self.world_size = split, rank, world_size
        self.plans: dict[int, list[list[Piece]]] = {}
        self.epochs_checked = 0
        self._read: dict[int, list[int]] = {}

    def noted(self, epoch: tf.Tensor, examples, ids: tf.Tensor):
        """``examples``, once their ``ids`` are noted (a dataset map)."""
        note = tf.numpy_function(self._note, [epoch, ids], tf.int64, stateful=True)
        with tf.control_dependencies([note]):
            return tf.nest.map_structure(tf.identity, examples)

    def _note(self, epoch, ids):
        self.note(int(epoch), ids)
        return np.int64(len(ids))

    def note(self, epoch: int, ids: np.ndarray) -> None:
        """The ids of examples this rank read in ``epoch`` (an epoch counted from 0)."""
        self._read.setdefault(epoch, []).extend(ids.tolist())

    def problem(self, epoch: int, allreduce_sum: Callable[[np.ndarray], np.ndarray]) -> str | None:
        """What is wrong with the shards of ``epoch`` (the same on every rank), or None."""
        read = np.asarray(self._read.pop(epoch, []), np.int64)
        mine = np.zeros((self.world_size, 2))
        mine[self.rank] = len(read), _id_hash(read)
        ranks = allreduce_sum(mine)
        expected = np.concatenate([np.arange(self.split.offsets[p.block] + p.start,
                                             self.split.offsets[p.block] + p.stop)
                                   for lane in self.plans[epoch] for p in lane])
        count, total = int(ranks[:, 0].sum()), int(ranks[:, 1].sum()) % 2**32
        if count == len(expected) and total == _id_hash(expected):
            self.epochs_checked += 1
            return None
        same = [f"{a} and {b}" for a in range(self.world_size) for b in range(a + 1, self.world_size)
                if ranks[a, 0] and (ranks[a] == ranks[b]).all()]
        counts = ", ".join(f"rank {r} {int(n)}" for r, n in enumerate(ranks[:, 0]))
        return (f"in epoch {epoch + 1} the workers read {count} examples ({counts}), not each of "
                f"the epoch's {len(expected)} once: their shards "
                + (f"are identical (ranks {', '.join(same)})" if same else
                   "overlap or leave examples out"))


def _id_hash(ids: np.ndarray) -> int:
    """Sum of the ids' 32-bit mixes, mod 2**32: order-free, and exact as a float64 per rank."""
    mixed = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return int(mixed.sum(dtype=np.uint64) % np.uint64(2**32))
