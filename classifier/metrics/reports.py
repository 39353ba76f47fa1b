"""What reports/evaluate/ holds (`write_reports`): the per-class table, the confusion matrix, the
plots' data (predictions.csv, roc.csv) and the figures."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from classifier import saving
from classifier.metrics.figures import RELIABILITY, write_figures, write_reliability
from classifier.metrics.scores import Roc, predicted_classes, roc
from classifier.model import images

log = logging.getLogger(__name__)


def write_plot_data(out: Path, split: images.Split, probs: np.ndarray, threshold: float, curve: Roc) -> None:
    """predictions.csv (one row per test image: DVC's confusion matrix counts its (actual,
    predicted) pairs) and roc.csv (the curve `curve`)."""
    predicted = predicted_classes(probs, threshold)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "actual", "predicted", "confidence"])
        for path, y, p, row in zip(split.paths, split.labels, predicted, probs, strict=True):
            names = (Path(path).name, split.classes[y], split.classes[p])
            writer.writerow([*map(saving.csv_text, names), f"{row[p]:.6f}"])
    with open(out / "roc.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fpr", "tpr", "threshold"])
        for values in zip(curve.fpr, curve.tpr, np.minimum(curve.thresholds, 1.0), strict=True):
            writer.writerow([f"{v:.6f}" for v in values])


def write_per_class(path: Path, metrics: dict[str, Any]) -> None:
    """per_class.csv: one row per class, in display order; an undefined AUC is left empty."""
    keys = ("images", "recall", "precision", "f1", "roc_auc")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["class", *keys])
        for cls, values in metrics["per_class"].items():
            cells = [values["images"], *("" if values[k] is None else f"{values[k]:.6f}" for k in keys[1:])]
            writer.writerow([saving.csv_text(cls), *cells])


def write_reports(
    out: Path, split: images.Split, probs: np.ndarray, metrics: dict[str, Any], threshold: float, histories: list[Path]
) -> None:
    """Everything reports/evaluate/ holds: per-class table, confusion matrix, plot data, figures."""
    curve = roc(split.labels, probs)
    write_plot_data(out, split, probs, threshold, curve)
    write_per_class(out / "per_class.csv", metrics)
    saving.write_json(out / "confusion.json", metrics["confusion"])
    write_figures(out, metrics, curve, split.classes, histories)
    write_reliability(out / RELIABILITY, split.labels, probs, threshold, "fine-tuned model")
