"""The label audit: which pictures' labels look wrong, from the cached features alone.

Linear heads (logistic regression on the standardised features, scikit-learn) are trained on k
folds of the train and validation features, each on all folds but one, so every picture gets class
probabilities from a head that never saw it (`out_of_sample`). cleanlab ranks the pictures by how
little those probabilities believe the given label, and picks the likely label errors by confident
learning (Northcutt et al. 2021, "Confident Learning: Estimating Uncertainty in Dataset Labels"),
which sets a per-class threshold instead of one for all (`rank`).

Logistic regression rather than a dense head like train_top's: it is what cleanlab itself fits by
default, it is deterministic, and it takes seconds (five folds of the demo's features: about 2 s on
a CPU, where five dense heads of 30 epochs take about 40 s and rank flipped labels no better). No
backbone pass.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classifier import saving
from classifier.errors import StageError

log = logging.getLogger(__name__)

#: The inverse regularisation strength of the logistic regressions (scikit-learn's C): with more
#: feature dimensions than pictures (VGG16 at 150 px: 8,192), a strong penalty keeps the
#: probabilities from going to 0 and 1 on pictures the head has not seen.
REGULARISATION = 0.1


def vectors(features: np.ndarray, pool: str) -> np.ndarray:
    """One vector per picture, as the dense head would see it (`heads.head_pool`): the feature map
    flattened, or averaged over its positions."""
    if pool == "flatten" or features.ndim == 2:
        return features.reshape(len(features), -1)
    return features.mean(axis=tuple(range(1, features.ndim - 1)))


def out_of_sample(
    features: np.ndarray, labels: np.ndarray, num_classes: int, pool: str, seed: int, folds: int
) -> np.ndarray:
    """(N, classes) probabilities of each picture from the head trained on the other `folds` - 1
    folds (stratified: each fold has every class in proportion)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels, minlength=num_classes)
    if not counts.min():
        raise StageError(
            f"class {int(counts.argmin())} has no train or validation picture: the audit needs some of each class. "
            "Run `dvc repro prepare` and check data.split in params.yaml"
        )
    smallest = int(counts.min())
    if smallest < folds:
        raise StageError(
            f"audit.folds is {folds}, but a class has only {smallest} train and validation pictures: every fold "
            f"needs one of each class. Set audit.folds in params.yaml to at most {smallest} (and at least 2)"
        )
    x = vectors(features, pool)
    probs = np.zeros((len(labels), num_classes), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (train, held_out) in enumerate(splitter.split(x, labels)):
        log.info("audit fold %d of %d: a head on %d pictures scores %d", fold + 1, folds, len(train), len(held_out))
        head = make_pipeline(StandardScaler(), LogisticRegression(C=REGULARISATION, max_iter=1000))
        head.fit(x[train], labels[train])
        probs[np.ix_(held_out, head.classes_)] = head.predict_proba(x[held_out])
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
    # One process: the stage has Keras and its tracking worker's pipes, which a pool's fork would copy.
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    order = np.argsort(quality, kind="stable")
    return Ranking(order, quality, np.asarray(flagged, dtype=bool), probs.argmax(axis=1))


#: suspects.csv's columns.
COLUMNS = ("rank", "picture", "split", "given", "suggested", "label_quality", "flagged")


def write_suspects(
    path: Path, ranking: Ranking, pictures: list[str], splits: list[str], labels: np.ndarray, classes: list[str]
) -> None:
    """suspects.csv: every audited picture, most suspect first: its path (the prepared picture's, as given),
    split, given and suggested class, label quality (6 decimals) and whether cleanlab flags it (1/0)."""
    with saving.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for place, i in enumerate(ranking.order, start=1):
            writer.writerow(
                [
                    place,
                    saving.csv_text(pictures[i]),
                    splits[i],
                    saving.csv_text(classes[labels[i]]),
                    saving.csv_text(classes[ranking.suggested[i]]),
                    f"{ranking.quality[i]:.6f}",
                    int(ranking.flagged[i]),
                ]
            )
