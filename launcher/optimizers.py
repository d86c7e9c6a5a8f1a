"""The optimizers a model updates with: ``model.optimizer`` and every other Keras optimizer the
model or its layers hold, where Keras code keeps them (an attribute, or a list, tuple or dict
in one): a GAN's ``d_optimizer`` and ``g_optimizer``. ktrain builds, averages, checkpoints,
restores and audits each of them, in this order on every rank; and makes each average its
gradients over the workers (``averaging``), on any backend."""

from __future__ import annotations

from collections.abc import Callable

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


def averaging(optimizer: keras.optimizers.Optimizer,
              average: Callable[[list], list]) -> keras.optimizers.Optimizer:
    """Make ``optimizer`` hand its gradients to ``average`` (which returns the ones to apply)
    before every update: where Keras applies one, so with ``gradient_accumulation_steps=K``
    there is one exchange per K steps. The instance changes in place (its class becomes a
    subclass of its own class), so the model keeps the same optimizer object, its variables
    and its config; ``plain`` reverts it (before saving). A ``LossScaleOptimizer``'s inner
    optimizer is the one changed."""
    target = getattr(optimizer, "inner_optimizer", optimizer)
    base = type(target)
    if hasattr(base, "_ktrain_average"):
        return optimizer

    class Averaging(base):
        _ktrain_average = staticmethod(average)

        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            return super()._backend_update_step(self._ktrain_average(grads),
                                                trainable_variables, learning_rate)

    Averaging.__name__ = Averaging.__qualname__ = base.__name__
    Averaging.__module__ = base.__module__
    target.__class__ = Averaging
    return optimizer


def plain(optimizer: keras.optimizers.Optimizer) -> None:
    """Give an optimizer that ``averaging`` changed back its own class."""
    target = getattr(optimizer, "inner_optimizer", optimizer)
    if hasattr(type(target), "_ktrain_average"):
        target.__class__ = type(target).__mro__[1]
