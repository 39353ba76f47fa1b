"""Fine-tune the last backbone block(s) together with the trained head, on augmented images.

The classifier is rebuilt from exactly the parts the earlier stages produced: the backbone with
the weights its features came from (models/backbone.weights.h5) and the head trained on those
features (models/top.keras; never a fresh random head, whose large gradients would wreck the
pretrained block). Everything is frozen except the last `finetune.blocks` block(s) and the head;
BatchNorm stays in inference mode; the model is recompiled with SGD at a low learning rate. The
saved model takes raw RGB images (0..255) and is always float32, whatever precision trained it.

Run: dvc repro finetune   (or: python -m stages.finetune data/prepared models/backbone.weights.h5
       models/top.keras models/model.keras models/classes.json reports/finetune)
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from stages import backbones, common, config, devices, eta, images, tracking
from stages.history import early_stopping, write_reports

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
    pool = backbones.head_pool(params.top, params.model.backbone)
    head = backbones.build_head(tuple(base.output_shape[1:]), num_classes, params.top, pool)
    return base, head


def assemble(
    params: config.Params, backbone_weights: Path, top: keras.Model, num_classes: int
) -> tuple[keras.Model, list[str]]:
    """Backbone (saved weights) + head (trained weights) + augmentation, last block(s) trainable."""
    base, head = _parts(params, num_classes)
    base.load_weights(backbone_weights)
    head.set_weights(top.get_weights())
    unfrozen = backbones.unfreeze_last_blocks(base, params.model.backbone, params.finetune.blocks)
    augment = images.augmentation(params.finetune.augment, params.seed)
    return backbones.build_classifier(base, head, params.model.backbone, augment), unfrozen


def inference_model(trained: keras.Model, params: config.Params, num_classes: int) -> keras.Model:
    """The trained backbone and head as a float32 classifier without augmentation layers.

    Augmentation only acts in training, and a model that holds none reloads on any Keras
    version; float32 makes the saved model independent of the precision that trained it.
    """
    base, head = _parts(params, num_classes)
    base.set_weights(trained.get_layer(base.name).get_weights())
    head.set_weights(trained.get_layer(head.name).get_weights())
    return backbones.build_classifier(base, head, params.model.backbone)


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
                loss=backbones.head_loss(num_classes),
                metrics=["accuracy"],
            )
        log.info("unfrozen: %s", ", ".join(unfrozen))
        time_left = eta.TimeLeft("finetune", p.epochs, len(train), p.batch_size, devices.device_name(), policy)
        history = images.fit(
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prepared", type=Path, help="the prepare stage's output")
    parser.add_argument("backbone_weights", type=Path, help="the featurize stage's backbone weights")
    parser.add_argument("top", type=Path, help="the train_top stage's head (.keras)")
    parser.add_argument("output", type=Path, help="where to save the fine-tuned model (.keras)")
    parser.add_argument("classes", type=Path, help="where to save the class names (JSON list)")
    parser.add_argument("reports", type=Path, help="folder for history.csv and metrics.json")
    args = parser.parse_args()
    params = config.load()
    tracking.start_worker("finetune")  # its arguments and params are good: the run will open
    devices.set_determinism(params.deterministic)
    name = "finetune"  # the metrics' prefix, live in MLflow and in metrics.json: finetune.val_accuracy
    with tracking.stage_run("finetune", params):
        top = keras.models.load_model(args.top, safe_mode=True)
        result = finetune(
            args.prepared,
            args.backbone_weights,
            top,
            params,
            devices.strategy(),
            devices.precision_policy(params.precision),
            callbacks=[tracking.epoch_logger(f"{name}.")],
        )
        common.save_model(result.model, args.output)
        common.write_json(args.classes, result.classes)
        kept = write_reports(args.reports, result.history, name, params.finetune.patience)
    log.info(
        "kept epoch %d: validation accuracy %.4f; wrote %s", kept + 1, result.history["val_accuracy"][kept], args.output
    )


if __name__ == "__main__":
    common.run(main)
