"""Which precision `auto` picks on which hardware (faked), and models computing in another precision."""

from __future__ import annotations

import json
import logging
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from classifier import config
from classifier.model import bottleneck, devices, eta, heads
from tests.conftest import TINY

pytestmark = pytest.mark.xdist_group("devices")  # one worker: its module fixtures are built once

ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 sha_ni\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma sha_ni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "policy"),
    [(ZEN4, "mixed_bfloat16"), (SAPPHIRE_RAPIDS, "mixed_bfloat16"), (ZEN3, "float32"), (GRAVITON3, "float32")],
)
def test_auto_picks_bfloat16_on_cpus_that_have_it_natively(tmp_path, cpuinfo, policy):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    flags = devices.cpu_flags(tmp_path / "cpuinfo")
    assert devices.precision_policy("auto", flags) == policy


@pytest.mark.parametrize(
    ("flags", "policy"),
    [("none", "float32"), ("", "float32"), ("avx512_bf16", "mixed_bfloat16"), ("sse, amx_bf16", "mixed_bfloat16")],
)
def test_pipeline_cpu_flags_stand_for_the_cpus_own(monkeypatch, flags, policy):
    """Either kind of machine can be tried on the other: PIPELINE_CPU_FLAGS is what `auto` goes by."""
    monkeypatch.setenv("PIPELINE_CPU_FLAGS", flags)
    assert devices.machine_flags() == frozenset(flags.replace(",", " ").split()) - {"none"}
    assert devices.precision_policy("auto") == policy
    assert devices.precision_policy("float32") == "float32"  # a forced precision still wins


def test_without_the_override_auto_goes_by_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv("PIPELINE_CPU_FLAGS", raising=False)
    assert devices.machine_flags() == devices.cpu_flags()
    native = bool(devices.cpu_flags() & devices.BF16_CPU_FLAGS)
    assert devices.precision_policy("auto") == ("mixed_bfloat16" if native else "float32")


def test_cpu_flags_are_none_where_the_system_does_not_list_them(tmp_path):
    assert devices.cpu_flags(tmp_path / "missing") == frozenset()
    (tmp_path / "cpuinfo").write_text("processor\t: 0\n")
    assert devices.cpu_flags(tmp_path / "cpuinfo") == frozenset()


@pytest.mark.parametrize(
    ("precision", "policy"), [("float32", "float32"), ("bfloat16", "mixed_bfloat16"), ("float16", "mixed_float16")]
)
def test_a_forced_precision_wins_over_the_hardware(precision, policy):
    assert devices.precision_policy(precision, frozenset({"avx512_bf16"})) == policy
    assert devices.precision_policy(precision, frozenset()) == policy


@pytest.mark.parametrize(
    ("capabilities", "policy"),
    [
        ([(9, 0)], "mixed_bfloat16"),  # H100, H200
        ([(8, 6), (8, 0)], "mixed_bfloat16"),
        ([(7, 5)], "mixed_float16"),  # T4: tensor cores, no bfloat16
        ([(7, 0), (8, 0)], "mixed_float16"),  # the oldest GPU decides
        ([(6, 1)], "float32"),
        ([(8, 0), (6, 0)], "float32"),
    ],
)
def test_auto_picks_bfloat16_on_gpus_that_have_it_and_float16_on_older_tensor_cores(monkeypatch, capabilities, policy):
    gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(len(capabilities))]
    details = {gpu.name: {"compute_capability": cc} for gpu, cc in zip(gpus, capabilities, strict=True)}
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: details[device.name])
    # a GPU decides, whatever the CPU has
    assert devices.precision_policy("auto", frozenset({"avx512_bf16"})) == policy


@pytest.fixture(scope="module")
def classifier() -> keras.Model:
    params = config.parse(TINY)
    keras.utils.set_random_seed(1)
    base, head = heads.fresh_parts(params, 3)
    return heads.build_classifier(base, head, "vgg16")


def test_a_model_computing_in_bfloat16_has_the_same_weights_and_float32_outputs(classifier):
    copy = devices.computing_in(classifier, "mixed_bfloat16")
    assert classifier.dtype_policy.name == "float32"  # the original is untouched
    inner = [layer for model in (copy.get_layer("vgg16"), copy.get_layer("top")) for layer in model.layers]
    computing = {layer.name: layer.dtype_policy.name for layer in inner if layer.weights}
    assert set(computing.values()) == {"mixed_bfloat16", "float32"}
    assert computing["prediction"] == "float32"  # the probabilities keep their digits
    assert [n for n, p in computing.items() if p == "float32"] == ["prediction"]
    for a, b in zip(classifier.get_weights(), copy.get_weights(), strict=True):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    exact, fast = classifier.predict(x, verbose=0), copy.predict(x, verbose=0)
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast.sum(axis=1), 1, rtol=1e-5)  # a float32 softmax
    np.testing.assert_allclose(fast, exact, atol=0.02)
    assert not np.array_equal(fast, exact)  # it did compute in bfloat16


def test_float32_is_the_model_itself(classifier):
    assert devices.computing_in(classifier, "float32") is classifier


def test_featurize_in_bfloat16_stays_close_to_float32(tmp_path, prepared, tiny_params, features, monkeypatch, caplog):
    monkeypatch.setattr(eta, "MIN_BATCHES", 1)
    monkeypatch.setattr(eta, "MIN_SECONDS", 0.0)
    params = config.parse({**TINY, "precision": "bfloat16"})
    with caplog.at_level(logging.INFO, logger="classifier.model.eta"):
        _, meta = bottleneck.featurize(prepared, tmp_path / "bf16", params)
    assert meta["policy"] == "mixed_bfloat16"
    assert json.loads((features / "features" / bottleneck.META).read_text())["policy"] == "float32"
    lines = [r.getMessage() for r in caplog.records if r.name == "classifier.model.eta"]
    assert len(lines) == 1 and re.fullmatch(
        r"featurize: 48 images ≈ \d+\.\d s at \d+\.\d img/s on CPU \(mixed_bfloat16\)", lines[0]
    ), lines
    for split in ("train", "test"):
        fast, _ = bottleneck.load_features(tmp_path / "bf16", split)
        exact, _ = bottleneck.load_features(features / "features", split)
        relative = np.linalg.norm(fast - exact) / np.linalg.norm(exact)
        assert 0 < relative < 0.02, relative
