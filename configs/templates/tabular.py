"""A tabular classifier: named numeric columns, normalized by a Normalization layer adapted on
the training rows, then dense layers; on scikit-learn's breast-cancer table (569 rows, 30
columns, shipped with scikit-learn). Put your own columns in load_data (a pandas DataFrame's
``.to_numpy("float32")`` will do)."""

import keras
import numpy as np


def build_model(train_data, hidden: int = 32) -> keras.Model:
    normalize = keras.layers.Normalization()
    normalize.adapt(train_data.map(lambda columns, label: columns))
    columns = keras.Input(shape=(normalize.mean.shape[-1],))
    hidden_layer = keras.layers.Dense(hidden, activation="relu")(normalize(columns))
    return keras.Model(columns, keras.layers.Dense(1, activation="sigmoid")(hidden_layer))


def load_data(validation_fraction: float = 0.2, seed: int = 0):
    from sklearn.datasets import load_breast_cancer

    columns, labels = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(columns))
    columns, labels = columns[order].astype("float32"), labels[order].astype("float32")
    held_out = int(len(columns) * validation_fraction)
    return {"train": (columns[held_out:], labels[held_out:]),
            "validation": (columns[:held_out], labels[:held_out])}
