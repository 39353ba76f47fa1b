"""The model's parts, defined once: pretrained backbones, their preprocessing, and the dense head.

`featurize` and `finetune` must run exactly the same backbone with exactly the same
preprocessing, and `train_top` and `finetune` must build exactly the same head; both live here.

Each registry entry names the Keras application, its own `preprocess_input` (VGG16 and ResNet50
expect caffe-style BGR mean subtraction, Inception/Xception/MobileNetV2 scale to [-1, 1],
EfficientNetV2 rescales inside the model and expects 0..255), and the layer that ends each of its
last blocks, so `finetune.blocks: n` unfreezes everything after the end of block -(n+1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import applications

from stages.common import StageError
from stages.config import BACKBONES, Params, ParamsError, TopParams

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


REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "vgg16",
            applications.VGG16,
            applications.vgg16.preprocess_input,
            ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"),
            32,
            224,
            head_pool="flatten",
        ),
        Backbone(
            "resnet50",
            applications.ResNet50,
            applications.resnet50.preprocess_input,
            ("pool1_pool", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
            32,
            224,
        ),
        Backbone(
            "inception_v3",
            applications.InceptionV3,
            applications.inception_v3.preprocess_input,
            tuple(f"mixed{i}" for i in range(11)),
            75,
            299,
        ),
        Backbone(
            "xception",
            applications.Xception,
            applications.xception.preprocess_input,
            ("block2_pool", "block3_pool", "block4_pool")
            + tuple(f"block{i}_sepconv3_bn" for i in range(5, 13))
            + ("block13_pool", "block14_sepconv2_act"),
            71,
            299,
        ),
        Backbone(
            "mobilenet_v2",
            applications.MobileNetV2,
            applications.mobilenet_v2.preprocess_input,
            ("block_12_add", "block_13_project_BN", "block_14_add", "block_15_add", "out_relu"),
            32,
            224,
        ),
        Backbone(
            "efficientnet_v2_b0",
            applications.EfficientNetV2B0,
            applications.efficientnet_v2.preprocess_input,
            ("block3b_add", "block4c_add", "block5e_add", "top_activation"),
            32,
            224,
        ),
    )
}
assert tuple(REGISTRY) == BACKBONES, "config.BACKBONES and the registry must name the same backbones"


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

    `weights`: "imagenet" (downloaded once by Keras into ~/.keras/models), None (random init),
    or the path of a local .h5 file with the no-top weights.
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
            "path of a local .h5 weights file, or to null for random initialisation "
            "(as `make demo` does)."
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


def head_pool(top: TopParams, backbone: str) -> str:
    """`top.pool`, with `auto` resolved for `backbone`: `flatten` for VGG16, as in the recipe (at
    150 px its features are 4x4x512, 8,192 inputs to the dense layer), global average pooling for the
    others, whose feature maps are deeper (ResNet50 at 150 px: 5x5x2048, which flattened would give
    the dense layer 51,200 inputs and 13 million weights to learn from a few thousand images)."""
    return REGISTRY[backbone].head_pool if top.pool == "auto" else top.pool


def build_head(feature_shape: tuple[int, ...], num_classes: int, params: TopParams, pool: str) -> keras.Model:
    """The dense classifier: Flatten or global average pooling (`pool`, see `head_pool`), Dense(units,
    relu), Dropout, then sigmoid (2 classes) or softmax."""
    if num_classes < 2:
        raise StageError(f"a classifier needs at least 2 classes, got {num_classes}")
    inputs = keras.Input(shape=feature_shape, name="features")
    if pool == "flatten":
        x = keras.layers.Flatten(name="flatten")(inputs)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
    x = keras.layers.Dense(params.units, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(params.dropout, name="dropout")(x)
    # The output stays float32 under mixed precision, for a numerically stable loss.
    if num_classes == 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="prediction")(x)
    else:
        outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="prediction")(x)
    return keras.Model(inputs, outputs, name="top")


def head_loss(num_classes: int) -> str:
    return "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"


def build_classifier(
    base: keras.Model, head: keras.Model, backbone: str, augmentation: keras.Layer | None = None
) -> keras.Model:
    """Raw images -> [augmentation] -> preprocessing -> frozen-BN backbone -> head."""
    inputs = keras.Input(shape=base.input_shape[1:], name="image")
    x = augmentation(inputs) if augmentation is not None else inputs
    x = Preprocess(backbone, name="preprocess")(x)
    x = base(x, training=False)  # BatchNorm stays in inference mode even when unfrozen
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier")


def unfreeze_last_blocks(base: keras.Model, backbone: str, blocks: int) -> list[str]:
    """Freeze the whole base except its last `blocks` blocks; return the unfrozen layers' names."""
    _require_blocks(backbone, blocks)
    ends = REGISTRY[backbone].block_ends
    names = [layer.name for layer in base.layers]
    cut = names.index(ends[-(blocks + 1)])
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i > cut
    return [layer.name for layer in base.layers[cut + 1 :] if layer.weights]
