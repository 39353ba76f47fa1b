"""Fine-tuning: the backbone with the weights its features came from and the trained head, last
block(s) unfrozen, trained on augmented images at a low learning rate with SGD; the saved model is
float32 without augmentation layers (`finetune`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from classifier import config
from classifier.model import augment, backbones, devices, eta, heads, images, training
from classifier.model.history import early_stopping

log = logging.getLogger(__name__)


@dataclass
class Finetuned:
    model: keras.Model  # for inference: float32, no augmentation layers
    history: dict[str, list[float]]
    unfrozen: list[str]  # backbone layers with weights that were trained
    classes: list[str]


def _parts(params: config.Params, num_classes: int) -> tuple[keras.Model, keras.Model]:
    """A fresh backbone (random init) and head, in the current dtype policy."""
    base = backbones.build_backbone(params.model.backbone, None, params.data.image_size)
    pool = heads.head_pool(params.top, params.model.backbone)
    head = heads.build_head(tuple(base.output_shape[1:]), num_classes, params.top, pool)
    return base, head


def assemble(
    params: config.Params, backbone_weights: Path, top: keras.Model, num_classes: int
) -> tuple[keras.Model, list[str]]:
    """Backbone (saved weights) + head (trained weights) + augmentation, last block(s) trainable."""
    base, head = _parts(params, num_classes)
    base.load_weights(backbone_weights)
    head.set_weights(top.get_weights())
    unfrozen = backbones.unfreeze_last_blocks(base, params.model.backbone, params.finetune.blocks)
    augmentation = augment.augmentation(params.finetune.augment, params.seed)
    return heads.build_classifier(base, head, params.model.backbone, augmentation), unfrozen


def inference_model(trained: keras.Model, params: config.Params, num_classes: int) -> keras.Model:
    """The trained backbone and head as a float32 classifier without augmentation layers.

    Augmentation only acts in training, and a model that holds none reloads on any Keras
    version; float32 makes the saved model independent of the precision that trained it.
    """
    base, head = _parts(params, num_classes)
    base.set_weights(trained.get_layer(base.name).get_weights())
    head.set_weights(trained.get_layer(head.name).get_weights())
    return heads.build_classifier(base, head, params.model.backbone)


def finetune(
    prepared: Path,
    backbone_weights: Path,
    top: keras.Model,
    params: config.Params,
    strategy: tf.distribute.Strategy,
    policy: str = "float32",
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> Finetuned:
    """Train the unfrozen block(s) and the head on the train split, validated each epoch."""
    p = params.finetune
    keras.utils.set_random_seed(params.seed)
    train = images.load_split(prepared, "train")
    validation = images.load_split(prepared, "validation")
    num_classes = len(train.classes)
    devices.set_policy(policy)
    try:
        with strategy.scope():
            model, unfrozen = assemble(params, backbone_weights, top, num_classes)
            model.compile(
                optimizer=keras.optimizers.SGD(learning_rate=p.learning_rate, momentum=p.momentum),
                loss=heads.head_loss(num_classes),
                metrics=["accuracy"],
            )
        log.info("unfrozen: %s", ", ".join(unfrozen))
        time_left = eta.TimeLeft("finetune", p.epochs, len(train), p.batch_size, devices.device_name(), policy)
        history = training.fit(
            model,
            train,
            validation,
            params.data.image_size,
            p.batch_size,
            p.epochs,
            params.seed,
            [time_left, *callbacks, *early_stopping(p.patience)],
        )
    finally:
        devices.set_policy("float32")
    return Finetuned(inference_model(model, params, num_classes), history, unfrozen, train.classes)
