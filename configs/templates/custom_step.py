"""A model with a training step of its own (keras-io's "Customizing what happens in fit()",
TensorFlow form): override train_step, keep everything else of fit. ktrain averages the
gradients of every optimizer the model holds, so the step trains alike on any number of
workers. Here a plain step on the digits; change it to your own loss or update."""

import keras
import numpy as np


class OwnStep(keras.Model):
    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {metric.name: metric.result() for metric in self.metrics}


def build_model(hidden: int = 64) -> keras.Model:
    inputs = keras.Input(shape=(64,))
    hidden_layer = keras.layers.Dense(hidden, activation="relu")(inputs)
    model = OwnStep(inputs, keras.layers.Dense(10, activation="softmax")(hidden_layer))
    model.compile(optimizer=keras.optimizers.Adam(0.003),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def load_data(validation_fraction: float = 0.2, seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order].astype("int32")
    held_out = int(len(x) * validation_fraction)
    return {"train": (x[held_out:], y[held_out:]), "validation": (x[:held_out], y[:held_out])}
