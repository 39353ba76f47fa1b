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
import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from stages import backbones, common, config, devices, tracking
from stages.featurize import META, load_features

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


def early_stopping(patience: int | None) -> list[keras.callbacks.Callback]:
    """Stop after `patience` epochs without a lower validation loss, and end with the weights of the
    epoch that had the lowest (`kept_epoch`); nothing when patience is None (every epoch, the last kept)."""
    if patience is None:
        return []
    return [keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)]


def kept_epoch(history: dict[str, list[float]], patience: int | None) -> int:
    """The index of the epoch whose weights training ended with: the first lowest validation loss
    under early stopping (as `EarlyStopping` restores it), else the last."""
    if patience is None:
        return len(history["val_loss"]) - 1
    return int(np.argmin(history["val_loss"]))


#: What a training stage records per epoch, and its final values in metrics.json.
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


def write_history(history: dict[str, list[float]], path: Path) -> None:
    """Per-epoch metrics as CSV: epoch (1, 2, ... within the stage, as MLflow's steps count them),
    loss, accuracy, val_loss, val_accuracy. A DVC plot per stage; evaluate's training_curves.png
    puts both stages on one axis, fine-tuning's epochs after the head's."""
    with common.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *HISTORY_KEYS])
        for epoch in range(len(history["loss"])):
            writer.writerow([epoch + 1, *(f"{history[k][epoch]:.6f}" for k in HISTORY_KEYS)])


def final_metrics(history: dict[str, list[float]], name: str, kept: int) -> dict[str, dict[str, float]]:
    """The values of the epoch whose weights were kept (index `kept`, see `kept_epoch`) as the
    stage's metrics.json: {name: {loss, accuracy, val_loss, val_accuracy, epoch}}, `epoch` counted
    from 1 as in history.csv. Nested so DVC's flattened column (`top.val_accuracy`) is the name the
    live per-epoch MLflow curve has (`tracking.epoch_logger(name + ".")`), and nothing else: the
    metrics files hold the headline numbers `dvc exp show` lists."""
    values = {k: round(float(history[k][kept]), 6) for k in HISTORY_KEYS}
    return {name: values | {"epoch": kept + 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("features", type=Path, help="the featurize stage's output")
    parser.add_argument("output", type=Path, help="where to save the trained head (.keras)")
    parser.add_argument("reports", type=Path, help="folder for history.csv and metrics.json")
    args = parser.parse_args()
    params = config.load()
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
        args.reports.mkdir(parents=True, exist_ok=True)
        write_history(history, args.reports / "history.csv")
        kept = kept_epoch(history, params.top.patience)
        common.write_json(args.reports / "metrics.json", final_metrics(history, name, kept))
    log.info(
        "kept epoch %d of %d: validation accuracy %.4f; wrote %s",
        kept + 1,
        len(history["val_loss"]),
        history["val_accuracy"][kept],
        args.output,
    )


if __name__ == "__main__":
    common.run(main)
