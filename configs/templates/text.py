"""A text classifier: raw strings in, TextVectorization + Embedding + pooling, on a small
generated corpus (which colour each sentence names most). TextVectorization is adapted on the
training texts (``train_data``, which ktrain passes to a model fn that asks for it). Put your
own texts and labels in load_data."""

import keras
import numpy as np

COLOURS = ["red", "green", "blue", "gold"]
FILLER = ["the", "a", "of", "and", "sky", "sea", "leaf", "sun"]


def build_model(train_data, vocabulary: int = 32, length: int = 16, width: int = 16,
                classes: int = len(COLOURS)) -> keras.Model:
    vectorize = keras.layers.TextVectorization(max_tokens=vocabulary,
                                               output_sequence_length=length)
    vectorize.adapt(train_data.map(lambda text, label: text))
    texts = keras.Input(shape=(), dtype="string")
    tokens = keras.layers.Embedding(vocabulary, width)(vectorize(texts))
    pooled = keras.layers.GlobalAveragePooling1D()(tokens)
    return keras.Model(texts, keras.layers.Dense(classes, activation="softmax")(pooled))


def load_data(examples: int = 2048, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = np.array(COLOURS + FILLER)
    drawn = rng.integers(0, len(words), size=(examples, 12))
    texts = np.array([" ".join(words[row]) for row in drawn])
    counts = np.stack([(drawn == k).sum(axis=1) for k in range(len(COLOURS))], axis=1)
    labels = np.argmax(counts + rng.random(counts.shape) * 0.5, axis=1).astype("int32")
    held_out = examples // 5
    return {"train": (texts[held_out:], labels[held_out:]),
            "validation": (texts[:held_out], labels[:held_out])}
