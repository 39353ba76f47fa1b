"""The recipe's baseline: a small convnet trained from scratch on the same split, scored on the same test set.

Three convolution blocks (3x3 convolutions of 32, 32 and 64 filters, ReLU, 2x2 max pooling), then
Flatten, Dense(`baseline.units`, relu), Dropout and a sigmoid (two classes) or softmax, trained with
RMSprop on the pixels scaled to 0..1 and the same augmentation as fine-tuning (`finetune.augment`).
Its test metrics sit beside the fine-tuned model's (`baseline.test.accuracy` next to `test.accuracy`):
what transfer learning gains is their difference. `baseline.enabled: false` skips the training: the
stage then writes empty outputs (no model, a history without epochs, `{}` as metrics) and logs nothing.

Run: dvc repro baseline
  (or: python -m stages.baseline data/prepared models/baseline reports/baseline)
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stages import common, config, tracking
from stages.history import write_reports, write_switched_off

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

# TensorFlow is imported where a baseline is trained, not here: switched off, the stage takes a second.

log = logging.getLogger(__name__)

#: The saved model, in the stage's model folder.
MODEL = "model.keras"
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
    strategy: tf.distribute.Strategy,
    policy: str = "float32",
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train on the train split, validated each epoch; return the model for inference (float32, no
    augmentation layers) and the per-epoch history."""
    import keras

    from stages import backbones, devices, eta, images
    from stages.history import early_stopping

    p = params.baseline
    keras.utils.set_random_seed(params.seed)
    train = images.load_split(prepared, "train")
    validation = images.load_split(prepared, "validation")
    num_classes = len(train.classes)
    size = params.data.image_size
    devices.set_policy(policy)
    try:
        with strategy.scope():
            model = build_baseline(size, num_classes, p, images.augmentation(params.finetune.augment, params.seed))
            model.compile(
                optimizer=keras.optimizers.RMSprop(learning_rate=p.learning_rate),
                loss=backbones.head_loss(num_classes),
                metrics=["accuracy"],
            )
        time_left = eta.TimeLeft("baseline", p.epochs, len(train), p.batch_size, devices.device_name(), policy)
        history = images.fit(
            model,
            train,
            validation,
            size,
            p.batch_size,
            p.epochs,
            params.seed,
            [time_left, *callbacks, *early_stopping(p.patience)],
        )
    finally:
        devices.set_policy("float32")
    saved = build_baseline(size, num_classes, p)
    for layer in saved.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return saved, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prepared", type=Path, help="the prepare stage's output")
    parser.add_argument("models", type=Path, help=f"folder for the trained model ({MODEL})")
    parser.add_argument("reports", type=Path, help="folder for history.csv and metrics.json")
    args = parser.parse_args()
    params = config.load()
    if not params.baseline.enabled:
        write_switched_off(args.models, args.reports)
        log.info("baseline.enabled is false in params.yaml: no baseline trained")
        return
    tracking.start_worker("baseline")  # its arguments and params are good: the run will open
    from stages import devices, evaluate, images

    devices.set_determinism(params.deterministic)
    name = "baseline"  # the metrics' prefix, live in MLflow and in metrics.json: baseline.val_accuracy
    policy = devices.precision_policy(params.precision)
    with tracking.stage_run("baseline", params):
        model, history = train_baseline(
            args.prepared, params, devices.strategy(), policy, callbacks=[tracking.epoch_logger(f"{name}.")]
        )
        split = images.load_split(args.prepared, "test")
        _, scores = evaluate.evaluate(devices.computing_in(model, policy), split, params)
        with common.atomic_dir(args.models) as tmp:
            common.save_model(model, tmp / MODEL)
        kept = write_reports(args.reports, history, name, params.baseline.patience, scores["test"])
    log.info("test accuracy %.4f on %d images (kept epoch %d)", scores["test"]["accuracy"], len(split), kept + 1)


if __name__ == "__main__":
    common.run(main)
