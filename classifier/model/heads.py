"""The dense head on a backbone's features, and the classifier that puts the two together.

Flatten or global average pooling (`top.pool`, see `head_pool`), Dense(units, relu), Dropout, then
a sigmoid for two classes or a softmax for more.
"""

from __future__ import annotations

from pathlib import Path

import keras

from classifier.config import Params, TopParams
from classifier.errors import StageError
from classifier.model.backbones import REGISTRY, Preprocess, build_backbone


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


def compile_classifier(model: keras.Model, optimizer: keras.optimizers.Optimizer, num_classes: int) -> None:
    """Compile `model` with the head's loss (binary cross-entropy for 2 classes, else sparse
    categorical) and accuracy, both averaged over the batch by sample weight: a picture of weight 0
    (what completes a batch split over several devices, `images.Batches`) counts in neither, and
    without weights both are the plain mean."""
    losses = keras.losses
    loss = losses.BinaryCrossentropy if num_classes == 2 else losses.SparseCategoricalCrossentropy
    model.compile(optimizer=optimizer, loss=loss(reduction="mean_with_sample_weight"), weighted_metrics=["accuracy"])


def build_classifier(
    base: keras.Model, head: keras.Model, backbone: str, augmentation: keras.Layer | None = None
) -> keras.Model:
    """Raw images -> [augmentation] -> preprocessing -> frozen-BN backbone -> head."""
    inputs = keras.Input(shape=base.input_shape[1:], name="image")
    x = augmentation(inputs) if augmentation is not None else inputs
    x = Preprocess(backbone, name="preprocess")(x)
    # Inference mode for the base where nothing overrides it (predict); under `fit` Keras passes
    # training=True down regardless, which is why unfreeze_last_blocks keeps BatchNorm frozen.
    x = base(x, training=False)
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier")


def fresh_parts(params: Params, num_classes: int) -> tuple[keras.Model, keras.Model]:
    """A fresh backbone (random init) and head, in the current dtype policy."""
    base = build_backbone(params.model.backbone, None, params.data.image_size)
    head = build_head(
        tuple(base.output_shape[1:]), num_classes, params.top, head_pool(params.top, params.model.backbone)
    )
    return base, head


def trained_parts(
    params: Params, backbone_weights: Path, top: keras.Model, num_classes: int
) -> tuple[keras.Model, keras.Model]:
    """The backbone with the weights its features came from and the head trained on those features."""
    base, head = fresh_parts(params, num_classes)
    base.load_weights(backbone_weights)
    head.set_weights(top.get_weights())
    return base, head


def frozen_classifier(params: Params, backbone_weights: Path, top: keras.Model, num_classes: int) -> keras.Model:
    """The recipe's second model: the frozen backbone and the head trained on its cached features, as
    one classifier of raw pictures (what train_top registers), in the current dtype policy: float32
    there, as in every saved model."""
    return build_classifier(*trained_parts(params, backbone_weights, top, num_classes), params.model.backbone)
