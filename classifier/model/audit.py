"""The label audit: which pictures' labels look wrong, from the cached features alone.

Heads like train_top's are trained on k folds of the train and validation features (each on all
folds but one), so every picture gets class probabilities from a head that never saw it
(`out_of_sample`). cleanlab ranks the pictures by how little those probabilities believe the given
label, and picks the likely label errors by confident learning (Northcutt et al. 2021, "Confident
Learning: Estimating Uncertainty in Dataset Labels"), which sets a per-class threshold instead of
one for all (`rank`). No backbone pass: seconds where train_top takes seconds.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classifier import config, saving
from classifier.errors import StageError

log = logging.getLogger(__name__)


def out_of_sample(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    params: config.TopParams,
    seed: int,
    pool: str,
    folds: int,
) -> np.ndarray:
    """(N, classes) probabilities of each picture from the head trained on the other `folds` - 1
    folds (stratified: each fold has every class in proportion). Each head is validated on its
    held-out fold, so `top.patience`, where set, stops it on pictures it is not trained on."""
    from sklearn.model_selection import StratifiedKFold

    from classifier.metrics.scores import as_class_probabilities
    from classifier.model.training import train_top

    smallest = int(np.bincount(labels, minlength=num_classes).min())
    if smallest < folds:
        raise StageError(
            f"audit.folds is {folds}, but a class has only {smallest} train and validation pictures: every fold "
            f"needs one of each class. Set audit.folds in params.yaml to at most {smallest} (and at least 2)"
        )
    probs = np.zeros((len(labels), num_classes), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (train, held_out) in enumerate(splitter.split(features, labels)):
        log.info("audit fold %d of %d: a head on %d pictures scores %d", fold + 1, folds, len(train), len(held_out))
        head, _ = train_top(
            (features[train], labels[train]), (features[held_out], labels[held_out]), num_classes, params, seed, pool
        )
        probs[held_out] = as_class_probabilities(head.predict(features[held_out], verbose=0))
    return probs


@dataclass
class Ranking:
    """Every picture, most suspect first."""

    order: np.ndarray  # picture indices, most suspect first
    quality: np.ndarray  # per picture (not ordered): cleanlab's label quality, 0 (surely wrong) to 1
    flagged: np.ndarray  # per picture: cleanlab finds its label likely wrong
    suggested: np.ndarray  # per picture: the class the out-of-sample probabilities favour


def rank(labels: np.ndarray, probs: np.ndarray) -> Ranking:
    """Rank pictures by cleanlab's label quality score (the out-of-sample probability of the given
    label, "self_confidence"), lowest first; the flagged ones are those confident learning counts as
    label errors. Ties keep the pictures' order."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = probs / probs.sum(axis=1, keepdims=True)  # cleanlab checks that rows sum to 1
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate")
    order = np.argsort(quality, kind="stable")
    return Ranking(order, quality, np.asarray(flagged, dtype=bool), probs.argmax(axis=1))


#: suspects.csv's columns.
COLUMNS = ("rank", "picture", "split", "given", "suggested", "label_quality", "flagged")


def write_suspects(
    path: Path, ranking: Ranking, pictures: list[str], splits: list[str], labels: np.ndarray, classes: list[str]
) -> None:
    """suspects.csv: every audited picture, most suspect first: its path (as the manifest lists it),
    split, given and suggested class, label quality (6 decimals) and whether cleanlab flags it (1/0)."""
    with saving.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for place, i in enumerate(ranking.order, start=1):
            writer.writerow(
                [
                    place,
                    pictures[i],
                    splits[i],
                    classes[labels[i]],
                    classes[ranking.suggested[i]],
                    f"{ranking.quality[i]:.6f}",
                    int(ranking.flagged[i]),
                ]
            )
