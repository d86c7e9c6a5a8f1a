"""Sharded data parallelism on JAX (``strategy.shard``): ZeRO's three stages in substance,
through the sharding XLA compiles into the train step (GSPMD) rather than collectives of our
own.

A variable that is split gets a layout that cuts its largest axis the device count divides
over the data-parallel mesh axis (the one ``DataParallel`` splits each batch over); variables
of fewer than ``MIN_ELEMENTS`` values stay whole (splitting them saves little and costs a
collective each). XLA then gathers a split value where the step needs it whole and reduces
gradients into the parts that use them:

- ``optimizer``: the optimizers' variables (Adam's moments, SGD's momentum) are split; the
  parameters stay whole on every device; each device updates its part, and XLA gathers the
  new parameters.
- ``gradients``: also the gradients, constrained to their variable's layout where the
  optimizer receives them, so their sum over the devices is a reduce-scatter.
- ``parameters``: also the model's variables, split as they are created (``sharded``):
  each device holds its part, and the step gathers a layer's weights where it uses them.

The math is one device's (the same global batch; tests: 1e-5). Checkpoints hold whole values
(gathered as they are captured), so they move between modes, device counts and backends.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ktrain import backends
from ktrain.environment import visible_gpus
from ktrain.errors import UserError
from ktrain.userfn import call_user, load_function

MIN_ELEMENTS = 1024
"""Variables smaller than this stay whole on every device."""


def check(run) -> None:
    """Refuse ``strategy.shard`` or ``model_parallel`` where ktrain cannot split the state:
    before anything starts."""
    if run.strategy.model_parallel is not None:
        _check_model_parallel(run)
        return
    mode = run.strategy.shard
    if mode == "none":
        return
    where = "strategy.shard"
    if backends.current() != "jax":
        raise UserError(f"shard: {mode} splits the training state over the devices with XLA's "
                        f"sharding, on the JAX backend only; this run uses "
                        f"{backends.current()}", where=where,
                        hint="set backend: jax, or remove strategy.shard")
    if run.strategy.name != "mirrored" and run.checkpoint.every_minutes:
        raise UserError(f"shard: {mode} across processes and checkpoint.every_minutes: every "
                        f"process gathers the split state for a checkpoint, so they must take "
                        f"it at the same step, and their clocks differ",
                        where="checkpoint.every_minutes",
                        hint="use checkpoint.every_steps (or every_epochs) instead")
    if getattr(run.strategy, "elastic", False):
        raise UserError(f"shard: {mode} and an elastic group (strategy.workers is a range): a "
                        f"lost worker takes its part of the state with it", where=where,
                        hint="use a fixed number of workers, or remove strategy.shard")


def _check_model_parallel(run) -> None:
    strategy, where = run.strategy, "strategy.model_parallel"
    mesh = strategy.model_parallel.mesh
    if backends.current() != "jax":
        raise UserError(f"model_parallel cuts variables over a device mesh with XLA's "
                        f"sharding, on the JAX backend only; this run uses "
                        f"{backends.current()}", where=where,
                        hint="set backend: jax, or remove strategy.model_parallel")
    if strategy.shard != "none":
        raise UserError(f"strategy.shard: {strategy.shard} and model_parallel together: ktrain "
                        f"cuts variables over one mesh axis at a time", where=where,
                        hint="choose one of them")
    if strategy.name != "mirrored":
        raise UserError(f"model_parallel runs under mirrored (one process over its devices), "
                        f"not {strategy.name}", where=where,
                        hint=f"use strategy.name: mirrored with devices: "
                             f"{mesh.data * mesh.model}")
    devices = (visible_gpus() or 1) if strategy.devices == "auto" else strategy.devices
    if devices != mesh.data * mesh.model:
        raise UserError(f"model_parallel.mesh is {mesh.data} x {mesh.model} = "
                        f"{mesh.data * mesh.model} devices, and the run has {devices}",
                        where=f"{where}.mesh",
                        hint=f"set strategy.devices: {mesh.data * mesh.model}, or a mesh whose "
                             f"data x model is {devices}")


def split_layout(shape, mesh, axis: str, min_size: int = MIN_ELEMENTS):
    """The layout that cuts the largest axis of ``shape`` that the mesh's ``axis`` divides over
    it; None to keep it whole (fewer than ``min_size`` values, or no axis divides)."""
    from keras.distribution import TensorLayout

    devices = mesh.shape[list(mesh.axis_names).index(axis)]
    if devices < 2 or int(np.prod(shape)) < min_size:
        return None
    fits = [i for i, size in enumerate(shape) if size % devices == 0 and size >= devices]
    if not fits:
        return None
    cut = max(fits, key=lambda i: shape[i])
    return TensorLayout([axis if i == cut else None for i in range(len(shape))], mesh)


def sharded(session, strategy, base_dir: str):
    """``session``, whose distribution creates every large variable split: over the data
    axis with ``shard: parameters``, over the model axis with ``model_parallel``; so the
    optimizers' variables too (Keras gives those their model variable's layout)."""
    if session.distribution is None:
        return session
    if getattr(strategy, "model_parallel", None) is not None:
        return _model_parallel(session, strategy.model_parallel, base_dir)
    if strategy.shard != "parameters":
        return session
    import keras

    class ShardedParameters(keras.distribution.DataParallel):
        def get_variable_layout(self, variable):
            if getattr(variable, "_layout", None) is None:
                layout = split_layout(variable.shape, self.device_mesh, self.batch_dim_name)
                if layout is not None:
                    return layout
            return super().get_variable_layout(variable)

    plain = session.distribution
    return dataclasses.replace(session, distribution=ShardedParameters(
        device_mesh=plain.device_mesh, auto_shard_dataset=plain.auto_shard_dataset))


def _model_parallel(session, parallel, base_dir: str):
    """A ``ModelParallel`` over a (data, model) mesh of the session's devices: the user's
    layout map first (``layout_fn``), then the min_size rule over the model axis; each data
    group takes its part of the global batch."""
    from keras.distribution import DeviceMesh, LayoutMap, ModelParallel

    devices = list(np.asarray(session.distribution.device_mesh.devices).flatten())
    mesh = DeviceMesh((parallel.mesh.data, parallel.mesh.model), ("batch", "model"), devices)
    layouts = LayoutMap(mesh)
    if parallel.layout_fn:
        key = "strategy.model_parallel.layout_fn"
        layouts = call_user(load_function(parallel.layout_fn, key, base_dir), {"mesh": mesh}, key)
        if not isinstance(layouts, LayoutMap):
            raise UserError(f"layout_fn returned a {type(layouts).__name__}", where=key,
                            hint="return a keras.distribution.LayoutMap(mesh) whose keys are "
                                 "variable paths (regular expressions)")

    class RuleModelParallel(ModelParallel):
        def get_variable_layout(self, variable):
            if getattr(variable, "_layout", None) is None and \
                    self._layout_map[variable.path] is None:
                layout = split_layout(variable.shape, self.device_mesh, "model",
                                      parallel.min_size)
                if layout is not None:
                    return layout
            return super().get_variable_layout(variable)

    return dataclasses.replace(session, num_replicas=parallel.mesh.data,
                               distribution=RuleModelParallel(layout_map=layouts,
                                                              batch_dim_name="batch"))


def split_state(model, distribution, mode: str) -> None:
    """Once the model and its optimizers are built: split what ``mode`` splits that was not
    created split, and constrain the gradients the optimizers receive."""
    if mode == "none" or distribution is None:
        return
    import jax

    from ktrain.optimizers import averaging, optimizer_variables, optimizers_of

    mesh, axis = distribution.device_mesh, distribution.batch_dim_name
    for variable in optimizer_variables(model):
        layout = split_layout(variable.shape, mesh, axis)
        if layout is not None:
            variable._layout = layout  # Keras' own slot: assign() places values by it
            variable.assign(variable.value)
    if mode in ("gradients", "parameters"):
        def constrained(grads):
            return [g if (layout := split_layout(g.shape, mesh, axis)) is None else
                    jax.lax.with_sharding_constraint(g, layout.backend_layout) for g in grads]

        for optimizer in optimizers_of(model).values():
            averaging(optimizer, constrained)


def bytes_per_device(model, mode: str, devices: int) -> dict[str, int]:
    """Bytes of parameters, optimizer state and gradients that one device holds."""
    from ktrain.optimizers import optimizer_variables

    def held(variables) -> int:
        return sum(_on_one_device(v) for v in variables)

    def gradient(v) -> int:
        whole = int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
        if _on_one_device(v) < whole:  # a split variable's gradient is laid out as it is
            return _on_one_device(v)
        split = mode in ("gradients", "parameters") and devices > 1 and \
            int(np.prod(v.shape)) >= MIN_ELEMENTS and any(
                s % devices == 0 and s >= devices for s in v.shape)
        return whole // devices if split else whole

    return {"parameters": held(model.variables),
            "optimizer_state": held(optimizer_variables(model)),
            "gradients": sum(gradient(v) for v in model.trainable_variables)}


def _on_one_device(variable) -> int:
    value = variable.value
    shards = getattr(value, "addressable_shards", None)
    if shards:
        return int(shards[0].data.nbytes)
    return int(np.prod(variable.shape)) * np.dtype(variable.dtype).itemsize


def unsplit(model) -> None:
    """The gradient constraint undone, and every split variable whole again on every device
    (before the model is saved: the chief writes model.keras from its own memory). Every
    process calls it."""
    from keras.distribution import TensorLayout

    from ktrain.optimizers import optimizer_variables, optimizers_of, plain

    for optimizer in optimizers_of(model).values():
        plain(optimizer)
    for variable in [*model.variables, *optimizer_variables(model)]:
        layout = getattr(variable, "_layout", None)
        if isinstance(layout, TensorLayout) and any(layout.axes):
            whole = host_value(variable)
            variable._layout = TensorLayout([None] * len(variable.shape), layout.device_mesh)
            variable.assign(whole)


def host_value(variable) -> np.ndarray:
    """A variable's whole value in this process' memory: gathered from every process where it
    is split across them (every process calls this at the same point)."""
    if replicated(variable):
        return np.asarray(variable.numpy())
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(variable.value, tiled=True))


def replicated(variable) -> bool:
    """Whether this process holds the variable's whole value."""
    value = variable.value
    return getattr(value, "is_fully_addressable", True) or \
        getattr(value, "is_fully_replicated", True)
