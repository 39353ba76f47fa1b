"""Per-epoch training history: early stopping, the history.csv each training stage writes, its headline numbers.

Plain Python and numpy (Keras only once early stopping is asked for), so a stage switched off
(`baseline.enabled: false`, an empty `ensemble.backbones`) writes its empty history without Keras.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from classifier import saving

if TYPE_CHECKING:
    import keras


def early_stopping(patience: int | None) -> list[keras.callbacks.Callback]:
    """Stop after `patience` epochs without a lower validation loss, and end with the weights of the
    epoch that had the lowest (`kept_epoch`); nothing when patience is None (every epoch, the last kept)."""
    if patience is None:
        return []
    import keras

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
    draws each stage in its own panels, on an epoch axis of its own numbered the same way."""
    with saving.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *HISTORY_KEYS])
        for epoch in range(len(history["loss"])):
            writer.writerow([epoch + 1, *(f"{history[k][epoch]:.6f}" for k in HISTORY_KEYS)])


def final_metrics(history: dict[str, list[float]], name: str, kept: int) -> dict[str, dict[str, Any]]:
    """The values of the epoch whose weights were kept (index `kept`, see `kept_epoch`) as the
    stage's metrics.json: {name: {loss, accuracy, val_loss, val_accuracy, epoch}}, `epoch` counted
    from 1 as in history.csv. Nested so DVC's flattened column (`top.val_accuracy`) is the name the
    live per-epoch MLflow curve has (`tracking.epoch_logger(name + ".")`), and nothing else: the
    metrics files hold the headline numbers `dvc exp show` lists."""
    values = {k: round(float(history[k][kept]), 6) for k in HISTORY_KEYS}
    return {name: values | {"epoch": kept + 1}}


def write_reports(
    reports: Path, history: dict[str, list[float]], name: str, patience: int | None, test: dict | None = None
) -> int:
    """A training stage's reports: history.csv and metrics.json (`final_metrics` of the kept epoch,
    with the model's headline `test` metrics under `name` when it was scored on the test split).
    Returns the index of the kept epoch."""
    reports.mkdir(parents=True, exist_ok=True)
    write_history(history, reports / "history.csv")
    kept = kept_epoch(history, patience)
    metrics = final_metrics(history, name, kept)
    if test is not None:
        metrics[name]["test"] = test
    saving.write_json(reports / "metrics.json", metrics)
    return kept


def finetune_note(head: float | None, tuned: float | None) -> str | None:
    """What finetune's log and the models table say when fine-tuning ended with a lower validation
    accuracy (`tuned`) than the head it started from (`head`, train_top's), else None."""
    if head is None or tuned is None or tuned >= head:
        return None
    return (
        f"fine-tuning lowered validation accuracy from {head:.4f} (the head, row top) to {tuned:.4f}: the "
        "frozen-backbone model (models/frozen) is the better one; try a lower finetune.learning_rate or a "
        "milder finetune.augment (docs/real.md)"
    )


def write_switched_off(models: Path, reports: Path) -> None:
    """What a training stage switched off in params.yaml writes: an empty model folder, a history
    without epochs and no metrics (`{}`), so that DVC finds every output it declares."""
    with saving.atomic_dir(models):
        pass
    reports.mkdir(parents=True, exist_ok=True)
    write_history({key: [] for key in HISTORY_KEYS}, reports / "history.csv")
    saving.write_json(reports / "metrics.json", {})
