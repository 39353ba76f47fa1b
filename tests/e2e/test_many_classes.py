"""End to end with four classes and every model: the real `dvc repro` of the tiny pipeline with the
baseline, an ensemble of two small backbones and the exports switched on, then the models it served,
exported and audited, and the `predict` command, in a temporary git repository (the other end-to-end
tests use two classes, and export nothing).

Four classes is more than top-3: evaluate adds `test.top3_accuracy`, macro-averages precision,
recall and F1, and the softmax model names every class in the served `p.<class>` columns.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import sys

import numpy as np
import pytest

from classifier.data import synthetic
from ops import demo
from ops.code import ROOT
from tests.conftest import TINY
from tests.workspace import STAGES, base_env, commit, dvc_repro, run

pytestmark = pytest.mark.slow

#: TINY with four generated classes, the baseline, an ensemble of two small backbones and every export.
PARAMS = copy.deepcopy(TINY)
PARAMS["data"]["synthetic"]["classes"] = 4
PARAMS["baseline"] = {"enabled": True, "units": 8, "epochs": 1, "batch_size": 8}
PARAMS["ensemble"] = {"backbones": ["mobilenet_v2", "efficientnet_v2_b0"], "weights": None, "image_size": 32}
PARAMS["export"] = {"formats": ["onnx", "tf_saved_model", "litert"]}
CLASSES = PARAMS["data"]["synthetic"]["classes"]
MEMBERS = PARAMS["ensemble"]["backbones"]
#: Every stage runs: the ensemble's after one featurize stage per member.
RAN = [*STAGES[:7], *(f"ensemble_features@{m}" for m in MEMBERS), *STAGES[7:]]
#: The model's class order: sorted names (images.load_split).
NAMES = sorted(synthetic.PATTERNS[:CLASSES])
PER_CLASS_TEST = PARAMS["data"]["split"]["test"]
#: How far apart two processes may compute a probability with the same saved model and preprocessing.
SAME = 1e-4


def printed_as(value: float, text: str) -> bool:
    """Whether `ops.predict`, which prints 3 decimals, may print `text` for `value` give or take SAME."""
    return any(f"{v:.3f}" == text for v in (value - SAME, value, value + SAME))


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory):
    """The PARAMS pipeline in a new git repository, logging to its own mlflow.db, reproduced once."""
    workspace = demo.make_workspace(tmp_path_factory.mktemp("four-classes") / "repo", PARAMS, git=True)
    env = base_env(MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}")
    commit(workspace, env, "pipeline with four classes")
    return {"path": workspace, "env": env, "ran": dvc_repro(workspace, env)}


def test_four_classes_run_through_every_stage_and_serve_and_predict_every_class(four_classes):
    import mlflow
    import pandas as pd

    # the pipeline: every stage runs, and succeeds
    workspace, env = four_classes["path"], four_classes["env"]
    store = env["MLFLOW_TRACKING_URI"]
    assert four_classes["ran"] == RAN
    assert json.loads((workspace / "models/classes.json").read_text()) == NAMES

    # the headline metrics: top-3 accuracy (more than 3 classes), macro averages
    test = json.loads((workspace / "reports/metrics.json").read_text())["test"]
    assert set(test) == {
        "accuracy",
        "top3_accuracy",
        "precision",
        "recall",
        "f1",
        "roc_auc",
        "log_loss",
        "ece",
        "images",
    }
    assert 0 <= test["ece"] <= 1
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

    # the four models side by side on the same test images, best first, in the pipeline version too
    with open(workspace / "reports/models.csv", newline="") as f:
        table = {row["model"]: row for row in csv.DictReader(f)}
    assert set(table) == {"finetuned", "top", "baseline", "ensemble"}
    assert table["top"]["description"] == "vgg16 frozen, dense head on its cached features"
    top = json.loads((workspace / "reports/train_top/metrics.json").read_text())["top"]["test"]
    assert float(table["top"]["accuracy"]) == pytest.approx(top["accuracy"], abs=1e-6)
    assert {row["images"] for row in table.values()} == {str(total)}
    assert table["ensemble"]["description"] == "head on mobilenet_v2 + efficientnet_v2_b0 features"
    accuracies = [float(row["accuracy"]) for row in table.values()]
    assert accuracies == sorted(accuracies, reverse=True)
    assert float(table["finetuned"]["accuracy"]) == pytest.approx(test["accuracy"], abs=1e-6)

    # the models evaluate and ensemble logged and registered: each pyfunc model names every class
    pictures = [min((workspace / "data/prepared/test" / name).iterdir()) for name in NAMES[:3]]
    frame = pd.DataFrame({"image": [p.read_bytes() for p in pictures]})
    mlflow.set_tracking_uri(store)
    try:
        client = mlflow.MlflowClient(store)
        experiment = client.get_experiment_by_name("image-classifier")
        runs = {
            stage: client.search_runs([experiment.experiment_id], f"tags.`pipeline.stage` = '{stage}'")
            for stage in ("train_top", "evaluate", "ensemble", "export", "pipeline")
        }
        registered = {v.run_id: v.version for v in client.search_model_versions("name = 'image-classifier'")}
        (version,) = runs["pipeline"]
        assert version.data.metrics["ensemble.test.accuracy"] == pytest.approx(
            float(table["ensemble"]["accuracy"]), abs=1e-6
        )
        assert version.data.metrics["baseline.test.accuracy"] == pytest.approx(
            float(table["baseline"]["accuracy"]), abs=1e-6
        )
        assert {version.data.tags[f"run.ensemble_features@{m}"] for m in MEMBERS} <= {
            r.info.run_id for r in client.search_runs([experiment.experiment_id])
        }
        ensemble_version = registered[runs["ensemble"][0].info.run_id]
        finetuned_version = registered[runs["evaluate"][0].info.run_id]
        frozen_version = registered[runs["train_top"][0].info.run_id]
        tagged = {
            v.version: v.tags.get("export.run") for v in client.search_model_versions("name = 'image-classifier'")
        }
        model = mlflow.pyfunc.load_model(f"models:/image-classifier/{finetuned_version}")
        scored = model.predict(frame)
        by_ensemble = mlflow.pyfunc.load_model(f"models:/image-classifier/{ensemble_version}").predict(frame)
        champion = client.get_model_version_by_alias("image-classifier", "champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert list(by_ensemble.columns) == ["label", "confidence", *(f"p.{name}" for name in NAMES)]
    # train_top registered first, then evaluate, then the ensemble (RAN): a later one is champion only
    # if it scored higher than every earlier one
    order = [("top", frozen_version), ("finetuned", finetuned_version), ("ensemble", ensemble_version)]
    best = max(float(table[name]["accuracy"]) for name, _ in order)
    assert champion.version == next(v for name, v in order if float(table[name]["accuracy"]) == best)

    # the best model of the table exported, each format checked against Keras; its registry version
    # says which run holds the exports
    spec = json.loads((workspace / "models/export/spec.json").read_text())
    chosen = next(iter(table))  # the table is best first
    assert spec["model"] == chosen and spec["classes"] == NAMES
    assert spec["input"] == {"shape": [None, 32, 32, 3], "dtype": "float32", "pixels": "RGB, 0 to 255"}
    assert sorted(p.name for p in (workspace / "models/export").iterdir()) == [
        "model.onnx",
        "model.tflite",
        "saved_model",
        "spec.json",
    ]
    checks = json.loads((workspace / "reports/export/metrics.json").read_text())["export"]
    assert set(checks) == {"onnx", "tf_saved_model", "litert"}
    assert all(0 <= c["max_difference"] < 1e-4 for c in checks.values()), checks
    (export_run,) = runs["export"]
    versions = {"top": frozen_version, "finetuned": finetuned_version, "ensemble": ensemble_version}
    if chosen in versions:
        assert tagged[versions[chosen]] == export_run.info.run_id
        assert export_run.data.tags["export.model_version"] == f"image-classifier v{versions[chosen]}"
    else:  # the baseline, which is not registered
        assert export_run.data.tags["export.model_version"] == "none (the model is not registered)"
    assert {v for v in tagged.values() if v} <= {export_run.info.run_id}

    # the README's example runs each export on a test picture: the three agree
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = readme.split("### Using the exported model", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    printed = run([sys.executable, "-c", example], workspace, env).stdout
    number = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
    answers = {
        name: np.array([float(x) for x in re.findall(number, rest)])
        for name, _, rest in (line.partition(" ") for line in printed.splitlines())
        if name in ("onnx", "saved_model", "litert")
    }
    assert set(answers) == {"onnx", "saved_model", "litert"}, printed
    assert answers["onnx"].shape == (CLASSES,) and answers["onnx"].sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(answers["saved_model"], answers["onnx"], atol=1e-5)
    np.testing.assert_allclose(answers["litert"], answers["onnx"], atol=1e-5)

    # the label audit: every train and validation picture ranked, the worst first
    with open(workspace / "reports/audit/suspects.csv", newline="") as f:
        suspects = list(csv.DictReader(f))
    per_class = PARAMS["data"]["split"]["train"] + PARAMS["data"]["split"]["validation"]
    assert len(suspects) == CLASSES * per_class
    assert [int(row["rank"]) for row in suspects] == list(range(1, len(suspects) + 1))
    quality = [float(row["label_quality"]) for row in suspects]
    assert quality == sorted(quality)
    assert {row["given"] for row in suspects} == set(NAMES)
    assert all((workspace / row["picture"]).is_file() for row in suspects)
    audited = json.loads((workspace / "reports/audit/metrics.json").read_text())["audit"]
    assert audited["pictures"] == len(suspects)
    assert audited["flagged"] == sum(row["flagged"] == "1" for row in suspects)
    columns = [f"p.{name}" for name in NAMES]
    assert list(scored.columns) == ["label", "confidence", *columns]
    assert len(scored) == 3
    probs = scored[columns].to_numpy()
    assert probs.sum(axis=1) == pytest.approx([1.0] * 3, abs=1e-5)
    assert list(scored["label"]) == [NAMES[i] for i in probs.argmax(axis=1)]
    assert list(scored["confidence"]) == pytest.approx(probs.max(axis=1).tolist(), abs=1e-7)

    # `ops.predict` on one of them: the same model, preprocessing and probabilities
    picture = pictures[0].relative_to(workspace)
    printed = run([sys.executable, "-m", "ops.predict", str(picture), "--top", "3"], workspace, env).stdout
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
