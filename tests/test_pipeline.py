"""End to end through the real `dvc repro`, in a temporary git repository, with the tiny config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import demo
from tests.conftest import TINY

STAGES = ["download", "prepare", "featurize", "train_top", "finetune", "evaluate"]


def dvc_repro(workspace: Path, env: dict) -> list[str]:
    """Run `dvc repro`; return the stages it ran, in order."""
    done = subprocess.run(["dvc", "repro"], cwd=workspace, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return re.findall(r"Running stage '(\w+)'", done.stdout)


def set_param(workspace: Path, section: str, key: str, value) -> None:
    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path):
    workspace = demo.make_workspace(tmp_path / "repo", TINY, git=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # stages run this venv's python
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }

    assert dvc_repro(workspace, env) == STAGES
    for output in [
        "data/raw/source.json",
        "data/prepared/manifest.csv",
        "data/features/train.npz",
        "models/backbone.weights.h5",
        "models/top.keras",
        "models/model.keras",
        "reports/train_top/history.csv",
        "reports/finetune/history.csv",
        "reports/evaluate/confusion.png",
        "reports/evaluate/roc.png",
        "reports/evaluate/training_curves.png",
        "reports/evaluate/predictions.csv",
    ]:
        assert (workspace / output).is_file(), output
    metrics = json.loads((workspace / "reports/metrics.json").read_text())
    assert metrics["test_images"] == 2 * TINY["data"]["split"]["test"]
    for key in ("accuracy", "precision", "recall", "f1", "log_loss", "roc_auc"):
        assert 0 <= metrics[key] <= (1 if key != "log_loss" else 100), key
    data = json.loads((workspace / "reports/data.json").read_text())
    assert data["classes"]["horizontal"] == {"train": 12, "validation": 6, "test": 6}
    assert json.loads((workspace / "models/classes.json").read_text()) == ["horizontal", "vertical"]

    # DVC sees the metrics and the plots.
    shown = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=workspace, env=env, capture_output=True, text=True)
    assert '"accuracy"' in shown.stdout and '"dropped"' in shown.stdout
    plots = subprocess.run(
        ["dvc", "plots", "show", "--json"], cwd=workspace, env=env, capture_output=True, text=True
    )
    assert plots.returncode == 0 and "confusion_matrix" in plots.stdout and "training_accuracy" in plots.stdout

    # Each stage logged one MLflow run with its params.
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    assert sorted(r.data.tags["pipeline.stage"] for r in runs) == sorted(STAGES)
    finetune_run = next(r for r in runs if r.info.run_name == "finetune")
    assert finetune_run.data.params["finetune.learning_rate"] == "0.01"
    assert len(client.get_metric_history(finetune_run.info.run_id, "val_accuracy")) == 1
    evaluate_run = next(r for r in runs if r.info.run_name == "evaluate")
    assert evaluate_run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])

    # Nothing changed: nothing runs.
    assert dvc_repro(workspace, env) == []

    # A fine-tuning knob re-runs exactly finetune and evaluate.
    set_param(workspace, "finetune", "learning_rate", 0.005)
    assert dvc_repro(workspace, env) == ["finetune", "evaluate"]

    # A head knob re-runs train_top and what follows, never featurize.
    set_param(workspace, "top", "units", 8)
    assert dvc_repro(workspace, env) == ["train_top", "finetune", "evaluate"]
