"""Train the dense classifier on cached bottleneck features (seconds, not hours).

The head is `backbones.build_head` (the same one `finetune` continues to train): Flatten or global
average pooling (`top.pool`, see `backbones.head_pool`), Dense(units, relu), Dropout, then a
sigmoid for two classes or a softmax for more. Each epoch's
loss and accuracy, train and validation, go to reports/train_top/history.csv (a DVC plot) and MLflow.

Run: dvc repro train_top
  (or: python -m stages.train_top data/features models/top.keras reports/train_top)
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from stages import backbones, common, config, devices, tracking
from stages.featurize import META, load_features
from stages.history import early_stopping, write_reports

log = logging.getLogger(__name__)


def optimizer(params: config.TopParams) -> keras.optimizers.Optimizer:
    if params.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=params.learning_rate)
    if params.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=params.learning_rate)
    return keras.optimizers.SGD(learning_rate=params.learning_rate, momentum=0.9)


def train_top(
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    params: config.TopParams,
    seed: int,
    pool: str,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Fit the head (`pool`: see `backbones.head_pool`) on (features, labels); return it and its
    per-epoch history."""
    keras.utils.set_random_seed(seed)
    head = backbones.build_head(train[0].shape[1:], num_classes, params, pool)
    head.compile(optimizer=optimizer(params), loss=backbones.head_loss(num_classes), metrics=["accuracy"])
    history = head.fit(
        train[0],
        train[1],
        validation_data=validation,
        epochs=params.epochs,
        batch_size=params.batch_size,
        shuffle=True,
        callbacks=[*callbacks, *early_stopping(params.patience)],
        verbose=2,
    )
    return head, history.history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("features", type=Path, help="the featurize stage's output")
    parser.add_argument("output", type=Path, help="where to save the trained head (.keras)")
    parser.add_argument("reports", type=Path, help="folder for history.csv and metrics.json")
    args = parser.parse_args()
    params = config.load()
    tracking.start_worker("train_top")  # its arguments and params are good: the run will open
    devices.set_determinism(params.deterministic)
    meta = json.loads((args.features / META).read_text())
    name = "top"  # the metrics' prefix, live in MLflow and in metrics.json: top.val_accuracy
    with tracking.stage_run("train_top", params):
        head, history = train_top(
            load_features(args.features, "train"),
            load_features(args.features, "validation"),
            len(meta["classes"]),
            params.top,
            params.seed,
            backbones.head_pool(params.top, params.model.backbone),
            callbacks=[tracking.epoch_logger(f"{name}.")],
        )
        common.save_model(head, args.output)
        kept = write_reports(args.reports, history, name, params.top.patience)
    log.info(
        "kept epoch %d of %d: validation accuracy %.4f; wrote %s",
        kept + 1,
        len(history["val_loss"]),
        history["val_accuracy"][kept],
        args.output,
    )


if __name__ == "__main__":
    common.run(main)
