"""The backbone registry: real layer names, each family's own preprocessing, weights and their failures."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest

from classifier import config
from classifier.model import backbones


@pytest.mark.parametrize("name", config.BACKBONES)
def test_block_ends_are_layers_of_the_architecture_in_order(name):
    spec = backbones.REGISTRY[name]
    size = max(spec.min_size, 75)
    base = backbones.build_backbone(name, None, (size, size))
    names = [layer.name for layer in base.layers]
    positions = [names.index(end) for end in spec.block_ends]  # raises if a name is wrong
    assert positions == sorted(positions)
    assert spec.block_ends[-1] == names[-1], "the last block ends the backbone"
    unfrozen = backbones.unfreeze_last_blocks(base, name, 1)
    assert unfrozen and all(names.index(n) > positions[-2] for n in unfrozen)
    assert not any(layer.trainable for layer in base.layers[: positions[-2] + 1])


@pytest.mark.parametrize("name", config.BACKBONES)
def test_preprocess_layer_is_the_familys_own(name):
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    lite = (images - 127.0) / 128.0  # EfficientNet-Lite's scaling, as its TensorFlow code has it
    expected = {
        "vgg16": keras.applications.vgg16.preprocess_input,
        "resnet50": keras.applications.resnet50.preprocess_input,
        "inception_v3": keras.applications.inception_v3.preprocess_input,
        "xception": keras.applications.xception.preprocess_input,
        "mobilenet_v2": keras.applications.mobilenet_v2.preprocess_input,
        "efficientnet_v2_b0": keras.applications.efficientnet_v2.preprocess_input,
        "efficientnet_lite0": lambda _: lite,
        "efficientnet_lite1": lambda _: lite,
        "efficientnet_lite2": lambda _: lite,
    }[name](images.copy())
    got = keras.ops.convert_to_numpy(backbones.Preprocess(name)(images))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_vgg16_preprocessing_is_caffe_style_not_a_rescale():
    red = np.zeros((1, 1, 1, 3), "float32")
    red[..., 0] = 255.0
    out = keras.ops.convert_to_numpy(backbones.Preprocess("vgg16")(red))[0, 0, 0]
    # BGR order, ImageNet means subtracted: blue and green become negative means, red 255 - 123.68
    np.testing.assert_allclose(out, [-103.939, -116.779, 255 - 123.68], atol=1e-3)


def test_vgg16_last_block_is_block5():
    base = backbones.build_backbone("vgg16", None, (32, 32))
    assert backbones.unfreeze_last_blocks(base, "vgg16", 1) == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert len(backbones.unfreeze_last_blocks(base, "vgg16", 2)) == 6
    with pytest.raises(config.ParamsError, match="finetune.blocks = 5 is too many for vgg16: at most 4"):
        backbones.unfreeze_last_blocks(base, "vgg16", 5)


def test_image_too_small_for_the_architecture():
    with pytest.raises(
        config.ParamsError, match=r"data.image_size = \[64, 64\] is too small for inception_v3: .* 75x75"
    ):
        backbones.build_backbone("inception_v3", None, (64, 64))


def test_local_weights_file_is_loaded(tmp_path):
    keras.utils.set_random_seed(1)
    original = backbones.build_backbone("vgg16", None, (32, 32))
    original.save_weights(tmp_path / "vgg16.weights.h5")
    keras.utils.set_random_seed(2)
    loaded = backbones.build_backbone("vgg16", str(tmp_path / "vgg16.weights.h5"), (32, 32))
    for a, b in zip(original.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not loaded.trainable


def test_missing_local_weights_file_names_the_param(tmp_path):
    with pytest.raises(backbones.WeightsUnavailable, match=r"model.weights = '.*nope.h5': no such file"):
        backbones.build_backbone("vgg16", str(tmp_path / "nope.h5"), (32, 32))


def test_unreachable_imagenet_weights_fail_fast_with_what_to_do(tmp_path, monkeypatch, http_root):
    """Weights fetched from a local server that does not have them: the offline situation."""
    from keras.src.applications import vgg16
    from keras.src.utils import file_utils

    _, base = http_root
    monkeypatch.setattr(vgg16, "WEIGHTS_PATH_NO_TOP", f"{base}/vgg16_notop.h5")
    monkeypatch.setattr(file_utils, "get_file", functools.partial(file_utils.get_file, cache_dir=str(tmp_path)))
    with pytest.raises(backbones.WeightsUnavailable) as err:
        backbones.build_backbone("vgg16", "imagenet", (32, 32))
    message = str(err.value)
    assert "Could not download the ImageNet weights of vgg16" in message
    assert "~/.keras/models/" in message and "model.weights" in message and "null" in message


def test_architecture_limits_are_checked_before_any_work():
    with pytest.raises(config.ParamsError, match="finetune.blocks = 11 is too many for inception_v3: at most 10"):
        backbones.check(config.parse({"model": {"backbone": "inception_v3"}, "finetune": {"blocks": 11}}))
    with pytest.raises(config.ParamsError, match=r"data.image_size = \[64, 64\] is too small for xception"):
        backbones.check(config.parse({"model": {"backbone": "xception"}, "data": {"image_size": 64}}))
    backbones.check(config.parse({}))  # the defaults pass


def test_a_model_saved_before_the_layers_moved_loads_the_same(tmp_path):
    """Models registered before the layout changed name their custom layers' module `stages.backbones`
    (and `stages.images`); Keras finds the classes by their registered names (`stages>Preprocess`),
    which stay, so those models load and predict as before."""
    import json
    import zipfile

    from classifier import inference, saving
    from classifier.model import augment

    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            augment.CentredShear(0.2, seed=1, name="shear"),
            backbones.Preprocess("vgg16", name="preprocess"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    saving.save_model(model, tmp_path / "now.keras")
    old = tmp_path / "before.keras"
    with zipfile.ZipFile(tmp_path / "now.keras") as zin, zipfile.ZipFile(old, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "config.json":
                text = data.decode()
                assert '"module": "classifier.model.backbones"' in text
                text = text.replace('"module": "classifier.model.backbones"', '"module": "stages.backbones"')
                text = text.replace('"module": "classifier.model.augment"', '"module": "stages.images"')
                data = json.dumps(json.loads(text)).encode()
            zout.writestr(info, data)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    loaded = inference.load_model(old, "float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2"])
def test_fine_tuning_leaves_every_batchnorm_in_inference_mode(name):
    """Under `fit`, Keras 3 passes training=True down through `base(x, training=False)`: an unfrozen
    block's BatchNorm would normalise each batch by its own statistics and drift its moving ones.
    Trained at a learning rate of nearly 0, the model must predict exactly as before."""
    from classifier.model import heads

    keras.utils.set_random_seed(0)
    base = backbones.build_backbone(name, None, (32, 32))
    unfrozen = backbones.unfreeze_last_blocks(base, name, 1)
    assert unfrozen and not any(isinstance(base.get_layer(n), keras.layers.BatchNormalization) for n in unfrozen)
    head = keras.Sequential([keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
    model = heads.build_classifier(base, head, name)
    heads.compile_classifier(model, keras.optimizers.SGD(learning_rate=1e-12), 3)
    rng = np.random.default_rng(0)
    pictures = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 3, 16)
    moving = [w for w in base.non_trainable_weights if "moving" in w.path]
    statistics = [keras.ops.convert_to_numpy(w) for w in moving]
    assert moving
    before = model.predict(pictures, verbose=0)
    model.fit(pictures, labels, epochs=2, batch_size=4, verbose=0)
    for variable, value in zip(moving, statistics, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value, err_msg=variable.path)
    np.testing.assert_allclose(model.predict(pictures, verbose=0), before, atol=1e-6)
