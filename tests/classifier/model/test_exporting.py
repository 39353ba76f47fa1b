"""The exported formats: each run by its own runtime gives the Keras model's probabilities, from raw pixels."""

from __future__ import annotations

import keras
import numpy as np
import onnxruntime

from classifier.metrics import scores
from classifier.model import exporting
from classifier.model.backbones import Preprocess


def small_classifier(classes: int, dtype: str = "float32") -> keras.Model:
    """Raw 0..255 pixels -> VGG16's preprocessing -> a small convnet -> probabilities."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(24, 24, 3), name="image")
    x = Preprocess("vgg16", name="preprocess", dtype=dtype)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", dtype=dtype)(x)
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype)(x)
    x = keras.layers.Dense(8, activation="relu", dtype=dtype)(x)
    if classes == 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x)
    else:
        outputs = keras.layers.Dense(classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs)


def pixels(count: int) -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 255, (count, 24, 24, 3)).astype(np.float32)


def test_each_format_gives_the_keras_probabilities_from_raw_pixels(tmp_path):
    model = small_classifier(3)
    written = exporting.export(model, tmp_path, exporting.FILES)
    assert {name: path.name for name, path in written.items()} == exporting.FILES
    assert all(path.exists() for path in written.values())
    # Batches of different sizes: the batch dimension of every export is free.
    largest = exporting.check(model, written, [pixels(5), pixels(2)])
    assert set(largest) == set(exporting.FILES)
    assert all(value < 1e-5 for value in largest.values()), largest
    # The preprocessing is inside: onnxruntime alone, given the pixels, gives the model's answer.
    session = onnxruntime.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: pixels(3)})[0]
    np.testing.assert_allclose(got, model.predict(pixels(3), verbose=0), atol=1e-5)
    assert got.shape == (3, 3)


#: Exports small_classifier(3) as ONNX and LiteRT into the folder argv[1], in a process of its own.
EXPORT_AGAIN = """
import sys
from pathlib import Path
from classifier.model import exporting
import keras
from tests.classifier.model.test_exporting import small_classifier
keras.utils.clear_session()
Path(sys.argv[1]).mkdir()
exporting.export(small_classifier(3), Path(sys.argv[1]), ["onnx", "litert"])
"""


def test_the_same_model_exports_to_the_same_onnx_and_litert_bytes(tmp_path):
    """Twice in this process (tf2onnx numbers the names it makes with a counter that runs on) and once
    in another with another hash seed (which decides which of several equal constants it keeps), as
    the export stage does: one model, its layers named as the first in a process."""
    import os
    import subprocess
    import sys

    from ops.code import ROOT

    keras.utils.clear_session()  # its layers named as the other process names them
    model = small_classifier(3)
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        exporting.export(model, tmp_path / folder, ["onnx", "litert"])
    subprocess.run(
        [sys.executable, "-c", EXPORT_AGAIN, str(tmp_path / "third")],
        env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)},
        check=True,
        capture_output=True,
        timeout=300,
    )
    for name in ("model.onnx", "model.tflite"):
        first = (tmp_path / "first" / name).read_bytes()
        assert [(tmp_path / folder / name).read_bytes() == first for folder in ("second", "third")] == [True, True], (
            name
        )


def test_a_two_class_model_is_checked_on_both_class_probabilities(tmp_path):
    model = small_classifier(2)
    written = exporting.export(model, tmp_path, ["onnx"])
    session = onnxruntime.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": pixels(4)})[0].shape == (4, 1), "the second class' probability"
    largest = exporting.check(model, written, [pixels(4)])
    assert list(largest) == ["onnx"] and largest["onnx"] < 1e-5
    # the check compares class probabilities: the first class' is 1 - the export's one column
    p = model.predict(pixels(4), verbose=0)[:, 0]
    run = exporting.RUNTIMES["onnx"](written["onnx"])
    np.testing.assert_allclose(scores.as_class_probabilities(run(pixels(4)))[:, 0], 1 - p, atol=1e-5)


def test_a_bfloat16_model_is_exported_in_float32_with_its_weights():
    model = small_classifier(3, dtype="mixed_bfloat16")
    copy = exporting.float32(model)
    assert copy is not model
    assert {layer.dtype_policy.name for layer in copy._flatten_layers(include_self=False)} == {"float32"}
    for mine, theirs in zip(copy.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, np.asarray(theirs, dtype=np.float32))
    # bfloat16 keeps about 3 significant digits (pixels near 100 round by up to 0.5): the copies agree to that
    np.testing.assert_allclose(copy.predict(pixels(4), verbose=0), model.predict(pixels(4), verbose=0), atol=0.05)
    float_model = small_classifier(3)
    assert exporting.float32(float_model) is float_model


def test_a_model_holding_constant_tensors_exports_to_onnx_with_one_input(tmp_path):
    """A Normalization layer given its mean and variance (as EfficientNetV2's is) holds them as constant
    tensors, which a conversion of the Keras function turns into ONNX inputs: the export takes the
    pixels alone."""
    inputs = keras.Input(shape=(32, 32, 3), name="image")
    x = keras.layers.Normalization(mean=[120.0, 110.0, 100.0], variance=[3000.0, 2800.0, 2600.0])(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    written = exporting.export(model, tmp_path, ["onnx"])
    session = onnxruntime.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"image": x})[0], model.predict(x, verbose=0), atol=1e-5)
    assert not (tmp_path / "saved_model").exists(), "the SavedModel it went through is not left behind"


def test_an_efficientnet_lite_classifier_exports_to_every_format(tmp_path):
    """EfficientNet-Lite's layers (ReLU6, depthwise convolutions, its preprocessing) in each runtime."""
    from classifier.model import backbones, heads

    keras.utils.set_random_seed(0)
    base = backbones.build_backbone("efficientnet_lite0", None, (32, 32))
    head = keras.Sequential([keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
    model = heads.build_classifier(base, head, "efficientnet_lite0")
    written = exporting.export(model, tmp_path, exporting.FILES)
    batch = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    largest = exporting.check(model, written, [batch])
    assert set(largest) == set(exporting.FILES) and all(value < 1e-4 for value in largest.values()), largest
