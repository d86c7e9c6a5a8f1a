"""Synthetic images for throughput benchmarks: ResNet50 (weights=None, no download) on random data."""

import keras
import numpy as np


def build_model(image_size: int = 64, classes: int = 10) -> keras.Model:
    return keras.applications.ResNet50(weights=None, input_shape=(image_size, image_size, 3),
                                       classes=classes)


def load_data(samples: int = 256, image_size: int = 64, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((samples, image_size, image_size, 3), dtype=np.float32)
    y = rng.integers(0, classes, samples).astype("int32")
    return x, y
