"""Evaluate the fine-tuned model on the held-out test split, and only there.

reports/metrics.json (a DVC metric, logged to MLflow under the same names) holds the headline
numbers only, nested so that DVC's flattened names are the MLflow names: `test.accuracy`,
`test.top3_accuracy` (more than 3 classes only: the fraction of test images whose true class is
among the model's 3 most probable), `test.precision`, `test.recall`, `test.f1` (of the second
class for two classes, macro-averaged for more), `test.log_loss`, `test.roc_auc` (two classes: of
the second class; more: the mean of the one-vs-rest AUCs of the classes the test split has; null
when undefined) and `test.images`, all computed by scikit-learn (`sklearn.metrics`).
reports/evaluate/ (a cached output) holds the rest: per_class.csv, confusion.json (rows actual,
columns predicted), the plots' data (predictions.csv for DVC's confusion matrix, roc.csv) and PNG
figures of the confusion matrix, the ROC curve and the training curves of both training stages.

Class indices are the model's (sorted label names, `images.load_split`); tables and figures show
the classes in natural order (`natural_key`: "two" before "ten", "class2" before "class10").

Run: dvc repro evaluate   (or: python -m stages.evaluate data/prepared models/model.keras
       reports/metrics.json reports/evaluate --history reports/train_top/history.csv ...)
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
    top_k_accuracy_score,
)

from stages import common, config, devices, images, tracking

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

#: The log loss counts a true class' probability as at least this (a sure mistake costs -log(EPS), not infinity).
EPS = 1e-7
#: The keys reports/metrics.json's "test" object always has: the headline numbers, nothing per class.
HEADLINE = ("accuracy", "precision", "recall", "f1", "log_loss", "roc_auc", "images")
#: Top-k accuracy's k. With more than TOP_K classes the "test" object has TOP_K_ACCURACY too (after
#: "accuracy"); with TOP_K or fewer it would say nothing (every class is among the TOP_K most probable).
TOP_K = 3
TOP_K_ACCURACY = f"top{TOP_K}_accuracy"
#: Number words a class may be named by ("zero" ... "ninety"), sorted by their value.
_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
)
_TENS = {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
NUMBER_WORDS = {word: value for value, word in enumerate(_UNITS.split(" "))} | _TENS | {"hundred": 100}
#: Above this many classes the confusion matrix PNG shows colours only, no counts.
MAX_ANNOTATED_CLASSES = 20


# Class order ---------------------------------------------------------------------------------


def natural_key(name: str) -> tuple:
    """Sort key that orders class names as a reader expects: numbers by value, whether written
    as digits ("class2" before "class10") or as a number word ("two" before "ten"), text
    case-insensitively; the name itself breaks ties, so the order is total."""
    parts = []
    for token in re.findall(r"\d+|[^\W\d_]+", name.casefold()):  # runs of digits, runs of letters
        if token.isdigit() or token in NUMBER_WORDS:
            parts.append((0, int(token) if token.isdigit() else NUMBER_WORDS[token], ""))
        else:
            parts.append((1, 0, token))
    return tuple(parts), name


def display_order(classes: Sequence[str]) -> list[int]:
    """Indices of `classes` (the model's order) in the order tables and figures show them.

    Only the display changes: class index i still means `classes[i]` everywhere else."""
    return sorted(range(len(classes)), key=lambda i: natural_key(classes[i]))


# Scores --------------------------------------------------------------------------------------


def as_class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model outputs -> (N, classes): a sigmoid column p becomes [1 - p, p]."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        return np.column_stack([1.0 - outputs[:, 0], outputs[:, 0]])
    return outputs


def predicted_classes(probs: np.ndarray, threshold: float) -> np.ndarray:
    """The predicted class index of each row: two classes decide by `threshold` on the second
    class' probability, more take the most probable."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of binary `labels` (1: positive) scored by `scores`: the probability
    that a positive outranks a negative (ties count half). NaN when `labels` hold one class only."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def one_vs_rest_aucs(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The AUC of each class against all others (NaN for a class absent from, or alone in, `labels`).

    Class by class rather than `roc_auc_score(multi_class="ovr")`, which raises on rows whose sum is
    off 1 by more than about 1e-5 (a float16 softmax's can be) and warns on a class missing from `labels`."""
    return np.array([roc_auc(labels == i, probs[:, i]) for i in range(probs.shape[1])])


def _roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates, thresholds) at every distinct score, from the
    highest down after a first threshold of inf at (0, 0). Every score is kept (no
    `drop_intermediate`), so roc.csv gives each threshold its rates. Without positives (negatives)
    the true (false) positive rates are 0, not sklearn's NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    return np.nan_to_num(fpr), np.nan_to_num(tpr), thresholds


def _defined(value: float) -> float | None:
    """None for NaN: JSON has no NaN, and an undefined AUC is no number."""
    return None if np.isnan(value) else float(value)


@dataclass
class Roc:
    """The ROC curve a figure and roc.csv show, and how it was averaged."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float | None  # the area under this curve
    macro_auc: float | None  # more than two classes: the mean of the one-vs-rest AUCs; else None
    classes: int


def roc(labels: np.ndarray, probs: np.ndarray) -> Roc:
    """Two classes: the ROC of the second class' probability. More: the micro-average of the
    one-vs-rest curves (every (image, class) pair is one decision), with its AUC and the macro AUC."""
    labels = np.asarray(labels, dtype=np.int64)
    if probs.shape[1] == 2:
        fpr, tpr, thresholds = _roc_points(labels, probs[:, 1])
        return Roc(fpr, tpr, thresholds, _defined(roc_auc(labels, probs[:, 1])), None, 2)
    onehot = np.eye(probs.shape[1], dtype=np.int64)[labels]
    fpr, tpr, thresholds = _roc_points(onehot.ravel(), probs.ravel())
    aucs = one_vs_rest_aucs(labels, probs)
    macro = float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else None
    return Roc(fpr, tpr, thresholds, _defined(roc_auc(onehot.ravel(), probs.ravel())), macro, probs.shape[1])


def headline_keys(classes: int) -> tuple[str, ...]:
    """The keys of reports/metrics.json's "test" object for a model of `classes` classes, in order:
    HEADLINE, with TOP_K_ACCURACY after "accuracy" for more than TOP_K classes."""
    if classes <= TOP_K:
        return HEADLINE
    after = HEADLINE.index("accuracy") + 1
    return (*HEADLINE[:after], TOP_K_ACCURACY, *HEADLINE[after:])


def compute_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float) -> dict[str, Any]:
    """All test metrics from true labels (indices into `classes`) and class probabilities.

    Returns {"test": the headline numbers (`headline_keys`, reports/metrics.json), "per_class": {class:
    {images, recall, precision, f1, roc_auc}}, "confusion": {"classes", "rows_actual_columns_predicted"}};
    per_class and confusion list the classes in display order (`display_order`). A class the test
    split lacks has precision 0 (and recall 0, nothing to recall) and an undefined (None) AUC.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n = len(classes)
    indices = np.arange(n)  # every class of the model, whether the test split has it or not
    predicted = predicted_classes(probs, threshold)
    confusion = confusion_matrix(labels, predicted, labels=indices)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=indices, average=None, zero_division=0
    )
    aucs = one_vs_rest_aucs(labels, probs)
    headline: dict[str, float | int | None]
    if n == 2:  # of the second class, the "positive" one
        headline = {"precision": float(precision[1]), "recall": float(recall[1]), "f1": float(f1[1])}
        headline["roc_auc"] = _defined(roc_auc(labels, probs[:, 1]))  # undefined when the test set has one class
    else:  # macro averages: each class counts the same, however many test images it has
        headline = {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}
        headline["roc_auc"] = None if np.all(np.isnan(aucs)) else float(np.nanmean(aucs))
    with warnings.catch_warnings():
        # The loss reads only the true class' probability, clipped to at least EPS (a softmax can round
        # to 0); the clipping and float32 rounding leave rows that sum to 1 within ~1e-7: sklearn warns.
        warnings.filterwarnings("ignore", "The y_prob values do not sum to one", UserWarning)
        loss = log_loss(labels, y_proba=np.clip(probs, EPS, 1.0), labels=indices)
    headline |= {
        "accuracy": float(accuracy_score(labels, predicted)),
        "log_loss": float(loss),
        "images": len(labels),
    }
    keys = headline_keys(n)
    if TOP_K_ACCURACY in keys:
        headline[TOP_K_ACCURACY] = float(top_k_accuracy_score(labels, probs, k=TOP_K, labels=indices))
    order = display_order(classes)
    return {
        "test": {key: headline[key] for key in keys},
        "per_class": {
            classes[i]: {
                "images": int(support[i]),  # test images of the class
                "recall": float(recall[i]),
                "precision": float(precision[i]),
                "f1": float(f1[i]),
                "roc_auc": _defined(aucs[i]),
            }
            for i in order
        },
        "confusion": {
            "classes": [classes[i] for i in order],
            "rows_actual_columns_predicted": confusion[np.ix_(order, order)].tolist(),
        },
    }


# Files ---------------------------------------------------------------------------------------


def write_plot_data(out: Path, split: images.Split, probs: np.ndarray, threshold: float, curve: Roc) -> None:
    """predictions.csv (one row per test image: DVC's confusion matrix counts its (actual,
    predicted) pairs) and roc.csv (the curve `curve`)."""
    predicted = predicted_classes(probs, threshold)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "actual", "predicted", "confidence"])
        for path, y, p, row in zip(split.paths, split.labels, predicted, probs, strict=True):
            writer.writerow([Path(path).name, split.classes[y], split.classes[p], f"{row[p]:.6f}"])
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
            writer.writerow([cls, *cells])


def read_history(path: Path) -> dict[str, np.ndarray]:
    """A history.csv as {column: values}."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = rows[0].keys() if rows else ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    return {key: np.array([float(r[key]) for r in rows]) for key in columns}


def training_series(histories: Sequence[Path]) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
    """(stage, epochs, history) of each history.csv that exists, in the order given, each stage's
    epochs continuing the previous one's (fine-tuning's first epoch follows the head's last), so
    both stages fit on one axis without overlapping. The stage is named as its metrics are
    (`top`, `finetune`): the history's folder without `train_`."""
    series = []
    offset = 0
    for path in histories:
        if not path.is_file():
            continue
        history = read_history(path)
        epochs = history["epoch"] + offset
        if len(epochs):
            offset = int(epochs[-1])
        series.append((path.parent.name.removeprefix("train_"), epochs, history))
    return series


# Figures -------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def confusion_figure(confusion: np.ndarray, classes: Sequence[str], accuracy: float) -> Figure:
    """The confusion matrix as a heat map: rows are the actual class, columns the predicted one,
    both in the order of `classes`; each cell shows its count (up to MAX_ANNOTATED_CLASSES classes)."""
    plt = _pyplot()
    n = len(classes)
    side = 3.0 + (0.45 if n <= MAX_ANNOTATED_CLASSES else 0.2) * n
    longest = max((len(c) for c in classes), default=1)
    fig, ax = plt.subplots(figsize=(side + 0.07 * longest + 1.2, side + 0.07 * longest), layout="constrained")
    image = ax.imshow(confusion, cmap="Blues", vmin=0)
    font = 10 if n <= MAX_ANNOTATED_CLASSES else 6
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 or longest > 10 else 0, fontsize=font)
    ax.set_yticks(range(n), classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if n <= MAX_ANNOTATED_CLASSES:
        high = confusion.max() / 2 if confusion.size else 0
        for (i, j), v in np.ndenumerate(confusion):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > high else "black", fontsize=font)
    fig.colorbar(image, ax=ax, shrink=0.8, label="images")
    ax.set_title(f"Test confusion matrix\naccuracy {accuracy:.3f} on {int(confusion.sum())} images", fontsize=11)
    return fig


def roc_figure(curve: Roc, classes: Sequence[str]) -> Figure:
    """The ROC curve with its AUC; for more than two classes the title and legend say it is the
    micro-average of the one-vs-rest curves, and give the macro-average AUC too."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")

    def auc_text(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.3f}"

    if curve.classes == 2:
        title = f"Test ROC, '{classes[1]}' as positive\nAUC {auc_text(curve.auc)}"
        label = f"model (AUC {auc_text(curve.auc)})"
    else:
        title = (
            f"Test ROC, micro-average of {curve.classes} one-vs-rest curves\n"
            f"micro-average AUC {auc_text(curve.auc)}, macro-average AUC {auc_text(curve.macro_auc)}"
        )
        label = f"micro-average (AUC {auc_text(curve.auc)})"
    ax.plot(curve.fpr, curve.tpr, label=label)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance (AUC 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    return fig


def training_figure(histories: Sequence[Path]) -> Figure:
    """Loss and accuracy per epoch, train (solid) and validation (dashed), of each training stage
    in its own colour on one epoch axis: the head's epochs, then fine-tuning's, with a line where
    fine-tuning starts. Epoch ticks are whole numbers."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    series = training_series(histories)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for (stage, epochs, history), colour in zip(series, ("tab:blue", "tab:orange", "tab:green"), strict=False):
            # Markers (filled: train, hollow: validation) keep a stage of one epoch visible.
            style = {"color": colour, "marker": "o" if len(epochs) <= 30 else None, "markersize": 5}
            ax.plot(epochs, history[key], label=f"{stage} train", **style)
            ax.plot(epochs, history[f"val_{key}"], "--", markerfacecolor="white", label=f"{stage} validation", **style)
        for _, epochs, _ in series[1:]:
            if len(epochs):
                ax.axvline(epochs[0] - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (" + ", then ".join(stage for stage, _, _ in series) + ")" if series else "epoch")
        ax.set_title(key)
        if series:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax.transAxes)
    return fig


def write_figures(
    out: Path, metrics: dict[str, Any], curve: Roc, classes: Sequence[str], histories: Sequence[Path]
) -> None:
    """confusion.png, roc.png and training_curves.png into `out`; `classes` in the model's order."""
    plt = _pyplot()
    confusion = metrics["confusion"]
    figures = {
        "confusion.png": confusion_figure(
            np.array(confusion["rows_actual_columns_predicted"]), confusion["classes"], metrics["test"]["accuracy"]
        ),
        "roc.png": roc_figure(curve, classes),
        "training_curves.png": training_figure(histories),
    }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=100)
        plt.close(fig)


# The stage -----------------------------------------------------------------------------------


def class_probabilities(model: Any, paths: list[str], image_size: tuple[int, int], batch_size: int) -> np.ndarray:
    """(N, classes) probabilities of the fine-tuned model for image files, decoded as in training."""
    return as_class_probabilities(model.predict(images.images_only(paths, image_size, batch_size), verbose=0))


def evaluate(model: Any, split: images.Split, params: config.Params) -> tuple[np.ndarray, dict[str, Any]]:
    """(class probabilities, metrics) of `model` on `split`."""
    probs = class_probabilities(model, split.paths, params.data.image_size, params.evaluate.batch_size)
    return probs, compute_metrics(split.labels, probs, split.classes, params.evaluate.threshold)


def write_reports(
    out: Path, split: images.Split, probs: np.ndarray, metrics: dict[str, Any], threshold: float, histories: list[Path]
) -> None:
    """Everything reports/evaluate/ holds: per-class table, confusion matrix, plot data, figures."""
    curve = roc(split.labels, probs)
    write_plot_data(out, split, probs, threshold, curve)
    write_per_class(out / "per_class.csv", metrics)
    common.write_json(out / "confusion.json", metrics["confusion"])
    write_figures(out, metrics, curve, split.classes, histories)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prepared", type=Path, help="the prepare stage's output")
    parser.add_argument("model", type=Path, help="the fine-tuned model (.keras)")
    parser.add_argument("metrics", type=Path, help="where to write metrics.json")
    parser.add_argument("reports", type=Path, help="folder for plot data and figures")
    parser.add_argument("--history", type=Path, action="append", default=[], help="a history.csv to plot")
    args = parser.parse_args()
    params = config.load()
    tracking.start_worker("evaluate")  # its arguments and params are good: the run will open
    devices.set_determinism(params.deterministic)
    import keras

    from stages import backbones  # noqa: F401  registers the custom layers

    with tracking.stage_run("evaluate", params):
        policy = devices.precision_policy(params.precision)
        model = devices.computing_in(keras.models.load_model(args.model, safe_mode=True), policy)
        log.info("predicting in %s on %s", policy, devices.device_name())
        split = images.load_split(args.prepared, "test")
        probs, metrics = evaluate(model, split, params)
        with common.atomic_dir(args.reports) as tmp:
            write_reports(tmp, split, probs, metrics, params.evaluate.threshold, args.history)
        common.write_json(args.metrics, {"test": metrics["test"]})  # headline numbers only: DVC's columns
        tracking.log_classifier(
            "evaluate", args.model, split.classes, Path(split.paths[0]), args.prepared, params, metrics["test"]
        )
    log.info("test accuracy %.4f on %d images; wrote %s", metrics["test"]["accuracy"], len(split), args.metrics)


if __name__ == "__main__":
    common.run(main)
