"""Transfer-learning correctness on tiny data: features line up with labels, each stage trains only its part."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from classifier import inference, saving
from classifier.model import augment, backbones, bottleneck, eta, finetuning, heads, images, training
from classifier.model.history import final_metrics, kept_epoch, write_history
from ops.code import ROOT


def test_features_are_in_manifest_order_with_their_labels(features, prepared, tiny_params):
    meta = json.loads((features / "features" / bottleneck.META).read_text())
    assert meta["classes"] == ["horizontal", "vertical"]
    assert meta["images"] == {"train": 24, "validation": 12, "test": 12}
    base = backbones.build_backbone("vgg16", None, tiny_params.data.image_size)
    base.load_weights(features / "backbone.weights.h5")
    extractor = backbones.feature_extractor(base, "vgg16")
    for name in ("train", "test"):
        x, y = bottleneck.load_features(features / "features", name)
        split = images.load_split(prepared, name)
        np.testing.assert_array_equal(y, split.labels)
        assert x.shape == (len(split), 1, 1, 512)
        # each row is the features of the image in the same position, computed on its own
        for i in (0, len(split) // 2, len(split) - 1):
            alone = images.decode_tf(split.paths[i], tiny_params.data.image_size)[None]
            np.testing.assert_allclose(x[i], extractor.predict_on_batch(alone)[0], rtol=1e-4, atol=1e-4)
        assert {split.classes[label] for label in y} == {Path(p).parent.name for p in split.paths}
        assert all(split.classes[label] == Path(p).parent.name for p, label in zip(split.paths, y, strict=True))


def test_featurize_is_reproducible_with_random_weights(tmp_path, features, prepared, tiny_params):
    bottleneck.featurize(prepared, tmp_path / "again", tiny_params)
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(
            bottleneck.load_features(tmp_path / "again", name)[0],
            bottleneck.load_features(features / "features", name)[0],
        )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_top_trains_the_head_only(features, tiny_params):
    before = digest(features / "backbone.weights.h5")
    train = bottleneck.load_features(features / "features", "train")
    head, history = training.train_top(
        train,
        bottleneck.load_features(features / "features", "validation"),
        2,
        tiny_params.top,
        tiny_params.seed,
        "flatten",
    )
    assert digest(features / "backbone.weights.h5") == before
    assert [layer.name for layer in head.layers if layer.weights] == ["dense", "prediction"]
    assert head.output_shape == (None, 1) and head.layers[-1].activation.__name__ == "sigmoid"
    assert len(history["loss"]) == tiny_params.top.epochs
    assert set(history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}


@pytest.mark.parametrize(
    ("backbone", "pool", "layer", "inputs"),
    [
        ("vgg16", "auto", "flatten", 4 * 4 * 512),
        ("resnet50", "auto", "pool", 2048),
        ("resnet50", "flatten", "flatten", 5 * 5 * 2048),
        ("vgg16", "avg", "pool", 512),
    ],
)
def test_the_head_pools_per_backbone_unless_told(tiny_params, backbone, pool, layer, inputs):
    """auto: the recipe's Flatten for VGG16 (4x4x512 at 150 px); global average pooling for deeper
    feature maps such as ResNet50's 5x5x2048, which flattened would give the dense layer 51,200 inputs."""
    top = dataclasses.replace(tiny_params.top, pool=pool)
    shape = {"vgg16": (4, 4, 512), "resnet50": (5, 5, 2048)}[backbone]
    head = heads.build_head(shape, 2, top, heads.head_pool(top, backbone))
    assert head.layers[1].name == layer
    assert head.get_layer("dense").kernel.shape == (inputs, top.units)


def test_head_is_softmax_for_more_than_two_classes(tiny_params):
    head = heads.build_head((1, 1, 512), 5, tiny_params.top, "flatten")
    assert head.output_shape == (None, 5) and head.layers[-1].activation.__name__ == "softmax"
    heads.compile_classifier(head, keras.optimizers.SGD(), 5)
    assert isinstance(head.loss, keras.losses.SparseCategoricalCrossentropy)
    assert head.loss.reduction == "mean_with_sample_weight"


def test_history_csv(tmp_path):
    history = {"loss": [0.9, 0.5], "accuracy": [0.5, 0.75], "val_loss": [1.0, 0.6], "val_accuracy": [0.4, 0.8]}
    write_history(history, tmp_path / "history.csv")
    assert (tmp_path / "history.csv").read_text().splitlines() == [
        "epoch,loss,accuracy,val_loss,val_accuracy",
        "1,0.900000,0.500000,1.000000,0.400000",
        "2,0.500000,0.750000,0.600000,0.800000",
    ]


def test_finetune_starts_from_the_trained_top(features, top, tiny_params):
    model, _ = finetuning.assemble(tiny_params, features / "backbone.weights.h5", top, 2)
    for a, b in zip(model.get_layer("top").get_weights(), top.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.get_layer("augmentation") is not None


def test_the_frozen_model_scores_pictures_as_its_head_scores_their_cached_features(
    features, top, prepared, tiny_params, tmp_path
):
    """train_top's second model: the backbone with featurize's weights and the trained head, as one
    model of pictures, gives what the head gives on the cached test features (float32 here)."""
    model = heads.frozen_classifier(tiny_params, features / "backbone.weights.h5", top, 2)
    saving.save_model(model, tmp_path / "model.keras")
    reloaded = inference.load_model(tmp_path / "model.keras", "float32")
    test = images.load_split(prepared, "test")
    served = inference.class_probabilities(reloaded, test.paths, tiny_params.data.image_size, 4)
    cached, metrics = training.score_head(
        top, bottleneck.load_features(features / "features", "test"), test.classes, 0.5
    )
    np.testing.assert_allclose(served, cached, atol=1e-5)
    assert metrics["test"]["images"] == len(test) and 0 <= metrics["test"]["ece"] <= 1


def test_finetune_changes_only_the_last_block_and_the_head(
    tmp_path, features, top, prepared, tiny_params, monkeypatch, caplog
):
    import tensorflow as tf

    monkeypatch.setattr(eta, "MIN_BATCHES", 1)  # three batches an epoch: time the second
    monkeypatch.setattr(eta, "MIN_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="classifier.model.eta"):
        result = finetuning.finetune(
            prepared, features / "backbone.weights.h5", top, tiny_params, tf.distribute.get_strategy()
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "classifier.model.eta"]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"finetune: 1 epoch × 24 images ≈ \d+\.\d s at \d+\.\d img/s on CPU \(float32\)", lines[0])
    assert re.fullmatch(r"epoch 1/1 done after \d+\.\d s; about 0\.0 s left", lines[1])
    assert result.unfrozen == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert result.classes == ["horizontal", "vertical"]
    assert len(result.history["val_accuracy"]) == tiny_params.finetune.epochs

    before = backbones.build_backbone("vgg16", None, tiny_params.data.image_size)
    before.load_weights(features / "backbone.weights.h5")
    after = result.model.get_layer("vgg16")
    for old, new in zip(before.layers, after.layers, strict=True):
        for w_old, w_new in zip(old.get_weights(), new.get_weights(), strict=True):
            if old.name.startswith("block5_"):
                assert not np.array_equal(w_old, w_new), f"{old.name} was not trained"
            else:
                np.testing.assert_array_equal(w_old, w_new, err_msg=f"{old.name} changed but is frozen")
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(top.get_weights(), result.model.get_layer("top").get_weights(), strict=True)
    ]
    assert all(changed), "every weight of the head is trained"

    # The saved model is for inference: no augmentation, float32, reloads with safe_mode, same outputs.
    names = [layer.name for layer in result.model.layers]
    assert "augmentation" not in names and result.model.dtype_policy.name == "float32"
    saving.save_model(result.model, tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    batch = next(iter(images.images_only(images.load_split(prepared, "test").paths, tiny_params.data.image_size, 4)))
    np.testing.assert_allclose(
        loaded.predict_on_batch(batch), result.model.predict_on_batch(batch), rtol=1e-5, atol=1e-6
    )


def test_augmentation_layers_follow_the_params(tiny_params):
    layers = [layer.name for layer in augment.augmentation(tiny_params.finetune.augment, 0).layers]
    assert layers == ["rotation", "shift", "shear", "zoom", "flip"]
    off = type(tiny_params.finetune.augment)(0, 0, 0, 0, 0, False)
    assert augment.augmentation(off, 0) is None


@pytest.mark.slow
def test_mixed_precision_on_two_devices(features, top, prepared, tiny_params, tmp_path):
    """The GPU code path (MirroredStrategy over several devices, mixed precision) on two logical CPUs.

    Runs in a fresh process: logical devices must be configured before TensorFlow starts.
    """
    top.save(tmp_path / "top.keras")
    script = textwrap.dedent(
        f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import json, keras, numpy as np
        from pathlib import Path
        from classifier import config
        from classifier.model import devices, finetuning as finetune
        from tests.conftest import TINY
        params = config.parse(TINY)
        names = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = devices.strategy(names)
        top = keras.models.load_model({str(tmp_path / "top.keras")!r})
        result = finetune.finetune(Path({str(prepared)!r}), Path({str(features / "backbone.weights.h5")!r}),
                                   top, params, strategy, devices.precision_policy("bfloat16"))
        print(json.dumps({{
            "replicas": strategy.num_replicas_in_sync,
            "policy": devices.precision_policy("bfloat16"),
            "saved_dtype": result.model.dtype_policy.name,
            "weights_float32": all(w.dtype == np.float32 for w in result.model.get_weights()),
            "global_policy_after": keras.mixed_precision.global_policy().name,
            "val_accuracy": result.history["val_accuracy"],
        }}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert report["policy"] == "mixed_bfloat16"  # float16 on a GPU; bfloat16 is what CPUs compute in
    assert report["saved_dtype"] == "float32" and report["weights_float32"]
    assert report["global_policy_after"] == "float32"
    assert len(report["val_accuracy"]) == tiny_params.finetune.epochs


def test_predict_prints_the_top_classes_of_image_files(tmp_path, features, top, prepared, tiny_params):
    import tensorflow as tf

    from ops import predict

    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert predict.top_classes(probs, ["a", "b", "c"], 2) == [[("b", 0.7), ("c", 0.2)], [("a", 0.5), ("c", 0.3)]]

    model = finetuning.finetune(
        prepared, features / "backbone.weights.h5", top, tiny_params, tf.distribute.get_strategy()
    ).model
    saving.save_model(model, tmp_path / "model.keras")
    saving.write_json(tmp_path / "classes.json", ["horizontal", "vertical"])
    from tests.conftest import TINY

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))  # data.max_side, evaluate.threshold
    picture = images.load_split(prepared, "test").paths[0]
    args = ["--model", str(tmp_path / "model.keras"), "--classes", str(tmp_path / "classes.json"), "--top", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-m", "ops.predict", *args]
    done = subprocess.run(
        [*run, picture], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"{re.escape(picture)}: (horizontal|vertical) 0\.\d{{3}}, (horizontal|vertical) 0\.\d{{3}}", line
    )
    expected = inference.class_probabilities(model, [picture], tiny_params.data.image_size, 1)[0]
    assert f"{max(expected):.3f}" in line, "the same scores as evaluate"

    (tmp_path / "notes.jpg").write_text("not a picture")
    done = subprocess.run(
        [*run, str(tmp_path / "notes.jpg")], check=False, capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 2
    assert f"error: {tmp_path / 'notes.jpg'} is not an image Pillow can decode" in done.stderr


def test_a_saved_model_is_byte_stable(tmp_path, tiny_params):
    """Two instances of the same model save to the same bytes: no time, no memory address."""
    import zipfile

    saved = []
    for name in ("a", "b"):
        keras.utils.set_random_seed(3)
        head = heads.build_head((2, 2, 8), 3, tiny_params.top, "avg")
        saving.save_model(head, tmp_path / f"{name}.keras")
        saved.append((tmp_path / f"{name}.keras").read_bytes())
    assert saved[0] == saved[1]
    with zipfile.ZipFile(tmp_path / "a.keras") as archive:
        assert {info.date_time for info in archive.infolist()} == {saving.ZIP_EPOCH}
        assert "date_saved" not in json.loads(archive.read("metadata.json"))
        assert '"shared_object_id": 0' in archive.read("config.json").decode()
    loaded = keras.models.load_model(tmp_path / "a.keras", safe_mode=True)
    assert loaded.layers[-1].dtype_policy.name == "float32"


@pytest.mark.parametrize("patience", [None, 2])
def test_early_stopping_keeps_the_weights_of_the_best_epoch(features, tiny_params, patience):
    params = dataclasses.replace(tiny_params.top, epochs=12, patience=patience)
    features_, labels = bottleneck.load_features(features / "features", "validation")
    if patience is not None:
        labels = 1 - labels  # validation disagrees with training: learning raises its loss, so training stops
    validation = (features_, labels)
    head, history = training.train_top(
        bottleneck.load_features(features / "features", "train"), validation, 2, params, tiny_params.seed, "flatten"
    )
    losses = history["val_loss"]
    kept = kept_epoch(history, patience)
    if patience is None:
        assert len(losses) == 12 and kept == 11
    else:
        assert kept == int(np.argmin(losses)) and len(losses) < 12
        assert len(losses) - 1 - kept == patience, "stopped `patience` epochs after the best"
    # the head ends with the kept epoch's weights: its validation loss is that epoch's
    assert head.evaluate(*validation, verbose=0)[0] == pytest.approx(losses[kept], rel=1e-4)
    assert final_metrics(history, "top", kept)["top"]["epoch"] == kept + 1
