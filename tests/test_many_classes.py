"""End to end with four classes: the real `dvc repro` of the tiny pipeline, then the model it served
and the `predict` command, in a temporary git repository (the other end-to-end tests use two).

Four classes is more than top-3: evaluate adds `test.top3_accuracy`, macro-averages precision,
recall and F1, and the softmax model names every class in the served `p.<class>` columns.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import sys

import pytest

from stages import demo, synthetic
from tests.conftest import TINY
from tests.workspace import STAGES, base_env, commit, dvc, ran_stages, run

pytestmark = pytest.mark.slow

CLASSES = 4
#: TINY, with four generated classes.
PARAMS = copy.deepcopy(TINY)
PARAMS["data"]["synthetic"]["classes"] = CLASSES
#: The model's class order: sorted names (images.load_split).
NAMES = sorted(synthetic.PATTERNS[:CLASSES])
PER_CLASS_TEST = PARAMS["data"]["split"]["test"]
#: How far apart two processes may compute a probability with the same saved model and preprocessing.
SAME = 1e-4


def printed_as(value: float, text: str) -> bool:
    """Whether `stages.predict`, which prints 3 decimals, may print `text` for `value` give or take SAME."""
    return any(f"{v:.3f}" == text for v in (value - SAME, value, value + SAME))


def test_four_classes_run_through_every_stage_and_serve_and_predict_every_class(tmp_path):
    import mlflow
    import pandas as pd

    workspace = demo.make_workspace(tmp_path / "repo", PARAMS, git=True)
    store = f"sqlite:///{workspace / 'mlflow.db'}"
    env = base_env(MLFLOW_TRACKING_URI=store)
    commit(workspace, env, "pipeline with four classes")

    # the pipeline: every stage runs, and succeeds
    done = dvc("repro", cwd=workspace, env=env)
    assert done.returncode == 0
    assert ran_stages(done.stdout) == STAGES
    assert json.loads((workspace / "models/classes.json").read_text()) == NAMES

    # the headline metrics: top-3 accuracy (more than 3 classes), macro averages
    test = json.loads((workspace / "reports/metrics.json").read_text())["test"]
    assert set(test) == {"accuracy", "top3_accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "images"}
    total = CLASSES * PER_CLASS_TEST
    assert test["images"] == total == 24
    for key in ("accuracy", "top3_accuracy", "precision", "recall", "f1"):
        assert 0 <= test[key] <= 1, key
    assert test["top3_accuracy"] >= test["accuracy"]
    assert test["roc_auc"] is None or 0 <= test["roc_auc"] <= 1
    assert test["log_loss"] > 0

    # the details: one row per class, a 4x4 confusion matrix counting every test image
    with open(workspace / "reports/evaluate/per_class.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["class", "images", "recall", "precision", "f1", "roc_auc"]
    assert sorted(row["class"] for row in rows) == NAMES
    assert [int(row["images"]) for row in rows] == [PER_CLASS_TEST] * CLASSES
    confusion = json.loads((workspace / "reports/evaluate/confusion.json").read_text())
    cells = confusion["rows_actual_columns_predicted"]
    assert sorted(confusion["classes"]) == NAMES
    assert len(cells) == CLASSES and all(len(row) == CLASSES for row in cells)
    assert sum(map(sum, cells)) == total
    assert [sum(row) for row in cells] == [PER_CLASS_TEST] * CLASSES, "rows are the actual classes"

    # the model evaluate logged and registered: the pyfunc model names every class
    pictures = [min((workspace / "data/prepared/test" / name).iterdir()) for name in NAMES[:3]]
    mlflow.set_tracking_uri(store)
    try:
        client = mlflow.MlflowClient(store)
        experiment = client.get_experiment_by_name("image-classifier")
        (evaluated,) = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'evaluate'")
        assert client.get_model_version("image-classifier", "1").run_id == evaluated.info.run_id
        model = mlflow.pyfunc.load_model("models:/image-classifier/1")
        scored = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in pictures]}))
    finally:
        mlflow.set_tracking_uri(None)
    columns = [f"p.{name}" for name in NAMES]
    assert list(scored.columns) == ["label", "confidence", *columns]
    assert len(scored) == 3
    probs = scored[columns].to_numpy()
    assert probs.sum(axis=1) == pytest.approx([1.0] * 3, abs=1e-5)
    assert list(scored["label"]) == [NAMES[i] for i in probs.argmax(axis=1)]
    assert list(scored["confidence"]) == pytest.approx(probs.max(axis=1).tolist(), abs=1e-7)

    # `stages.predict` on one of them: the same model, preprocessing and probabilities
    picture = pictures[0].relative_to(workspace)
    printed = run([sys.executable, "-m", "stages.predict", str(picture), "--top", "3"], workspace, env).stdout
    (line,) = printed.strip().splitlines()
    found = re.fullmatch(rf"{re.escape(str(picture))}: (\S+) ([0-9.]+), (\S+) ([0-9.]+), (\S+) ([0-9.]+)", line)
    assert found, line
    named, texts = found.group(1, 3, 5), found.group(2, 4, 6)
    shown = [float(p) for p in texts]
    assert set(named) <= set(NAMES) and len(set(named)) == 3
    assert shown == sorted(shown, reverse=True)
    served = scored.iloc[0]
    assert served[f"p.{named[0]}"] >= served["confidence"] - SAME, "first the class the served model decides"
    for name, text in zip(named, texts, strict=True):
        assert printed_as(served[f"p.{name}"], text), (name, line, served.to_dict())
    (left_out,) = set(NAMES) - set(named)
    assert served[f"p.{left_out}"] <= shown[-1] + 0.0005 + SAME, "the 3 most probable are shown"
