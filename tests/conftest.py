"""Shared fixtures: tiny generated data sets and a parameter set small enough for a CPU in seconds."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import keras
import pytest

from classifier import config
from classifier.data import cleaning, synthetic
from classifier.model import bottleneck, heads, training

# Tests send Ctrl-C to the stages they start. A shell starts a background job with SIGINT ignored,
# which its children inherit: the tests restore what a terminal's foreground job has.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: Small images, random backbone weights, one or two epochs: the shape of the real run, in seconds.
TINY: dict = {
    "seed": 7,
    "precision": "float32",  # the same numbers on every CPU; tests/classifier/model/test_devices.py covers the others
    "data": {
        "source": "synthetic",
        "seed": 7,
        "image_size": [32, 32],
        "max_side": 48,
        "min_side": 16,
        "split": {"train": 12, "validation": 6, "test": 6},
        "synthetic": {"classes": 2, "images_per_class": 24, "size": 40},
    },
    "model": {"backbone": "vgg16", "weights": None},
    "featurize": {"batch_size": 8},
    # Every epoch kept (patience null): the tests name the epoch a stage ends with.
    "top": {"units": 16, "epochs": 2, "batch_size": 8, "patience": None},
    "finetune": {"learning_rate": 0.01, "epochs": 1, "batch_size": 8, "patience": None},
    "evaluate": {"batch_size": 8},
    # Switched off here; tests/e2e/test_many_classes.py runs them end to end.
    "baseline": {"enabled": False},
    "ensemble": {"backbones": []},
    "audit": {"folds": 2},
    "export": {"formats": []},
}


def pytest_collection_modifyitems(items):
    """The slow tests first (a pipeline, a stage's process: marked `slow`), then the quick ones, each
    in file order: run side by side, the quick tests keep the workers busy while the last pipelines
    end, rather than a pipeline starting last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_runtest_teardown(item):
    """Loading an MLflow model puts its code folder first on sys.path (MLflow's doing), for good. A
    logged classifier's folder holds only the part of the `classifier` package it answers with, so
    a process started later with `spawn` (prepare's workers) would import that part, not the
    project: after each test, the folders MLflow added are taken off again."""
    sys.path[:] = [
        entry
        for entry in sys.path
        if not (Path(entry).name == "code" and ((Path(entry).parent / "MLmodel").is_file() or not Path(entry).exists()))
    ]


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    """Every test logs to its own MLflow store, never to the repository's mlflow.db."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture(scope="session")
def tiny_params() -> config.Params:
    return config.parse(TINY)


@pytest.fixture(scope="session")
def raw(tmp_path_factory, tiny_params) -> Path:
    """raw/<class>/<jpg> as the download stage leaves it: two classes of generated patterns."""
    out = tmp_path_factory.mktemp("raw")
    synthetic.generate(out, tiny_params.data.synthetic, tiny_params.data.seed)
    return out


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, raw, tiny_params) -> Path:
    """The prepare stage's output for `raw`: split images and manifest.csv."""
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    cleaning.prepare(raw, out, tiny_params.data, tiny_params.data.seed, workers=1)
    return out


@pytest.fixture
def http_root(tmp_path):
    """(folder, base URL): a static HTTP server on 127.0.0.1 serving `folder`, stopped after the test."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def features(tmp_path_factory, prepared, tiny_params) -> Path:
    """featurize's outputs for the tiny data: <split>.npz, meta.json and the backbone's weights."""
    out = tmp_path_factory.mktemp("features")
    base, _ = bottleneck.featurize(prepared, out / "features", tiny_params)
    base.save_weights(out / "backbone.weights.h5")
    return out


@pytest.fixture(scope="session")
def top(features, tiny_params) -> keras.Model:
    head, _ = training.train_top(
        bottleneck.load_features(features / "features", "train"),
        bottleneck.load_features(features / "features", "validation"),
        2,
        tiny_params.top,
        tiny_params.seed,
        heads.head_pool(tiny_params.top, tiny_params.model.backbone),
    )
    return head


@pytest.fixture(scope="session")
def team_stack():
    """The team stack (tests/teamstack.py), shared by tests/ops/test_team.py and tests/e2e/test_caching.py."""
    from tests import teamstack

    yield from teamstack.stack()


@pytest.fixture(scope="session")
def team_members(team_stack, tmp_path_factory):
    """alice and bob, who ran the tiny pipeline against the team stack at the same time
    (tests/teamstack.py)."""
    from tests import teamstack

    return teamstack.members(team_stack, tmp_path_factory)
