"""Data in files, for configs/parquet.yaml and configs/tfrecord.yaml: the digits written as
Parquet and TFRecord files (many, as a data pipeline leaves them), a decoding map fn, and
synthetic wide files for scripts/bench.py.

    python configs/streaming.py            # writes configs/data/{parquet,tfrecord}/...
    ktrain run configs/parquet.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np

HERE = Path(__file__).resolve().parent


def build_model(width: int = 64, hidden: int = 128, classes: int = 10) -> keras.Model:
    return keras.Sequential([keras.Input((width,)), keras.layers.Dense(hidden, activation="relu"),
                             keras.layers.Dense(classes, activation="softmax")])


def decode(record):
    """A per-example map fn: one serialized tf.train.Example -> (pixels, label). ktrain runs it
    after sharding, so each record is decoded once, by the worker that trains on it."""
    import tensorflow as tf

    parsed = tf.io.parse_single_example(record, {
        "pixels": tf.io.FixedLenFeature([64], tf.float32),
        "label": tf.io.FixedLenFeature([], tf.int64)})
    return parsed["pixels"], parsed["label"]


def write_digits(folder: Path = HERE / "data", files: int = 12) -> None:
    """The digits (80% train in ``files`` files, 20% validation in 2) in both formats."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    n_train = int(len(y) * 0.8)
    for fmt in ("parquet", "tfrecord"):
        (folder / fmt).mkdir(parents=True, exist_ok=True)
        for name, parts in (("train", np.array_split(np.arange(n_train), files)),
                            ("validation", np.array_split(np.arange(n_train, len(y)), 2))):
            for i, rows in enumerate(parts):
                _write(folder / fmt / f"{name}-{i:02d}.{fmt}", {"pixels": x[rows]}, y[rows])


def write_synthetic(folder: Path, fmt: str, *, rows: int, width: int, files: int = 16,
                    classes: int = 10, seed: int = 0) -> str:
    """Random rows of ``width`` float32 features and a label, a chunk at a time; the glob."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        x = rng.standard_normal((rows // files, width), dtype=np.float32)
        _write(folder / f"part-{i:03d}.{fmt}", {"pixels": x},
               rng.integers(0, classes, len(x)).astype(np.int64))
    return str(folder / f"part-*.{fmt}")


def _write(path: Path, features: dict[str, np.ndarray], label: np.ndarray) -> None:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {name: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
                   for name, v in features.items()}
        pq.write_table(pa.table({**columns, "label": label}), path, row_group_size=4096)
        return
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(len(label)):
            feature = {name: tf.train.Feature(float_list=tf.train.FloatList(value=v[i]))
                       for name, v in features.items()}
            feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label[i]]))
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                         .SerializeToString())


if __name__ == "__main__":
    write_digits(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "data")
