"""Test-set metrics computed by hand on small, known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages import evaluate


def test_binary_metrics_match_hand_computation():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p_pos = np.array([0.1, 0.4, 0.6, 0.8, 0.7, 0.3, 0.9, 0.2])
    probs = evaluate.as_class_probabilities(p_pos[:, None])
    m = evaluate.compute_metrics(labels, probs, ["cat", "dog"], threshold=0.5)
    # predicted: 0 0 1 1 1 0 1 0 -> TP=3 FP=1 FN=1 TN=3
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["confusion_matrix"]["rows_actual_columns_predicted"] == [[3, 1], [1, 3]]
    assert m["per_class"]["cat"]["accuracy"] == pytest.approx(3 / 4)
    expected_loss = -np.mean(np.log(np.where(labels == 1, p_pos, 1 - p_pos)))
    assert m["log_loss"] == pytest.approx(expected_loss)
    # AUC: pairs (positive, negative) where the positive scores higher: 14 of 16
    assert m["roc_auc"] == pytest.approx(14 / 16)
    assert m["test_images"] == 8


def test_threshold_moves_the_decision():
    labels = np.array([0, 1])
    probs = evaluate.as_class_probabilities(np.array([[0.3], [0.6]]))
    assert evaluate.compute_metrics(labels, probs, ["a", "b"], 0.5)["accuracy"] == 1.0
    assert evaluate.compute_metrics(labels, probs, ["a", "b"], 0.7)["accuracy"] == 0.5


def test_multiclass_metrics_are_macro_averaged_and_have_no_auc():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
    m = evaluate.compute_metrics(labels, probs, ["a", "b", "c"], 0.5)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["confusion_matrix"]["rows_actual_columns_predicted"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    # precision a=1/2 b=1 c=1; recall a=1 b=1 c=1/2
    assert m["precision"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert "roc_auc" not in m


def test_roc_curve_and_auc_agree():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(labels * 0.3 + rng.uniform(size=200), 2)  # with ties
    fpr, tpr, _ = evaluate.roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert evaluate.roc_auc(labels, scores) == pytest.approx(trapezoid)


def test_auc_is_undefined_with_one_class():
    assert math.isnan(evaluate.roc_auc(np.array([1, 1]), np.array([0.2, 0.9])))
    m = evaluate.compute_metrics(
        np.array([1, 1]), evaluate.as_class_probabilities(np.array([[0.2], [0.9]])), ["a", "b"], 0.5
    )
    assert m["roc_auc"] is None
