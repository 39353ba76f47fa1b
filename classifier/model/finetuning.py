"""Fine-tuning: the backbone with the weights its features came from and the trained head, last
block(s) unfrozen, trained on augmented images at a low learning rate with SGD; the saved model is
float32 without augmentation layers (`finetune`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from classifier import config
from classifier.model import augment, backbones, heads, images, training

log = logging.getLogger(__name__)


@dataclass
class Finetuned:
    model: keras.Model  # for inference: float32, no augmentation layers
    history: dict[str, list[float]]
    unfrozen: list[str]  # backbone layers with weights that were trained
    classes: list[str]


def assemble(
    params: config.Params, backbone_weights: Path, top: keras.Model, num_classes: int
) -> tuple[keras.Model, list[str]]:
    """Backbone (saved weights) + head (trained weights) + augmentation, last block(s) trainable."""
    base, head = heads.trained_parts(params, backbone_weights, top, num_classes)
    unfrozen = backbones.unfreeze_last_blocks(base, params.model.backbone, params.finetune.blocks)
    augmentation = augment.augmentation(params.finetune.augment, params.seed)
    return heads.build_classifier(base, head, params.model.backbone, augmentation), unfrozen


def inference_model(trained: keras.Model, params: config.Params, num_classes: int) -> keras.Model:
    """The trained backbone and head as a float32 classifier without augmentation layers.

    Augmentation only acts in training, and a model that holds none reloads on any Keras
    version; float32 makes the saved model independent of the precision that trained it.
    """
    base, head = heads.fresh_parts(params, num_classes)
    base.set_weights(trained.get_layer(base.name).get_weights())
    head.set_weights(trained.get_layer(head.name).get_weights())
    return heads.build_classifier(base, head, params.model.backbone)


def finetune(
    prepared: Path,
    backbone_weights: Path,
    top: keras.Model,
    params: config.Params,
    strategy: Any,
    policy: str = "float32",
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> Finetuned:
    """Train the unfrozen block(s) and the head on the train split, validated each epoch."""
    p = params.finetune
    keras.utils.set_random_seed(params.seed)
    train = images.load_split(prepared, "train")
    validation = images.load_split(prepared, "validation")
    num_classes = len(train.classes)
    unfrozen: list[str] = []

    def build() -> keras.Model:
        model, layers = assemble(params, backbone_weights, top, num_classes)
        sgd = keras.optimizers.SGD(learning_rate=p.learning_rate, momentum=p.momentum)
        heads.compile_classifier(model, sgd, num_classes)
        log.info("unfrozen: %s", ", ".join(layers))
        unfrozen.extend(layers)
        return model

    model, history = training.fit(
        "finetune",
        build,
        strategy,
        policy,
        train,
        validation,
        params.data.image_size,
        p.batch_size,
        p.epochs,
        params.seed,
        p.patience,
        callbacks,
    )
    return Finetuned(inference_model(model, params, num_classes), history, unfrozen, train.classes)
