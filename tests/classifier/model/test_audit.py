"""The label audit on generated features: labels flipped at random must rank first."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from classifier import config
from classifier.errors import StageError
from classifier.model import audit


def blobs(per_class: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of `classes` overlapping Gaussian clouds in 16 dimensions, `per_class` each."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (classes, 16)) * 1.6
    labels = np.repeat(np.arange(classes), per_class)
    return (centres[labels] + rng.normal(0.0, 1.0, (len(labels), 16))).astype(np.float32), labels


def flip(labels: np.ndarray, count: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`labels` with `count` of them, chosen at random, changed to another class; and which."""
    rng = np.random.default_rng(seed)
    wrong = np.zeros(len(labels), dtype=bool)
    wrong[rng.choice(len(labels), count, replace=False)] = True
    given = labels.copy()
    given[wrong] = (labels[wrong] + rng.integers(1, classes, wrong.sum())) % classes
    return given, wrong


def test_most_labels_flipped_at_random_rank_first_and_are_flagged():
    features, labels = blobs(per_class=100, classes=3, seed=0)
    given, wrong = flip(labels, 15, 3, seed=1)
    probs = audit.out_of_sample(features, given, 3, "flatten", seed=3, folds=5)
    ranking = audit.rank(given, probs)
    precision = wrong[ranking.order[: wrong.sum()]].mean()  # precision at the number flipped
    assert precision >= 0.8, f"precision at 15: {precision:.2f}"
    assert ranking.flagged[wrong].mean() >= 0.8  # recall of cleanlab's flags
    assert ranking.flagged[~wrong].mean() <= 0.05  # few clean pictures flagged
    # the suggested class of a flipped picture is mostly its true class
    assert (ranking.suggested[wrong] == labels[wrong]).mean() >= 0.8
    assert sorted(ranking.quality[ranking.order]) == list(ranking.quality[ranking.order])


def test_each_picture_is_scored_by_a_head_that_never_saw_it():
    # One picture carries a label that no other picture near it has: a head that had seen it would
    # have learned it, an out-of-sample head cannot, so its probability of that label stays low.
    features, labels = blobs(per_class=40, classes=2, seed=4)
    given = labels.copy()
    given[0] = 1 - labels[0]
    probs = audit.out_of_sample(features, given, 2, "flatten", seed=3, folds=2)
    assert probs.shape == (80, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert probs[0, given[0]] < 0.5
    assert audit.rank(given, probs).order[0] == 0


def test_more_folds_than_a_class_has_pictures_is_refused_with_the_largest_that_works():
    features, labels = blobs(per_class=3, classes=2, seed=0)
    with pytest.raises(StageError, match=r"audit.folds is 5, but a class has only 3 .*at most 3"):
        audit.out_of_sample(features, labels, 2, "flatten", seed=0, folds=5)


def test_feature_maps_are_flattened_or_averaged_as_the_head_would():
    maps = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)  # 2 pictures, 2x2 positions, 3 channels
    assert audit.vectors(maps, "flatten").shape == (2, 12)
    np.testing.assert_allclose(audit.vectors(maps, "avg"), maps.mean(axis=(1, 2)))
    assert audit.vectors(maps[:, 0, 0, :], "avg").shape == (2, 3), "vectors stay as they are"


def test_suspects_csv_lists_every_picture_most_suspect_first(tmp_path):
    labels = np.array([0, 1, 1])
    ranking = audit.Ranking(
        order=np.array([2, 0, 1]),
        quality=np.array([0.4, 0.9, 0.05]),
        flagged=np.array([False, False, True]),
        suggested=np.array([0, 1, 0]),
    )
    path = tmp_path / "suspects.csv"
    audit.write_suspects(
        path, ranking, ["a.jpg", "b.jpg", "c.jpg"], ["train", "train", "validation"], labels, ["cat", "dog"]
    )
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        list(audit.COLUMNS),
        ["1", "c.jpg", "validation", "dog", "cat", "0.050000", "1"],
        ["2", "a.jpg", "train", "cat", "cat", "0.400000", "0"],
        ["3", "b.jpg", "train", "dog", "dog", "0.900000", "0"],
    ]


def test_the_audit_params_are_checked():
    with pytest.raises(config.ParamsError, match="audit.folds"):
        config.parse({"audit": {"folds": 1}})
    with pytest.raises(config.ParamsError, match="export.formats"):
        config.parse({"export": {"formats": ["onnx", "pickle"]}})
