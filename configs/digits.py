"""Quickstart model and data: scikit-learn's 8x8 digits, which ship with the package (no download)."""

import keras
import numpy as np


def build_model(hidden: int = 128, dropout: float = 0.1) -> keras.Model:
    """A small MLP. Return it compiled or not: ktrain compiles it from the config if not."""
    return keras.Sequential([
        keras.Input(shape=(64,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dropout(dropout),
        keras.layers.Dense(10, activation="softmax"),
    ])


def load_data(validation_fraction: float = 0.2, seed: int = 0):
    """Return {"train": (x, y), "validation": (x, y)}; ktrain batches, shuffles and shards."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order].astype("int32")
    n_val = int(len(x) * validation_fraction)
    return {"train": (x[n_val:], y[n_val:]), "validation": (x[:n_val], y[:n_val])}
