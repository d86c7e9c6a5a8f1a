"""The file formats ``ktrain.sources`` streams: finding the files, cutting them into blocks
(Parquet row groups, TFRecord files) and reading a block's rows as tensors. What order the rows
are read in, and by which worker, is ``ktrain.sources``' business."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np

from ktrain import backends
from ktrain.errors import UserError

tf = backends.optional_tensorflow()
FORMATS = ("parquet", "tfrecord")


@dataclass(frozen=True)
class Block:
    """The unit a lane reads rows of: a Parquet row group or a TFRecord file."""

    path: str
    group: int
    rows: int
    bytes: int
    """Its rows' size (Parquet: uncompressed), to size the chunks rows are read in."""


# ------------------------------------------------------------------------------- files


def format_of(files: str | Sequence[str], key: str) -> str:
    first = files if isinstance(files, str) else (files[0] if files else "")
    name = first.rstrip("/").rsplit("/", 1)[-1]
    for fmt, endings in (("parquet", (".parquet", ".pq")),
                         ("tfrecord", (".tfrecord", ".tfrecords", ".tfr"))):
        if any(ending in name for ending in endings):
            return fmt
    raise UserError(f"cannot tell the format of '{first}' from its name", where=key,
                    hint=f"set format: one of {', '.join(FORMATS)}")


def expand(files: str | Sequence[str], key: str) -> list[str]:
    """Every file the paths or patterns name, sorted; a folder stands for the files in it
    (but not Spark's _SUCCESS and other hidden files)."""
    found: list[str] = []
    for pattern in [files] if isinstance(files, str) else list(files):
        fs, path = fsspec.core.url_to_fs(pattern)
        if any(c in path for c in "*?["):
            matches = sorted(fs.glob(path))
        elif fs.isdir(path):
            matches = sorted(f for f in fs.find(path)
                             if not f.rsplit("/", 1)[-1].startswith(("_", ".")))
        else:
            matches = [path] if fs.exists(path) else []
        if not matches:
            raise UserError(f"no files match '{pattern}'", where=key,
                            hint="check the path or pattern (relative paths start at the "
                                 "config file's folder)")
        found += [fs.unstrip_protocol(m) if "://" in pattern else m for m in matches]
    return found


def file_problems(data) -> list[UserError]:
    """data.files and data.validation_files that match no file (for ``ktrain validate``)."""
    problems = []
    for key in ("files", "validation_files"):
        if getattr(data, key) is not None:
            try:
                expand(getattr(data, key), f"data.{key}")
            except UserError as err:
                problems.append(err)
    return problems


def _open(path: str):
    return fsspec.open(path, "rb").open()


def parquet_blocks(paths: list[str]) -> list[Block]:
    import pyarrow.parquet as pq

    blocks = []
    for path in paths:
        with _open(path) as handle:
            meta = pq.ParquetFile(handle).metadata
            groups = (meta.row_group(g) for g in range(meta.num_row_groups))
            blocks += [Block(path, g, group.num_rows, group.total_byte_size)
                       for g, group in enumerate(groups) if group.num_rows]
    return blocks


def tfrecord_blocks(paths: list[str]) -> list[Block]:
    return [Block(path, 0, *_records_and_bytes(path)) for path in paths]


def _records_and_bytes(path: str) -> tuple[int, int]:
    """Records in a TFRecord file and their bytes, by its framing (length, crc, data, crc):
    no parsing."""
    count = size = 0
    with _open(path) as handle:
        while header := handle.read(12):
            if len(header) < 12:
                break
            length = int.from_bytes(header[:8], "little")
            handle.seek(length + 4, 1)
            count, size = count + 1, size + length
    return count, size


# ------------------------------------------------------------------------------- readers


def _assemble(columns: Sequence[tf.Tensor], names: Sequence[str], key: str):
    """A batch of features as one float32 vector each (numeric columns), or a single column as
    it is."""
    if len(columns) == 1 and columns[0].dtype == tf.string:
        return columns[0]
    strings = [n for n, c in zip(names, columns) if c.dtype == tf.string]
    if strings:
        raise UserError(f"feature(s) {strings} hold strings, which cannot join a numeric "
                        f"feature vector", where=f"{key}.features",
                        hint="name one string feature on its own and decode it in a map fn")
    widths = [int(np.prod(c.shape[1:])) for c in columns]  # static: the model sees its width
    return tf.concat([tf.reshape(tf.cast(c, tf.float32), [-1, w]) for c, w in zip(columns, widths)],
                     axis=1)


class _ParquetColumns:
    """The columns a Parquet source reads, checked against the files' schema."""

    def __init__(self, split):
        import pyarrow.parquet as pq

        source = split.source
        self.columns = [*source.features, *([source.label] if source.label else [])]
        if not source.features or (not source.label and source.map is None):
            raise UserError("a Parquet source needs features (columns) and a label, or a map "
                            "fn that makes (features, label)", where=split.key,
                            hint="e.g. features: [x0, x1], label: y")
        with _open(split.blocks[0].path if split.blocks else split.paths[0]) as handle:
            self.schema = pq.ParquetFile(handle).schema_arrow
        missing = [c for c in self.columns if c not in self.schema.names]
        if missing:
            raise UserError(f"column(s) {missing} are not in {split.paths[0]}",
                            where=f"{split.key}.features",
                            hint=f"its columns are: {', '.join(self.schema.names)}")
        self.paths = [block.path for block in split.blocks]
        self.chunk_rows = split.chunk_rows
        self.groups = [block.group for block in split.blocks]
        self.features, self.key = len(source.features), split.key
        self.names = list(source.features)

    def _chunks(self, block, start, stop):
        """The rows ``start:stop`` of a block, a chunk at a time, as tuples of NumPy columns."""
        import pyarrow.parquet as pq

        block = int(block)
        with _open(self.paths[block]) as handle:
            table = pq.ParquetFile(handle).read_row_group(self.groups[block],
                                                          columns=self.columns)
        table = table.slice(int(start), int(stop) - int(start))
        for batch in table.to_batches(max_chunksize=self.chunk_rows):
            yield tuple(_to_numpy(batch.column(i)) for i in range(len(self.columns)))


class ParquetReader(_ParquetColumns):
    """Rows of a row group, read with pyarrow (in chunks), as tuples of column tensors; for a
    ``ktrain.sources.FileSplit``."""

    def __init__(self, split):
        super().__init__(split)
        self.specs = tuple(_column_spec(self.schema.field(c), split.key) for c in self.columns)

    def __call__(self, block, start, stop) -> tf.data.Dataset:
        """The rows as batches of examples."""
        return tf.data.Dataset.from_generator(
            self._chunks, args=(block, start, stop), output_signature=self.specs
        ).map(self._examples)

    def _examples(self, *columns):
        x = _assemble(columns[:self.features], self.names, self.key)
        return (x, columns[self.features]) if len(columns) > self.features else x


class ParquetArrays(_ParquetColumns):
    """Rows of a row group as NumPy (features, label) chunks, read with pyarrow alone: Parquet
    where TensorFlow is not installed. Numeric features are joined into one float32 vector, as
    ``ParquetReader`` joins them."""

    def __init__(self, split):
        import pyarrow as pa

        super().__init__(split)
        if split.source.map is not None:
            raise UserError("a map fn runs in tf.data, and TensorFlow is not installed",
                            where=f"{split.key}.map",
                            hint="name the features and the label and leave map unset (do the "
                                 "work in the model), or pip install tensorflow-cpu")
        for name in self.columns:
            kind = self.schema.field(name).type
            element = kind.value_type if pa.types.is_fixed_size_list(kind) else kind
            if not (pa.types.is_integer(element) or pa.types.is_floating(element)
                    or pa.types.is_boolean(element)):
                raise UserError(f"column '{name}' is of type {kind}, which ktrain reads without "
                                f"TensorFlow only if it is numeric", where=f"{split.key}.features",
                                hint="use numeric or fixed-size list columns, or pip install "
                                     "tensorflow-cpu (string columns go through tf.data)")

    def __call__(self, block, start, stop):
        """The rows as (features, label) chunks."""
        for columns in self._chunks(block, start, stop):
            features = columns[:self.features]
            x = np.concatenate([c.reshape(len(c), -1).astype(np.float32, copy=False)
                                for c in features], axis=1)
            yield x, columns[self.features]


def _column_spec(field, key: str) -> tf.TensorSpec:
    import pyarrow as pa

    kind = field.type
    if pa.types.is_fixed_size_list(kind):
        return tf.TensorSpec((None, kind.list_size), tf.as_dtype(kind.value_type.to_pandas_dtype()))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
        return tf.TensorSpec((None,), tf.string)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return tf.TensorSpec((None,), tf.as_dtype(kind.to_pandas_dtype()))
    raise UserError(f"column '{field.name}' is of type {kind}, which ktrain cannot stream",
                    where=f"{key}.features", hint="use numeric, string or fixed-size list "
                                                  "columns (pyarrow.list_(type, size))")


def _to_numpy(column) -> np.ndarray:
    import pyarrow as pa

    if pa.types.is_fixed_size_list(column.type):
        return column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    return column.to_numpy(zero_copy_only=False)


class TFRecordReader:
    """Records of a TFRecord file, by TensorFlow's own reader, for a ``ktrain.sources.FileSplit``;
    parsed as tf.train.Example when features are named (their types and lengths taken from the
    first record)."""

    def __init__(self, split):
        source = split.source
        self.paths = tf.constant([block.path for block in split.blocks] or [""])
        self.chunk_rows = split.chunk_rows
        self.names = list(source.features)
        self.label, self.key = source.label, split.key
        self.spec = None
        if source.features:
            self.spec = _example_spec(split.paths[0], [*self.names, *([self.label] if
                                                                     self.label else [])],
                                      split.key)
        elif source.map is None:
            raise UserError("a TFRecord source needs features (and a label) to parse "
                            "tf.train.Example records, or a map fn that parses each record",
                            where=split.key, hint="e.g. features: [pixels], label: digit")

    def __call__(self, block, start, stop) -> tf.data.Dataset:
        """The records as batches of examples, or as they are for a map fn (in batches)."""
        records = tf.data.TFRecordDataset(self.paths[block]).skip(start).take(stop - start) \
            .batch(self.chunk_rows)
        return records if self.spec is None else records.map(self._examples)

    def _examples(self, records):
        parsed = tf.io.parse_example(records, self.spec)
        x = _assemble([parsed[n] for n in self.names], self.names, self.key)
        return (x, parsed[self.label]) if self.label else x


def _example_spec(path: str, keys: list[str], key: str) -> dict:
    first = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
    if first is None:
        raise UserError(f"{path} holds no records", where=key, hint="remove the empty file")
    try:
        example = tf.train.Example.FromString(first.numpy())
    except Exception:  # noqa: BLE001 - protobuf's DecodeError; any failure means the same
        raise UserError(f"the records of {path} are not tf.train.Example", where=key,
                        hint="leave features unset and parse each record in a map fn") from None
    present = example.features.feature
    missing = [k for k in keys if k not in present]
    if missing:
        raise UserError(f"key(s) {missing} are not in the records of {path}",
                        where=f"{key}.features", hint=f"its keys are: {', '.join(present)}")
    spec = {}
    for name in keys:
        kind = present[name].WhichOneof("kind")
        values = getattr(present[name], kind).value
        dtype = {"float_list": tf.float32, "int64_list": tf.int64, "bytes_list": tf.string}[kind]
        spec[name] = tf.io.FixedLenFeature([] if len(values) == 1 else [len(values)], dtype)
    return spec
