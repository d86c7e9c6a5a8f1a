"""Exports of a trained model for serving: a SavedModel (TF Serving), TFLite and ONNX.

All three come from one SavedModel that Keras writes, whose ``serving_default`` signature
takes the model's inputs by their Input layers' names; TFLite and ONNX are converted from
that SavedModel, so every format takes the same named inputs and gives the same outputs.
TFLite uses the builtin ops only (what every TFLite runtime has, on phones too); ONNX comes
from tf2onnx, the converter Keras itself calls for ``model.export(format="onnx")``, given the
SavedModel (its own route captures a preprocessing layer's statistics as extra inputs).

Exports are made on TensorFlow whatever backend trained the model: the chief runs
``ktrain export`` as a child process at the end of a run, so a converter that fails (or
crashes) cannot take the finished run with it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile

from ktrain import backends, console
from ktrain.checkpoint import CheckpointStore, load_checkpoint_url
from ktrain.config import EXPORT_FORMATS as FORMATS
from ktrain.config import load_config
from ktrain.errors import UserError, all_of, first_line
from ktrain.output import RunOutput
from ktrain.userfn import load_function

TARGETS = {"saved_model": "export/saved_model", "tflite": "export/model.tflite",
           "onnx": "export/model.onnx"}
"""Where each format goes, under output_dir."""

_NEEDS = {"saved_model": [], "tflite": [], "onnx": ["tf2onnx", "onnx"]}


def missing_packages(formats: list[str]) -> UserError | None:
    """The packages ``formats`` need that this Python lacks (checked before training)."""
    import importlib.util

    missing = ["tensorflow"] if importlib.util.find_spec("tensorflow") is None else []
    missing += [p for f in formats for p in _NEEDS[f] if importlib.util.find_spec(p) is None]
    if not missing:
        return None
    return UserError(f"export: {', '.join(formats)} needs {', '.join(missing)}, which "
                     f"{'is' if len(missing) == 1 else 'are'} not installed", where="export",
                     hint="pip install 'ktrain-launcher[export]' (with tensorflow-cpu on a "
                          "JAX-only machine), or remove export from the config")


def export_model(model, output, formats: list[str]) -> tuple[dict[str, str], list[UserError]]:
    """Write ``formats`` of ``model`` into ``output`` (a RunOutput); return where each went
    and, for each that failed, why (the rest are still written)."""
    written, failures = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        saved_model = os.path.join(tmp, "saved_model")
        try:
            model.export(saved_model, format="tf_saved_model", verbose=False)
        except Exception as err:  # the model's own call cannot be traced: no format can be made
            return {}, [_cannot(model, "saved_model", err, [], "")]
        for name in formats:
            try:
                local = _CONVERTERS[name](model, saved_model, tmp)
            except UserError as err:
                failures.append(err)
                continue
            written[name] = output.publish(local, TARGETS[name])
    return written, failures


def _saved_model(model, saved_model: str, tmp: str) -> str:
    return saved_model


def _tflite(model, saved_model: str, tmp: str) -> str:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        flatbuffer = converter.convert()
    except Exception as err:
        # The converter's message locates each op as fused["OpType:", "graph/node/name@..."].
        ops = re.findall(r'fused\["(\w+):", "([^"@]+)@', str(err))
        unconverted = re.findall(r"'tf\.(\w+)' op is neither", str(err))
        ops = [(node, op) for op, node in ops if op in unconverted] or [
            ("", op) for op in unconverted]
        raise _cannot(model, "tflite", err, ops,
                      "TFLite's builtin ops lack these; change the layer to ops TFLite has, "
                      "or export saved_model and convert it with TensorFlow Lite's select TF "
                      "ops (a larger runtime)") from None
    local = os.path.join(tmp, "model.tflite")
    with open(local, "wb") as f:
        f.write(flatbuffer)
    return local


def _onnx(model, saved_model: str, tmp: str) -> str:
    import onnx
    from tf2onnx import convert, tf_loader

    # ktrain reports what failed; TensorFlow's deprecation notes about tf2onnx's calls are noise
    for name in ("tf2onnx", "tensorflow"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    local = os.path.join(tmp, "model.onnx")
    try:
        graph, inputs, outputs, renamed = tf_loader.from_saved_model(
            saved_model, None, None, tag="serve", signatures=["serving_default"],
            return_tensors_to_rename=True)
        proto, _ = convert.from_graph_def(graph, input_names=inputs, output_names=outputs,
                                          tensors_to_rename=renamed)
    except Exception as err:
        raise _cannot(model, "onnx", err, [], "") from None
    # tf2onnx leaves an op it cannot convert in the graph as it was, under TensorFlow's name.
    left = [(node.name, node.op_type) for node in proto.graph.node
            if not onnx.defs.has(node.op_type, node.domain or "")]
    if left:
        raise _cannot(model, "onnx", None, left,
                      "tf2onnx has no ONNX conversion for these; change the layer to other "
                      "ops, or export saved_model or tflite")
    onnx.save(proto, local)
    return local


_CONVERTERS = {"saved_model": _saved_model, "tflite": _tflite, "onnx": _onnx}


def _cannot(model, fmt: str, err: Exception | None, ops: list[tuple[str, str]],
            hint: str) -> UserError:
    """Name the layer (and op) that ``fmt`` cannot take, from the graph's node names."""
    if ops:
        named = sorted({f"layer '{_layer_of(node, model)}' (op {op})" if _layer_of(node, model)
                        else f"op {op}" for node, op in ops})
        what = f"{', '.join(named)} cannot be exported"
    else:
        what = f"the model cannot be exported: {first_line(err)[:300]}"
    return UserError(what, where=f"export {fmt}", hint=hint or None)


def _layer_of(node: str, model) -> str:
    """The innermost of the model's layers whose name is on a graph node's path (TensorFlow
    names a node model/layer_1/op, numbering each name it traces)."""
    names = set()
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        names.add(layer.name)
        stack.extend(getattr(layer, "layers", []))
    found = ""
    for part in node.split("/"):
        for candidate in (part, re.sub(r"_\d+$", "", part)):
            if candidate in names:
                found = candidate
    return found


# ------------------------------------------------------------------- ktrain export


def export_run(run_dir: str, formats: list[str] | None,
               checkpoint: str | None) -> dict[str, str]:
    """``ktrain export``: write ``formats`` (default: the run's export list, else all) of a
    run's model.keras (or of a checkpoint's weights in the run's model) under
    ``run_dir``/export; exit 2 naming each format that failed, after writing the others."""
    output = RunOutput.named(run_dir)
    run = _run_config(output)
    formats = formats or run.export or list(FORMATS)
    problem = missing_packages(formats)
    if problem:
        raise problem
    console.import_keras("tensorflow")
    store = CheckpointStore(output.checkpoints_url)
    if checkpoint is None and output.has_model():
        model, source = _final_model(run, output), f"{output.url}/model.keras"
    else:
        if checkpoint in (None, "latest"):
            if not store.positions():
                raise UserError(f"'{run_dir}' holds neither model.keras nor a checkpoint",
                                where="ktrain export",
                                hint="give the output_dir of a run that trained at least "
                                     "one epoch")
            checkpoint = store.file_for(store.positions()[-1])
        from ktrain.assembly import checkpoint_model  # loads Keras: not at `ktrain run`'s start

        model, source = checkpoint_model(run, load_checkpoint_url(checkpoint)), checkpoint
    written, failures = export_model(model, output, formats)
    for name, url in written.items():
        output.say(f"export: {name} of {source} -> {url}")
    if written and output.fs.exists(f"{output.path}/summary.json"):
        output.update_summary(exports={**output.read_summary().get("exports", {}), **written})
    if failures:
        raise all_of(failures)
    return written


def _run_config(output):
    if not output.fs.exists(f"{output.path}/config.yaml"):
        raise UserError(f"'{output.url}' is not a ktrain run's output_dir (it has no "
                        f"config.yaml)", where="ktrain export",
                        hint="give the output_dir of a run that trained at least one epoch")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "config.yaml")
        output.fs.get_file(f"{output.path}/config.yaml", local)
        os.environ.pop(backends.ENV, None)  # exports are made on TensorFlow, see above
        return load_config(local)


def _final_model(run, output):
    import keras

    load_function(run.model.fn, "model.fn", run.base_dir)  # registers the model's own layers
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.keras")
        output.fs.get_file(f"{output.path}/model.keras", local)
        return keras.saving.load_model(local, compile=False)


def export_after_run(output_url: str, formats: list[str], say) -> None:
    """At the end of a run (chief): ``ktrain export`` in a child process; its lines go to
    ``say``, and a failure is a warning, never the run's failure."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # converting is CPU work; the run still holds its GPUs
    done = subprocess.run(
        [sys.executable, "-m", "ktrain", "export", output_url, "--format", ",".join(formats)],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("export:"):
            say(line)
    if done.returncode:  # the child's own report is its last lines, from "ktrain: error:" on
        _, marker, report = done.stderr.rpartition("ktrain: error: ")
        say(f"warning: {(report if marker else done.stderr[-2000:]).strip()}\n(the run itself "
            f"is complete; `ktrain export {output_url}` tries again)")
