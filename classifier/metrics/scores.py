"""The scores of class probabilities against labels (`compute_metrics`), with scikit-learn: accuracy,
top-3 accuracy, precision, recall, F1, log loss, ROC AUC, the expected calibration error, per class
and the confusion matrix; and the order tables show classes in (`natural_key`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

#: The log loss counts a true class' probability as at least this (a sure mistake costs -log(EPS), not infinity).
EPS = 1e-7


#: The keys reports/metrics.json's "test" object always has: the headline numbers, nothing per class.
HEADLINE = ("accuracy", "precision", "recall", "f1", "log_loss", "ece", "roc_auc", "images")


#: Equal-width confidence bins of the expected calibration error and the reliability diagram:
#: (0, 0.1], (0.1, 0.2], ... (0.9, 1].
CALIBRATION_BINS = 10


#: Top-k accuracy's k. With more than TOP_K classes the "test" object has TOP_K_ACCURACY too (after
#: "accuracy"); with TOP_K or fewer it would say nothing (every class is among the TOP_K most probable).
TOP_K = 3


TOP_K_ACCURACY = f"top{TOP_K}_accuracy"


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


@dataclass
class Calibration:
    """How far a model's confidence is from its accuracy, bin by bin (`CALIBRATION_BINS`); a bin without
    predictions has NaN confidence and accuracy."""

    edges: np.ndarray  # the bins' bounds, 0 to 1
    confidence: np.ndarray  # mean confidence of the predictions in each bin
    accuracy: np.ndarray  # the fraction of them that are right
    counts: np.ndarray  # how many there are
    ece: float | None  # expected calibration error: sum over bins of count/N * |accuracy - confidence|


def calibration(labels: np.ndarray, probs: np.ndarray, threshold: float, bins: int = CALIBRATION_BINS) -> Calibration:
    """The calibration of `probs` against `labels`: each prediction (the class `predicted_classes`
    picks) counts in the bin of its confidence, the probability the model gave that class. A model is
    calibrated when, of the pictures it is 80% sure of, 80% are right (Guo et al. 2017, "On
    Calibration of Modern Neural Networks"). The ECE is None without predictions."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    predicted = predicted_classes(probs, threshold) if len(labels) else np.zeros(0, dtype=np.int64)
    confidence = probs[np.arange(len(labels)), predicted]
    correct = (predicted == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
    gaps = np.where(counts > 0, np.abs(np.nan_to_num(accuracy) - np.nan_to_num(mean_confidence)), 0.0)
    ece = float(np.sum(counts * gaps) / len(labels)) if len(labels) else None
    return Calibration(edges, mean_confidence, accuracy, counts, ece)


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
        "ece": calibration(labels, probs, threshold).ece,
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


#: Number words a class may be named by ("zero" ... "ninety"), sorted by their value.
_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
)


_TENS = {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}


NUMBER_WORDS = {word: value for value, word in enumerate(_UNITS.split(" "))} | _TENS | {"hundred": 100}


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
