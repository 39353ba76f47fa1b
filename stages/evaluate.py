"""Evaluate the fine-tuned model on the held-out test split, and only there.

reports/metrics.json (a DVC metric): accuracy, precision, recall, F1 (of the second class for two
classes, macro-averaged for more), log loss, ROC AUC (two classes), per-class accuracy and the
confusion matrix. reports/evaluate/ holds the plots' data (predictions.csv for the confusion
matrix, roc.csv), per_class.csv, and PNG figures of the confusion matrix, the ROC curve and the
training curves of both training stages.

Run: dvc repro evaluate   (or: python -m stages.evaluate data/prepared models/model.keras
       reports/metrics.json reports/evaluate --history reports/train_top/history.csv ...)
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np

from stages import common, config, devices, images, tracking

log = logging.getLogger(__name__)

EPS = 1e-7


def as_class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model outputs -> (N, classes): a sigmoid column p becomes [1 - p, p]."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        return np.column_stack([1.0 - outputs[:, 0], outputs[:, 0]])
    return outputs


def predicted_classes(probs: np.ndarray, threshold: float) -> np.ndarray:
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates, thresholds), from the highest score down."""
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]  # last index of each score
    tps = np.cumsum(labels)[distinct]
    fps = (distinct + 1) - tps
    positives, negatives = labels.sum(), len(labels) - labels.sum()
    tpr = np.r_[0.0, tps / max(positives, 1)]
    fpr = np.r_[0.0, fps / max(negatives, 1)]
    return fpr, tpr, np.r_[np.inf, scores[distinct]]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a positive outranks a negative (ties count half)."""
    positives = labels == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in np.r_[np.nonzero(np.diff(sorted_values))[0] + 1, len(values)]:
        ranks[order[start:end]] = (start + 1 + end) / 2.0  # mean of ranks start+1 .. end
        start = end
    return ranks


def compute_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float) -> dict:
    """All test metrics from true labels and class probabilities."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(classes)
    predicted = predicted_classes(probs, threshold)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_pos = np.diag(confusion).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(true_pos / confusion.sum(axis=0))
        recall = np.nan_to_num(true_pos / confusion.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    picked = np.clip(probs[np.arange(len(labels)), labels], EPS, 1.0)
    metrics = {
        "test_images": len(labels),
        "accuracy": float(true_pos.sum() / len(labels)),
        "log_loss": float(-np.mean(np.log(picked))),
        "per_class": {
            cls: {"accuracy": float(recall[i]), "precision": float(precision[i]), "f1": float(f1[i])}
            for i, cls in enumerate(classes)
        },
        "confusion_matrix": {"classes": classes, "rows_actual_columns_predicted": confusion.tolist()},
    }
    if n == 2:  # of the second class, the "positive" one
        metrics |= {"precision": float(precision[1]), "recall": float(recall[1]), "f1": float(f1[1])}
        auc = roc_auc(labels, probs[:, 1])
        metrics["roc_auc"] = None if np.isnan(auc) else auc  # undefined when the test set has one class
    else:
        metrics |= {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}
    return metrics


def write_plot_data(out: Path, split: images.Split, probs: np.ndarray, threshold: float) -> None:
    """predictions.csv (the confusion-matrix plot), roc.csv and per_class.csv."""
    predicted = predicted_classes(probs, threshold)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "actual", "predicted", "confidence"])
        for path, y, p, row in zip(split.paths, split.labels, predicted, probs, strict=True):
            writer.writerow([Path(path).name, split.classes[y], split.classes[p], f"{row[p]:.6f}"])
    if probs.shape[1] == 2:
        fpr, tpr, thresholds = roc_curve(split.labels, probs[:, 1])
    else:  # micro-average of one-vs-rest
        onehot = np.eye(probs.shape[1], dtype=np.int64)[split.labels]
        fpr, tpr, thresholds = roc_curve(onehot.ravel(), probs.ravel())
    with open(out / "roc.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fpr", "tpr", "threshold"])
        for row in zip(fpr, tpr, np.minimum(thresholds, 1.0), strict=True):
            writer.writerow([f"{v:.6f}" for v in row])


def write_per_class(path: Path, metrics: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "accuracy", "precision", "f1"])
        for cls, values in metrics["per_class"].items():
            writer.writerow([cls, *(f"{values[k]:.6f}" for k in ("accuracy", "precision", "f1"))])


def write_figures(out: Path, metrics: dict, histories: list[Path]) -> None:
    """PNG figures: confusion matrix, ROC curve, training curves."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    classes = metrics["confusion_matrix"]["classes"]
    confusion = np.array(metrics["confusion_matrix"]["rows_actual_columns_predicted"])
    size = max(4.0, 0.4 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 6 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if len(classes) <= 20:
        for (i, j), v in np.ndenumerate(confusion):
            ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set_title(f"Test confusion matrix (accuracy {metrics['accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)

    roc = np.genfromtxt(out / "roc.csv", delimiter=",", names=True)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(roc["fpr"], roc["tpr"], label="model")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    title = f"ROC (AUC {metrics['roc_auc']:.3f})" if metrics.get("roc_auc") is not None else "ROC"
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for path in histories:
        if not path.is_file():
            continue
        h = np.genfromtxt(path, delimiter=",", names=True, ndmin=1)
        stage = path.parent.name
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            ax.plot(h["epoch"], h[key], label=f"{stage} train")
            ax.plot(h["epoch"], h[f"val_{key}"], "--", label=f"{stage} validation")
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=100)
    plt.close(fig)


def class_probabilities(model, paths: list[str], image_size: tuple[int, int], batch_size: int) -> np.ndarray:
    """(N, classes) probabilities of the fine-tuned model for image files, decoded as in training."""
    return as_class_probabilities(model.predict(images.images_only(paths, image_size, batch_size), verbose=0))


def evaluate(model, split: images.Split, params: config.Params) -> tuple[np.ndarray, dict]:
    """(class probabilities, metrics) of `model` on `split`."""
    probs = class_probabilities(model, split.paths, params.data.image_size, params.evaluate.batch_size)
    return probs, compute_metrics(split.labels, probs, split.classes, params.evaluate.threshold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prepared", type=Path, help="the prepare stage's output")
    parser.add_argument("model", type=Path, help="the fine-tuned model (.keras)")
    parser.add_argument("metrics", type=Path, help="where to write metrics.json")
    parser.add_argument("reports", type=Path, help="folder for plot data and figures")
    parser.add_argument("--history", type=Path, action="append", default=[], help="a history.csv to plot")
    args = parser.parse_args()
    params = config.load()
    devices.set_determinism(params.deterministic)
    import keras

    from stages import backbones, serving  # noqa: F401  backbones registers the custom layers

    with tracking.stage_run("evaluate", params) as run:
        model = keras.models.load_model(args.model, safe_mode=True)
        split = images.load_split(args.prepared, "test")
        probs, metrics = evaluate(model, split, params)
        with common.atomic_dir(args.reports) as tmp:
            write_plot_data(tmp, split, probs, params.evaluate.threshold)
            write_per_class(tmp / "per_class.csv", metrics)
            write_figures(tmp, metrics, args.history)
        common.write_json(args.metrics, metrics)
        try:
            serving.log_model(
                args.model,
                split.classes,
                params.evaluate.threshold,
                Path(split.paths[0]),
                params.evaluate.registered_model,
                metrics["accuracy"],
                test_set=tracking.locked_hashes().get(args.prepared.as_posix()),
                max_side=params.data.max_side,
            )
        except Exception as err:
            raise tracking.logging_failed("evaluate", "logging the model", err) from err
    tracking.log_pipeline_version(params, run)
    log.info("test accuracy %.4f on %d images; wrote %s", metrics["accuracy"], len(split), args.metrics)


if __name__ == "__main__":
    common.run(main)
