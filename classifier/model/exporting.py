"""The chosen model in standard formats, each checked against the Keras model it came from.

Keras 3's `model.export` writes a TensorFlow SavedModel (what TF Serving loads) and LiteRT (.tflite,
for phones and browsers); ONNX (for onnxruntime and the runtimes that read ONNX) is tf2onnx's
conversion of that SavedModel (`_onnx_from_saved_model` says why not Keras's own). Each
holds the whole classifier, preprocessing included: it takes a batch of RGB pixels, 0..255 as
float32, at the model's size, as the Keras model does, and gives its output (two classes: one column,
the probability of the second class; more: one probability per class). The model is exported in
float32, whatever precision scored it. `check` runs each export with its own runtime (onnxruntime,
TensorFlow, the LiteRT interpreter) on the same pictures as the Keras model and measures the largest
difference in any class probability.

TensorFlow does the conversion: the stage runs on Keras's TensorFlow backend.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from classifier.metrics.scores import as_class_probabilities

log = logging.getLogger(__name__)

#: Each format's file or folder in the export folder.
FILES = {"onnx": "model.onnx", "tf_saved_model": "saved_model", "litert": "model.tflite"}


def float32(model: Any) -> Any:
    """`model` when every layer computes in float32; else a float32 copy with the same weights (a
    model built under a bfloat16 or float16 policy): ONNX and LiteRT take float32 pixels, and Keras
    exports ONNX from float32 models only."""
    import keras

    layers = model._flatten_layers(include_self=False, recursive=True)
    if all(layer.dtype_policy.name == "float32" for layer in layers):
        return model

    def clone(layer: keras.Layer) -> keras.Layer:
        config = layer.get_config()
        config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights([np.asarray(w, dtype=np.float32) for w in model.get_weights()])
    return copy


def _onnx_from_saved_model(saved_model: Path, path: Path) -> None:
    """ONNX converted by tf2onnx from a SavedModel, whose graph it freezes whole. Keras's own ONNX
    export converts the model's function instead, where tf2onnx turns the constant tensors a layer
    holds (the mean and variance of EfficientNetV2's Normalization) into inputs nobody can give.
    The same model gives the same bytes, in one process or several."""
    from tf2onnx import convert, tf_loader

    graph, inputs, outputs, renamed = tf_loader.from_saved_model(
        str(saved_model), None, None, signatures=["serving_default"], return_tensors_to_rename=True
    )
    converted, _ = convert.from_graph_def(graph, input_names=inputs, output_names=outputs, tensors_to_rename=renamed)
    path.write_bytes(_canonical(converted).SerializeToString())


#: A name tf2onnx made up: numbered by a counter that runs on through a process (`__<n>`, the
#: unknown dimensions' `unk__<n>`), or a constant that its merging of equal constants kept, of
#: several, in an order that varies with Python's hash seed (`const_starts__5` or `const_ends__6`).
_MADE_UP = re.compile(r"__\d+(?=(:\d+)?$)")


def _canonical(model: Any) -> Any:
    """The ONNX `model` with the names tf2onnx made up numbered in the order the graph uses them, and
    its constants and shapes sorted by name: the same model converts to the same bytes each time."""
    graph, names = model.graph, dict[str, str]()
    used = [n for node in graph.node for n in (*node.input, node.name, *node.output)]
    for name in [*used, *(t.name for t in graph.initializer)]:
        if _MADE_UP.search(name) and name not in names:
            names[name] = f"const__{len(names)}" if name.startswith("const_") else _MADE_UP.sub(f"__{len(names)}", name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
        node.name = names.get(node.name, node.name)
    dims: dict[str, str] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        info.name = names.get(info.name, info.name)
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = dims.setdefault(dim.dim_param, f"unk__{len(dims)}")
    for tensors in (graph.initializer, graph.value_info):
        for tensor in tensors:
            tensor.name = names.get(tensor.name, tensor.name)
        ordered = sorted(tensors, key=lambda t: t.name)
        del tensors[:]
        tensors.extend(ordered)
    return model


def export(model: Any, out: Path, formats: Iterable[str]) -> dict[str, Path]:
    """Write `model` (float32: see `float32`) into `out` in each of `formats` (keys of FILES); return
    where each went. ONNX goes through the SavedModel (`_onnx_from_saved_model`)."""
    import tempfile

    written = {}
    model(np.zeros((1, *model.input_shape[1:]), dtype=np.float32))  # Keras exports only a model it has run
    formats = list(formats)
    with tempfile.TemporaryDirectory() as tmp:
        saved_model = out / FILES["tf_saved_model"] if "tf_saved_model" in formats else Path(tmp) / "saved_model"
        if "tf_saved_model" in formats or "onnx" in formats:
            log.info("exporting as tf_saved_model: %s", saved_model)
            model.export(str(saved_model), format="tf_saved_model", verbose=False)
        for name in formats:
            path = out / FILES[name]
            if name == "onnx":
                log.info("converting the SavedModel to onnx: %s", path)
                _onnx_from_saved_model(saved_model, path)
            elif name == "litert":
                log.info("exporting as litert: %s", path)
                model.export(str(path), format=name, verbose=False)
            written[name] = path
    return written


def _onnx(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def _saved_model(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # held by the function: its variables live as long as it
    return lambda batch: loaded.serve(tf.constant(batch)).numpy()


def _litert(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    given, taken = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]

    def run(batch: np.ndarray) -> np.ndarray:
        interpreter.resize_tensor_input(given, list(batch.shape))  # the batch dimension is free
        interpreter.allocate_tensors()
        interpreter.set_tensor(given, batch)
        interpreter.invoke()
        return interpreter.get_tensor(taken).copy()

    return run


#: How each format is run: its path -> a function of a batch of pixels.
RUNTIMES: dict[str, Callable[[Path], Callable[[np.ndarray], np.ndarray]]] = {
    "onnx": _onnx,
    "tf_saved_model": _saved_model,
    "litert": _litert,
}


def check(model: Any, exported: dict[str, Path], batches: Iterable[Any]) -> dict[str, float]:
    """{format: the largest absolute difference between its class probabilities and the Keras model's},
    over every picture of `batches`."""
    runs = {name: RUNTIMES[name](path) for name, path in exported.items()}
    largest = dict.fromkeys(runs, 0.0)
    for batch in batches:
        pixels = np.asarray(batch, dtype=np.float32)
        expected = as_class_probabilities(model.predict(pixels, verbose=0))
        for name, run in runs.items():
            got = as_class_probabilities(run(pixels))
            largest[name] = max(largest[name], float(np.max(np.abs(got - expected))))
    return largest
