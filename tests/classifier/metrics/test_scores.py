"""Test-set metrics computed by hand on small, known cases, and the metrics files' exact shape."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from classifier.metrics import scores
from classifier.model.history import final_metrics

HEADLINE = {"accuracy", "precision", "recall", "f1", "log_loss", "ece", "roc_auc", "images"}


def test_binary_metrics_match_hand_computation():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p_pos = np.array([0.1, 0.4, 0.6, 0.8, 0.7, 0.3, 0.9, 0.2])
    probs = scores.as_class_probabilities(p_pos[:, None])
    m = scores.compute_metrics(labels, probs, ["cat", "dog"], threshold=0.5)
    test = m["test"]
    # predicted: 0 0 1 1 1 0 1 0 -> TP=3 FP=1 FN=1 TN=3
    assert test["accuracy"] == pytest.approx(6 / 8)
    assert test["precision"] == pytest.approx(3 / 4)
    assert test["recall"] == pytest.approx(3 / 4)
    assert test["f1"] == pytest.approx(3 / 4)
    assert m["confusion"] == {"classes": ["cat", "dog"], "rows_actual_columns_predicted": [[3, 1], [1, 3]]}
    assert m["per_class"]["cat"]["recall"] == pytest.approx(3 / 4)
    assert m["per_class"]["cat"]["images"] == 4
    expected_loss = -np.mean(np.log(np.where(labels == 1, p_pos, 1 - p_pos)))
    assert test["log_loss"] == pytest.approx(expected_loss)
    # AUC: pairs (positive, negative) where the positive scores higher: 14 of 16
    assert test["roc_auc"] == pytest.approx(14 / 16)
    assert test["images"] == 8


def test_metrics_file_holds_only_the_headline_numbers_under_test():
    """reports/metrics.json is {"test": {...}}: DVC shows test.accuracy, as MLflow names it; nothing
    per class (those would be one DVC column each)."""
    for classes in (["a", "b"], ["a", "b", "c"]):
        labels = np.arange(12) % len(classes)
        probs = np.full((12, len(classes)), 0.1) + np.eye(len(classes))[labels]
        probs /= probs.sum(axis=1, keepdims=True)
        m = scores.compute_metrics(labels, probs, classes, 0.5)
        assert set(m) == {"test", "per_class", "confusion"}
        assert set(m["test"]) == HEADLINE
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m["test"].values())


def test_training_metrics_are_nested_under_the_stage_prefix():
    """{"top": {...}} flattens to top.val_accuracy, the name of the live per-epoch MLflow curve."""
    history = {
        "loss": [0.9, 0.5],
        "accuracy": [0.5, 0.75],
        "val_loss": [1.0, 0.6],
        "val_accuracy": [0.4, 0.8],
        "learning_rate": [0.1, 0.1],
    }
    assert final_metrics(history, "top", 1) == {
        "top": {"loss": 0.5, "accuracy": 0.75, "val_loss": 0.6, "val_accuracy": 0.8, "epoch": 2}
    }
    assert final_metrics(history, "finetune", 0)["finetune"]["epoch"] == 1


def test_threshold_moves_the_decision():
    labels = np.array([0, 1])
    probs = scores.as_class_probabilities(np.array([[0.3], [0.6]]))
    assert scores.compute_metrics(labels, probs, ["a", "b"], 0.5)["test"]["accuracy"] == 1.0
    assert scores.compute_metrics(labels, probs, ["a", "b"], 0.7)["test"]["accuracy"] == 0.5


def test_multiclass_metrics_are_macro_averaged_with_macro_auc():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
    m = scores.compute_metrics(labels, probs, ["a", "b", "c"], 0.5)
    assert m["test"]["accuracy"] == pytest.approx(3 / 4)
    assert m["confusion"]["rows_actual_columns_predicted"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    # precision a=1/2 b=1 c=1; recall a=1 b=1 c=1/2
    assert m["test"]["precision"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m["test"]["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    # one-vs-rest AUCs, by hand: a: 0.8 > 0.2, 0.6, 0.1 -> 1; b: 0.7 > all three -> 1;
    # c: positives 0.2, 0.8 against negatives 0.1, 0.1: 4 of 4 pairs -> 1
    assert m["test"]["roc_auc"] == pytest.approx(1.0)
    probs[2] = [0.1, 0.2, 0.05]  # c's 0.05 now below both negatives: c's AUC 2 / 4
    assert scores.compute_metrics(labels, probs, ["a", "b", "c"], 0.5)["test"]["roc_auc"] == pytest.approx(
        (1 + 1 + 0.5) / 3
    )


def test_roc_curve_and_auc_agree():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    values = np.round(labels * 0.3 + rng.uniform(size=200), 2) / 1.3  # with ties
    curve = scores.roc(labels, scores.as_class_probabilities(values[:, None]))
    fpr, tpr = curve.fpr, curve.tpr
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert scores.roc_auc(labels, values) == pytest.approx(trapezoid)
    assert curve.auc == pytest.approx(trapezoid)
    # roc.csv gives every threshold its rates: inf at (0, 0), then each distinct score, highest first
    assert curve.thresholds[0] == np.inf
    assert curve.thresholds[1:].tolist() == sorted(set(values.tolist()), reverse=True)


def test_auc_is_undefined_with_one_class():
    assert math.isnan(scores.roc_auc(np.array([1, 1]), np.array([0.2, 0.9])))
    m = scores.compute_metrics(
        np.array([1, 1]), scores.as_class_probabilities(np.array([[0.2], [0.9]])), ["a", "b"], 0.5
    )
    assert m["test"]["roc_auc"] is None
    assert m["per_class"]["a"]["roc_auc"] is None


def test_classes_are_shown_in_natural_order():
    as_text = sorted(["two", "ten", "one", "eight", "five", "four", "zero", "twenty-one", "twenty"])
    assert sorted(as_text, key=scores.natural_key) == [
        "zero",
        "one",
        "two",
        "four",
        "five",
        "eight",
        "ten",
        "twenty",
        "twenty-one",
    ]
    assert sorted(["class10", "class2", "Class1", "cat"], key=scores.natural_key) == [
        "cat",
        "Class1",
        "class2",
        "class10",
    ]
    assert sorted(["n02-Chihuahua", "n010-Beagle"], key=scores.natural_key) == ["n02-Chihuahua", "n010-Beagle"]


def test_display_order_moves_rows_and_columns_together_not_the_model_classes():
    """The model's class i is still classes[i] (sorted as text, as images.load_split sorts them);
    only the per-class table and the confusion matrix list them naturally."""
    classes = ["eight", "five", "four"]  # the model's order: sorted as text
    labels = np.array([0, 0, 1, 2, 2, 2])  # eight, eight, five, four, four, four
    predicted = np.array([2, 0, 1, 2, 2, 0])  # one eight taken for a four, one four for an eight
    probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3
    m = scores.compute_metrics(labels, probs, classes, 0.5)
    assert m["confusion"]["classes"] == ["four", "five", "eight"]
    assert list(m["per_class"]) == ["four", "five", "eight"]
    #                                 predicted: four five eight
    assert m["confusion"]["rows_actual_columns_predicted"] == [
        [2, 0, 1],  # actual four
        [0, 1, 0],  # actual five
        [1, 0, 1],  # actual eight
    ]
    assert m["per_class"]["four"] == pytest.approx(
        {"images": 3, "recall": 2 / 3, "precision": 2 / 3, "f1": 2 / 3, "roc_auc": m["per_class"]["four"]["roc_auc"]}
    )
    assert scores.predicted_classes(probs, 0.5).tolist() == predicted.tolist()  # indices keep their meaning


@pytest.mark.filterwarnings("error")
def test_top3_accuracy_counts_the_true_class_among_the_three_most_probable():
    labels = np.array([0, 2, 3, 4, 0, 0])
    probs = np.array(
        [
            [0.50, 0.20, 0.15, 0.10, 0.05],  # a is 1st: in the top 3 (and the top 1)
            [0.40, 0.30, 0.20, 0.06, 0.04],  # c is 3rd: in
            [0.40, 0.30, 0.20, 0.06, 0.04],  # d is 4th: out
            [0.05, 0.10, 0.15, 0.30, 0.40],  # e is 1st: in (and the top 1)
            [0.05, 0.10, 0.15, 0.30, 0.40],  # a is 5th: out
            [0.12, 0.60, 0.05, 0.15, 0.08],  # a is 3rd (after b 0.60, d 0.15): in
        ]
    )
    m = scores.compute_metrics(labels, probs, list("abcde"), 0.5)
    assert m["test"]["top3_accuracy"] == pytest.approx(4 / 6)
    assert m["test"]["accuracy"] == pytest.approx(2 / 6)
    # in metrics.json right after accuracy: DVC's columns and MLflow's names, test.top3_accuracy
    assert list(m["test"]) == [
        "accuracy",
        "top3_accuracy",
        "precision",
        "recall",
        "f1",
        "log_loss",
        "ece",
        "roc_auc",
        "images",
    ]
    assert list(m["test"]) == list(scores.headline_keys(5))


def test_top3_accuracy_only_for_more_than_three_classes():
    """With two or three classes the true class is always among the three most probable."""
    for n in (2, 3, 4):
        labels = np.arange(12) % n
        probs = np.full((12, n), 0.1) + np.eye(n)[(labels + 1) % n] + 0.5 * np.eye(n)[labels]  # true class 2nd
        probs /= probs.sum(axis=1, keepdims=True)
        test = scores.compute_metrics(labels, probs, [f"c{i}" for i in range(n)], 0.5)["test"]
        if n <= 3:
            assert set(test) == HEADLINE
        else:
            assert set(test) == HEADLINE | {"top3_accuracy"}
            assert test["top3_accuracy"] == pytest.approx(1.0)  # the true class is 2nd in every row
        assert test["accuracy"] == 0.0


@pytest.mark.filterwarnings("error")
def test_a_class_missing_from_the_test_set_has_no_auc_and_precision_zero():
    """d and e have no test image (d is predicted once, e never): their AUC is undefined (None in
    JSON, no NaN), their precision, recall and F1 are 0, and the macro AUC is the mean of the others'."""
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.70, 0.10, 0.15, 0.05, 0.0],  # a, predicted a
            [0.20, 0.10, 0.10, 0.60, 0.0],  # a, predicted d
            [0.10, 0.60, 0.20, 0.10, 0.0],  # b
            [0.30, 0.40, 0.20, 0.10, 0.0],  # b
            [0.10, 0.20, 0.50, 0.20, 0.0],  # c
            [0.25, 0.05, 0.45, 0.25, 0.0],  # c
        ]
    )
    m = scores.compute_metrics(labels, probs, list("abcde"), 0.5)
    json.dumps(m, allow_nan=False)  # raises on a NaN
    for absent in ("d", "e"):
        assert m["per_class"][absent] == {"images": 0, "recall": 0.0, "precision": 0.0, "f1": 0.0, "roc_auc": None}
    # one-vs-rest AUCs by hand: a's positives 0.70, 0.20 against 0.10, 0.30, 0.10, 0.25: 6 of 8 pairs;
    # b's 0.60, 0.40 and c's 0.50, 0.45 beat all their negatives: 1
    assert m["per_class"]["a"]["roc_auc"] == pytest.approx(6 / 8)
    assert m["per_class"]["b"]["roc_auc"] == m["per_class"]["c"]["roc_auc"] == pytest.approx(1.0)
    test = m["test"]
    assert test["roc_auc"] == pytest.approx((6 / 8 + 1 + 1) / 3)
    assert scores.roc(labels, probs).macro_auc == pytest.approx(test["roc_auc"])
    # precision a=1 b=1 c=1 d=0/1 e=0/0 -> 0; recall a=1/2 b=1 c=1 d=e=0 (none to find)
    assert test["precision"] == pytest.approx(3 / 5)
    assert test["recall"] == pytest.approx(2.5 / 5)
    assert test["f1"] == pytest.approx((2 / 3 + 1 + 1) / 5)
    assert test["accuracy"] == pytest.approx(5 / 6)
    assert test["top3_accuracy"] == 1.0
    assert test["log_loss"] == pytest.approx(-np.mean(np.log([0.70, 0.20, 0.60, 0.40, 0.50, 0.45])))


@pytest.mark.filterwarnings("error")
def test_log_loss_clips_a_zero_probability_of_the_true_class():
    """A sure mistake (probability 0 for the true class) costs -log(EPS), not infinity; a sure hit costs 0."""
    labels = np.array([0, 1])
    probs = np.array([[0.0, 1.0], [0.5, 0.5]])
    loss = scores.compute_metrics(labels, probs, ["a", "b"], 0.5)["test"]["log_loss"]
    assert math.isfinite(loss)
    assert loss == pytest.approx((-math.log(scores.EPS) - math.log(0.5)) / 2)
    three = np.array([[0.0, 0.3, 0.7], [0.0, 1.0, 0.0]])
    loss = scores.compute_metrics(np.array([0, 1]), three, list("abc"), 0.5)["test"]["log_loss"]
    assert loss == pytest.approx(-math.log(scores.EPS) / 2)
    sure = scores.compute_metrics(np.array([2, 1]), three, list("abc"), 0.5)["test"]["log_loss"]  # 0.7, then 1
    assert sure == pytest.approx(-math.log(0.7) / 2)


def test_the_expected_calibration_error_weighs_each_bin_by_its_predictions():
    # Three classes; confidence is the probability of the predicted (most probable) class.
    labels = np.array([0, 0, 1, 1, 2])
    probs = np.array(
        [
            [0.95, 0.03, 0.02],  # bin (0.9, 1]: right
            [0.92, 0.05, 0.03],  # bin (0.9, 1]: right
            [0.90, 0.05, 0.05],  # bin (0.8, 0.9] (0.9 is its upper edge): wrong
            [0.30, 0.65, 0.05],  # bin (0.6, 0.7]: right
            [0.30, 0.65, 0.05],  # bin (0.6, 0.7]: wrong
        ]
    )
    cal = scores.calibration(labels, probs, 0.5)
    assert cal.counts.tolist() == [0, 0, 0, 0, 0, 0, 2, 0, 1, 2]
    assert cal.accuracy[9] == 1.0 and cal.confidence[9] == pytest.approx(0.935)
    assert cal.accuracy[6] == 0.5 and cal.confidence[6] == pytest.approx(0.65)
    assert np.isnan(cal.accuracy[0])
    expected = (2 * abs(1 - 0.935) + 1 * abs(0 - 0.9) + 2 * abs(0.5 - 0.65)) / 5
    assert cal.ece == pytest.approx(expected)
    assert scores.compute_metrics(labels, probs, ["a", "b", "c"], 0.5)["test"]["ece"] == pytest.approx(expected)


def test_two_classes_are_calibrated_on_the_class_the_threshold_predicts():
    labels = np.array([1, 0])
    probs = np.array([[0.7, 0.3], [0.8, 0.2]])  # the second class' probability 0.3 and 0.2
    # threshold 0.25: the first picture is predicted as class 1 (confidence 0.3, right), the second as
    # class 0 (confidence 0.8, right)
    cal = scores.calibration(labels, probs, 0.25)
    assert cal.ece == pytest.approx((abs(1 - 0.3) + abs(1 - 0.8)) / 2)


def test_a_perfectly_calibrated_model_has_no_calibration_error_and_no_pictures_none():
    probs = np.tile([0.75, 0.25], (8, 1))  # every picture: class 0, 75% sure
    labels = np.array([0, 0, 0, 1] * 2)  # 6 of 8 right: 75%
    assert scores.calibration(labels, probs, 0.5).ece == pytest.approx(0.0)
    assert scores.calibration(np.zeros(0, dtype=int), np.zeros((0, 2)), 0.5).ece is None
