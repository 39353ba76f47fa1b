"""The two backends: which one `auto` takes where, the processes a stage runs as, pictures decoded the
same way by TensorFlow and by Pillow, models that cross from one backend to the other, and a batch
split over several devices (tests/e2e/test_jax.py runs the stages as two processes)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from classifier.errors import StageError
from classifier.model import backend, images
from ops.code import ROOT

#: How far apart (on 0..255) TensorFlow's and Pillow's decoding may put a pixel: float32 rounding only.
SAME_PIXEL = 0.01


@pytest.fixture
def machine(monkeypatch):
    """A machine to describe: no KERAS_BACKEND, one process, and what is installed and present as set."""
    for name in ("KERAS_BACKEND", "KERAS_DISTRIBUTION_NUM_PROCESSES", "SLURM_STEP_NUM_TASKS", "XLA_FLAGS"):
        monkeypatch.setenv(name, "")  # so that the test's value is undone after it, whatever select sets
        monkeypatch.delenv(name)
    state = {"installed": {"tensorflow", "jax"}, "gpu": False}
    monkeypatch.setattr(backend, "installed", lambda module: module in state["installed"])
    monkeypatch.setattr(backend, "nvidia_gpu", lambda: state["gpu"])
    return state


def test_auto_is_tensorflow_on_a_cpu_and_jax_on_a_gpu_as_several_processes_or_without_tensorflow(machine, monkeypatch):
    assert backend.choose("auto") == "tensorflow"
    machine["gpu"] = True
    assert backend.choose("auto") == "jax"
    machine["installed"] = {"tensorflow"}  # a GPU but no JAX: TensorFlow
    assert backend.choose("auto") == "tensorflow"
    machine["gpu"], machine["installed"] = False, {"jax"}
    assert backend.choose("auto") == "jax"
    machine["installed"] = {"tensorflow", "jax"}
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "1")
    assert backend.choose("auto") == "jax"


def test_keras_backend_is_followed_by_auto_and_must_agree_with_an_explicit_choice(machine, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert backend.choose("auto") == "jax"
    assert backend.choose("jax") == "jax"
    with pytest.raises(StageError, match="asks for backend: tensorflow but KERAS_BACKEND=jax is set"):
        backend.choose("tensorflow")
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    with pytest.raises(StageError, match="KERAS_BACKEND=torch is not a backend this pipeline runs on"):
        backend.choose("auto")


def test_select_refuses_a_backend_that_is_not_installed_or_not_the_one_keras_runs_on(machine, monkeypatch):
    machine["installed"] = {"tensorflow"}
    with pytest.raises(StageError, match=r"the jax backend is chosen but jax is not installed here: `make install"):
        backend.select("jax")
    machine["installed"] = {"tensorflow", "jax"}
    import keras  # noqa: F401  this test process runs Keras on TensorFlow

    with pytest.raises(StageError, match="Keras is already running on tensorflow, not jax"):
        backend.select("jax")


def test_determinism_on_jax_asks_xla_for_deterministic_gpu_kernels_once(machine, monkeypatch):
    monkeypatch.delitem(sys.modules, "keras")  # as before Keras is imported (restored after the test)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    assert backend.select("jax", deterministic=True) == "jax"
    assert backend.select("jax", deterministic=True) == "jax"
    assert os.environ["XLA_FLAGS"] == f"--xla_cpu_foo=1 {backend.XLA_DETERMINISM}"
    assert os.environ["KERAS_BACKEND"] == "jax"


def test_the_cluster_comes_from_kerass_variables_or_a_slurm_step(monkeypatch):
    for name in ("KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    assert backend.cluster() == backend.Cluster(1, 0) and backend.cluster().writes
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.delenv("SLURM_SRUN_COMM_PORT", raising=False)
    assert backend.cluster() == backend.Cluster(1, 0)  # sbatch's script: one process, whatever the job's size
    monkeypatch.setenv("SLURM_SRUN_COMM_PORT", "40000")  # a task srun started
    assert backend.cluster() == backend.Cluster(4, 3) and not backend.cluster().writes
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "2")
    with pytest.raises(StageError, match=r"process id 2 is not one of the 2 processes \(0..1\)"):
        backend.cluster()
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "one")
    with pytest.raises(StageError, match="must be whole numbers"):
        backend.cluster()


def _encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt", "options"),
    [
        ("RGB", "JPEG", {"quality": 90}),  # 4:2:0 chroma, as prepare writes
        ("RGB", "JPEG", {"subsampling": 0}),
        ("L", "JPEG", {}),
        ("RGB", "PNG", {}),
        ("RGBA", "PNG", {}),
        ("P", "GIF", {}),
    ],
)
@pytest.mark.parametrize(("before", "after"), [((375, 500), (150, 150)), ((64, 48), (224, 224)), ((37, 91), (32, 32))])
def test_pillow_decodes_and_resizes_a_picture_as_tensorflow_does(mode, fmt, options, before, after):
    rng = np.random.default_rng(len(fmt) + before[0])
    pixels = (rng.random((*before, 4)) * 255).astype(np.uint8)
    picture = Image.fromarray(pixels, "RGBA").convert(mode)
    data = _encoded(np.asarray(picture), fmt, **options) if mode != "P" else _gif(picture)
    on_tensorflow = np.asarray(images.decode_bytes(data, after))  # this process runs Keras on TensorFlow
    with_pillow = images.decode_pillow(data, after)
    assert with_pillow.shape == on_tensorflow.shape == (*after, 3) and with_pillow.dtype == np.float32
    assert np.abs(with_pillow - on_tensorflow).max() <= SAME_PIXEL


def _gif(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, "GIF")
    return out.getvalue()


def test_batches_shuffle_alike_in_every_process_and_complete_the_last_batch_with_weightless_pictures(tmp_path):
    paths = []
    for i in range(10):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((8, 8, 3), i * 20, dtype=np.uint8)).save(paths[-1])
    labels = np.arange(10, dtype=np.int32)

    def epoch(batches: images.Batches) -> list:
        return [batches[i] for i in range(len(batches))]

    one = images.Batches(paths, (4, 4), 4, labels, shuffle=True, seed=3)
    first = np.concatenate([y for _, y in epoch(one)])
    assert sorted(first) == list(range(10))
    one.on_epoch_end()
    second = np.concatenate([y for _, y in epoch(one)])
    assert sorted(second) == list(range(10)) and list(second) != list(first)
    # two processes, a batch split over devices: each feeds half of each batch of the same order,
    # and the last batch (2 pictures of 10) is completed to 4 with pictures of weight 0
    halves = [
        images.Batches(paths, (4, 4), 4, labels, shuffle=True, seed=3, cluster=backend.Cluster(2, i), full=True)
        for i in range(2)
    ]
    parts = [epoch(half) for half in halves]
    assert all(len(p) == 3 and all(len(b[1]) == 2 for b in p) for p in parts)
    joined = np.concatenate([np.concatenate([parts[0][s][1], parts[1][s][1]]) for s in range(3)])
    weights = np.concatenate([np.concatenate([parts[0][s][2], parts[1][s][2]]) for s in range(3)])
    assert list(joined[:10]) == list(first) and list(weights) == [1] * 10 + [0, 0]
    # a picture's pixels: decoded as float32 0..255 (each file one grey level)
    x, y, _ = parts[0][0]
    assert x.shape == (2, 4, 4, 3) and np.allclose(x[:, 0, 0, 0], y * 20, atol=1e-3)
    with pytest.raises(StageError, match="a batch of 5 pictures does not split evenly over 2 processes"):
        images.Batches(paths, (4, 4), 5, labels, cluster=backend.Cluster(2, 0))


def _run_on_jax(
    script: str, *args: str, launch: int = 0, devices: int = 1, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`script` run on JAX with `args`; as `launch` processes (ops.launch), each with `devices` CPU devices."""
    command = [sys.executable, "-c", textwrap.dedent(script), *args]
    if launch:
        command = [sys.executable, "-m", "ops.launch", "--processes", str(launch), "--", *command]
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_a_model_saved_on_tensorflow_predicts_the_same_on_jax(tmp_path, tiny_params):
    from classifier import saving
    from classifier.model import backbones, heads

    base = backbones.build_backbone("vgg16", None, (32, 32))
    head = heads.build_head(tuple(base.output_shape[1:]), 3, tiny_params.top, "flatten")
    model = heads.build_classifier(base, head, "vgg16")
    saving.save_model(model, tmp_path / "model.keras")
    pictures = (np.random.default_rng(0).random((5, 32, 32, 3)) * 255).astype(np.float32)
    np.save(tmp_path / "pictures.npy", pictures)
    on_tensorflow = model.predict(pictures, verbose=0)
    _run_on_jax(
        """
        import json, sys, numpy as np, keras
        from classifier import inference
        from classifier.errors import StageError
        from classifier.model import devices, images
        assert keras.backend.backend() == "jax"
        folder = sys.argv[1]
        pictures = np.load(folder + "/pictures.npy")
        model = inference.load_model(folder + "/model.keras", "float32")
        np.save(folder + "/on_jax.npy", model.predict(pictures, verbose=0))
        # the same model loaded over this process's two devices: a batch of 5 is split 3 + 3, padded
        with devices.predicting():
            both = inference.load_model(folder + "/model.keras", "float32")
            np.save(folder + "/on_two_devices.npy", devices.predict_batch(both, pictures))
        try:
            images.dataset(images.Split(["a.jpg"] * 5, np.zeros(5, "int32"), ["a", "b"]), (32, 32), 5)
            refused = ""
        except StageError as err:
            refused = str(err)
        open(folder + "/refused.txt", "w").write(refused)
        """,
        str(tmp_path),
        devices=2,
    )
    on_jax = np.load(tmp_path / "on_jax.npy")
    assert on_jax.shape == on_tensorflow.shape == (5, 3)
    assert np.abs(on_jax - on_tensorflow).max() <= 1e-5
    assert np.abs(np.load(tmp_path / "on_two_devices.npy") - on_jax).max() <= 1e-6
    assert (tmp_path / "refused.txt").read_text() == (
        "a batch of 5 pictures does not split evenly over 2 devices: make the batch size a multiple of 2"
    )
