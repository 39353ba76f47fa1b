"""The baseline from scratch, the ensemble of backbones and the table that compares them with the
fine-tuned model (stages/baseline.py, ensemble_features.py, ensemble.py, compare.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from classifier import config, inference
from classifier.errors import StageError
from classifier.metrics import scores, table
from classifier.model import backbones, baseline, ensemble, images, training
from classifier.model.members import WEIGHTS, featurize_member
from ops.code import ROOT
from ops.serving import registry
from tests.conftest import TINY

pytestmark = pytest.mark.xdist_group("baseline_and_ensemble")  # one worker: its module fixtures are built once

#: Two small backbones, random weights, at the tiny images' size.
MEMBERS = ("mobilenet_v2", "efficientnet_v2_b0")


@pytest.fixture(scope="module")
def ensemble_params(tiny_params) -> config.Params:
    return dataclasses.replace(
        tiny_params, ensemble=config.EnsembleParams(backbones=MEMBERS, weights=None, image_size=32)
    )


@pytest.fixture(scope="module")
def members(tmp_path_factory, prepared, ensemble_params):
    """Each member's features folder, as `ensemble_features@<backbone>` writes it."""
    folder = tmp_path_factory.mktemp("ensemble")
    for name in MEMBERS:
        featurize_member(name, prepared, folder / name, ensemble_params)
    return folder


# The baseline ------------------------------------------------------------------------------------


def test_the_baseline_is_the_recipes_small_convnet(tiny_params):
    model = baseline.build_baseline((150, 150), 2, tiny_params.baseline)
    convs = [layer for layer in model.layers if layer.name.startswith("conv")]
    assert [layer.filters for layer in convs] == [32, 32, 64]
    assert [layer.kernel_size for layer in convs] == [(3, 3)] * 3
    assert model.get_layer("flatten").output.shape[1] == 17 * 17 * 64, "three 3x3 convolutions and 2x2 poolings"
    assert model.get_layer("dense").units == 64 and model.get_layer("dropout").rate == 0.5
    assert model.output_shape == (None, 1) and model.layers[-1].activation.__name__ == "sigmoid"
    assert baseline.build_baseline((150, 150), 5, tiny_params.baseline).output_shape == (None, 5)


def test_the_baseline_trains_on_augmented_images_and_saves_without_them(prepared, tiny_params):
    import tensorflow as tf

    params = dataclasses.replace(tiny_params, baseline=config.BaselineParams(units=8, epochs=2, batch_size=8))
    model, history = baseline.train_baseline(prepared, params, tf.distribute.get_strategy())
    assert len(history["val_accuracy"]) == 2
    assert "augmentation" not in [layer.name for layer in model.layers], "augmentation only acts in training"
    assert model.get_layer("rescale").scale == pytest.approx(1 / 255)
    again, _ = baseline.train_baseline(prepared, params, tf.distribute.get_strategy())
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the same seed, the same model
    probs, scores = inference.evaluate(model, images.load_split(prepared, "test"), tiny_params)
    assert probs.shape == (12, 2) and scores["test"]["images"] == 12


def run_switched_off(module: str, args: list[str], params: dict, cwd) -> dict:
    """Run a stage module switched off by `params` in `cwd`; return whether it imported TensorFlow."""
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    code = f"import runpy;runpy.run_module('stages.{module}', run_name='__main__', alter_sys=True)"
    check = "import atexit, sys; atexit.register(lambda: print('TF', 'tensorflow' in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", f"{check}\n{code}", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_TRACKING": "off"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("TF True", "TF False"), done.stdout
    return {"tensorflow": done.stdout.strip() == "TF True", "log": done.stderr}


@pytest.mark.slow  # a stage's process
def test_a_switched_off_baseline_writes_empty_outputs_without_tensorflow(tmp_path):
    params = TINY | {"baseline": {"enabled": False}}
    done = run_switched_off("baseline", ["data/prepared", "models/baseline", "reports/baseline"], params, tmp_path)
    assert not done["tensorflow"]
    assert "baseline.enabled is false in params.yaml: no baseline trained" in done["log"]
    assert list((tmp_path / "models" / "baseline").iterdir()) == []
    assert (tmp_path / "reports/baseline/history.csv").read_text() == "epoch,loss,accuracy,val_loss,val_accuracy\n"
    assert json.loads((tmp_path / "reports/baseline/metrics.json").read_text()) == {}


# The ensemble ------------------------------------------------------------------------------------


def test_a_member_sees_the_images_at_its_own_size_never_enlarged():
    assert backbones.member_size("resnet50", 299) == 224
    assert backbones.member_size("xception", 299) == 299
    assert backbones.member_size("mobilenet_v2", 96) == 96, "smaller images are not enlarged"
    with pytest.raises(config.ParamsError, match="too small for inception_v3: it needs at least 75x75"):
        backbones.member_size("inception_v3", 64)


def test_member_features_are_pooled_vectors_in_manifest_order(members, prepared):
    meta = json.loads((members / "mobilenet_v2" / "meta.json").read_text())
    assert meta["side"] == 32 and meta["image_size"] == 32 and meta["backbone"] == "mobilenet_v2"
    assert meta["pool"] == "avg", "top.pool: auto averages the deep maps of all but VGG16"
    assert meta["feature_shape"] == [1280] and meta["images"] == {"train": 24, "validation": 12, "test": 12}
    assert (members / "mobilenet_v2" / WEIGHTS).is_file()
    features, labels = ensemble.concatenated(members, MEMBERS, "test")
    assert features.shape == (12, 1280 + 1280), "side by side, in the order of ensemble.backbones"
    np.testing.assert_array_equal(labels, images.load_split(prepared, "test").labels)


def test_the_saved_ensemble_scores_images_as_its_head_scores_their_cached_features(
    members, prepared, ensemble_params, tmp_path
):
    import keras

    p = ensemble_params
    head, _ = training.train_top(
        ensemble.concatenated(members, MEMBERS, "train"),
        ensemble.concatenated(members, MEMBERS, "validation"),
        2,
        p.top,
        p.seed,
        "flatten",
    )
    metas = ensemble.member_meta(members, MEMBERS, 32)
    model = ensemble.assemble(members, MEMBERS, metas, head)
    model.save(tmp_path / "ensemble.keras")
    reloaded = keras.models.load_model(tmp_path / "ensemble.keras", safe_mode=True)
    assert registry.backbone_of(tmp_path / "ensemble.keras") == "mobilenet_v2 + efficientnet_v2_b0", "its description"
    test = images.load_split(prepared, "test")
    served = inference.class_probabilities(reloaded, test.paths, (32, 32), 4)
    cached = scores.as_class_probabilities(head.predict(ensemble.concatenated(members, MEMBERS, "test")[0]))
    np.testing.assert_allclose(served, cached, atol=1e-5)


def test_missing_or_mismatched_member_features_say_which_stage_to_run(members, tmp_path):
    with pytest.raises(StageError, match=r"run `dvc repro ensemble_features@resnet50`"):
        ensemble.member_meta(members, ("mobilenet_v2", "resnet50"), 32)
    with pytest.raises(StageError, match=r"32px images, not ensemble.image_size \(64\)"):
        ensemble.member_meta(members, MEMBERS, 64)


@pytest.mark.slow  # a stage's process
def test_a_switched_off_ensemble_writes_empty_outputs_without_tensorflow(tmp_path):
    params = TINY | {"ensemble": {"backbones": []}}
    args = ["data/ensemble", "data/prepared", "models/ensemble", "reports/ensemble"]
    done = run_switched_off("ensemble", args, params, tmp_path)
    assert not done["tensorflow"]
    assert list((tmp_path / "models" / "ensemble").iterdir()) == []
    assert json.loads((tmp_path / "reports/ensemble/metrics.json").read_text()) == {}


@pytest.mark.parametrize(
    ("ensemble_params", "message"),
    [
        (
            {"backbones": ["resnet50", "alexnet"]},
            "ensemble.backbones = ['resnet50', 'alexnet'] is not valid: each one of",
        ),
        ({"backbones": ["resnet50", "resnet50"]}, "each backbone at most once"),
        ({"backbones": "resnet50"}, "ensemble.backbones = 'resnet50' is not valid: a list"),
        ({"weights": "my.h5"}, "ensemble.weights = 'my.h5' is not valid: imagenet, or null"),
        ({"image_size": 16}, "ensemble.image_size = 16 is not valid: must be >= 32"),
    ],
)
def test_bad_ensemble_params_are_named(ensemble_params, message):
    with pytest.raises(config.ParamsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.parse({"ensemble": ensemble_params})


# The comparison ----------------------------------------------------------------------------------


def test_the_table_lists_each_trained_model_best_first(tmp_path, tiny_params):
    files = {
        "baseline.json": {"baseline": {"val_accuracy": 0.7, "test": {"accuracy": 0.75, "f1": 0.7, "images": 80}}},
        "metrics.json": {"test": {"accuracy": 0.9375, "f1": 0.93, "roc_auc": None, "images": 80}},
        "ensemble.json": {},  # switched off
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    found = table.scores([tmp_path / name for name in files])
    assert set(found) == {"baseline", "finetuned"}
    rows = table.table(found, tiny_params)
    table.write_table(rows, tmp_path / "models.csv")
    assert (tmp_path / "models.csv").read_text().splitlines() == [
        "model,description,accuracy,f1,roc_auc,images",
        'finetuned,"vgg16, last 1 block fine-tuned",0.937500,0.930000,,80',
        "baseline,small convnet trained from scratch,0.750000,0.700000,,80",
    ]
    params = dataclasses.replace(tiny_params, ensemble=config.EnsembleParams(backbones=MEMBERS))
    assert table.describe("ensemble", params) == "head on mobilenet_v2 + efficientnet_v2_b0 features"


def test_of_models_equal_in_test_accuracy_the_lower_log_loss_comes_first(tmp_path, tiny_params):
    found = {
        "top": {"accuracy": 0.9875, "log_loss": 0.12},
        "finetuned": {"accuracy": 0.9875, "log_loss": 0.10},
        "baseline": {"accuracy": 0.9875, "log_loss": 0.10},  # equal in both: the order given
        "ensemble": {"accuracy": 0.99, "log_loss": 0.5},
    }
    assert [row["model"] for row in table.table(found, tiny_params)] == ["ensemble", "finetuned", "baseline", "top"]


def test_the_table_notes_a_fine_tuning_that_ended_below_the_head_it_started_from(tmp_path, tiny_params):
    # As seen on a real 10-class data set: the head reached 0.862, fine-tuning brought it to 0.651.
    files = {
        "train_top.json": {"top": {"val_accuracy": 0.862, "test": {"accuracy": 0.85, "ece": 0.05, "images": 360}}},
        "finetune.json": {"finetune": {"val_accuracy": 0.651}},
        "metrics.json": {"test": {"accuracy": 0.632, "ece": 0.2, "images": 360}},
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    paths = [tmp_path / name for name in files]
    assert table.validation_accuracies(paths) == {"top": 0.862, "finetune": 0.651}
    note = table.finetune_note(table.validation_accuracies(paths))
    assert note == (
        "fine-tuning lowered validation accuracy from 0.8620 (the head, row top) to 0.6510: the frozen-backbone "
        "model (models/frozen) is the better one; try a lower finetune.learning_rate or a milder finetune.augment "
        "(docs/real.md)"
    )
    rows = table.table(table.scores(paths), tiny_params, {table.FINETUNED: note})
    table.write_table(rows, tmp_path / "models.csv")
    assert (tmp_path / "models.csv").read_text().splitlines() == [
        "model,description,accuracy,ece,images,note",
        'top,"vgg16 frozen, dense head on its cached features",0.850000,0.050000,360,',
        f'finetuned,"vgg16, last 1 block fine-tuned",0.632000,0.200000,360,"{note}"',  # quoted: it has a comma
    ]
    assert table.finetune_note({"top": 0.8, "finetune": 0.8}) is None, "as good is no regression"
    assert table.finetune_note({"finetune": 0.8}) is None
