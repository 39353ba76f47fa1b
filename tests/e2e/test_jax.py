"""End to end on Keras's JAX backend, without TensorFlow, as two processes: the real `dvc repro` of
the tiny pipeline with `backend: jax`, featurize, finetune and evaluate each run by `ops.launch` as
two processes on 127.0.0.1 (PIPELINE_LAUNCH), so that each batch of fine-tuning is split two ways
and the validation split's last batch is completed with pictures of weight 0, and `import
tensorflow` failing in every process.

Then, here on TensorFlow: the JAX run's backbone weights give the same features, and its saved
model the same test scores and the same validation accuracy, as the JAX run computed; both
processes ended fine-tuning with the same weights; and process 0 alone logged to MLflow.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import sys

import numpy as np
import pytest

from ops import demo
from tests.conftest import TINY
from tests.workspace import STAGES, base_env, dvc, ran_stages, without_tensorflow

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("jax")]  # one worker: its pipeline is built once

#: How far apart TensorFlow and JAX may compute a float32 feature or probability of the same weights.
CLOSE = 1e-4


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """The tiny pipeline on JAX, reproduced once: its folder, store and `dvc repro` output."""
    tmp = tmp_path_factory.mktemp("jax")
    workspace = demo.make_workspace(tmp / "repo", copy.deepcopy(TINY) | {"backend": "jax"}, git=True)
    env = base_env(
        PYTHONPATH=without_tensorflow(tmp),
        PIPELINE_LAUNCH=f"{sys.executable} -m ops.launch --processes 2 --",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
    )
    done = dvc("repro", cwd=workspace, env=env)
    output = done.stdout + done.stderr
    return {"path": workspace, "store": env["MLFLOW_TRACKING_URI"], "output": output, "ran": ran_stages(output)}


def test_the_jax_path_runs_every_stage_as_two_processes_without_tensorflow(jax_run):
    workspace = jax_run["path"]
    assert jax_run["ran"] == STAGES
    meta = json.loads((workspace / "data/features/meta.json").read_text())
    assert meta["images"] == {"train": 24, "validation": 12, "test": 12}
    test = json.loads((workspace / "reports/metrics.json").read_text())["test"]
    assert test["images"] == 12 and 0 <= test["accuracy"] <= 1


def test_tensorflow_reads_the_jax_runs_weights_and_model_as_it_computed_them(jax_run, tiny_params):
    from classifier import inference
    from classifier.model import backbones, bottleneck, images

    workspace = jax_run["path"]
    prepared = workspace / "data/prepared"
    # the backbone weights JAX saved give, on TensorFlow, the features JAX computed (process 0 the first half
    # of each split, process 1 the second, gathered in order)
    base = backbones.build_backbone("vgg16", None, tiny_params.data.image_size)
    base.load_weights(workspace / "models/backbone.weights.h5")
    extractor = backbones.feature_extractor(base, "vgg16")
    split = images.load_split(prepared, "test")
    on_tf = np.concatenate([extractor.predict_on_batch(b) for b in images.images_only(split.paths, (32, 32), 8)])
    on_jax, labels = bottleneck.load_features(workspace / "data/features", "test")
    assert on_jax.shape == on_tf.shape and (labels == split.labels).all()
    assert np.abs(on_jax - on_tf).max() <= CLOSE * max(1.0, np.abs(on_tf).max())
    # the model JAX fine-tuned loads here and scores the test split as evaluate did there
    model = inference.load_model(workspace / "models/model.keras", "float32")
    _, scores = inference.evaluate(model, split, tiny_params)
    written = json.loads((workspace / "reports/metrics.json").read_text())["test"]
    assert scores["test"]["accuracy"] == written["accuracy"]
    assert scores["test"]["log_loss"] == pytest.approx(written["log_loss"], abs=CLOSE)
    # fine-tuning's validation accuracy (12 pictures in batches of 8, the second completed with 4 of
    # weight 0) is that of the saved model's own predictions: the padding counted for nothing
    validation = images.load_split(prepared, "validation")
    probs = inference.class_probabilities(model, validation.paths, (32, 32), 8)
    accuracy = float(((probs[:, 1] >= 0.5) == validation.labels).mean())
    with open(workspace / "reports/finetune/history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert float(history[-1]["val_accuracy"]) == pytest.approx(accuracy, abs=1e-6)


def test_both_processes_end_fine_tuning_with_the_same_weights(jax_run):
    digests = re.findall(r"process (\d) of 2: weights sha256 (\w+)", jax_run["output"])
    assert sorted(index for index, _ in digests) == ["0", "1"]
    assert digests[0][1] == digests[1][1]


def test_process_0_alone_logs_each_stage_run(jax_run):
    import mlflow

    client = mlflow.MlflowClient(jax_run["store"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stages = sorted(run.data.tags.get("pipeline.stage", "") for run in runs)
    for stage in ("featurize", "finetune", "evaluate"):
        assert stages.count(stage) == 1, stages
    finetune = next(run for run in runs if run.data.tags.get("pipeline.stage") == "finetune")
    assert finetune.info.status == "FINISHED"
    assert finetune.data.tags["pipeline.backend"] == "jax" and finetune.data.tags["pipeline.processes"] == "2"
    train_top = next(run for run in runs if run.data.tags.get("pipeline.stage") == "train_top")
    assert train_top.data.tags["pipeline.processes"] == "1"
