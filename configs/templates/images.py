"""An image classifier: a small convolutional network on scikit-learn's 8x8 digits as images
(they ship with scikit-learn: no download). Put your own images in load_data as arrays of
shape (examples, height, width, channels), and widen the network to fit them."""

import keras
import numpy as np


def build_model(filters: int = 16, classes: int = 10) -> keras.Model:
    return keras.Sequential([
        keras.Input(shape=(8, 8, 1)),
        keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(2 * filters, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(classes, activation="softmax"),
    ])


def load_data(validation_fraction: float = 0.2, seed: int = 0):
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order], labels[order].astype("int32")
    held_out = int(len(images) * validation_fraction)
    return {"train": (images[held_out:], labels[held_out:]),
            "validation": (images[:held_out], labels[:held_out])}
