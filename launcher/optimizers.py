"""The optimizers a model updates with: ``model.optimizer`` and every other Keras optimizer the
model or its layers hold, where Keras code keeps them (an attribute, or a list, tuple or dict
in one): a GAN's ``d_optimizer`` and ``g_optimizer``. ktrain builds, averages, checkpoints,
restores and audits each of them, in this order on every rank."""

from __future__ import annotations

import keras


def optimizers_of(model: keras.Model) -> dict[str, keras.optimizers.Optimizer]:
    """Each optimizer once, by where it is held: ``optimizer`` (model.optimizer) first, then
    the model's attributes (``d_optimizer``), then its layers' (``critic.optimizer``)."""
    found: dict[str, keras.optimizers.Optimizer] = {}

    def add(name: str, value, nested: bool = True) -> None:
        if isinstance(value, keras.optimizers.Optimizer):
            if not any(value is seen for seen in found.values()):
                found[name] = value
        elif nested and isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                add(f"{name}[{i}]", item, nested=False)
        elif nested and isinstance(value, dict):
            for key, item in value.items():
                add(f"{name}[{key!r}]", item, nested=False)

    if model.optimizer is not None:
        add("optimizer", model.optimizer)
    for holder in model._flatten_layers(include_self=True):
        prefix = "" if holder is model else f"{holder.name}."
        for attribute, value in vars(holder).items():
            add(prefix + attribute.lstrip("_"), value)
    return found


def optimizer_variables(model: keras.Model) -> list:
    """Every optimizer's variables, one optimizer after another (what a checkpoint holds)."""
    return [v for optimizer in optimizers_of(model).values() for v in optimizer.variables]


def steps_done(optimizers) -> int:
    """Training steps taken: the most updates any of a model's ``optimizers`` (those of
    ``optimizers_of``) has applied (a GAN applies each of its two once a step; its
    model.optimizer may never be used)."""
    return max(int(o.iterations.numpy()) for o in optimizers)
