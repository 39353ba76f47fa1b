"""Using the model: the served pyfunc model answers as the model does and refuses a bad request in one
line; a registered version describes itself; `ops.predict` refuses what does not fit the model."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from ops import runner, tracking
from ops.serving import pyfunc, registry, server
from tests.classifier.data.test_pictures import rotated_jpeg, transparent_png
from tests.workspace import free_port, wait_until_answering

pytestmark = pytest.mark.xdist_group("serving")  # one worker: its module fixtures are built once

CLASSES = ["cat", "dog"]
SEND = pyfunc.WHAT_TO_SEND
NOT_AN_IMAGE = "not a picture in a format read here (JPEG, PNG, GIF, BMP, WebP or TIFF)"


def tiny_classifier(outputs: int = 1):
    """A 32x32 classifier on the vgg16 preprocessing (so it names its backbone), random but fixed weights."""
    import keras

    from classifier.model import backbones

    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            backbones.Preprocess("vgg16", name="preprocess"),
            keras.layers.Rescaling(1 / 255),  # probabilities well inside (0, 1): their equality means something
            keras.layers.Flatten(),
            keras.layers.Dense(outputs, activation="sigmoid" if outputs == 1 else "softmax"),
        ]
    )


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> SimpleNamespace:
    """The tiny classifier logged by `serving.log_model` as evaluate logs it, and registered as `clf`,
    in a store of its own; with two pictures and the loaded pyfunc model."""
    import mlflow

    folder = tmp_path_factory.mktemp("served")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    tiny_classifier().save(folder / "model.keras")
    pictures = [rotated_jpeg(folder / "phone.jpg"), transparent_png(folder / "logo.png")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        tracking.store.create_store(folder / "mlflow.db")  # as the stages make it: every location in the folder
        mlflow.set_tracking_uri(store)
        experiment = mlflow.create_experiment("serving", artifact_location=(folder / "mlartifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            outcome = registry.log_model(
                folder / "model.keras",
                CLASSES,
                0.5,
                "clf",
                0.875,
                test_set="0123456789abcdef.dir",
                max_side=48,
                precision="auto",
                min_side=16,
                max_pixels=89_478_485,  # data.max_pixels' default: the server's own limit is lower
                metrics={"accuracy": 0.875, "log_loss": 0.3125, "roc_auc": 0.9, "images": 80},
                about={
                    "model": "finetuned",
                    "what": "vgg16, last 1 block fine-tuned",
                    "version": "exp-3f2a1 finetune.learning_rate=0.0002",
                    "changed": {"finetune.learning_rate": 0.0002},
                },
            )
        uri = f"runs:/{run.info.run_id}/finetuned"
        model = mlflow.pyfunc.load_model(uri)
        description = mlflow.MlflowClient(store).get_model_version("clf", "1").description
        mlflow.set_tracking_uri(None)
    return SimpleNamespace(
        store=store, uri=uri, model=model, pictures=pictures, outcome=outcome, description=description, folder=folder
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def split_request(values: list) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}).encode()


def expected_rows(model, files: list[bytes]) -> list[dict]:
    """What the pyfunc model answers in Python for these files, as the scoring server's JSON rows."""
    return json.loads(model.predict(pd.DataFrame({"image": files})).to_json(orient="records"))


def assert_same_rows(answer: list[dict], expected: list[dict]) -> None:
    assert [row["label"] for row in answer] == [row["label"] for row in expected]
    for got, want in zip(answer, expected, strict=True):
        assert set(got) == {"label", "confidence", "p.cat", "p.dog"}
        for key in ("confidence", "p.cat", "p.dog"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7)


async def _asgi_post(app, body: bytes, content_type: str) -> tuple[int, str]:
    """POST /invocations straight into the ASGI app (no socket, no HTTP client library needed)."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/invocations",
        "raw_path": b"/invocations",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", content_type.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()


@pytest.fixture
def scoring_app(logged, monkeypatch):
    """The very app `mlflow models serve` runs for the logged model, called in-process."""
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server

    monkeypatch.setenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, "true")  # init sets it; restored after the test
    app = scoring_server.init(logged.model)
    return lambda body, content_type="application/json": asyncio.run(_asgi_post(app, body, content_type))


def test_the_scoring_app_answers_as_the_model_predicts(logged, scoring_app):
    files = [path.read_bytes() for path in logged.pictures]
    expected = expected_rows(logged.model, files)
    assert all(0.05 < row["p.dog"] < 0.95 for row in expected), "not saturated"
    assert abs(expected[0]["p.dog"] - expected[1]["p.dog"]) > 1e-3, "the model tells the two pictures apart"
    status, body = scoring_app(split_request([b64(f) for f in files]))
    assert status == 200, body
    assert_same_rows(json.loads(body)["predictions"], expected)
    records = json.dumps({"dataframe_records": [{"image": b64(f)} for f in files]}).encode()
    status, body = scoring_app(records)
    assert status == 200, body
    assert_same_rows(json.loads(body)["predictions"], expected)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (
            split_request([b64(b"a note, not a picture")]),
            None,
            f"row 0 is not a usable picture: {NOT_AN_IMAGE}. {SEND}",
        ),
        (split_request([""]), None, f"row 0 is not a usable picture: the file is empty. {SEND}"),
        (
            json.dumps({"dataframe_records": [{"picture": b64(b"x")}]}).encode(),
            None,
            f"no column 'image' in the request. {SEND}",
        ),
        (json.dumps({"dataframe_records": []}).encode(), None, f"no column 'image' in the request. {SEND}"),
        (split_request([]), None, f"no picture in the request (0 rows). {SEND}"),
        (b"image\nphoto.jpg\n", "text/csv", f"row 0 is text, not an image file. {SEND}"),
    ],
    ids=["not a picture", "empty file", "no image column", "no rows, no columns", "no rows", "csv text"],
)
def test_a_bad_request_is_refused_in_one_line(scoring_app, body, content_type, message):
    status, answer = scoring_app(body, content_type or "application/json")
    assert status == 400
    assert json.loads(answer) == {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": message,
        "sqlstate": "KAM00",
        "error_class": "INVALID_PARAMETER_VALUE",
    }
    assert "\n" not in message and "Traceback" not in answer


def test_a_bad_picture_is_named_by_its_row_and_base64_twice_is_recognised(logged, scoring_app):
    good = logged.pictures[0].read_bytes()
    status, answer = scoring_app(split_request([b64(good), b64(b"GIF89a broken"), b64(good)]))
    assert (status, json.loads(answer)["message"]) == (400, f"row 1 is not a usable picture: {NOT_AN_IMAGE}. {SEND}")
    status, answer = scoring_app(split_request([b64(b64(good).encode())]))
    assert status == 400
    assert json.loads(answer)["message"] == (
        "row 0 is the base64 of a picture, not the picture: it was encoded twice, or sent under inputs or "
        f"instances, whose base64 MLflow does not decode. {SEND}"
    )


def test_text_that_is_not_base64_is_refused_by_mlflow_in_one_line(scoring_app):
    """MLflow decodes the `binary` column before the model sees it, and refuses what it cannot decode
    itself: in one line too, without a traceback (the README quotes it)."""
    status, answer = scoring_app(split_request(["cat.jpg"]))
    assert status == 400
    assert json.loads(answer)["message"] == (
        "Invalid input. Data is not compatible with model signature. Failed to convert column image to type "
        "'<class 'object'>'. Error: 'Error('Incorrect padding')'"
    )
    assert "stack_trace" not in json.loads(answer)


def test_the_python_api_refuses_in_the_same_words(logged):
    with pytest.raises(MlflowException) as refused:
        logged.model.predict(pd.DataFrame({"image": [b"not a picture"]}))
    assert refused.value.message == f"row 0 is not a usable picture: {NOT_AN_IMAGE}. {SEND}"
    assert refused.value.get_http_status_code() == 400


def test_a_picture_prepare_would_drop_is_refused_not_scored(logged):
    """prepare drops pictures under data.min_side: the served model has never been measured on such a
    picture, so it refuses one rather than score it as confidently as any."""
    from mlflow.exceptions import MlflowException
    from PIL import Image

    from classifier.data import pictures

    dot = pictures.jpeg_bytes(Image.new("RGB", (1, 1), (200, 30, 30)))
    fine = pictures.jpeg_bytes(Image.new("RGB", (40, 16), (200, 30, 30)))
    assert len(logged.model.predict(pd.DataFrame({"image": [fine]}))) == 1
    with pytest.raises(MlflowException) as refused:
        logged.model.predict(pd.DataFrame({"image": [fine, dot]}))
    assert refused.value.message == (
        f"row 1 is too small to classify: {pictures.REASONS['too_small']} (1x1, under data.min_side = 16). {SEND}"
    )
    assert refused.value.get_http_status_code() == 400


#: Loads a logged model in a process where the project cannot be imported from its checkout (nor
#: from the editable install): only what the model ships. Prints where `classifier` came from and
#: the model's answer for one picture.
SHIPPED_ONLY = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path[:] = [p for p in sys.path if p and p.rstrip("/") != sys.argv[2]]
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
import classifier
print(classifier.__file__)
print(model.predict(pd.DataFrame({"image": [open(sys.argv[3], "rb").read()]})).to_json(orient="records"))
"""


def test_the_logged_model_ships_only_the_code_it_answers_with_and_runs_on_it_alone(logged, tmp_path):
    import mlflow

    from ops import code

    mlflow.set_tracking_uri(logged.store)
    try:
        model_id = mlflow.models.get_model_info(logged.uri).model_id
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "model")))
    finally:
        mlflow.set_tracking_uri(None)
    shipped = sorted(p.relative_to(local / "code").as_posix() for p in (local / "code").rglob("*.py"))
    wanted = code.files_of(code.closure("ops.serving.pyfunc") - {"ops.serving.pyfunc"})
    assert shipped == [p.as_posix() for p in wanted]
    assert "classifier/inference.py" in shipped and "classifier/data/pictures.py" in shipped
    assert not [p for p in shipped if p.startswith("ops/") or p.endswith(("sources.py", "archives.py", "fetch.py"))]
    done = subprocess.run(
        [sys.executable, "-c", SHIPPED_ONLY, logged.uri, str(code.ROOT), str(logged.pictures[0])],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": logged.store, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    where, answer = done.stdout.strip().splitlines()[-2:]
    assert not where.startswith(str(code.ROOT)) and "/code/classifier/" in where
    assert json.loads(answer) == expected_rows(logged.model, [logged.pictures[0].read_bytes()])


def test_a_store_whose_model_is_stored_in_another_folder_is_refused_before_its_code_runs(logged, tmp_path):
    """A copied store whose registered version's storage was pointed at a folder outside it (holding a
    model whose code writes a file): `ops.serving` refuses in one line and never loads that model."""
    import shutil
    import sqlite3

    import yaml

    copy = tmp_path / "copy"
    shutil.copytree(logged.folder, copy)
    evil = tmp_path / "elsewhere"
    shutil.copytree(next((copy / "mlartifacts" / "models").glob("*/artifacts")), evil)
    flavor = yaml.safe_load((evil / "MLmodel").read_text())["flavors"]["python_function"]
    marker = tmp_path / "ran"
    (evil / Path(flavor["model_code_path"]).name).write_text(f"open({str(marker)!r}, 'w').close()\n")
    with contextlib.closing(sqlite3.connect(copy / "mlflow.db")) as db:
        db.execute("UPDATE model_versions SET storage_location = ?", (evil.as_uri(),))
        db.commit()
    done = subprocess.run(
        [sys.executable, "-m", "ops.serving", "models:/clf/1", "--port", str(free_port())],
        cwd=copy,
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
            "PYTHONPATH": str(Path(pyfunc.__file__).parents[2]),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    refused = done.stderr.splitlines()[-1]
    assert refused.startswith(f"error: The MLflow store {copy / 'mlflow.db'} keeps artifacts outside {copy} (")
    assert f"model_versions.storage_location {evil.as_uri()!r}" in refused
    assert not marker.exists()


def test_a_registered_version_describes_itself(logged):
    assert logged.outcome == "clf v1: candidate and champion (test accuracy 0.8750, the first champion)"
    # which model of which version first (the registry's list shows the first line), then the details
    assert logged.description.splitlines() == [
        "finetuned model of exp-3f2a1 finetune.learning_rate=0.0002: vgg16, last 1 block fine-tuned",
        "",
        "- params changed from the committed params.yaml: finetune.learning_rate=0.0002",
        "- test metrics: accuracy 0.8750, log loss 0.3125",
        "- test set: 0123456789abcdef.dir (80 images, the DVC hash of the prepared data it was scored on)",
        "- classes (2): cat, dog",
        "- backbone: vgg16",
    ]


def test_names_from_a_data_set_are_shown_not_rendered_in_a_description():
    """Class names, a version name and a param value that hold HTML, a link, an image, code or
    emphasis: the description renders (CommonMark with tables and strike-through, as the registry
    page) to text that shows each as it is, and to no element of theirs."""
    import html

    from markdown_it import MarkdownIt

    classes = [
        "<img src=x onerror=alert(1)>",
        "[click](http://x.example)",
        "![i](http://x.example/i.png)",
        "**b** _c_ `d`",
    ]
    about = {"model": "top", "version": "v<script>1</script>", "changed": {"data.source": "http://x.example/<b>.tgz"}}
    text = registry.describe(classes, "h&lt;", "vgg16", 0.5, {}, about)
    rendered = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(text)
    assert not re.search(r"<(img|a|script|b|strong|em|code|del)\b", rendered), rendered
    shown = html.unescape(re.sub(r"<[^>]+>", "", rendered))
    for name in [*classes, "v<script>1</script>", "data.source=http://x.example/<b>.tgz", "h&lt;"]:
        assert name in shown


def test_a_description_names_the_first_classes_of_many(tmp_path):
    import mlflow

    classes = [f"breed{i:03d}" for i in range(120)]
    text = registry.describe(classes, None, None, 0.5, {})
    assert text.splitlines() == [
        "a model of an unknown pipeline version: a classifier",
        "",
        "- params changed from the committed params.yaml: unknown (no committed params.yaml)",
        "- test metrics: accuracy 0.5000",
        "- test set: unknown (the DVC hash of the prepared data it was scored on)",
        "- classes (120): " + ", ".join(classes[:10]) + ", ... (the first 10; all in the model's artifacts/spec.json)",
        "- backbone: unknown",
    ]
    # register() sets it on the new version, whatever the champion decision
    mlflow.set_tracking_uri(tracking.tracking_uri())
    registry.register((tmp_path / "model").as_uri(), "many", 0.5, None, run_id="r", description=text)
    assert mlflow.MlflowClient(tracking.tracking_uri()).get_model_version("many", "1").description == text
    mlflow.set_tracking_uri(None)


def post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


@pytest.mark.slow
def test_mlflow_models_serve_answers_and_refuses_in_one_line(logged, tmp_path):
    """The real `mlflow models serve` on 127.0.0.1, started from the store as a user would, in a
    folder without the project's code (the model brings its own), stopped at the end."""
    port = free_port()
    bin_dir = Path(sys.executable).parent  # mlflow runs uvicorn from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": logged.store,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    env.pop("PYTHONPATH", None)
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", logged.uri, "--env-manager", "local"]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: uvicorn is its child, stopped with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{url}/ping", server, tmp_path / "server.log")

        files = [path.read_bytes() for path in logged.pictures]
        status, body = post(f"{url}/invocations", split_request([b64(f) for f in files]))
        assert status == 200, body
        assert_same_rows(json.loads(body)["predictions"], expected_rows(logged.model, files))

        status, body = post(f"{url}/invocations", split_request([b64(b"a note, not a picture")]))
        assert (status, json.loads(body)["message"]) == (400, f"row 0 is not a usable picture: {NOT_AN_IMAGE}. {SEND}")
        assert "Traceback" not in body and "stack_trace" not in body
        status, body = post(f"{url}/invocations", json.dumps({"dataframe_records": [{"img": b64(files[0])}]}).encode())
        assert (status, json.loads(body)["message"]) == (400, f"no column 'image' in the request. {SEND}")
        assert "Traceback" not in body and "stack_trace" not in body
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


# ops.predict ------------------------------------------------------------------------------


def run_predict(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`python -m ops.predict *args` in this process: its exit code and what it printed to stderr."""
    from ops import predict

    monkeypatch.setattr("sys.argv", ["predict", *args])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stopped:
            runner.run(predict.main)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("outputs", "classes", "predicts"), [(1, ["a", "b", "c"], "2 (one sigmoid output)"), (3, CLASSES, "3")]
)
def test_predict_refuses_classes_that_do_not_match_the_model(tmp_path, monkeypatch, capsys, outputs, classes, predicts):
    tiny_classifier(outputs).save(tmp_path / "model.keras")
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    picture = rotated_jpeg(tmp_path / "phone.jpg")
    model, names = tmp_path / "model.keras", tmp_path / "classes.json"
    code, err = run_predict(monkeypatch, capsys, str(picture), "--model", str(model), "--classes", str(names))
    assert code == 2
    assert err == (
        f"error: {names} names {len(classes)} classes but {model} predicts {predicts}: "
        "give the classes file written with this model (--classes)\n"
    )


def test_predict_names_the_missing_image_and_asks_for_a_build_only_without_a_model(tmp_path, monkeypatch, capsys):
    model, names = tmp_path / "model.keras", tmp_path / "classes.json"
    names.write_text(json.dumps(CLASSES))
    tiny_classifier().save(model)
    picture = rotated_jpeg(tmp_path / "phone.jpg")
    args = ["--model", str(model), "--classes", str(names)]

    code, err = run_predict(
        monkeypatch, capsys, str(picture), str(tmp_path / "cat.jpg"), str(tmp_path / "dog.png"), *args
    )
    assert (code, err) == (2, f"error: image not found: {tmp_path / 'cat.jpg'}, {tmp_path / 'dog.png'}\n")

    code, err = run_predict(
        monkeypatch, capsys, str(picture), "--model", str(tmp_path / "none.keras"), "--classes", str(names)
    )
    assert code == 2
    assert err == (
        f"error: not found: {tmp_path / 'none.keras'} (build the model with `dvc repro` first, or name it with "
        "--model and --classes)\n"
    )


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--top", "0", "argument --top: 0 is less than 1"),
        ("--top", "-1", "argument --top: -1 is less than 1"),
        ("--batch-size", "0", "argument --batch-size: 0 is less than 1"),
        ("--batch-size", "-1", "argument --batch-size: -1 is less than 1"),
        ("--top", "two", "argument --top: 'two' is not a whole number"),
    ],
)
def test_predict_refuses_a_count_under_one_instead_of_printing_nothing(
    tmp_path, monkeypatch, capsys, option, value, said
):
    picture = rotated_jpeg(tmp_path / "phone.jpg")
    code, err = run_predict(monkeypatch, capsys, str(picture), option, value)
    assert code == 2 and err.splitlines()[-1].endswith(said)


def test_predict_refuses_a_classes_file_that_names_a_class_twice(tmp_path, monkeypatch, capsys):
    tiny_classifier(3).save(tmp_path / "model.keras")
    names = tmp_path / "classes.json"
    names.write_text(json.dumps(["cat", "dog", "cat"]))
    picture = rotated_jpeg(tmp_path / "phone.jpg")
    code, err = run_predict(
        monkeypatch, capsys, str(picture), "--model", str(tmp_path / "model.keras"), "--classes", str(names)
    )
    assert code == 2
    assert err == (
        f"error: {names} names 'cat' more than once: two outputs of the model would print the same label. "
        "Give the classes file written with this model (--classes)\n"
    )


def test_predict_says_a_model_file_that_is_no_keras_model_is_not_one(tmp_path, monkeypatch, capsys):
    (tmp_path / "model.keras").write_bytes(b"these bytes are no model")
    names = tmp_path / "classes.json"
    names.write_text(json.dumps(CLASSES))
    picture = rotated_jpeg(tmp_path / "phone.jpg")
    model = tmp_path / "model.keras"
    code, err = run_predict(monkeypatch, capsys, str(picture), "--model", str(model), "--classes", str(names))
    assert code == 2
    assert err.startswith(
        f"error: {model} is not a Keras model file (.keras, as `dvc repro` writes models/model.keras)"
    )
    assert len(err.splitlines()) == 1


# Limits of the served model (serving.check_limits) and of its server (stages/serve.py) -------------


def png(width: int, height: int) -> bytes:
    """A one-colour PNG: a few hundred bytes, however many pixels its header says."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("files", "said"),
    [
        ([png(1, 1)] * 5000, "5000 pictures in one request; at most 64: send them in several requests"),
        ([b"x" * (pyfunc.MAX_REQUEST_BYTES + 1)], f"{pyfunc.MAX_REQUEST_BYTES + 1} bytes of pictures in one request"),
        ([png(20, 20), png(5001, 5000)], "row 1 is 5001x5000 = 25005000 pixels; at most 25000000 per picture"),
        ([png(4000, 4000)] * 7, "the pictures up to row 6 hold 112000000 pixels; at most 100000000 in one request"),
    ],
)
def test_a_request_over_the_models_limits_is_refused_before_any_decoding(files, said):
    started = time.perf_counter()
    with pytest.raises(pyfunc.BadRequest) as refused:
        pyfunc.check_limits(files)
    assert refused.value.message.startswith(said) and refused.value.get_http_status_code() == 400
    assert time.perf_counter() - started < 1.0, "from the headers alone"


def test_a_lower_data_max_pixels_is_the_limit_per_picture():
    pyfunc.check_limits([png(100, 100)], max_pixels=10_000)
    with pytest.raises(pyfunc.BadRequest, match=r"row 0 is 101x100 = 10100 pixels; at most 10000 per picture"):
        pyfunc.check_limits([png(101, 100)], max_pixels=10_000)


def guarded(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes], **limits):
    """POST /invocations to serve.Guard(app) with these headers and body chunks: (status, answer)."""

    guard = server.Guard(app, **limits)
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}
    asyncio.run(guard(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


async def never_called(scope, receive, send):
    raise AssertionError("the guard let it through")


def answering(got: list[bytes]):
    """An ASGI app that answers 200 to every request, keeping each body it read in `got`."""

    async def app(scope, receive, send):
        got.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def test_the_server_refuses_what_the_model_cannot_take_before_reading_it():
    json_type = [(b"content-type", b"application/json")]
    status, answer = guarded(never_called, [(b"content-type", b"application/vnd.apache.parquet")], [b"PAR1"])
    assert (status, answer["message"].split(":")[0]) == (415, "content type 'application/vnd.apache.parquet'")
    status, answer = guarded(never_called, [*json_type, (b"content-length", b"999999999")], [b""])
    assert status == 413 and answer["message"].startswith("the request is over ")
    status, _ = guarded(never_called, json_type, [b"[" * 600, b"]" * 600], max_body=1000)  # no length given
    assert status == 413
    status, answer = guarded(never_called, json_type, [b"[" * 100_000 + b"]" * 100_000])
    assert status == 400 and answer["message"].startswith(
        "the request nests or lists more than a request of at most 64"
    )


def test_the_server_lets_a_request_within_the_limits_through_whole():
    got: list[bytes] = []
    app = answering(got)

    body = split_request([b64(png(10, 10))] * 3)
    status, _ = guarded(app, [(b"content-type", b"application/json; charset=utf-8")], [body[:50], body[50:]])
    assert (status, got) == (200, [body])


def test_a_busy_server_answers_503_at_once_rather_than_queue_without_end():

    async def scenario() -> list[int]:
        release = asyncio.Event()

        async def slow(scope, receive, send):
            await receive()
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        guard = server.Guard(slow, slots=1, waiting=1)
        statuses: list[int] = []

        async def request() -> None:
            async def receive() -> dict:
                return {"type": "http.request", "body": b"{}", "more_body": False}

            async def send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            scope = {"type": "http", "path": "/invocations", "headers": [(b"content-type", b"application/json")]}
            await guard(scope, receive, send)

        tasks = [asyncio.create_task(request()) for _ in range(3)]  # one served, one waiting, one refused
        await asyncio.sleep(0.2)
        assert statuses == [503]
        release.set()
        await asyncio.gather(*tasks)
        return statuses

    assert asyncio.run(scenario()) == [503, 200, 200]


# Slow and wide requests: read under a deadline, refused before parsing, given up past the timeout --


JSON = [(b"content-type", b"application/json")]


@pytest.mark.parametrize(
    "body",
    [
        b'{"dataframe_records": [{' + b",".join(b'"k%d": 1' % i for i in range(1_000_000)) + b"}]}",
        b'{"dataframe_split": {"columns": ["image"], "data": [[' + b",".join([b"0"] * 1_000_000) + b"]]}}",
        b'{"inputs": [' + b",".join([b'"a"'] * 1_000_000) + b"]}",
    ],
    ids=["a row of a million keys", "a row of a million numbers", "a flat list of a million strings"],
)
def test_a_wide_json_is_refused_before_it_is_parsed(body):
    status, answer = guarded(never_called, JSON, [body])
    assert status == 400
    assert answer["message"].startswith("the request holds more values than a request of at most 64 pictures does.")


@pytest.mark.parametrize(
    "body",
    [
        b'{"dataframe_split": {"columns": ["image"], "data": [[' + b"9" * 1_000_000 + b"]]}}",
        b'{"dataframe_records": [{"image": -' + b"1" * 33 + b"}]}",
        b"7" * 5000,
    ],
    ids=["a million digits", "33 digits", "a number alone"],
)
def test_a_number_no_parser_would_read_is_refused_in_one_line(body):
    status, answer = guarded(never_called, JSON, [body])
    assert (status, answer["message"].split(".")[0]) == (
        400,
        "the request holds a number of more than 32 digits, which no request for this model has",
    )


def test_the_widest_request_the_model_takes_goes_through():
    got: list[bytes] = []
    app = answering(got)

    records = json.dumps({"dataframe_records": [{"image": b64(png(2, 2))}] * pyfunc.MAX_ROWS}).encode()
    split = json.dumps(
        {
            "dataframe_split": {
                "index": list(range(10**31, 10**31 + 64)),
                "columns": ["image"],
                "data": [[b64(png(2, 2))]] * 64,
            }
        }
    ).encode()
    for body in (records, split):
        assert guarded(app, JSON, [body])[0] == 200
    assert got == [records, split]


def test_stalled_bodies_hold_no_slot_and_are_answered_408_with_the_connection_closed():
    """Five clients send headers and one byte of a 100,000-byte body; one slot, one waiting place.
    A whole request sent meanwhile is served at once, and each stalled one gets 408 at the deadline."""

    async def scenario() -> tuple[list, list]:
        served: list[bytes] = []
        guard = server.Guard(answering(served), slots=1, waiting=1, read_seconds=1.0)
        answers: list[tuple[str, int, list]] = []

        async def request(name: str, chunks: list[bytes], stall: bool) -> None:
            queue = [
                {"type": "http.request", "body": c, "more_body": stall or i < len(chunks) - 1}
                for i, c in enumerate(chunks)
            ]

            async def receive() -> dict:
                if queue:
                    return queue.pop(0)
                await asyncio.Event().wait()  # the rest never comes
                raise AssertionError

            async def send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    answers.append((name, message["status"], message["headers"]))

            length = [(b"content-length", b"100000")] if stall else []
            await guard({"type": "http", "path": "/invocations", "headers": JSON + length}, receive, send)

        stalled = [asyncio.create_task(request(f"stalled {i}", [b"{"], stall=True)) for i in range(5)]
        await asyncio.sleep(0.1)
        await request("whole", [b'{"dataframe_split"', b": {}}"], stall=False)
        early = list(answers)
        await asyncio.gather(*stalled)
        return early, answers, served

    early, answers, served = asyncio.run(scenario())
    assert early == [("whole", 200, [])]
    assert served == [b'{"dataframe_split": {}}']
    close = (b"connection", b"close")
    assert sorted((name, status, close in headers) for name, status, headers in answers[1:]) == [
        (f"stalled {i}", 408, True) for i in range(5)
    ]


def test_bodies_beyond_what_may_be_held_at_once_are_told_to_come_back():
    status, answer = guarded(never_called, JSON, [b"{" * 10, b"}" * 10], held_bytes=15)
    assert (status, answer["message"]) == (503, "the model is busy: try again in a moment")


@pytest.fixture
def http_server():
    """uvicorn with the guard's protocol (read_seconds 0.5) around an app that answers 200, on 127.0.0.1."""
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    protocol = type("Protocol", (server.Protocol,), {"read_seconds": 0.5})
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="warning", lifespan="off")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield port
    running.should_exit = True
    thread.join(timeout=30)


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the server closed `sock` within `seconds`, what it sent before)."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return False, got
    return True, got


def test_a_connection_whose_headers_stall_is_closed(http_server):
    with (
        socket.create_connection(("127.0.0.1", http_server)) as silent,
        socket.create_connection(("127.0.0.1", http_server)) as trickling,
    ):
        trickling.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for _ in range(4):  # a header line every 0.2 s: never quiet long enough for a keep-alive timeout
            time.sleep(0.2)
            try:
                trickling.sendall(b"X-A: b\r\n")
            except OSError:
                break
        assert closed_within(silent, 5) == (True, b"")
        assert closed_within(trickling, 5) == (True, b"")
        assert time.monotonic() - started < 5


def test_a_connection_that_asks_in_time_is_answered_and_kept(http_server):
    with socket.create_connection(("127.0.0.1", http_server)) as client:
        for _ in range(3):  # three requests on one connection, each within the deadline of the last answer
            time.sleep(0.3)
            client.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            client.settimeout(5)
            answer = b""
            while not answer.endswith(b"\r\n\r\nok"):
                answer += client.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200")


def test_a_request_past_the_timeout_is_given_up_before_its_next_picture(logged, monkeypatch):
    from classifier.model import images

    model = logged.model.unwrap_python_model()
    decoded = []
    real = images.model_input

    def slow(*args, **kwargs):
        decoded.append(time.monotonic())
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "model_input", slow)
    monkeypatch.setattr(model, "seconds", 1.0)
    frame = pd.DataFrame({"image": [logged.pictures[0].read_bytes()] * 10})
    started = time.monotonic()
    with pytest.raises(MlflowException) as given_up:  # the model's own module's BadRequest
        model.predict(None, frame)
    assert given_up.value.message.startswith(
        "the request was given up after 1 s (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT), 4 of 10 pictures decoded"
    )
    assert given_up.value.get_http_status_code() == 503
    assert len(decoded) == 4 and decoded[-1] - started < 1.0


def test_a_request_that_waited_out_its_timeout_for_the_model_does_nothing(logged, monkeypatch):
    model = logged.model.unwrap_python_model()
    monkeypatch.setattr(model, "seconds", 0.3)
    frame = pd.DataFrame({"image": [logged.pictures[0].read_bytes()]})
    waited = r"given up after 0.3 s .*, waiting for the requests before it"
    with model.busy, pytest.raises(MlflowException, match=waited):  # another request holds the model
        model.predict(None, frame)
    assert model.predict(None, frame)["label"].tolist() == [logged.model.predict(frame)["label"][0]]


#: The most memory requests may add to the idle server's under the load test below (README: "Serving
#: the model"); the idle server (TensorFlow, MLflow, the model) holds about 0.8 GB.
MEMORY_CEILING = 512 * 2**20


#: A request that sends its headers and one byte of the body it announces, then nothing.
STALLED = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"


@pytest.mark.slow
def test_hostile_requests_at_once_keep_the_server_under_its_memory_ceiling(logged, tmp_path):
    """`python -m ops.serving --read-timeout 5` on 127.0.0.1, sent at once after ten connections
    that stall their bodies: thousands of tiny pictures, pictures at the pixel limits, a compressed
    table, deep JSON, a row of 4 million keys, a flat list of 16 million numbers, one plain picture.
    Each gets its answer (the plain picture 200: the stalled connections hold no slot), the stalled
    ones get 408 and are closed, and the process's peak memory stays within MEMORY_CEILING of its
    idle size."""
    import concurrent.futures

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged.store, "PYTHONPATH": str(Path(pyfunc.__file__).parents[2])}
    out = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.serving", logged.uri, "--port", str(port), "--read-timeout", "5"],
        cwd=tmp_path,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/invocations"
    stalled: list[socket.socket] = []
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/ping", process, tmp_path / "server.log")
        idle = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{process.pid}/status").read_text())[1]) * 1024
        tiny = split_request([b64(png(1, 1))] * 5000)
        full = split_request([b64(png(1250, 1250))] * 64)  # 100 million pixels: the most one request takes
        large = split_request([b64(png(5000, 5000))])  # 25 million pixels: the most one picture has
        deep = b"[" * 200_000 + b"]" * 200_000
        wide = b'{"dataframe_records": [{' + b",".join(b'"k%d": 1' % i for i in range(4_000_000)) + b"}]}"
        flat = b'{"inputs": [' + b"0," * 16_000_000 + b"0]}"
        requests = [(tiny, "application/json")] * 3 + [(full, "application/json")] * 2
        requests += [(large, "application/json")] * 2 + [
            (deep, "application/json"),
            (b"PAR1" * 3000, "application/vnd.apache.parquet"),
            (wide, "application/json"),
            (flat, "application/json"),
            (split_request([b64(logged.pictures[0].read_bytes())]), "application/json"),
        ]

        def send(body_type: tuple[bytes, str]) -> int:
            request = urllib.request.Request(url, data=body_type[0], headers={"Content-Type": body_type[1]})
            try:
                with urllib.request.urlopen(request, timeout=300) as answer:
                    return answer.status
            except urllib.error.HTTPError as refused:
                return refused.code

        for _ in range(10):
            stalled.append(socket.create_connection(("127.0.0.1", port)))
            stalled[-1].sendall(STALLED)
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            statuses = list(pool.map(send, requests))
        answers = [closed_within(connection, 30) for connection in stalled]
        peak = int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{process.pid}/status").read_text())[1]) * 1024
    finally:
        for connection in stalled:
            connection.close()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        out.close()
    assert statuses[:3] == [400] * 3, "5000 pictures: over the rows limit"
    assert set(statuses[3:7]) <= {200, 503}, statuses  # within the limits: answered, or told to come back
    assert statuses[7:] == [400, 415, 400, 400, 200], statuses
    assert [(closed, said.split(b"\r\n")[0]) for closed, said in answers] == [
        (True, b"HTTP/1.1 408 Request Timeout")
    ] * 10
    print(f"server memory: {idle / 2**20:.0f} MB idle, peak {peak / 2**20:.0f} MB")
    assert peak - idle < MEMORY_CEILING, f"peak {peak / 2**20:.0f} MB, idle {idle / 2**20:.0f} MB"
