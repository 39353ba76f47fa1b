"""The recipe's baseline: a small convnet trained from scratch (`train_baseline`).

Keras is imported where a baseline is trained, not here: switched off, the stage takes a second.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from classifier import config

if TYPE_CHECKING:
    import keras


log = logging.getLogger(__name__)


#: Filters of the three convolution blocks, as in the recipe.
FILTERS = (32, 32, 64)


def build_baseline(
    image_size: tuple[int, int], num_classes: int, params: config.BaselineParams, augment: keras.Layer | None = None
) -> keras.Model:
    """Raw 0..255 RGB images -> [augmentation] -> 0..1 -> three conv/pool blocks -> dense head."""
    import keras

    inputs = keras.Input(shape=(*image_size, 3), name="image")
    x = augment(inputs) if augment is not None else inputs
    x = keras.layers.Rescaling(1 / 255, name="rescale")(x)
    for i, filters in enumerate(FILTERS, start=1):
        x = keras.layers.Conv2D(filters, 3, activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(params.units, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(params.dropout, name="dropout")(x)
    units, activation = (1, "sigmoid") if num_classes == 2 else (num_classes, "softmax")
    outputs = keras.layers.Dense(units, activation=activation, dtype="float32", name="prediction")(x)
    return keras.Model(inputs, outputs, name="baseline")


def train_baseline(
    prepared: Path,
    params: config.Params,
    strategy: Any,
    policy: str = "float32",
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train on the train split, validated each epoch; return the model for inference (float32, no
    augmentation layers) and the per-epoch history."""
    import keras

    from classifier.model import augment, heads, images, training

    p = params.baseline
    keras.utils.set_random_seed(params.seed)
    train = images.load_split(prepared, "train")
    validation = images.load_split(prepared, "validation")
    num_classes = len(train.classes)
    size = params.data.image_size

    def build() -> keras.Model:
        model = build_baseline(size, num_classes, p, augment.augmentation(params.finetune.augment, params.seed))
        heads.compile_classifier(model, keras.optimizers.RMSprop(learning_rate=p.learning_rate), num_classes)
        return model

    model, history = training.fit(
        "baseline",
        build,
        strategy,
        policy,
        train,
        validation,
        size,
        p.batch_size,
        p.epochs,
        params.seed,
        p.patience,
        callbacks,
    )
    saved = build_baseline(size, num_classes, p)
    for layer in saved.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return saved, history
