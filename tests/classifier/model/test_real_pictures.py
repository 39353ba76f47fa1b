"""The recipe's claim on real pictures, small: EfficientNet-Lite0's ImageNet features tell Fashion-MNIST's
ten classes apart from a dozen pictures each, where the same network with random weights cannot, and
fine-tuning its last block starts exactly where the head left off. Needs Fashion-MNIST on this machine
(Debian's dataset-fashion-mnist, which CI installs); benchmarks/real.py measures the same at full size."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from classifier import config
from classifier.data import cleaning, fashion_mnist
from classifier.metrics import scores
from classifier.model import bottleneck, finetuning, heads, images, training
from ops.demo import FASHION_MNIST_64, merge
from tests.conftest import TINY

pytestmark = [
    pytest.mark.skipif(
        fashion_mnist.local_copy() is None,  # what `real` lays out, with a cache of its own
        reason="needs Fashion-MNIST on this machine: apt-get install dataset-fashion-mnist",
    ),
    pytest.mark.xdist_group("real_pictures"),  # one worker: its module fixtures are built once
]

#: 12 training pictures of each of the 10 classes at 64x64: seconds on a CPU.
REAL = merge(
    merge(TINY, FASHION_MNIST_64),
    {
        "data": {"split": {"train": 12, "validation": 6, "test": 12}, "fashion_mnist": {"per_class": 30}},
        "model": {"backbone": "efficientnet_lite0", "weights": "imagenet"},
        "top": {"units": 64, "epochs": 40, "batch_size": 16},
    },
)


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[config.Params, Path]:
    """(params, prepared folder) of the first 30 Fashion-MNIST pictures of each class."""
    params = config.parse(REAL)
    root = tmp_path_factory.mktemp("fashion-mnist")
    fashion_mnist.lay_out(root / "raw", params.data.fashion_mnist, root / "cache")
    cleaning.prepare(root / "raw", root / "prepared", params.data, params.data.seed, workers=1)
    return params, root / "prepared"


def head_on_features(params: config.Params, prepared: Path, out: Path) -> tuple[float, keras.Model]:
    """(test accuracy, head) of the head trained on the features `params.model.weights` give, which
    are written into `out` with the backbone's weights (backbone.weights.h5)."""
    base, meta = bottleneck.featurize(prepared, out, params)
    base.save_weights(out / "backbone.weights.h5")
    pool = heads.head_pool(params.top, params.model.backbone)
    head, _ = training.train_top(
        bottleneck.load_features(out, "train"),
        bottleneck.load_features(out, "validation"),
        len(meta["classes"]),
        params.top,
        params.seed,
        pool,
    )
    _, metrics = training.score_head(head, bottleneck.load_features(out, "test"), meta["classes"], 0.5)
    return metrics["test"]["accuracy"], head


@pytest.fixture(scope="module")
def transferred(real, tmp_path_factory) -> tuple[float, keras.Model, Path]:
    """(test accuracy, head, features folder) on EfficientNet-Lite0's ImageNet features."""
    params, prepared = real
    out = tmp_path_factory.mktemp("imagenet")
    return (*head_on_features(params, prepared, out), out)


def test_imagenet_features_separate_real_classes_where_random_weights_cannot(real, transferred, tmp_path):
    accuracy = transferred[0]
    untrained, _ = head_on_features(config.parse(merge(REAL, {"model": {"weights": None}})), real[1], tmp_path)
    assert accuracy >= 0.6, f"ImageNet features: {accuracy:.3f} on 120 test pictures of 10 classes"
    assert accuracy >= untrained + 0.25, f"ImageNet {accuracy:.3f} vs random weights {untrained:.3f}"


def test_fine_tuning_starts_from_the_heads_predictions(real, transferred):
    """The fine-tuning model (backbone with the featurized weights, the trained head, BatchNorm frozen)
    gives the head's own probabilities on the cached features before any step: preprocessing,
    resizing and BatchNorm agree between featurize and finetune."""
    params, prepared = real
    _, head, features = transferred
    model, unfrozen = finetuning.assemble(params, features / "backbone.weights.h5", head, 10)
    assert unfrozen and not any(name.endswith("bn") for name in unfrozen)
    test = images.load_split(prepared, "test")
    pictures = np.concatenate(list(images.images_only(test.paths, params.data.image_size, 64)))
    from_features = scores.as_class_probabilities(
        head.predict(bottleneck.load_features(features, "test")[0], verbose=0)
    )
    from_pictures = scores.as_class_probabilities(model.predict(pictures, verbose=0))
    np.testing.assert_allclose(from_pictures, from_features, atol=1e-3)


def test_the_default_head_keeps_its_best_epoch_not_an_overfit_last_one(real, transferred):
    """With the default top params (up to 50 epochs, patience 5) the head ends at its lowest validation
    loss. Trained all 50 epochs, the same head grows overconfident on real features: its test log loss
    is higher (on Fashion-MNIST at 100 per class, 1.33 against 0.60; docs/real.md)."""
    params, _ = real
    features = transferred[2]
    classes = json.loads((features / bottleneck.META).read_text())["classes"]
    defaults = config.parse({}).top

    def trained(top: config.TopParams) -> tuple[dict, dict]:
        data = (bottleneck.load_features(features, split) for split in ("train", "validation"))
        head, history = training.train_top(*data, len(classes), top, params.seed, "avg")
        _, metrics = training.score_head(head, bottleneck.load_features(features, "test"), classes, 0.5)
        return metrics["test"], history

    kept, history = trained(defaults)
    last, _ = trained(dataclasses.replace(defaults, patience=None))
    assert len(history["val_loss"]) < defaults.epochs, "stopped once validation loss no longer fell"
    assert kept["log_loss"] < last["log_loss"], (kept, last)
